"""Per-file facts about the data (the manifest) and duplicate groups, shared by validate and prepare.

Both stages hash through `describe` and group through `duplicate_groups`, so "duplicate" means
the same thing in the validation report and in the split.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cnnops.data.decode import ColorMode, Window, perceptual_hash, read_image, to_tensor
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
    record: ImageRecord, *, color_mode: ColorMode, max_pixels: int, window: Window | None = None
) -> tuple[ManifestEntry, Image.Image | None]:
    """The manifest entry of one file and its converted image; a decoding failure is recorded, not raised."""
    size = record.path.stat().st_size if record.path.exists() else 0
    try:
        decoded = read_image(record.path, color_mode=color_mode, max_pixels=max_pixels, window=window)
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


POOL_MIN_FILES = 64  # fewer files are decoded in this process: starting workers would cost more
POOL_CHUNK = 16  # files a worker takes at a time


def describe_all(
    records: Sequence[ImageRecord],
    *,
    color_mode: ColorMode,
    max_pixels: int,
    into: np.ndarray | None = None,
    rows: Sequence[int] | None = None,
    window: Window | None = None,
    workers: int | None = None,
) -> Iterator[ManifestEntry]:
    """`describe` over every record, in order, by a pool of processes (one per core by default).

    Processes, not threads: decoding and hashing are CPU-bound and Pillow holds the GIL for much of
    them. With `into` (a writable N x C x H x W uint8 array, memory-mapped for prepare), each
    decodable image is resized to H x W and written to its row by the process that decoded it: a
    forked worker shares the parent's MAP_SHARED mapping, so pixels never travel through a pipe and
    the parent only collects entries. Entries stream in record order, a chunk at a time, so memory
    holds a few images whatever the number of files. `rows` gives each record's row of `into`
    (default: its position); `window` is the data contract's high-bit window.
    """
    task = partial(_describe_one, color_mode=color_mode, max_pixels=max_pixels, window=window)
    numbered = zip(rows if rows is not None else range(len(records)), records, strict=True)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(records) < POOL_MIN_FILES:
        global _INTO
        _INTO = into
        try:
            yield from map(task, numbered)
        finally:
            _INTO = None
        return
    # fork: workers start in milliseconds, share the parent's imports and inherit `into`'s mapping
    # (initargs are not pickled under fork); one torch thread each, so the pool never oversubscribes.
    with multiprocessing.get_context("fork").Pool(
        workers, initializer=_init_worker, initargs=(into,)
    ) as pool:
        yield from pool.imap(task, numbered, chunksize=POOL_CHUNK)


_INTO: np.ndarray | None = None  # the array `describe_all` writes into, per process


def _init_worker(into: np.ndarray | None) -> None:
    global _INTO
    _INTO = into
    torch.set_num_threads(1)


def _describe_one(
    numbered: tuple[int, ImageRecord], *, color_mode: ColorMode, max_pixels: int, window: Window | None
) -> ManifestEntry:
    row, record = numbered
    entry, image = describe(record, color_mode=color_mode, max_pixels=max_pixels, window=window)
    if image is not None and _INTO is not None:
        _INTO[row] = to_tensor(image, tuple(_INTO.shape[2:])).numpy()
    return entry


def duplicate_groups(sha256: Sequence[str], phash: Sequence[str], max_distance: int) -> np.ndarray:
    """Component id per image: identical bytes, or perceptual hashes within `max_distance` bits.

    Pairs within the distance come from `near_pairs` (multi-index hashing, exact) and are chained
    into groups with scipy's connected components, so A~B and B~C put A, B and C in one group.
    """
    n = len(sha256)
    first_of: dict[str, int] = {}
    same_bytes = [(i, first_of.setdefault(digest, i)) for i, digest in enumerate(sha256)]
    exact = np.array([pair for pair in same_bytes if pair[0] != pair[1]], dtype=np.int64).reshape(-1, 2)
    near = near_pairs(np.array([int(h, 16) for h in phash], dtype=np.uint64), max_distance)
    pairs = np.concatenate([exact, near])
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


HASH_BITS = 64
PAIR_CHUNK = 1 << 22  # candidate pairs checked per vectorised step (bounds memory in a huge bucket)


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i < j) of 64-bit hashes within `max_distance` bits, as an (m, 2) array.

    Multi-index hashing (Norouzi et al., 2012): split the bits into max_distance + 1 blocks; by the
    pigeonhole principle a pair that differs in at most max_distance bits agrees exactly on one
    block, so only hashes sharing a block value are compared. Near-linear on spread-out hashes
    (100k in seconds) instead of the n^2 comparisons of the pairwise search, with the same pairs.
    No library does this for plain uint64 hashes (imagehash compares two at a time).
    """
    found: list[np.ndarray] = [np.zeros((0, 2), dtype=np.int64)]
    bounds = np.linspace(0, HASH_BITS, min(max_distance, HASH_BITS - 1) + 2).astype(int)
    for low, high in itertools.pairwise(bounds):
        mask = np.uint64((1 << int(high - low)) - 1)
        keys = (hashes >> np.uint64(low)) & mask
        order = np.argsort(keys, kind="stable")
        starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
            found.append(_close_pairs(order[start : start + size], hashes, max_distance))
    pairs = np.concatenate(found)
    pairs.sort(axis=1)
    return np.unique(pairs, axis=0)


def _close_pairs(members: np.ndarray, hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """The pairs of one bucket within the distance, checked a chunk of candidates at a time."""
    left, right = np.triu_indices(len(members), 1)
    kept = []
    for start in range(0, len(left), PAIR_CHUNK):
        a, b = members[left[start : start + PAIR_CHUNK]], members[right[start : start + PAIR_CHUNK]]
        close = np.bitwise_count(hashes[a] ^ hashes[b]) <= max_distance
        kept.append(np.stack([a[close], b[close]], axis=1))
    return np.concatenate(kept).astype(np.int64)
