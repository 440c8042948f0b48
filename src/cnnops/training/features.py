"""What the layers see: the first convolution's filters, and feature maps early, midway and late.

The lecture's feature-visualisation slide, on the user's own model: early layers respond to edges
and textures, deeper ones to parts and objects. Two pictures: the first convolution's filters as
an image grid, and for a few images the most active channels of an early, a middle and a late
convolution (the first, the middle and the last Conv2d of the network, in definition order).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from cnnops.data.splits import PreparedSplit
from cnnops.models import Classifier
from cnnops.training.plots import PLAIN_TEXT, figure_image

log = logging.getLogger(__name__)

FILTER_SIDE = 24  # each filter enlarged to about this many pixels a side (a 5x5 kernel: 4x)
MAP_CHANNELS = 8  # the most active channels of each layer shown for each image
SHOWN_IMAGES = 3  # images of a split whose feature maps are shown
MAPS = plt.get_cmap("viridis").with_extremes(bad="white")


@dataclass(frozen=True)
class FeaturePictures:
    """The two pictures, as PIL images (the gallery embeds them, the run logs them as PNG)."""

    filters: Image.Image  # the first convolution's filters
    maps: Image.Image  # rows: images; columns: the image, then each probed layer's maps
    layers: tuple[str, ...]  # the probed convolutions' module paths


def convolutions(model: Classifier) -> list[str]:
    """Module paths of the network's Conv2d layers, in definition order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def probed_layers(model: Classifier) -> list[str]:
    """The first, the middle and the last convolution (fewer when the network has fewer)."""
    convs = convolutions(model)
    picks = sorted({0, (len(convs) - 1) // 2, len(convs) - 1}) if convs else []
    return [convs[i] for i in picks]


def pictures(model: Classifier, images: torch.Tensor) -> FeaturePictures | None:
    """Both pictures for `images` (N x C x H x W float [0, 1]); None when the network has no
    convolution (the MLP), said in the log."""
    layers = probed_layers(model)
    if not layers:
        log.info("%s has no convolution: no filters or feature maps to show", model.spec.model)
        return None
    maps = _activations(model, images, layers)
    first = model.get_submodule(layers[0]).weight.detach().cpu().float()
    return FeaturePictures(_filter_grid(first), _maps_figure(images.cpu(), maps), tuple(layers))


def split_pictures(model: Classifier, split: PreparedSplit) -> FeaturePictures | None:
    """Both pictures for `SHOWN_IMAGES` images spread over `split` (which is in class order), at the
    model's input size."""
    picks = np.linspace(0, len(split) - 1, min(SHOWN_IMAGES, len(split))).round().astype(int)
    return pictures(model, split.floats(picks.tolist(), model.spec.image_size))


def _activations(model: Classifier, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each layer's output for `images`, in eval mode, without gradients.

    Forward hooks by hand: torchvision's create_feature_extractor traces with FX, whose node names
    miss convolutions inside Conv2dNormActivation (convnext_tiny, efficientnet_b0, mobilenet_v3);
    the output is cloned, as an in-place activation after it would overwrite it.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach().float().cpu().clone())
        )
        for name in layers
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(images.to(model.mean.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def _filter_grid(weight: torch.Tensor) -> Image.Image:
    """Filters (O x I x kh x kw) as a grid, each scaled to its own range: RGB when they read three
    channels, grey otherwise (their mean over the input channels)."""
    tiles = weight if weight.shape[1] == 3 else weight.mean(1, keepdim=True)
    side = math.ceil(math.sqrt(len(tiles)))
    grid = make_grid(tiles, nrow=side, padding=1, normalize=True, scale_each=True, pad_value=1)
    picture = _pil(grid)
    scale = max(1, FILTER_SIDE // max(weight.shape[-2:]))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _channel_grid(maps: torch.Tensor) -> np.ndarray:
    """One image's most active channels (C x h x w) as one grid, each map scaled to its own range."""
    strongest = maps.mean((1, 2)).argsort(descending=True)[:MAP_CHANNELS]
    chosen = maps[strongest].unsqueeze(1)
    grid = make_grid(
        chosen, nrow=math.ceil(len(chosen) / 2), normalize=True, scale_each=True, pad_value=math.nan
    )
    return grid[0].numpy()  # the padding NaN: drawn white (MAPS' "bad" colour)


def _maps_figure(images: torch.Tensor, maps: dict[str, torch.Tensor]) -> Image.Image:
    """Rows: images; columns: the image, then its strongest channels at each probed layer."""
    rows, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), dpi=80, squeeze=False)
    for r in range(rows):
        picture = images[r].permute(1, 2, 0).numpy()
        axes[r][0].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
        for c, (name, out) in enumerate(maps.items(), start=1):
            axes[r][c].imshow(_channel_grid(out[r]), cmap=MAPS)
            if r == 0:
                shape = "x".join(str(n) for n in out.shape[1:])
                axes[r][c].set_title(f"{name}\n{shape}", fontsize=7, **PLAIN_TEXT)
        for ax in axes[r]:
            ax.axis("off")
    axes[0][0].set_title("image", fontsize=7)
    return figure_image(fig)


def _pil(grid: torch.Tensor) -> Image.Image:
    """A make_grid tensor (3 x H x W in [0, 1]) as a PIL image."""
    return Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8))


def save(found: FeaturePictures, folder: Path) -> list[Path]:
    """Write both pictures as PNG into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "first_conv_filters.png", folder / "feature_maps.png"]
    for picture, path in zip((found.filters, found.maps), written, strict=True):
        picture.save(path)
    return written
