"""Where shortcuts usually sit: the outer band and the four corners of the image.

One geometry for both readers of it: the saliency evidence (transplants and energy at these
places) and the data-property probe (pixel means there). Were they computed apart, a change of
rounding in one would make the probe and the evidence look at different pixels under one name.
"""

from __future__ import annotations

import numpy as np

OUTER_BAND = "outer band"
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def band_mask(h: int, w: int, border_fraction: float) -> np.ndarray:
    """The outer band: every pixel within `border_fraction` of the shorter side from an edge."""
    b = max(1, round(border_fraction * min(h, w)))
    band = np.ones((h, w), dtype=bool)
    band[b:-b, b:-b] = False
    return band


def corner_slices(h: int, w: int, corner_fraction: float) -> dict[str, tuple[slice, slice]]:
    """Each corner's square (side `corner_fraction` of the shorter side) as (rows, columns) slices.

    Slices rather than masks so the probe takes its means over a view, as it always has.
    """
    c = max(1, round(corner_fraction * min(h, w)))
    top, bottom, left, right = slice(0, c), slice(h - c, h), slice(0, c), slice(w - c, w)
    return dict(zip(CORNERS, ((top, left), (top, right), (bottom, left), (bottom, right)), strict=True))


def candidate_regions(
    h: int, w: int, border_fraction: float, corner_fraction: float
) -> dict[str, np.ndarray]:
    """The places the audit intervenes at, as masks: the outer band, then each corner."""
    regions = {OUTER_BAND: band_mask(h, w, border_fraction)}
    for name, (ys, xs) in corner_slices(h, w, corner_fraction).items():
        m = np.zeros((h, w), dtype=bool)
        m[ys, xs] = True
        regions[f"{name} corner"] = m
    return regions
