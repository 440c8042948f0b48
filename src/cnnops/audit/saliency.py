"""Saliency maps for any cnnops model, in batches: Grad-CAM, Grad-CAM++ and Score-CAM.

Saliency only says where to intervene; the evidence module decides. Grad-CAM and Grad-CAM++ come
from the `grad-cam` package. Score-CAM is written here because the package's version runs one
image at a time behind a progress bar; ours masks a whole batch of images with every channel at
once, which is what makes the audit affordable on a CPU.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from torch import nn

from cnnops.errors import ConfigError
from cnnops.models import Classifier

METHODS = ("gradcam", "gradcam++", "scorecam")
_NO_CONV_FAMILIES = ("vit_", "swin_")  # token grids need a reshape transform the audit does not guess


def find_target_layer(model: Classifier, dotted: str | None = None) -> tuple[str, nn.Module]:
    """The layer whose activations the CAMs weight: `dotted` (relative to the bare network) or found.

    Found = the last top-level block of the network that contains a convolution and still outputs a
    spatial map (H, W > 1): `features` for the small ConvNet, VGG, AlexNet, MobileNet, EfficientNet,
    ConvNeXt and DenseNet, `layer4` for ResNets, `trunk_output` for RegNets, `Mixed_7c` for
    Inception. One rule instead of a table, so a new torchvision family needs no entry.
    """
    net = model.net
    names = dict(net.named_modules())
    if dotted is not None:
        if dotted not in names or dotted == "":
            close = difflib.get_close_matches(dotted, [n for n in names if n], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"audit.target_layer: {dotted!r} is not a module of {model.spec.model}{hint}; "
                "give a dotted path relative to the network, e.g. 'layer4' or 'features.7'"
            )
        return dotted, names[dotted]
    if model.spec.model.startswith(_NO_CONV_FAMILIES):
        raise ConfigError(
            f"audit: {model.spec.model} is a transformer without a convolutional feature map; "
            "the audit supports convolutional networks (set train.model to one)"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        child.register_forward_hook(lambda _m, _i, out, n=name: shapes.__setitem__(n, tuple(out.shape)))
        for name, child in net.named_children()
    ]
    try:
        with torch.no_grad():
            h, w = model.spec.image_size
            model(torch.zeros(1, model.spec.in_channels, h, w, device=_device_of(model)))
    finally:
        for hook in hooks:
            hook.remove()
    for name, child in reversed(list(net.named_children())):
        has_conv = any(isinstance(m, nn.Conv2d) for m in child.modules())
        shape = shapes.get(name, ())
        if has_conv and len(shape) == 4 and shape[2] * shape[3] > 1:
            return name, child
    raise ConfigError(
        f"audit: found no convolutional block with a spatial output in {model.spec.model}; "
        "set audit.target_layer to a dotted module path"
    )


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_for_saliency(model: Classifier) -> Classifier:
    """A copy in eval mode with in-place activations turned off and gradients on.

    In-place ReLU overwrites the very tensor whose gradient hook CAMs read, and BatchNorm or
    Dropout in train mode would make maps depend on the batch; a copy leaves the caller's model alone.
    """
    copy_ = copy.deepcopy(model).eval()
    for module in copy_.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    for p in copy_.parameters():
        p.requires_grad_(True)
    return copy_


def _score_cam(
    model: Classifier, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Score-CAM (Wang et al., 2020): each channel weighs by the class probability of the image it masks."""
    acts: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
    try:
        with torch.no_grad():
            base = model(x).softmax(1).gather(1, targets[:, None])
    finally:
        hook.remove()
    a = acts[0].float()
    n, c = a.shape[:2]
    up = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
    flat = up.flatten(2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    masks = ((flat - lo) / (hi - lo).clamp_min(1e-8)).view_as(up)  # N x C x H x W in [0, 1]
    masked = (x[:, None] * masks[:, :, None]).flatten(0, 1)  # (N*C) x ch x H x W
    rep_targets = targets.repeat_interleave(c)
    scores = []
    with torch.no_grad():
        for i in range(0, masked.shape[0], chunk):
            out = model(masked[i : i + chunk]).softmax(1)
            scores.append(out.gather(1, rep_targets[i : i + chunk, None]))
    weights = (torch.cat(scores).view(n, c) - base).softmax(1)
    return F.relu((weights[:, :, None, None] * a).sum(1))


def _cam_fn(
    method: str, model: Classifier, layer: nn.Module, chunk: int
) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
    if method == "scorecam":
        return lambda x, t: _score_cam(model, layer, x, t, chunk).cpu().numpy()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = (GradCAM if method == "gradcam" else GradCAMPlusPlus)(model=model, target_layers=[layer])
    return lambda x, t: cam(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t])


def saliency_fn(
    model: Classifier, *, method: str = "gradcam", target_layer: str | None = None, batch_size: int = 64
) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
    """Set a method up once (model copy, layer, hooks); the result maps images in batches.

    The returned function takes float [0, 1] NCHW images in the model's colour mode and the
    classes to explain, and returns N x H x W float32 maps at the input's size, each in [0, 1].
    """
    if method not in METHODS:
        raise ConfigError(f"audit.methods: unknown method {method!r}; use {', '.join(METHODS)}")
    model = prepare_for_saliency(model)
    _, layer = find_target_layer(model, target_layer)
    device = _device_of(model)
    fn = _cam_fn(method, model, layer, chunk=batch_size)

    def maps_of(images: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        maps = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            m = torch.as_tensor(np.asarray(fn(x, targets[i : i + batch_size].to(device)), dtype=np.float32))
            if m.shape[-2:] != x.shape[-2:]:
                m = F.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            flat = m.flatten(1)
            lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
            maps.append(((flat - lo) / (hi - lo).clamp_min(1e-8)).view_as(m))
        if not maps:
            return np.zeros((0, *images.shape[-2:]), dtype=np.float32)
        return torch.cat(maps).numpy()

    return maps_of


def saliency(
    model: Classifier,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    method: str = "gradcam",
    target_layer: str | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Saliency maps (N x H x W float32, each scaled to [0, 1]) of `images` for class `targets`."""
    return saliency_fn(model, method=method, target_layer=target_layer, batch_size=batch_size)(
        images, targets
    )
