"""Saliency maps for any cnnops model, in batches: Grad-CAM, Grad-CAM++, Score-CAM, Ablation-CAM and
occlusion.

Saliency only says where to intervene; the evidence module decides. Grad-CAM and Grad-CAM++ are
hooked here rather than taken from the `grad-cam` package (the tests' reference), which backpropagates
through the whole network to every parameter and scales each image in numpy: our hook makes the target
layer's output a leaf, so the backward runs through the head only, and whole batches scale in torch.
Score-CAM is ours too: it masks a batch of images with every channel, a bounded chunk at a time.
A CAM is as coarse as its layer's map: a ResNet's last block at 32-64 px is 2x2, and its upsampled
top pixels always lie in the outer corner of a quadrant, wherever the cue is. Where the map is
`COARSE_SIDE` cells a side or fewer, `pointing_fn` lets an occlusion map (Zeiler and Fergus, 2014)
choose the places instead, the CAM only breaking its ties. Ablation-CAM is ours as well: the
package's AblationCAM loops over images one at a time and swaps a layer of its own in for the
target layer; ours ablates every (image, channel) pair of a batch in bounded chunks with a stand-in
for the target layer (`_Emit`), so the layer is not recomputed for them; blocks before it are (none
in the small ConvNet, whose target layer is its first block; ResNet-18's stem to layer3).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnops.errors import ConfigError
from cnnops.models import Classifier

METHODS = ("gradcam", "gradcam++", "scorecam", "ablationcam", "occlusion")
COARSE_SIDE = 4  # a target layer map this many cells a side or fewer does not choose places alone
TIE_BREAK = 1e-3  # the CAM's weight beside an occlusion map: orders places the occlusion left equal
_NO_CONV_FAMILIES = ("vit_", "swin_")  # token grids need a reshape transform the audit does not guess


def find_target_layer(model: Classifier, dotted: str | None = None) -> tuple[str, nn.Module]:
    """The layer whose activations the CAMs weight: `dotted` (relative to the bare network) or found.

    Found = the last top-level block of the network that contains a convolution and still outputs a
    spatial map (H, W > 1): `features` for the small ConvNet, VGG, AlexNet, MobileNet, EfficientNet,
    ConvNeXt and DenseNet, `layer4` for ResNets, `trunk_output` for RegNets, `Mixed_7c` for
    Inception. One rule instead of a table, so a new torchvision family needs no entry.
    """
    net = model.net
    if not any(isinstance(m, nn.Conv2d) for m in net.modules()):
        raise ConfigError(
            f"audit: {model.spec.model} has no convolutional layer, and Grad-CAM, Grad-CAM++ and Score-CAM "
            "weigh a convolution's feature maps; the audit supports convolutional networks (an MLP can be "
            "trained, evaluated and exported, not audited): set train.model to a CNN to audit it"
        )
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
    """A channels-last copy in eval mode with in-place activations off and no parameter gradients.

    In-place ReLU would rewrite tensors that the head's backward reads, and BatchNorm or Dropout in
    train mode would make maps depend on the batch; a copy leaves the caller's model alone. The CAMs
    differentiate with respect to the target layer's output only, so no parameter needs a gradient.
    Channels-last runs a batch's convolutions and pooling faster on CPU (same maps to float rounding).
    """
    copy_ = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    for module in copy_.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_


def _forward(
    model: Classifier, layer: nn.Module, x: torch.Tensor, *, leaf: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the target layer's output A, kept by a hook that passes a copy downstream.

    With `leaf`, A is a leaf that requires grad and nothing else does, so the forward records a graph
    from A to the logits only (the head) and a backward from the logits stops at A. The copy lets an
    in-place op after the layer (DenseNet's functional ReLU) leave A as the layer gave it.
    """
    kept: list[torch.Tensor] = []

    def swap(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        kept.append(out.detach().requires_grad_(leaf))
        return kept[-1].clone()

    hook = layer.register_forward_hook(swap)
    try:
        with torch.set_grad_enabled(leaf):
            logits = model(x)
    finally:
        hook.remove()
    return logits, kept[0]


def _grad_cam(
    model: Classifier, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor, plus: bool
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) or Grad-CAM++ (Chattopadhay et al., 2018), N x h x w.

    The channel weights are those of the package's GradCAM and GradCAMPlusPlus: the mean gradient,
    or the positive gradients weighted by alpha (eq. 19 of the Grad-CAM++ paper). In eval mode the
    images are independent, so the gradient of the summed scores is each image's own gradient.
    """
    logits, a = _forward(model, layer, x, leaf=True)
    (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), a)
    a = a.detach()
    if plus:
        g2 = g * g
        alpha = g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6)
        weights = (g.clamp_min(0) * torch.where(g != 0, alpha, 0)).sum((2, 3))
    else:
        weights = g.mean((2, 3))
    return F.relu((weights[:, :, None, None] * a).sum(1))


def _score_cam(
    model: Classifier, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Score-CAM (Wang et al., 2020): each channel weighs by the class probability of the image it masks.

    The masked images are made `chunk` at a time, just before their forward: made at once, a batch of
    N images through C channels holds N*C of them (64 photos at 224 px through ResNet-50's 2048
    channels: about 100 GB). Each (image, channel) pair is masked as before, so the maps are the same.
    """
    logits, a = _forward(model, layer, x, leaf=False)
    base = logits.softmax(1).gather(1, targets[:, None])
    n, c = a.shape[:2]
    maps = a.flatten(0, 1)[None]  # 1 x (N*C) x h x w: one mask for each masked image
    image = torch.arange(n, device=x.device).repeat_interleave(c)  # the image each mask applies to
    scores = []
    with torch.no_grad():
        for i in range(0, n * c, chunk):
            part = image[i : i + chunk]
            masks = _upsampled_unit(maps[:, i : i + chunk], x.shape[-2:])  # upsampled as channels: faster
            masked = x[part].mul_(masks[0, :, None])
            scores.append(model(masked).softmax(1).gather(1, targets[part, None]))
    weights = (torch.cat(scores).view(n, c) - base).softmax(1)
    return F.relu((weights[:, :, None, None] * a).sum(1))


class _Emit(nn.Module):
    """Stands in for the target layer: returns the activations it was given, whatever its input."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.empty(0)

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        return self.out


@contextmanager
def _standing_in(model: nn.Module, layer: nn.Module, stand_in: nn.Module) -> Iterator[None]:
    """`stand_in` in `layer`'s place in `model` (a saliency copy) for the block, `layer` back after."""
    parent, name = next((p, n) for p in model.modules() for n, c in p.named_children() if c is layer)
    setattr(parent, name, stand_in)
    try:
        yield
    finally:
        setattr(parent, name, layer)


def _ablation_cam(
    model: Classifier, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Ablation-CAM (Desai and Ramaswamy, WACV 2020): channel k weighs by the drop of the class score
    y_c when channel k of the target layer's output is zeroed, w_k = (y_c - y_c^k) / |y_c|.

    The paper divides by y_c; |y_c| gives the same map where y_c > 0 (each map is scaled to [0, 1])
    and keeps a drop a drop where the class score is negative. `chunk` ablated activations a forward,
    each made just before it, as Score-CAM's masked images; `_Emit` stands in for the target layer,
    so only the network after it works on them (the inputs fed beside them are ignored there).
    """
    logits, a = _forward(model, layer, x, leaf=False)
    base = logits.gather(1, targets[:, None])[:, 0]
    n, c = a.shape[:2]
    image = torch.arange(n, device=x.device).repeat_interleave(c)
    channel = torch.arange(c, device=x.device).repeat(n)
    emit, drops = _Emit(), []
    with torch.no_grad(), _standing_in(model, layer, emit):
        for i in range(0, n * c, chunk):
            im, ch = image[i : i + chunk], channel[i : i + chunk]
            emit.out = a[im].clone()
            emit.out[torch.arange(len(im), device=x.device), ch] = 0.0
            drops.append(base[im] - model(x[im]).gather(1, targets[im, None])[:, 0])
    weights = torch.cat(drops).view(n, c) / base.abs().clamp_min(1e-8)[:, None]
    return F.relu((weights[:, :, None, None] * a).sum(1))


def _upsampled_unit(maps: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """`maps` (N x C x h x w) upsampled bilinearly to `size`, each map min-max scaled to [0, 1]."""
    if maps.shape[-2:] != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    flat = maps.flatten(2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-8)).view_as(maps)


def occlusion_squares(h: int, w: int, patch: float) -> torch.Tensor:
    """The occluding squares (P x 1 x H x W, 1 inside): side `patch` of each side, moved by half of it,
    the last row and column flush with the far edges so every pixel is covered."""
    ph, pw = max(1, round(patch * h)), max(1, round(patch * w))

    def starts(size: int, p: int) -> list[int]:
        return sorted({*range(0, size - p + 1, max(1, p // 2)), size - p})

    squares = torch.zeros(len(starts(h, ph)) * len(starts(w, pw)), 1, h, w)
    for k, (y, x) in enumerate((y, x) for y in starts(h, ph) for x in starts(w, pw)):
        squares[k, :, y : y + ph, x : x + pw] = 1.0
    return squares


def _occlusion(
    model: Classifier, x: torch.Tensor, targets: torch.Tensor, squares: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Occlusion (Zeiler and Fergus, 2014): each pixel's mean drop of the class probability over the
    squares that cover it, each square filled with the image's own mean (N x H x W).

    `chunk` occluded images a forward, each made just before it, as Score-CAM's masked images.
    """
    n, p = len(x), len(squares)
    squares = squares.to(x.device)
    fill = x.mean((2, 3), keepdim=True)
    with torch.no_grad():
        base = model(x).softmax(1).gather(1, targets[:, None])[:, 0]
        image = torch.arange(n, device=x.device).repeat_interleave(p)
        square = torch.arange(p, device=x.device).repeat(n)
        drops = []
        for i in range(0, n * p, chunk):
            im, sq = image[i : i + chunk], square[i : i + chunk]
            m = squares[sq]
            occluded = x[im] * (1 - m) + fill[im] * m
            drops.append((base[im] - model(occluded).softmax(1).gather(1, targets[im, None])[:, 0]).relu())
    weights = torch.cat(drops).view(n, p)
    cover = squares[:, 0].sum(0).clamp_min(1)
    return torch.einsum("np,phw->nhw", weights, squares[:, 0]) / cover


def _cam_fn(
    method: str, model: Classifier, layer: nn.Module, chunk: int, occlusion_patch: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if method == "scorecam":
        return lambda x, t: _score_cam(model, layer, x, t, chunk)
    if method == "ablationcam":
        return lambda x, t: _ablation_cam(model, layer, x, t, chunk)
    if method == "occlusion":
        return lambda x, t: _occlusion(model, x, t, occlusion_squares(*x.shape[-2:], occlusion_patch), chunk)
    return lambda x, t: _grad_cam(model, layer, x, t, plus=method == "gradcam++")


def layer_grid(model: Classifier, layer: nn.Module) -> tuple[int, int]:
    """The spatial size of `layer`'s output for the model's input size (one forward of one image)."""
    shape: list[tuple[int, ...]] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: shape.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.spec.in_channels, *model.spec.image_size, device=_device_of(model)))
    finally:
        hook.remove()
    return (shape[0][2], shape[0][3]) if len(shape[0]) == 4 else (1, 1)


def pointing_fn(
    model: Classifier, *, method: str, target_layer: str | None, batch_size: int, occlusion_patch: float
) -> tuple[Callable[[torch.Tensor, torch.Tensor], np.ndarray], str | None]:
    """The maps that choose where to intervene, and why they are not `method`'s (None when they are).

    Where the target layer's map is `COARSE_SIDE` cells a side or fewer, the occlusion map chooses,
    with `method`'s map at `TIE_BREAK` weight so places the occlusion left equal (no drop anywhere)
    are ordered by the CAM rather than by pixel order: a coarse CAM never decides the place alone.
    """
    cam = saliency_fn(model, method=method, target_layer=target_layer, batch_size=batch_size)
    grid = layer_grid(model, find_target_layer(model, target_layer)[1])
    if method == "occlusion" or max(grid) > COARSE_SIDE:
        return cam, None
    occlusion = saliency_fn(
        model, method="occlusion", target_layer=target_layer, batch_size=batch_size,
        occlusion_patch=occlusion_patch,
    )  # fmt: skip

    def maps_of(images: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        combined = occlusion(images, targets) + TIE_BREAK * cam(images, targets)
        return combined / np.maximum(combined.max((1, 2), keepdims=True), 1e-8)

    return maps_of, f"occlusion: the target layer's map is {grid[0]}x{grid[1]}"


def saliency_fn(
    model: Classifier,
    *,
    method: str = "gradcam",
    target_layer: str | None = None,
    batch_size: int = 64,
    occlusion_patch: float = 0.25,
) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
    """Set a method up once (model copy, layer); the result maps images in batches.

    The returned function takes float [0, 1] NCHW images in the model's colour mode and the
    classes to explain, and returns N x H x W float32 maps at the input's size, each in [0, 1].
    `occlusion_patch` is the occluding square's side as a share of the image's (occlusion only).
    """
    if method not in METHODS:
        raise ConfigError(f"audit.methods: unknown method {method!r}; use {', '.join(METHODS)}")
    model = prepare_for_saliency(model)
    _, layer = find_target_layer(model, target_layer)
    device = _device_of(model)
    fn = _cam_fn(method, model, layer, batch_size, occlusion_patch)

    def maps_of(images: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        maps = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device, memory_format=torch.channels_last)
            cams = fn(x, targets[i : i + batch_size].to(device))
            maps.append(_upsampled_unit(cams[:, None].float(), x.shape[-2:])[:, 0])
        if not maps:
            return np.zeros((0, *images.shape[-2:]), dtype=np.float32)
        return torch.cat(maps).cpu().numpy()

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
