"""The intensity window of high-bit images (12/16-bit X-ray, microscopy), measured on the train split.

`data.window: percentiles` maps the `data.window_percentiles` of the train split's high-bit values
onto 0..255 (`cnnops.data.decode`, step 3). Percentiles are taken over a bounded, evenly spaced
sample of the train images and a fixed number of values from each, so memory and time do not grow
with the data; the window found is stored with the split, the checkpoint and the ONNX metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnops.data.decode import Window, read_high_bit
from cnnops.errors import DataError

log = logging.getLogger(__name__)

VALUES_PER_IMAGE = 4096  # values drawn from each sampled image


def measure_window(
    paths: Sequence[Path], percentiles: tuple[float, float], *, sample: int, max_pixels: int, seed: int
) -> Window | None:
    """(low, high) at `percentiles` of the high-bit values in `paths` (at most `sample` images, evenly
    spaced); None, with a warning, when none of them is a high-bit image."""
    step = max(1, -(-len(paths) // sample))
    rng = np.random.default_rng(seed)
    drawn = []
    for path in paths[::step]:
        values = read_high_bit(path, max_pixels=max_pixels)
        if values is not None:
            flat = values.ravel()
            drawn.append(flat[rng.integers(0, flat.size, min(VALUES_PER_IMAGE, flat.size))])
    if not drawn:
        log.warning(
            "data.window is percentiles but no sampled train image is high-bit: 8-bit images ignore it"
        )
        return None
    low, high = (float(v) for v in np.percentile(np.concatenate(drawn), percentiles))
    if not high > low:
        raise DataError(
            f"the train split's high-bit values have {percentiles[0]}th and {percentiles[1]}th percentiles "
            f"both {low:g}: no window to map; widen data.window_percentiles or give data.window [low, high]"
        )
    log.info("window of the train split's high-bit images: %g..%g (%d images)", low, high, len(drawn))
    return low, high
