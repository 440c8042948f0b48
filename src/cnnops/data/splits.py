"""The prepared split: the contract between `prepare` and every later stage.

`prepare` decodes each image once through the data contract, resizes it and stores the split as
uint8 tensors with labels, class names and source paths, so training never touches image files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cnnops import atomic
from cnnops.errors import StageInputError
from cnnops.models import CHANNELS, ModelSpec

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreparedSplit:
    images: torch.Tensor  # uint8, N x C x H x W, C = 1 ("L") or 3 ("RGB")
    labels: torch.Tensor  # int64, N
    paths: list[str]  # POSIX paths relative to the data root, one per image
    class_names: list[str]  # index -> class folder name, the same list in every split
    color_mode: str  # "RGB" or "L"

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 NCHW, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.images.shape[0] != n or self.labels.shape != (n,):
            raise ValueError(f"{self.images.shape[0]} images, {tuple(self.labels.shape)} labels, {n} paths")
        channels = CHANNELS[self.color_mode]
        if self.images.shape[1] != channels:
            raise ValueError(
                f"color_mode {self.color_mode} needs {channels} channels, got {self.images.shape[1]}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def floats(self) -> torch.Tensor:
        """Images as float32 in [0, 1], the input every cnnops model takes."""
        return self.images.float().div_(255.0)

    def save(self, path: str | Path) -> None:
        """Written whole or not at all (a killed prepare never leaves a split a later stage reads)."""
        state = {
            "images": self.images.contiguous(),
            "labels": self.labels,
            "paths": list(self.paths),
            "class_names": list(self.class_names),
            "color_mode": self.color_mode,
        }
        with atomic.atomic_path(Path(path)) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: str | Path) -> PreparedSplit:
        path = Path(path)
        if not path.exists():
            raise StageInputError(
                f"{path}: prepared split not found; run `cnnops prepare` (or `dvc repro prepare`)"
            )
        blob = torch.load(path, weights_only=True)
        return cls(**blob)


def load_splits(prepared_dir: str | Path, names: tuple[str, ...] = SPLITS) -> dict[str, PreparedSplit]:
    """Load the named splits from the prepare stage's output folder (`<dir>/<split>.pt`)."""
    return {name: PreparedSplit.load(Path(prepared_dir) / f"{name}.pt") for name in names}


def load_split_for(
    spec: ModelSpec, prepared: str | Path, model_path: str | Path, name: str = "test"
) -> PreparedSplit:
    """`<prepared>/<name>.pt`, refused unless a model of `spec` can read it: not empty, and the same
    classes, colour mode and image size (data re-prepared after training would be scored wrongly)."""
    path = Path(prepared) / f"{name}.pt"
    split = PreparedSplit.load(path)
    if len(split) == 0:
        raise StageInputError(f"{path}: the {name} split is empty; raise prepare.{name}_fraction")
    found = (list(split.class_names), split.color_mode, list(split.image_size))
    wanted = (list(spec.class_names), spec.color_mode, list(spec.image_size))
    if found != wanted:
        raise StageInputError(
            f"{path} (classes {found[0]}, {found[1]}, {found[2]}) does not match the model in {model_path} "
            f"(classes {wanted[0]}, {wanted[1]}, {wanted[2]}): its classes, colour mode or image size differ "
            "from the model's; re-run `dvc repro train` on this prepared data"
        )
    return split
