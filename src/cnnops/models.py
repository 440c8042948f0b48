"""Model factory and checkpoint format.

Every cnnops model is a `Classifier`: it takes float32 NCHW images in [0, 1] in the dataset's
colour mode and carries its own normalisation (and grayscale-to-RGB expansion for torchvision
networks), so preprocessing travels with the model into evaluate, audit and the ONNX graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnops.errors import ConfigError, StageInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_CONVNET = "convnet"


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


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and feed it: stored in checkpoints and ONNX metadata."""

    model: str
    num_classes: int
    class_names: list[str]
    color_mode: str  # "RGB" or "L"
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    @property
    def in_channels(self) -> int:
        return 3 if self.color_mode == "RGB" else 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{**d, "image_size": tuple(d["image_size"]), "mean": tuple(d["mean"]), "std": tuple(d["std"])})


class Classifier(nn.Module):
    """A network plus its input contract: [0, 1] images in, logits out."""

    def __init__(self, net: nn.Module, spec: ModelSpec, net_channels: int) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.expand_gray = spec.in_channels == 1 and net_channels == 3
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand_gray:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x - self.mean) / self.std)


def _replace_head(net: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer (the head of every torchvision classifier) for one of num_classes."""
    name, last = None, None
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            name, last = module_name, module
    if last is None:
        raise ConfigError(f"{type(net).__name__} has no Linear head to replace")
    net.set_submodule(name, nn.Linear(last.in_features, num_classes))


def build_network(spec: ModelSpec) -> tuple[nn.Module, int]:
    """The bare network (randomly initialised) and the channel count it expects."""
    if spec.model == SMALL_CONVNET:
        return SmallConvNet(spec.in_channels, spec.num_classes), spec.in_channels
    from torchvision.models import get_model, list_models

    available = list_models(module=__import__("torchvision.models", fromlist=["models"]))
    if spec.model not in available:
        import difflib

        close = difflib.get_close_matches(spec.model, available, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"train.model: unknown model {spec.model!r}{hint}; use 'convnet' or a torchvision classification model"
        )
    net = get_model(spec.model, weights=None)
    _replace_head(net, spec.num_classes)
    return net, 3


def create_classifier(spec: ModelSpec) -> Classifier:
    net, channels = build_network(spec)
    return Classifier(net, spec, channels)


def default_spec(
    model: str, class_names: list[str], color_mode: str, image_size: tuple[int, int]
) -> ModelSpec:
    """The spec for a model on a dataset: ImageNet statistics for torchvision nets, 0.5/0.5 for the ConvNet."""
    channels = 3 if color_mode == "RGB" else 1
    if model == SMALL_CONVNET:
        mean, std = (0.5,) * channels, (0.5,) * channels
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


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a Classifier from a checkpoint; returns it in eval mode with the checkpoint's extra dict."""
    path = Path(path)
    if not path.exists():
        raise StageInputError(f"{path}: model checkpoint not found; run `cnnops train` (or `dvc repro train`)")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    model = create_classifier(ModelSpec.from_dict(blob["spec"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob.get("extra", {})
