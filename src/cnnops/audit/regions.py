"""Where shortcuts usually sit: the outer band and the four corners of the image, and at other
scales the edge strips, the centre and the cells of coarse grids.

One geometry for both readers of it: the saliency evidence (transplants and energy at these
places) and the data-property probe (pixel means there). Were they computed apart, a change of
rounding in one would make the probe and the evidence look at different pixels under one name.
The probe reads the band and the corners (`candidate_regions`); the interventions read every
scale (`intervention_regions`): a text line along an edge is wider than a corner, a watermark in
the middle of the image is in no corner, and a cue over a quarter of the image in no small place.
"""

from __future__ import annotations

import numpy as np

OUTER_BAND = "outer band"
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
EDGES = ("top", "bottom", "left", "right")
CENTRE = "centre"
_ROWS, _COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")  # a 3x3 grid's words


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


def edge_strip_masks(h: int, w: int, fraction: float) -> dict[str, np.ndarray]:
    """A strip along each edge, `fraction` of the side across it deep (a text line, a ruler)."""
    dy, dx = max(1, round(fraction * h)), max(1, round(fraction * w))
    out = {}
    for edge, (ys, xs) in zip(
        EDGES,
        ((slice(0, dy), slice(None)), (slice(h - dy, h), slice(None)),
         (slice(None), slice(0, dx)), (slice(None), slice(w - dx, w))),
        strict=True,
    ):  # fmt: skip
        m = np.zeros((h, w), dtype=bool)
        m[ys, xs] = True
        out[f"{edge} strip {100 * fraction:.0f}%"] = m
    return out


def centre_mask(h: int, w: int, fraction: float) -> np.ndarray:
    """The centred rectangle whose sides are `fraction` of the image's (a centre watermark)."""
    ch, cw = max(1, round(fraction * h)), max(1, round(fraction * w))
    m = np.zeros((h, w), dtype=bool)
    m[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw] = True
    return m


def grid_masks(h: int, w: int, n: int) -> dict[str, np.ndarray]:
    """The cells of an n x n grid, named by where they sit (a cue over a large part of the image)."""
    ys, xs = np.linspace(0, h, n + 1).round().astype(int), np.linspace(0, w, n + 1).round().astype(int)
    out = {}
    for i in range(n):
        for j in range(n):
            m = np.zeros((h, w), dtype=bool)
            m[ys[i] : ys[i + 1], xs[j] : xs[j + 1]] = True
            out[f"{_cell_words(i, j, n)} cell of {n}x{n}"] = m
    return out


def _cell_words(i: int, j: int, n: int) -> str:
    """A grid cell's place in words: its row and column mapped onto top/middle/bottom, left/centre/right."""
    if n > 3:
        return f"row {i + 1} column {j + 1}"  # words repeat past 3 a side: numbers stay unique
    return f"{_ROWS[round(2 * i / (n - 1))]}-{_COLUMNS[round(2 * j / (n - 1))]}"


def intervention_regions(
    h: int,
    w: int,
    *,
    border_fraction: float,
    corner_fraction: float,
    edge_fractions: tuple[float, ...],
    centre_fraction: float,
    grids: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """Every fixed place the transplants test: the probe's band and corners first (the report keeps
    their order), then each edge strip depth, the centre, and each grid's cells. Duplicates (a 1x1
    grid, two equal depths) are dropped by name."""
    regions = candidate_regions(h, w, border_fraction, corner_fraction)
    for fraction in edge_fractions:
        regions.update(edge_strip_masks(h, w, fraction))
    regions[CENTRE] = centre_mask(h, w, centre_fraction)
    for n in grids:
        regions.update(grid_masks(h, w, n))
    return regions


def shape_matters(name: str) -> bool:
    """Whether a place's texture is an object's as often as a cue's, so a transplant there is judged
    against the donor's own pixels shuffled too: every place but a corner (see evidence.region_transplant)."""
    return not name.endswith(" corner")


def off_object_only(name: str) -> bool:
    """Whether a place is pasted only where it lies off the donor's object: the strips, the centre and
    the grid cells, large enough to hold part of an object (the band and corners keep their measured
    whole-place pastes)."""
    return name != OUTER_BAND and not name.endswith(" corner")
