"""The prepared split: the contract between `prepare` and every later stage.

On disk a split is two files in the prepared folder: `<split>.npy`, every image as uint8 N x C x H x
W in NumPy's own format (its header holds the shape), and `<split>.json`, the index: format,
count, labels, source paths, class names, colour mode and, with data/groups.csv, each image's
group. Later stages map the images file into memory (`numpy.load(mmap_mode="c")`): pages are read
from disk when a batch touches them, so no
stage holds a whole split in RAM however large the data. `SplitWriter` fills the images file one
image at a time, so prepare never holds one either.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from cnnops import atomic
from cnnops.data.digest import update_digest
from cnnops.errors import StageInputError
from cnnops.models import CHANNELS, ModelSpec

SPLITS = ("train", "val", "test")
FORMAT = "cnnops-split/2"  # 1 was one torch.save'd <split>.pt with every image in it
RERUN = "re-run `cnnops prepare` (or `dvc repro prepare`)"


def split_files(prepared: str | Path, name: str) -> tuple[Path, Path]:
    """The images file and the index file of split `name`."""
    return Path(prepared) / f"{name}.npy", Path(prepared) / f"{name}.json"


def split_digest(prepared: str | Path, names: tuple[str, ...]) -> str:
    """SHA-256 over the named splits' files: their index and their images, streamed."""
    digest = hashlib.sha256()
    for name in names:
        for path in reversed(split_files(prepared, name)):
            update_digest(digest, path)
    return digest.hexdigest()


