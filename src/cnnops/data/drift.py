"""Drift of an incoming batch from the training data: the image properties compared, and the
reference distributions (GX partition objects) they are compared with.

The reference is the training data as the model saw it: the prepared train split (read memory-mapped
in batches) for brightness and contrast at the prepared size, validate's manifest of those same files
for width, height and the colour mode as stored, the split's labels for the class shares. An incoming
file is measured the same way: decoded through the data contract (with the split's high-bit window),
resized to the prepared size like prepare does. The comparison itself is Great Expectations'
`ExpectColumnKLDivergenceToBeLessThan` (`cnnops check-incoming`): KL(batch || reference) in nats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cnnops.data.decode import HIGH_BIT_MODES, read_image, to_tensor
from cnnops.data.splits import PreparedSplit, split_files
from cnnops.errors import StageInputError

NUMERIC = ("width", "height", "brightness", "contrast")
CATEGORICAL = ("mode", "label")
PROPERTIES = (*NUMERIC, *CATEGORICAL)
MAX_CATEGORIES = (
    20  # a numeric property with this many distinct reference values or fewer is compared value by value
)
MAX_BINS = 10  # quantile bins of a continuous property; fewer for a small batch (see `partition`)
# Added to every reference bin (Jeffreys' prior), so a bin the reference left empty, or a value it never
# held, has a small weight instead of zero: KL(batch || reference) stays finite and grows with how much
# of the batch lands where the training data had (almost) nothing.
PSEUDO_COUNT = 0.5
STATS_BATCH = 256  # train images read at a time for their brightness and contrast


@dataclass(frozen=True)
class Reference:
    """The training data's image properties, one row per train image (columns PROPERTIES)."""

    frame: pd.DataFrame
    image_size: tuple[int, int]  # (height, width) of the prepared split
    color_mode: str
    window: tuple[float, float] | None  # the high-bit window the split was decoded through


def image_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Brightness (mean) and contrast (standard deviation) of each float image of a batch (N x C x H x W,
    values in [0, 1]) over its pixels and channels."""
    flat = images.flatten(1)
    return flat.mean(1).numpy(), flat.std(1).numpy()


def load_reference(prepared: Path, validation: Path, color_mode: str) -> tuple[Reference | None, str]:
    """The train split's properties, or None and why not (no prepared split yet, validate's report
    missing, a colour mode the params have changed since)."""
    index = split_files(prepared, "train")[1]
    if not index.exists() or not validation.exists():
        missing = index if not index.exists() else validation
        return (
            None,
            f"{missing} not found: the pipeline has not run on this data yet, so there is no reference",
        )
    split = PreparedSplit.load(prepared, "train")
    if split.color_mode != color_mode:
        return (
            None,
            f"{index} is {split.color_mode}, data.color_mode is {color_mode}: re-run the pipeline first",
        )
    sizes = _manifest(validation).set_index("path").reindex(split.paths)
    if sizes["width"].isna().any():
        stale = sizes.index[sizes["width"].isna()][0]
        raise StageInputError(
            f"{validation}: no decoded entry for {stale} of the train split {index}: the two are from "
            "different runs; run `dvc repro prepare` before checking incoming data"
        )
    brightness, contrast = zip(
        *(image_stats(images) for images, _ in split.batches(STATS_BATCH)), strict=True
    )
    frame = pd.DataFrame(
        {
            "width": sizes["width"].astype(int).to_numpy(),
            "height": sizes["height"].astype(int).to_numpy(),
            "brightness": np.concatenate(brightness),
            "contrast": np.concatenate(contrast),
            "mode": sizes["mode"].to_numpy(),
            "label": [split.class_names[i] for i in split.labels.tolist()],
        }
    )
    return Reference(frame, split.image_size, split.color_mode, split.window), ""


def _manifest(validation: Path) -> pd.DataFrame:
    try:
        rows = json.loads(validation.read_text())["manifest"]
        return pd.DataFrame(rows, columns=["path", "width", "height", "mode"])
    except (ValueError, KeyError, TypeError):
        raise StageInputError(
            f"{validation}: not a validate report with a manifest; run `dvc repro validate`"
        ) from None


def file_properties(
    path: Path, image: Any, mode: str, reference: Reference, max_pixels: int
) -> dict[str, float]:
    """Brightness and contrast of one contract-decoded image at the reference's prepared size; a
    high-bit file is decoded again through the split's window first, as prepare does."""
    if mode in HIGH_BIT_MODES and reference.window is not None:
        image = read_image(
            path, color_mode=reference.color_mode, max_pixels=max_pixels, window=reference.window
        ).image
    tensor = to_tensor(image, reference.image_size).unsqueeze(0).float().div_(255.0)
    brightness, contrast = image_stats(tensor)
    return {"brightness": float(brightness[0]), "contrast": float(contrast[0])}


def partition(values: pd.Series, batch_size: int) -> dict[str, Any]:
    """The keyword arguments of GX's KL expectation for one reference property: its partition object
    (values and weights, or bins and weights) and the weight held out for values it never held.

    A categorical property, or a numeric one with few distinct values (every image 28 px wide), is
    compared value by value. A continuous one gets bins at the reference's quantiles, as many as the
    square root of the batch size (2 to MAX_BINS): KL over k bins measured on n files is biased upwards
    by about (k - 1) / 2n, so a batch of 9 files is compared on 3 bins, not 10. Two open bins beyond
    the reference's range catch a batch outside it.
    """
    n = len(values)
    distinct = values.value_counts(sort=False).sort_index()
    if values.name in CATEGORICAL or len(distinct) <= MAX_CATEGORIES:
        return {
            "partition_object": {
                "values": [_scalar(v) for v in distinct.index],
                "weights": (distinct.to_numpy() / n).tolist(),
            },
            "tail_weight_holdout": PSEUDO_COUNT / (n + PSEUDO_COUNT),
        }
    bins = min(MAX_BINS, max(2, math.isqrt(batch_size)))
    edges = np.unique(np.quantile(values.to_numpy(float), np.linspace(0, 1, bins + 1)))
    bounds = [-math.inf, *edges.tolist(), math.inf]
    counts = np.histogram(values.to_numpy(float), bounds)[0] + PSEUDO_COUNT
    return {"partition_object": {"bins": bounds, "weights": (counts / counts.sum()).tolist()}}


def _scalar(value: Any) -> Any:
    """numpy scalars as Python ones (GX compares them with the batch's value counts)."""
    return value.item() if isinstance(value, np.generic) else value


def summary(values: Sequence[Any] | pd.Series, numeric: bool) -> dict[str, Any]:
    """What a report shows of one property's distribution: median and 5th-95th percentiles, or the
    shares of its most common values (at most 5)."""
    series = pd.Series(values)
    if numeric:
        low, median, high = (float(v) for v in np.quantile(series.to_numpy(float), [0.05, 0.5, 0.95]))
        return {"median": round(median, 4), "p5": round(low, 4), "p95": round(high, 4)}
    shares = series.value_counts(normalize=True).head(5)
    return {"shares": {str(k): round(float(v), 4) for k, v in shares.items()}}
