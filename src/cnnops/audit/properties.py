"""The data-property probes: can simple image properties alone predict the label?

If brightness, a corner's mean or the file format predicts the class, the data carries a cue a
model may take, whatever the model did. Two probes, both warnings, never a `fail` (a cue in the data
is not proof the model uses it): a depth-limited decision tree (scikit-learn) fitted on the train
split and scored on the test split, with its per-class F1 and the properties it used; and per class,
the one-vs-rest AUROC of each image property alone (brightness, contrast, sharpness, high-frequency
energy, noise, entropy, saturation, hue, JPEG quality where the files say it) with a permutation
p-value. A flagged property gets an intervention (`property_transplants`) that can fail the audit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import rankdata
from sklearn.metrics import f1_score
from sklearn.tree import DecisionTreeClassifier

from cnnops.audit.contract import PropertyProbe, PropertyScore, PropertyWeight
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
    permutations: int,
    data_dir: Path | None,
) -> PropertyProbe:
    """Fit the shallow probe on train properties; per-class F1 on test and the properties it relied on;
    and each image property's one-vs-rest AUROC per class on the train split (`property_scores`).

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
        auroc=property_scores(
            *property_values(train, batch_size, data_dir), train.labels.numpy(), train.class_names,
            permutations, seed,
        ),
    )  # fmt: skip


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
IMMERKAER = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
ENTROPY_BINS = 64
GREY_PROPERTIES = ("brightness", "contrast", "sharpness", "high-frequency energy", "noise", "entropy")
COLOUR_PROPERTIES = ("saturation", "hue")
JPEG_QUALITY = "JPEG quality"
# The IJG (libjpeg) standard luminance quantization table, in natural (row-major) order, as Pillow's
# `Image.quantization` gives a file's tables.
IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=float)  # fmt: skip
QUALITIES = np.arange(1, 101)
# libjpeg's table at every quality (jpeg_quality_scaling, then baseline's clip to 1-255): a quality's
# table is compared whole, since below about 15 the clip at 255 flattens the large entries
_SCALES = np.where(QUALITIES < 50, 5000 // QUALITIES, 200 - 2 * QUALITIES)
IJG_TABLES = np.clip((IJG_LUMA[None] * _SCALES[:, None] + 50) // 100, 1, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W luminance of float images (ITU-R 601 weights, as Pillow's L)."""
    if x.shape[1] == 1:
        return x
    return (x[:, :1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114).contiguous()


def _filtered(g: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(g, kernel[None, None].to(g.dtype))


def image_properties(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each property of a batch of float images (N x C x H x W in [0, 1]), one number an image.

    sharpness: variance of the Laplacian; high-frequency energy: share of the spectrum's power (mean
    removed) beyond half the Nyquist radius; noise: Immerkaer's fast estimate of a Gaussian noise's
    standard deviation (1996), which a flat-mean or a blurred image keeps near 0; entropy: of the grey
    histogram in 64 bins. RGB adds saturation (HSV) and the hue's saturation-weighted unit vector
    (`hue`: its angle, measured against the set's mean hue by `property_values`).
    """
    g = _grey(x)
    h, w = g.shape[-2:]
    lap = _filtered(g, LAPLACIAN)
    spectrum = torch.fft.fft2(g - g.mean((2, 3), keepdim=True)).abs().square()
    fy, fx = torch.meshgrid(torch.fft.fftfreq(h), torch.fft.fftfreq(w), indexing="ij")
    high = (fy.square() + fx.square()).sqrt() > 0.25  # half of the Nyquist frequency (0.5 cycles/px)
    power = spectrum.flatten(1).sum(1).clamp_min(1e-12)
    hist = torch.stack([torch.histc(img, ENTROPY_BINS, 0.0, 1.0) for img in g])
    prob = hist / hist.sum(1, keepdim=True)
    out = {
        "brightness": g.mean((1, 2, 3)),
        "contrast": g.std((1, 2, 3)),
        "sharpness": lap.var((1, 2, 3)),
        "high-frequency energy": spectrum[:, :, high].flatten(1).sum(1) / power,
        "noise": _filtered(g, IMMERKAER).abs().mean((1, 2, 3)) * float(np.sqrt(np.pi / 2) / 6),
        "entropy": -(prob * prob.clamp_min(1e-12).log2()).sum(1),
    }
    if x.shape[1] == 3:
        top, bottom = x.amax(1), x.amin(1)
        sat = (top - bottom) / top.clamp_min(1e-6)
        hue = _hue_angle(x, top, bottom)
        out["saturation"] = sat.mean((1, 2))
        out["hue cos"] = (sat * torch.cos(hue)).mean((1, 2))
        out["hue sin"] = (sat * torch.sin(hue)).mean((1, 2))
    return out


def _hue_angle(x: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Per pixel HSV hue in radians, from the RGB channels of N x 3 x H x W floats."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    span = (top - bottom).clamp_min(1e-6)
    sector = torch.where(
        top == r, (g - b) / span % 6, torch.where(top == g, (b - r) / span + 2, (r - g) / span + 4)
    )
    return sector * (np.pi / 3)


def jpeg_quality(path: Path) -> float:
    """The IJG quality a JPEG file was saved at, from its luminance table (NaN for other files).

    The quality whose libjpeg table (`IJG_TABLES`) is nearest the file's: exact for libjpeg's own
    files; files from other encoders land near the IJG quality of the same table.
    """
    with Image.open(path) as im:
        tables = getattr(im, "quantization", None) if im.format == "JPEG" else None
    if not tables or len(tables[0]) != len(IJG_LUMA):
        return float("nan")
    table = np.asarray(tables[0], dtype=float)
    return float(QUALITIES[np.abs(np.log(IJG_TABLES) - np.log(table)).sum(1).argmin()])


def _collected(batches: Iterable[torch.Tensor]) -> dict[str, np.ndarray]:
    """Every image's properties from float batches, with the hue's angle from the set's mean hue (one
    scalar a circular value needs the whole set's mean first)."""
    parts: dict[str, list[np.ndarray]] = {}
    for x in batches:
        for name, v in image_properties(x).items():
            parts.setdefault(name, []).append(v.numpy())
    values = {name: np.concatenate(v) for name, v in parts.items()}
    if "hue cos" in values:
        cos, sin = values.pop("hue cos"), values.pop("hue sin")
        mean = np.arctan2(sin.mean(), cos.mean())
        values["hue"] = np.degrees(np.angle(np.exp(1j * (np.arctan2(sin, cos) - mean))))
    return values


def property_values(
    split: PreparedSplit, batch_size: int, data_dir: Path | None = None
) -> tuple[np.ndarray, list[str]]:
    """Every image's properties (N x P), `batch_size` images at a time, and their names. With
    `data_dir`, each image's JPEG quality where its file is a JPEG (left out when none is)."""
    values = _collected(
        split.images[i : i + batch_size].float().div(255.0) for i in range(0, len(split), batch_size)
    )
    if data_dir is not None:
        quality = np.array(
            [jpeg_quality(data_dir / p) if (data_dir / p).is_file() else np.nan for p in split.paths]
        )
        if np.isfinite(quality).any():
            values[JPEG_QUALITY] = quality
    names = list(values)
    return np.stack([values[n] for n in names], 1) if names else np.zeros((len(split), 0)), names


def property_scores(
    values: np.ndarray,
    names: list[str],
    labels: np.ndarray,
    class_names: list[str],
    permutations: int,
    seed: int,
) -> dict[str, dict[str, PropertyScore]]:
    """Per class, each property's one-vs-rest AUROC with a two-sided permutation p-value.

    By hand rather than scipy.stats.permutation_test: the AUROC is the positives' rank sum, so with
    the ranks computed once a permutation is one gather for every property at once, where the
    generic test would re-rank each resample. NaN values (no JPEG quality) leave their images out.
    """
    rng = np.random.default_rng([seed, 2])
    out: dict[str, dict[str, PropertyScore]] = {}
    for cls, name in enumerate(class_names):
        scores = {}
        for j, prop in enumerate(names):
            known = np.isfinite(values[:, j])
            v, pos = values[known, j], labels[known] == cls
            if pos.sum() < 2 or (~pos).sum() < 2:
                continue
            scores[prop] = _score(v, pos, permutations, rng)
        out[name] = scores
    return out


PERMUTATION_ENTRIES = 100 * 1024  # indices one permutation gather holds: 800 kB of int64


def _score(v: np.ndarray, pos: np.ndarray, permutations: int, rng: np.random.Generator) -> PropertyScore:
    n1, n0 = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(v)
    auc = (ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    extreme = 0
    # Permutations a gather: k x N indices, k bounded so memory does not grow with the split (100 at
    # N <= 1024, as before; fewer, down to one, on a lab's train split).
    chunk = max(1, min(100, PERMUTATION_ENTRIES // len(v)))
    for start in range(0, permutations, chunk):
        k = min(chunk, permutations - start)
        chosen = rng.permuted(np.tile(np.arange(len(v)), (k, 1)), axis=1)[:, :n1]
        aucs = (ranks[chosen].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
        extreme += int((np.abs(aucs - 0.5) >= abs(auc - 0.5) - 1e-12).sum())
    return PropertyScore(
        auroc=round(float(auc), 4),
        p_value=round((1 + extreme) / (permutations + 1), 6),
        class_median=round(float(np.median(v[pos])), 6),
        others_median=round(float(np.median(v[~pos])), 6),
    )


VALIDATE_SIDE = 64  # validate sees the files before prepare's size is known: each is measured at 64 px


def thumbnail_property_scores(
    thumbnails: np.ndarray,
    rows: list[int],
    labels: list[str],
    *,
    permutations: int,
    seed: int,
    batch_size: int = 64,
) -> dict[str, dict[str, PropertyScore]]:
    """`property_scores` of the images at `rows` of `thumbnails` (uint8 N x C x `VALIDATE_SIDE`^2,
    memory-mapped: validate's manifest pass decoded each file into it once) with their class names,
    a batch at a time: validate's data warning, before anything is trained."""
    names = sorted(set(labels))

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, len(rows), batch_size):
            yield torch.from_numpy(thumbnails[rows[i : i + batch_size]]).float().div(255.0)

    values = _collected(batches())
    if not values:
        return {}
    props = list(values)
    y = np.array([names.index(label) for label in labels])
    return property_scores(np.stack([values[n] for n in props], 1), props, y, names, permutations, seed)
