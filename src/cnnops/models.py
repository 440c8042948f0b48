"""Model factory and checkpoint format.

Every cnnops model is a `Classifier`: it takes float32 NCHW images in [0, 1] in the dataset's
colour mode and carries its own normalisation (and grayscale-to-RGB expansion for torchvision
networks), so preprocessing travels with the model into evaluate, audit and the ONNX graph.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnops.errors import ConfigError, StageInputError, WeightsNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_CONVNET = "convnet"
LECTURE_MLP = "mlp"
_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,})\.\w+$")  # torchvision's <name>-<sha256 prefix>.pth
CHANNELS = {"RGB": 3, "L": 1}  # image channels of each colour mode (`cnnops.data.decode.ColorMode`)


class SmallConvNet(nn.Module):
    """The classic small CNN: conv 5x5, pool, conv 3x3, pool, dense; with BatchNorm."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=5, padding=2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class LectureMLP(nn.Module):
    """The lecture's multilayer perceptron: flatten, hidden layers with ReLU and dropout, classes.

    It has no convolution, so it sees pixels, not local shapes: the baseline the CNNs are compared
    with (and one the Grad-CAM audit cannot look into).
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 128), dropout: float = 0.2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and feed it: stored in checkpoints and ONNX metadata."""

    model: str
    num_classes: int
    class_names: list[str]
    color_mode: str  # "RGB" or "L"
    image_size: tuple[int, int]  # (H, W) of the network's input
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    # (H, W) the images were prepared at, when larger than image_size: training crops image_size at
    # random from them, evaluation and the ONNX contract centre-crop it (the 256 -> 224 recipe)
    stored_size: tuple[int, int] | None = None
    # (low, high) of high-bit images mapped onto 0..255 when prepared (params `data.window`); None:
    # the type's full range. Predict decodes its inputs through the same window.
    window: tuple[float, float] | None = None

    @property
    def prepared_size(self) -> tuple[int, int]:
        """The size of the images this model reads from a prepared split."""
        return self.stored_size or self.image_size

    @property
    def in_channels(self) -> int:
        return CHANNELS[self.color_mode]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["stored_size"] = None if self.stored_size is None else list(self.stored_size)
        d["window"] = None if self.window is None else list(self.window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        stored, window = d.get("stored_size"), d.get("window")  # absent from older checkpoints
        sizes = {
            "image_size": tuple(d["image_size"]),
            "stored_size": None if stored is None else tuple(stored),
            "window": None if window is None else tuple(window),
        }
        return cls(**{**d, **sizes, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


# cnnops' own networks (no pretrained weights; they take the dataset's channels directly), by name.
OWN_NETWORKS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    SMALL_CONVNET: lambda spec: SmallConvNet(spec.in_channels, spec.num_classes),
    LECTURE_MLP: lambda spec: LectureMLP(spec.in_channels * math.prod(spec.image_size), spec.num_classes),
}


class Classifier(nn.Module):
    """A network plus its input contract: [0, 1] images in, logits out."""

    def __init__(self, net: nn.Module, spec: ModelSpec, net_channels: int) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.expand_gray = spec.in_channels == 1 and net_channels == 3
        self.frozen_backbone = False
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand_gray:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x - self.mean) / self.std)

    @property
    def head(self) -> nn.Linear:
        """The classification layer: the network's last Linear."""
        return self.net.get_submodule(_head_name(self.net))

    def freeze_backbone(self) -> None:
        """Linear probe: only the head trains; the backbone keeps its weights *and* BatchNorm statistics."""
        self.frozen_backbone = True
        for param in self.net.parameters():
            param.requires_grad_(False)
        for param in self.head.parameters():
            param.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        # A frozen backbone stays in eval mode so BatchNorm running stats (and dropout) never change.
        super().train(mode)
        if mode and self.frozen_backbone:
            self.net.eval()
            self.head.train()
        return self

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head) trainable parameters, for a lower backbone learning rate when fine-tuning."""
        head_ids = {id(p) for p in self.head.parameters()}
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        return [p for p in trainable if id(p) not in head_ids], [p for p in trainable if id(p) in head_ids]


def _head_name(net: nn.Module) -> str:
    """The last Linear layer is the head of every torchvision classifier and of our own networks."""
    name = None
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise ConfigError(f"{type(net).__name__} has no Linear head to replace")
    return name


def _replace_head(net: nn.Module, num_classes: int) -> None:
    name = _head_name(net)
    net.set_submodule(name, nn.Linear(net.get_submodule(name).in_features, num_classes))


def _torchvision_names() -> list[str]:
    import torchvision.models
    from torchvision.models import list_models

    return list_models(module=torchvision.models)


def resolve_weights(model: str, weights: str) -> Any:
    """The torchvision weights enum member `weights` of `model` (e.g. DEFAULT, IMAGENET1K_V1)."""
    from torchvision.models import get_model_weights

    if model in OWN_NETWORKS:
        raise ConfigError(f"train.weights: the {model!r} has no pretrained weights; set train.weights: null")
    enum = get_model_weights(model)
    try:
        return enum[weights]
    except KeyError:
        valid = list(enum.__members__)
        raise ConfigError(
            f"train.weights: {model} has no weights {weights!r}; valid: {', '.join(valid)}"
        ) from None


def weights_file(weights: Any) -> Path:
    """Where torchvision's hub cache keeps a weights file: $TORCH_HOME/hub/checkpoints/<file of the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _fetch_command(model: str, weights: Any) -> str:
    return (
        f'python -c "from torchvision.models import get_model_weights; '
        f"get_model_weights('{model}').{weights.name}.get_state_dict(progress=True)\" "
        f"(it saves into that machine's $TORCH_HOME/hub/checkpoints/), or "
        f"curl -L -o {Path(weights.url).name} {weights.url}"
    )


