"""The ImageFolder layout: which files under `<root>/<class>/` are images of which class.

`scan_image_folder` turns an ImageFolder root into sorted records and decides what is refused or
skipped (files in the root, empty classes, hidden files, links leaving the root, FIFOs); see its
docstring for every case. Decoding the files is `cnnops.data.decode`'s job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cnnops.errors import DataError

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations.csv"  # audit masks/boxes (cnnops.audit.annotations)
GROUPS_FILE = "groups.csv"  # which images belong together (cnnops.data.groups)
ROOT_FILES = (ANNOTATIONS_FILE, GROUPS_FILE)  # the only files allowed directly in the data root


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # the file as found under the root (root / relpath)
    relpath: str  # POSIX path relative to the root, e.g. "cat/001.png"
    label: str  # class folder name


@dataclass(frozen=True)
class FolderScan:
    root: Path
    class_names: list[str]  # sorted class folder names; index = label id
    records: list[ImageRecord]  # sorted by relpath
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why), each also logged


def scan_image_folder(
    root: str | Path, *, hidden_files: Literal["error", "skip"] = "skip", min_classes: int = 2
) -> FolderScan:
    """List `<root>/<class>/**/<file>` as (path, class) records, refusing what breaks the layout.

    - root missing or not a folder, or with no class folder: DataError.
    - fewer than `min_classes` class folders: DataError (validate passes 1 and reports it itself).
    - a file directly in the root (not in a class folder): DataError, except `annotations.csv`.
    - an empty class folder (nothing left after skips): DataError.
    - hidden files/folders (name starts with "."): DataError when `hidden_files="error"`, else
      skipped with a warning and listed in `skipped`.
    - a symlink whose target is outside the root, or that is broken: DataError (DVC would track
      the link, not the image). Symlinks inside the root are followed.
    - a file or folder whose name is not valid UTF-8: DataError naming its bytes (rename it).
    - every other file is a record, whatever its name: non-image, zero-byte and corrupt files
      are refused when decoded (`read_image`), so validate can report them all at once.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: data folder not found; run `dvc pull` to restore the example or put your images in "
            f"{root}/<class>/<image>"
        )
    real_root = root.resolve()
    skipped: list[tuple[str, str]] = []
    class_dirs: list[Path] = []
    for entry, rel in _entries(root, root, real_root, hidden_files, skipped):
        if entry.is_dir():
            class_dirs.append(entry)
        elif entry.name not in ROOT_FILES:
            raise DataError(
                f"{root / rel}: is directly in the data root, outside any class folder; move it into "
                f"{root}/<class>/ (each sub-folder of {root} is a class) or out of {root}"
            )
    if not class_dirs:
        raise DataError(
            f"{root}: has no class folders; put images in {root}/<class>/<image>, one folder per class"
        )
    if len(class_dirs) < min_classes:
        raise DataError(
            f"{root}: has {len(class_dirs)} class folder(s) ({', '.join(d.name for d in class_dirs)}), a "
            f"classifier needs at least {min_classes}; add a folder of images per class"
        )
    records: list[ImageRecord] = []
    for class_dir in class_dirs:
        found = [
            ImageRecord(path=root / rel, relpath=rel, label=class_dir.name)
            for rel in _walk_class(class_dir, root, real_root, hidden_files, skipped)
        ]
        if not found:
            raise DataError(
                f"{class_dir}/: class folder has no images; add images to it or remove the folder"
            )
        records.extend(found)
    records.sort(key=lambda r: r.relpath)
    return FolderScan(root=root, class_names=[d.name for d in class_dirs], records=records, skipped=skipped)


def _walk_class(
    directory: Path, root: Path, real_root: Path, hidden_files: str, skipped: list[tuple[str, str]]
) -> Iterator[str]:
    """Relative POSIX paths of the files under a class folder, depth first, sorted, loop-safe."""
    seen: set[Path] = set()
    stack = [directory]
    while stack:
        current = stack.pop()
        real = current.resolve()
        if real in seen:  # an in-root symlink loop: each real folder is listed once
            continue
        seen.add(real)
        for entry, rel in _entries(current, root, real_root, hidden_files, skipped, reverse=True):
            if entry.is_dir():
                stack.append(entry)
            elif entry.is_file():
                yield rel
            else:  # a FIFO or device would block or mislead the decoder
                raise DataError(f"{root / rel}: is not a regular file; remove it from {root}")


def _entries(
    directory: Path,
    root: Path,
    real_root: Path,
    hidden_files: str,
    skipped: list[tuple[str, str]],
    *,
    reverse: bool = False,
) -> Iterator[tuple[Path, str]]:
    """The sorted entries of `directory` with their root-relative paths: hidden ones skipped or
    refused, links leaving the root refused, the same rules at every depth."""
    for entry in sorted(directory.iterdir(), reverse=reverse):
        _check_utf8(entry)
        rel = entry.relative_to(root).as_posix()
        if entry.name.startswith("."):
            _hidden(rel, root, hidden_files, skipped)
            continue
        _check_link(entry, rel, root, real_root)
        yield entry, rel


def _check_utf8(entry: Path) -> None:
    """A name that is not UTF-8 (Python holds its bytes as lone surrogates) breaks every manifest,
    JSON report and HTML page downstream: refuse it here, named by its bytes."""
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{os.fsencode(entry)!r}: the name is not valid UTF-8; rename it to UTF-8 "
            "(e.g. `convmv -f latin1 -t utf8 --notest -r <data folder>`), then run the stage again"
        ) from None


def _hidden(rel: str, root: Path, policy: str, skipped: list[tuple[str, str]]) -> None:
    if policy == "error":
        raise DataError(
            f"{root / rel}: is a hidden file or folder; "
            "delete it, or set data.hidden_files: skip in params.yaml"
        )
    log.warning("skipping hidden %s (data.hidden_files: skip)", root / rel)
    skipped.append((rel, "hidden"))


def _check_link(entry: Path, rel: str, root: Path, real_root: Path) -> None:
    if not entry.is_symlink():
        return
    target = Path(os.path.realpath(entry))
    if not target.exists():
        raise DataError(
            f"{root / rel}: is a broken symlink (to {target}); remove it or copy the image in its place"
        )
    if not target.is_relative_to(real_root):
        raise DataError(
            f"{root / rel}: is a symlink to {target}, outside {root}; copy the file into {root} instead "
            "(DVC tracks the link, not the image, so the data would not be versioned)"
        )
