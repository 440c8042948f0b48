"""The data-property probe: can simple image properties alone predict the label?

If brightness, a corner's mean or the file format predicts the class, the data carries a cue a
model may take, whatever the model did. A depth-limited decision tree (scikit-learn) is fitted on
the train split and scored on the test split; its per-class F1 and the properties it used are
reported. It is a warning, never a `fail`: a cue in the data is not proof the model uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from sklearn.metrics import f1_score
from sklearn.tree import DecisionTreeClassifier

from cnnops.audit.contract import PropertyProbe, PropertyWeight
from cnnops.audit.regions import band_mask, corner_slices
from cnnops.data.splits import PreparedSplit

log = logging.getLogger(__name__)

FILE_FIELDS = ("width", "height", "aspect", "bytes", "format", "mode")


def pixel_properties(
    split: PreparedSplit, border_fraction: float, corner_fraction: float, batch_size: int
) -> tuple[np.ndarray, list[str]]:
    """Per image: brightness and contrast per channel, outer band, centre and corner means.

    The band and corners are the audit's candidate regions (`regions`), so a cue the probe finds
    in the data is at the place the transplants test. Read `batch_size` images at a time: the
    features are 11 numbers a channel, so the whole train split of a lab is probed in a few MB.
    """
    _, c, h, w = split.images.shape
    fields = _pixel_fields(band_mask(h, w, border_fraction), corner_slices(h, w, corner_fraction))
    names = [name + (f"[{'RGB'[ch]}]" if c == 3 else "") for ch in range(c) for name in fields]
    values = np.zeros((len(split), len(names)), dtype=np.float32)
    for i in range(0, len(split), batch_size):
        x = split.images[i : i + batch_size].float().div(255.0).numpy()
        values[i : i + len(x)] = np.stack([f(x[:, ch]) for ch in range(c) for f in fields.values()], 1)
    return values, names


def _pixel_fields(
    band: np.ndarray, corners: dict[str, tuple[slice, slice]]
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each pixel property by name, as a function of one channel of a batch (N x H x W in [0, 1])."""
    return {
        "brightness": lambda img: img.mean((1, 2)),
        "contrast": lambda img: img.std((1, 2)),
        "band mean": lambda img: img[:, band].mean(1),
        "band std": lambda img: img[:, band].std(1),
        "centre mean": lambda img: img[:, ~band].mean(1),
        **{
            f"{corner} mean": lambda img, ys=ys, xs=xs: img[:, ys, xs].mean((1, 2))
            for corner, (ys, xs) in corners.items()
        },
    }


def file_properties(paths: list[str], manifest: dict[str, dict]) -> tuple[np.ndarray, list[str]]:
    """Per image: stored size, aspect ratio, bytes, format and mode, from the validate manifest."""
    formats = sorted({str(manifest[p].get("format")) for p in paths if p in manifest})
    modes = sorted({str(manifest[p].get("mode")) for p in paths if p in manifest})
    rows = []
    for p in paths:
        m = manifest.get(p, {})
        width, height = float(m.get("width") or 0), float(m.get("height") or 0)
        rows.append([
            width, height, width / height if height else 0.0, float(m.get("bytes") or 0),
            formats.index(str(m.get("format"))) if p in manifest else -1,
            modes.index(str(m.get("mode"))) if p in manifest else -1,
        ])  # fmt: skip
    return np.asarray(rows, dtype=float).reshape(len(paths), len(FILE_FIELDS)), list(FILE_FIELDS)


def probe(
    train: PreparedSplit,
    test: PreparedSplit,
    manifest: dict[str, dict] | None,
    *,
    border_fraction: float,
    corner_fraction: float,
    seed: int,
    batch_size: int,
) -> PropertyProbe:
    """Fit the shallow probe on train properties; per-class F1 on test and the properties it relied on.

    Both splits are streamed whole (`pixel_properties`), not sampled: the figures are those of every
    image, and memory is one batch of images plus the small feature table.
    """
    features = []
    for split in (train, test):
        pix, names = pixel_properties(split, border_fraction, corner_fraction, batch_size)
        if manifest is not None:
            files, file_names = file_properties(split.paths, manifest)
            pix, names = np.concatenate([pix, files], 1), names + file_names
        features.append(pix)
    tree = DecisionTreeClassifier(max_depth=3, min_samples_leaf=5, random_state=seed)
    tree.fit(features[0], train.labels.numpy())
    pred = tree.predict(features[1])
    y = test.labels.numpy()
    labels = list(range(len(test.class_names)))
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    importance = sorted(zip(names, tree.feature_importances_, strict=True), key=lambda t: -t[1])
    return PropertyProbe(
        accuracy=round(float((pred == y).mean()), 4) if len(y) else 0.0,
        majority_accuracy=round(float(np.bincount(y).max() / len(y)), 4) if len(y) else 0.0,
        used_file_properties=manifest is not None,
        top_properties=tuple(PropertyWeight(n, round(float(v), 4)) for n, v in importance[:3] if v > 0),
        per_class_f1={name: round(float(v), 4) for name, v in zip(test.class_names, f1, strict=True)},
    )