def _refetch(model: str, weights: Any, path: Path) -> str:
    """What to do about a missing or unusable cache file: fetch it on a connected machine, copy it here."""
    return f"On a connected machine run {_fetch_command(model, weights)}; then copy the file to {path}"


def _check_sha256(path: Path, model: str, weights: Any) -> None:
    """torchvision's convention: the hex after the name's last '-' starts the file's sha256, so a
    corrupt, truncated or planted file is refused before torch.load ever reads it."""
    match = _HASH_PREFIX.search(path.name)
    if match is None:
        raise WeightsNotFoundError(
            f"{path}: the name carries no sha256 prefix (<name>-<hex>.pth), so the file cannot be checked; "
            + _refetch(model, weights, path)
        )
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if not digest.startswith(match.group(1)):
        raise WeightsNotFoundError(
            f"{path}: sha256 {digest[:16]}... does not start with {match.group(1)}, the hash in its name: "
            f"the file is corrupt, truncated or not torchvision's {model}.{weights.name}; delete it. "
            + _refetch(model, weights, path)
        )


def _load_weights_file(path: Path, model: str, weights: Any) -> dict[str, torch.Tensor]:
    """The hash-checked state dict, unpickled with weights_only=True: tensors and containers only,
    never code (torchvision itself loads its cache with weights_only=False)."""
    _check_sha256(path, model, weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code, RuntimeError/EOFError for damaged archives
        raise WeightsNotFoundError(
            f"{path}: refused as weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it is "
            f"not a plain state dict; delete it. " + _refetch(model, weights, path)
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsNotFoundError(
            f"{path}: holds a {type(state).__name__}, not a state dict of tensors; delete it. "
            + _refetch(model, weights, path)
        )
    return state


def _pretrained_network(model: str, weights_name: str) -> nn.Module:
    """Build `model` with weights from the local cache only: cnnops never downloads at run time."""
    from torchvision.models import get_model

    weights = resolve_weights(model, weights_name)
    path = weights_file(weights)
    if not path.is_file():
        torch_home = Path(torch.hub.get_dir()).parent
        raise WeightsNotFoundError(
            f"pretrained weights {model}.{weights.name} are not in the local cache: the file {path.name} "
            f"must be at {path} (TORCH_HOME={torch_home}; cnnops never downloads). "
            + _refetch(model, weights, path)
        )
    state = _load_weights_file(path, model, weights)
    net = get_model(model, weights=None)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsNotFoundError(
            f"{path}: its tensors do not fit torchvision's {model} ({' '.join(str(exc).split())[:300]}); "
            f"it is not {model}.{weights.name} as a plain state dict (cnnops does not remap the legacy keys "
            "some families publish, e.g. densenet); choose another train.model or set train.weights: null"
        ) from None
    if hasattr(net, "transform_input"):  # GoogLeNet, Inception v3: torchvision turns it on with weights
        net.transform_input = True
    return net


def build_network(spec: ModelSpec, weights: str | None = None) -> tuple[nn.Module, int]:
    """The bare network and the channel count it expects; random unless `weights` names an enum member."""
    if spec.model in OWN_NETWORKS:
        if weights is not None:
            resolve_weights(spec.model, weights)  # raises: our own networks have no pretrained weights
        return OWN_NETWORKS[spec.model](spec), spec.in_channels
    available = _torchvision_names()
    if spec.model not in available:
        close = difflib.get_close_matches(spec.model, [*OWN_NETWORKS, *available], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"train.model: unknown model {spec.model!r}{hint}; use 'convnet', 'mlp' or a torchvision "
            "classification model (torchvision.models.list_models(module=torchvision.models))"
        )
    from torchvision.models import get_model

    net = get_model(spec.model, weights=None) if weights is None else _pretrained_network(spec.model, weights)
    _replace_head(net, spec.num_classes)
    return net, 3


SEARCH_SIDE = 512  # the smallest working input is searched up to this side (ImageNet nets take 32-224)


def _takes(model: Classifier, size: tuple[int, int]) -> str | None:
    """None when the network runs on one image of `size`, else the first line of its error."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.spec.in_channels, *size))
    except (RuntimeError, ValueError) as exc:  # a kernel larger than its input, an empty pooled map
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def smallest_input(model: Classifier) -> tuple[int, int] | None:
    """The smallest input, no side below the spec's, the network takes (None: none up to SEARCH_SIDE).

    Found by trying, as the downsampling of a network (strides, pooling, fixed kernels) is not
    declared anywhere: square sides double until one runs, then bisection finds the first.
    """
    h, w = model.spec.image_size

    def grown(side: int) -> tuple[int, int]:
        return max(h, side), max(w, side)

    low = high = min(h, w)  # grown(low) is the failing size itself
    while _takes(model, grown(high)) is not None:
        if high >= SEARCH_SIDE:
            return None
        low, high = high, min(2 * high, SEARCH_SIDE)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _takes(model, grown(middle)) is not None else (low, middle)
    return grown(high)


def _check_input_size(model: Classifier) -> None:
    """Fail early, naming the smallest size that works, when the images are too small for the
    network's downsampling."""
    was_training = model.training
    model.eval()
    try:
        error = _takes(model, model.spec.image_size)
        if error is None:
            return
        h, w = model.spec.image_size
        smallest = smallest_input(model)
        fix = (
            f"the smallest it takes is {smallest[0]}x{smallest[1]}: set prepare.image_size (or "
            "train.input_size) to at least that"
            if smallest is not None
            else f"no size up to {SEARCH_SIDE}x{SEARCH_SIDE} worked; check the model"
        )
        raise ConfigError(f"train.model: {model.spec.model} cannot take {h}x{w} images ({error}); {fix}")
    finally:
        model.train(was_training)


def create_classifier(
    spec: ModelSpec, weights: str | None = None, *, check_input: bool = False
) -> Classifier:
    """Build the Classifier for `spec`; `weights` (a torchvision weights enum name) loads from TORCH_HOME.

    Example: ``create_classifier(default_spec("resnet18", names, "L", (32, 32)), "IMAGENET1K_V1")``.
    """
    net, channels = build_network(spec, weights)
    model = Classifier(net, spec, channels)
    if check_input:
        _check_input_size(model)
    return model


def default_spec(
    model: str,
    class_names: list[str],
    color_mode: str,
    image_size: tuple[int, int],
    weights: str | None = None,
) -> ModelSpec:
    """The spec for a model on a dataset; mean and std come from the model.

    0.5/0.5 for our own ConvNet and MLP, the weights' own preset for pretrained torchvision nets,
    ImageNet statistics for torchvision nets trained from scratch.
    """
    channels = CHANNELS[color_mode]
    if model in OWN_NETWORKS:
        mean, std = (0.5,) * channels, (0.5,) * channels
    elif weights is not None:
        preset = resolve_weights(model, weights).transforms()
        mean, std = tuple(preset.mean), tuple(preset.std)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return ModelSpec(model, len(class_names), list(class_names), color_mode, tuple(image_size), mean, std)


def save_checkpoint(path: str | Path, model: Classifier, extra: dict[str, Any] | None = None) -> None:
    """State dict plus spec (never a pickled module), loadable with weights_only=True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"spec": model.spec.to_dict(), "state_dict": model.state_dict(), "extra": extra or {}}, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written checkpoint


def load_classifier(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a Classifier from a checkpoint; returns it in eval mode with the checkpoint's extra dict."""
    path = Path(path)
    if not path.exists():
        raise StageInputError(
            f"{path}: model checkpoint not found; run `cnnops train` (or `dvc repro train`)"
        )
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        model = create_classifier(ModelSpec.from_dict(blob["spec"]))
        model.load_state_dict(blob["state_dict"])
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, ValueError) as exc:
        # weights_only refuses any pickled code; a torn or foreign file fails on its keys or shapes
        raise StageInputError(
            f"{path}: not a cnnops checkpoint, or a damaged one ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); re-run `cnnops train`"
        ) from None
    return model.eval(), blob.get("extra", {})