@dataclass(frozen=True)
class PreparedSplit:
    images: torch.Tensor  # uint8, N x C x H x W, C = 1 ("L") or 3 ("RGB"); memory-mapped when loaded
    labels: torch.Tensor  # int64, N
    paths: list[str]  # POSIX paths relative to the data root, one per image
    class_names: list[str]  # index -> class folder name, the same list in every split
    color_mode: str  # "RGB" or "L"
    groups: list[str | None] | None = None  # data/groups.csv's group per image (None: not listed)
    window: tuple[float, float] | None = None  # the high-bit window its images were decoded through

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"{len(self.groups)} groups for {n} paths")
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

    def floats(
        self, index: slice | torch.Tensor | list[int] = slice(None), size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Images (all, or those at `index`) as float32 in [0, 1], the input every cnnops model takes,
        centre-cropped to a model's input `size` when it is smaller than the stored size.

        A copy: call it on a batch (`batches`), never on a whole split of lab size."""
        images = self.images[index]
        if size is not None and tuple(images.shape[-2:]) != tuple(size):
            images = F.center_crop(images, list(size))
        return images.float().div_(255.0)

    def batches(
        self, batch_size: int, size: tuple[int, int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float images, labels) in order, `batch_size` at a time: memory bounded by one batch."""
        for start in range(0, len(self), batch_size):
            part = slice(start, start + batch_size)
            yield self.floats(part, size), self.labels[part]

    def save(self, prepared: str | Path, name: str) -> None:
        """Write the split from memory (small splits: tests, synthetic data); prepare streams instead."""
        with SplitWriter(prepared, name, len(self), self.images.shape[1:]) as writer:
            writer.images[:] = self.images.numpy()
            writer.finish(
                self.labels.tolist(), self.paths, self.class_names, self.color_mode, self.groups, self.window
            )

    @classmethod
    def load(cls, prepared: str | Path, name: str) -> PreparedSplit:
        """The split memory-mapped (copy-on-write: a stage may change its copy, never the file)."""
        images_file, index_file = split_files(prepared, name)
        index = _read_index(index_file, images_file)
        try:
            images = np.load(images_file, mmap_mode="c")
        except (OSError, ValueError) as exc:  # a truncated file fails here: its size no longer fits
            raise StageInputError(f"{images_file}: unreadable or truncated ({exc}); {RERUN}") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != index["count"]:
            raise StageInputError(
                f"{images_file}: holds {images.dtype} {list(images.shape)}, its index {index_file} says "
                f"{index['count']} uint8 NCHW images; {RERUN}"
            )
        labels = torch.tensor(index["labels"], dtype=torch.int64)
        window = index.get("window")
        fields = (index["paths"], index["class_names"], index["color_mode"], index.get("groups"))
        fields += (None if window is None else tuple(window),)
        try:
            return cls(torch.from_numpy(images), labels, *fields)
        except ValueError as exc:
            raise StageInputError(f"{index_file}: {exc}; {RERUN}") from None


def _read_index(index_file: Path, images_file: Path) -> dict:
    """The index, refusing a missing split, an older format and a torn or foreign file by name."""
    if not index_file.exists():
        old = index_file.with_suffix(".pt")
        if old.exists():
            raise StageInputError(f"{old}: a prepared split of an older cnnops (one .pt file); {RERUN}")
        raise StageInputError(
            f"{index_file}: prepared split not found; run `cnnops prepare` (or `dvc repro prepare`)"
        )
    try:
        index = json.loads(index_file.read_text())
        keys = ("count", "labels", "paths", "class_names", "color_mode")
        ok = isinstance(index, dict) and index.get("format") == FORMAT and all(k in index for k in keys)
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise StageInputError(f"{index_file}: not a {FORMAT} split index; {RERUN}")
    if not images_file.exists():
        raise StageInputError(f"{images_file}: missing beside its index {index_file}; {RERUN}")
    return index


class SplitWriter:
    """Fills `<split>.npy` one image at a time, then writes the index; both land only on `finish`.

    The images file is allocated in full before it is mapped (`posix_fallocate`), so a disk too small
    fails here with an error naming the split, instead of a SIGBUS halfway through a memory-mapped
    write; until `finish`, both files are temporaries that a later stage never sees.
    """

    def __init__(self, prepared: str | Path, name: str, count: int, shape: tuple[int, ...]) -> None:
        self.name = name
        self.images_file, self.index_file = split_files(prepared, name)
        self.images_file.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.images_file.with_name(f".{self.images_file.name}.tmp")
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *shape)}
        try:
            with open(self._tmp, "wb") as handle:
                np.lib.format.write_array_header_2_0(handle, header)
                os.posix_fallocate(handle.fileno(), handle.tell(), max(1, count * int(np.prod(shape))))
        except OSError as exc:
            self._tmp.unlink(missing_ok=True)
            raise StageInputError(
                f"{self.images_file}: cannot allocate {count} images of {list(shape)} for the {name} split "
                f"({exc.strerror}); free disk space or lower prepare.image_size"
            ) from None
        self.images = np.load(self._tmp, mmap_mode="r+")

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.images = None  # unmaps
        self._tmp.unlink(missing_ok=True)  # still there: `finish` was not reached

    def finish(
        self,
        labels: list[int],
        paths: list[str],
        class_names: list[str],
        color_mode: str,
        groups: list[str | None] | None = None,
        window: tuple[float, float] | None = None,
    ) -> None:
        self.images.flush()
        count = len(self.images)
        self.images = None
        os.replace(self._tmp, self.images_file)
        index = {
            "format": FORMAT,
            "count": count,
            "color_mode": color_mode,
            "class_names": list(class_names),
            "labels": list(labels),
            "paths": list(paths),
            **({} if groups is None else {"groups": list(groups)}),
            "window": None if window is None else list(window),
        }
        atomic.write_json(self.index_file, index, indent=None)


def load_splits(prepared_dir: str | Path, names: tuple[str, ...] = SPLITS) -> dict[str, PreparedSplit]:
    """Load the named splits from the prepare stage's output folder."""
    return {name: PreparedSplit.load(prepared_dir, name) for name in names}


def load_split_for(
    spec: ModelSpec, prepared: str | Path, model_path: str | Path, name: str = "test"
) -> PreparedSplit:
    """Split `name`, refused unless a model of `spec` can read it: not empty, and the same classes,
    colour mode and image size (data re-prepared after training would be scored wrongly)."""
    path = split_files(prepared, name)[1]
    split = PreparedSplit.load(prepared, name)
    if len(split) == 0:
        raise StageInputError(f"{path}: the {name} split is empty; raise prepare.{name}_fraction")
    found = (list(split.class_names), split.color_mode, list(split.image_size))
    wanted = (list(spec.class_names), spec.color_mode, list(spec.prepared_size))
    if found != wanted:
        raise StageInputError(
            f"{path} (classes {found[0]}, {found[1]}, {found[2]}) does not match the model in {model_path} "
            f"(classes {wanted[0]}, {wanted[1]}, {wanted[2]}): its classes, colour mode or image size differ "
            "from the model's; re-run `dvc repro train` on this prepared data"
        )
    return split
