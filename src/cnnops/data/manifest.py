"""Per-file facts about the data (the manifest) and duplicate groups, shared by validate and prepare.

Both stages hash through `describe` and group through `duplicate_groups`, so "duplicate" means
the same thing in the validation report and in the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cnnops.data.decode import ColorMode, perceptual_hash, read_image
from cnnops.data.folder import ImageRecord
from cnnops.errors import DataError


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # POSIX, relative to the data root
    label: str  # class folder
    bytes: int
    sha256: str | None = None  # of the file's bytes; None when it could not be read
    format: str | None = None
    mode: str | None = None  # as stored in the file
    width: int | None = None
    height: int | None = None
    bit_depth: int | None = None
    phash: str | None = None  # 16 hex digits, on the image converted to the data colour mode
    error: str | None = None  # why it did not decode (a DataError message), else None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def describe(
    record: ImageRecord, *, color_mode: ColorMode, max_pixels: int
) -> tuple[ManifestEntry, Image.Image | None]:
    """The manifest entry of one file and its converted image; a decoding failure is recorded, not raised."""
    size = record.path.stat().st_size if record.path.exists() else 0
    try:
        decoded = read_image(record.path, color_mode=color_mode, max_pixels=max_pixels)
    except DataError as exc:
        return ManifestEntry(path=record.relpath, label=record.label, bytes=size, error=str(exc)), None
    entry = ManifestEntry(
        path=record.relpath,
        label=record.label,
        bytes=size,
        sha256=decoded.sha256,
        format=decoded.format,
        mode=decoded.mode,
        width=decoded.width,
        height=decoded.height,
        bit_depth=decoded.bit_depth,
        phash=perceptual_hash(decoded.image),
    )
    return entry, decoded.image


def duplicate_groups(sha256: Sequence[str], phash: Sequence[str], max_distance: int) -> np.ndarray:
    """Component id per image: identical bytes, or perceptual hashes within `max_distance` bits.

    Pairs are found with a blocked XOR/popcount over all hashes (exact, O(n^2) but vectorised:
    about a second for 10^4 images) and chained into groups with scipy's connected components,
    so A~B and B~C put A, B and C in one group.
    """
    n = len(sha256)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    first_of: dict[str, int] = {}
    for i, digest in enumerate(sha256):
        j = first_of.setdefault(digest, i)
        if j != i:
            rows.append(np.array([i]))
            cols.append(np.array([j]))
    hashes = np.array([int(h, 16) for h in phash], dtype=np.uint64)
    block = 2048
    for start in range(0, n, block):
        distance = np.bitwise_count(hashes[start : start + block, None] ^ hashes[None, :])
        r, c = np.nonzero(distance <= max_distance)
        keep = c > r + start  # each unordered pair once, no self-pairs
        rows.append(r[keep] + start)
        cols.append(c[keep])
    r_all = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c_all = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(r_all), dtype=np.int8), (r_all, c_all)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
