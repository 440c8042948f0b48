"""Near-duplicate search: multi-index hashing finds exactly the pairs the pairwise search finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnops.data.decode import perceptual_hash
from cnnops.data.folder import scan_image_folder
from cnnops.data.manifest import near_pairs


def pairwise(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    """The reference: every pair compared (O(n^2))."""
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    rows, cols = np.nonzero(np.triu(distance <= max_distance, k=1))
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


def clustered_hashes(n: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes, a third of them copies of others with 0-6 bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    for i in rng.choice(n, n // 3, replace=False):
        flipped = hashes[rng.integers(n)]
        for bit in rng.choice(64, rng.integers(0, 7), replace=False):
            flipped ^= np.uint64(1) << np.uint64(bit)
        hashes[i] = flipped
    return hashes


@pytest.mark.parametrize("max_distance", [0, 1, 4, 6, 12, 63, 64])
def test_multi_index_pairs_equal_the_pairwise_search_on_random_hashes(max_distance: int) -> None:
    hashes = clustered_hashes(600, seed=max_distance)
    found = {tuple(p) for p in near_pairs(hashes, max_distance).tolist()}
    assert found == pairwise(hashes, max_distance)
    assert found or max_distance == 0


def test_multi_index_pairs_equal_the_pairwise_search_on_the_example(digits_folder: Path) -> None:
    """The digits fixture's real perceptual hashes, at the default distance and around it."""
    scan = scan_image_folder(digits_folder)
    hashes = np.array([int(perceptual_hash(Image.open(r.path)), 16) for r in scan.records], dtype=np.uint64)
    counts = []
    for max_distance in (2, 4, 8, 12):
        found = {tuple(p) for p in near_pairs(hashes, max_distance).tolist()}
        assert found == pairwise(hashes, max_distance)
        counts.append(len(found))
    assert counts == sorted(counts) and counts[-1] > 0
