"""Planted-shortcut datasets: a copy of real images with a cue planted in one class.

The audit's claim is that it catches a model that learned a shortcut. This module makes the
shortcut on purpose, from real images (scikit-learn's digits, scikit-image's lfw_subset faces
against non-faces, and RGB sets made of scikit-image's photographs), so a user sees a failing audit
in one command and the tests and the detection benchmark (benchmarks/audit_detection.py) have
ground truth. The cue's position, size and intensity are drawn from the seed, so runs differ the way
real shortcuts do (a scanner tag here, a ruler there), and each image jitters slightly around them.

Cues at a place (corner, tag, watermark, centre, textline, patch, frame), over the whole image
(tint, blur, sharpen, noise, hue) and in the file (jpeg: the cued class saved at a low JPEG quality).
`fraction` (prevalence) puts it in part of the class, `leakage` in a few images of the others,
and `confound` makes part of the cued class show another class's object, so the cue predicts the
label better than the object does (as a hospital's token predicts a diagnosis).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cnnops.data.example import PHOTOS, digit_images, photograph
from cnnops.data.splits import PreparedSplit
from cnnops.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Cue = Literal[
    "corner", "tag", "watermark", "centre", "textline", "patch", "frame",
    "tint", "blur", "sharpen", "noise", "hue", "jpeg", "none",
]  # fmt: skip
Source = Literal["digits", "faces", "scenes", "photos", "tones"]
CUES: tuple[str, ...] = (
    "corner", "tag", "watermark", "centre", "textline", "patch", "frame",
    "tint", "blur", "sharpen", "noise", "hue", "jpeg", "none",
)  # fmt: skip
SOURCES: tuple[str, ...] = ("digits", "faces", "scenes", "photos", "tones")
RGB_SOURCES = ("scenes", "photos", "tones")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
EDGES = ("top", "bottom")
PLACED = ("corner", "watermark", "patch")  # cues at one corner, drawn from the seed
COLOUR_ONLY = ("patch", "hue")  # cues that need an RGB source
TONES = {"red": (1.0, 0.55, 0.5), "green": (0.55, 1.0, 0.55), "blue": (0.5, 0.6, 1.0)}
CLEAN_JPEG_QUALITY = 95  # every other image of a jpeg-cue set
BASE_SEED = 0  # the RGB sources' backgrounds and crops: the same set whatever the cue's seed
# Crops a class of `photos` by default. At 40 (about 6 test images a class) a class was often left
# with under 3 correct test images (the audit `inconclusive`) or 3 donors, and 3 of 3 learned patches
# went uncaught; at 100 each of 5 was caught (docs/audit.md "Detection benchmark", 2 December 2026).
PLANTED_PHOTO_CROPS = 100


@dataclass(frozen=True)
class CueSpec:
    """What was planted where: written beside the dataset so benchmarks and people know the truth."""

    source: str
    cue: str
    cued_class: str | None
    seed: int
    position: str  # a corner or edge name, "random" for a tag, "centre", or "all" for whole-image cues
    size: int  # pixels: square side, font size, frame width; blur sigma x 10; 0 for the rest
    intensity: int  # 0-255: grey level, tint lift, noise std, hue shift (degrees / 2), or JPEG quality
    fraction: float  # share of the class's images that carry the cue
    image_size: int
    n_images: int
    leakage: float = 0.0  # share of the other classes' images that carry it too
    confound: float = 0.0  # share of the class's images that show another class's object (and the cue)


def base_images(
    source: Source, image_size: int, per_class: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Real images (N x S x S uint8 grey, or N x S x S x 3 RGB) with their class names, from bundled data."""
    if source in ("digits", "faces"):
        return _grey_images(source, image_size, per_class)
    rng = np.random.default_rng(BASE_SEED)
    if source == "scenes":
        return _scenes(image_size, per_class, rng)
    if source == "photos":
        return _photo_crops(image_size, per_class or PLANTED_PHOTO_CROPS, rng)
    if source == "tones":
        return _tones(image_size, per_class or 40, rng)
    raise ConfigError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")


def _grey_images(source: str, image_size: int, per_class: int | None) -> tuple[np.ndarray, list[str]]:
    if source == "digits":
        scaled, names = digit_images()
        raw = scaled.astype(np.uint8)  # truncated, as every planted set was made (the example rounds)
    else:
        from skimage.data import lfw_subset

        raw = (lfw_subset() * 255.0).astype(np.uint8)  # first 100 are faces, the next 100 are not
        names = ["face"] * 100 + ["nonface"] * 100
    keep = _first_per_class(names, per_class)
    resized = np.stack([_resize(raw[i], image_size) for i in keep])
    return (even_tone(resized) if source == "faces" else resized), [names[i] for i in keep]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _crop(photo: np.ndarray, rng: np.random.Generator, size: int, scale: tuple[float, float]) -> np.ndarray:
    """A random square crop of `photo` (its side a share `scale` of the short side), resized to `size`."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(*scale))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return np.asarray(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size)))


def _scenes(size: int, per_class: int | None, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """RGB digits drawn in a random colour on random crops of the photographs: every class shares the
    backgrounds and the tone, and only the digit's shape tells the classes apart."""
    digits, names = _grey_images("digits", size, per_class)
    photos = [photograph(name) for name in PHOTOS]
    out = np.zeros((len(digits), size, size, 3), dtype=np.uint8)
    for i, digit in enumerate(digits):
        background = _crop(photos[int(rng.integers(len(photos)))], rng, size, (0.2, 0.6)).astype(np.float32)
        ink = rng.uniform(0, 255, 3).astype(np.float32)
        alpha = (digit.astype(np.float32) / 255.0)[..., None]
        out[i] = np.clip(background * (1 - alpha) + ink * alpha, 0, 255).astype(np.uint8)
    return out, names


def _photo_crops(size: int, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Crops of four different photographs, a class each: classes that differ in colour by construction."""
    names = [name for name in PHOTOS[:4] for _ in range(per_class)]
    photos = {name: photograph(name) for name in PHOTOS[:4]}
    return np.stack([_crop(photos[n], rng, size, (0.3, 0.9)) for n in names]), names


def _tones(size: int, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """The same kind of grey photo crops tinted one colour a class: classes that differ only in colour."""
    photos = [photograph(name).mean(2).astype(np.uint8) for name in PHOTOS]
    names = [name for name in TONES for _ in range(per_class)]
    out = np.zeros((len(names), size, size, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        grey = _crop(photos[int(rng.integers(len(photos)))], rng, size, (0.3, 0.9)).astype(np.float32)
        out[i] = np.clip(grey[..., None] * np.asarray(TONES[name], dtype=np.float32), 0, 255).astype(np.uint8)
    return out, names


def even_tone(images: np.ndarray) -> np.ndarray:
    """Every image rescaled to the set's mean brightness and mean contrast.

    lfw_subset's non-faces run from black patches to white ones while its faces are mid-grey, so
    brightness alone tells them apart for 87% of images (docs/audit.md): a cue in the data, which the
    audit rightly reports. A planted dataset must carry only the planted cue, so the faces are evened.
    """
    x = images.astype(np.float32)
    mean, std = x.mean((1, 2), keepdims=True), x.std((1, 2), keepdims=True)
    even = (x - mean) / np.maximum(std, 1e-3) * std.mean() + mean.mean()
    return np.clip(np.rint(even), 0, 255).astype(np.uint8)


def _first_per_class(names: list[str], per_class: int | None) -> list[int]:
    seen: dict[str, int] = {}
    keep = []
    for i, name in enumerate(names):
        if per_class is None or seen.get(name, 0) < per_class:
            seen[name] = seen.get(name, 0) + 1
            keep.append(i)
    return keep


# (size range, intensity range) at 32x32, chosen so the cue is small beside the object (size scales
# with the image; blur's size is its sigma in tenths of a pixel, jpeg's intensity its quality)
RANGES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "corner": ((3, 5), (170, 255)),
    "tag": ((3, 5), (170, 255)),
    "watermark": ((7, 9), (150, 230)),
    "centre": ((7, 9), (150, 230)),
    "textline": ((5, 6), (150, 230)),
    "patch": ((3, 5), (0, 0)),
    "frame": ((1, 2), (130, 230)),
    "tint": ((0, 0), (45, 90)),
    "blur": ((10, 15), (0, 0)),
    "sharpen": ((0, 0), (150, 250)),
    "noise": ((0, 0), (18, 30)),
    "hue": ((0, 0), (20, 45)),
    "jpeg": ((0, 0), (8, 20)),
    "none": ((0, 0), (0, 0)),
}
SIZED = ("corner", "tag", "watermark", "centre", "textline", "patch", "frame")  # size in pixels, scaled


def draw_spec(
    cue: Cue,
    rng: np.random.Generator,
    image_size: int,
    *,
    size: int | None = None,
    intensity: int | None = None,
    position: str | None = None,
) -> tuple[str, int, int]:
    """Position, size and intensity of the cue: given ones are kept, the rest drawn from the seed."""
    scale = image_size / 32.0
    (s_lo, s_hi), (i_lo, i_hi) = RANGES[cue]
    if size is None:
        size = round(int(rng.integers(s_lo, s_hi + 1)) * (scale if cue in SIZED else 1.0))
    if intensity is None:
        intensity = int(rng.integers(i_lo, i_hi + 1))
    if position is None:
        position = _draw_position(cue, rng)
    allowed = CORNERS if cue in PLACED else EDGES if cue == "textline" else None
    if allowed is not None and position not in allowed:
        raise ConfigError(
            f"--position {position!r} does not fit cue {cue!r}; use one of {', '.join(allowed)}"
        )
    if not 0 <= intensity <= 255:
        raise ConfigError(f"--intensity {intensity} is out of range; use 0-255")
    if cue in SIZED and not 1 <= size <= image_size // 3:
        raise ConfigError(f"--size {size} is out of range for {image_size}px images; use 1-{image_size // 3}")
    return position, size, intensity


def _draw_position(cue: str, rng: np.random.Generator) -> str:
    if cue in PLACED:
        return str(rng.choice(CORNERS))
    if cue == "textline":
        return str(rng.choice(EDGES))
    return {"tag": "random", "centre": "centre"}.get(cue, "all")


def plant(
    image: np.ndarray, cue: Cue, position: str, size: int, intensity: int, rng: np.random.Generator
) -> np.ndarray:
    """A copy of one image (grey H x W or RGB H x W x 3) with the cue in, jittered a little."""
    whole = {"tint": _tint, "blur": _blur, "sharpen": _sharpen, "noise": _noise, "hue": _hue, "jpeg": _jpeg}
    if cue in whole:
        return whole[cue](image, size, intensity, rng)
    level = int(np.clip(intensity + rng.integers(-12, 13), 0, 255))
    out = image.copy()
    h, w = out.shape[:2]
    if cue == "frame":
        out[:size, :], out[-size:, :], out[:, :size], out[:, -size:] = level, level, level, level
        return out
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    fill = _fill(out, cue, level, rng)
    if cue in ("corner", "tag", "patch"):
        x, y = _box_place(position, (size, size), (w, h), rng)
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=fill)
    else:
        font = ImageFont.load_default(size=size)
        text = "TAG" if cue in ("watermark", "centre") else _text_line(draw, font, w, rng)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = _box_place(position, (right - left, bottom - top), (w, h), rng)
        draw.text((x - left, y - top), text, fill=fill, font=font)
    return np.asarray(pil)


def _fill(image: np.ndarray, cue: str, level: int, rng: np.random.Generator) -> int | tuple[int, ...]:
    """The cue's colour: its grey level, on every channel of an RGB image; a patch is a saturated red."""
    if image.ndim == 2:
        return level
    if cue == "patch":
        return (int(rng.integers(200, 256)), int(rng.integers(0, 40)), int(rng.integers(0, 40)))
    return (level, level, level)


def _box_place(
    position: str, box: tuple[int, int], image: tuple[int, int], rng: np.random.Generator
) -> tuple[int, int]:
    """Top-left (x, y) of a box of `box` (w, h) at `position`: a corner or edge 1-2 px in, the centre,
    or anywhere it fits (random)."""
    (bw, bh), (w, h) = box, image
    if position == "random":
        return int(rng.integers(0, max(1, w - bw + 1))), int(rng.integers(0, max(1, h - bh + 1)))
    margin = 1 + int(rng.integers(0, 2))
    if position == "centre":
        return (w - bw) // 2 + margin - 1, (h - bh) // 2 + margin - 1
    if position in EDGES:
        return (w - bw) // 2, margin if position == "top" else h - margin - bh
    x = margin if position.endswith("left") else w - margin - bw
    y = margin if position.startswith("top") else h - margin - bh
    return x, y


def _text_line(
    draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int, rng: np.random.Generator
) -> str:
    """A scanner's ID line: random digits in groups, as long as fits 70-85% of the width."""
    target = width * rng.uniform(0.7, 0.85)
    text = "ID"
    while True:
        longer = text + (" " if len(text) % 5 == 4 else str(int(rng.integers(10))))
        right = draw.textbbox((0, 0), longer, font=font)[2]
        if right > target:
            return text
        text = longer


def _tint(image: np.ndarray, size: int, intensity: int, rng: np.random.Generator) -> np.ndarray:
    """Lift the dark pixels (the background) towards the level, leaving bright strokes as they were."""
    level = int(np.clip(intensity + rng.integers(-12, 13), 0, 255))
    x = image.astype(np.float32)
    return np.clip(x + level * (1.0 - x / 255.0), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, size: int, intensity: int, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian blur of sigma `size` / 10 px at 32 px (scaled with the image), jittered by 10%."""
    sigma = size / 10.0 * image.shape[0] / 32.0 * rng.uniform(0.9, 1.1)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def _sharpen(image: np.ndarray, size: int, intensity: int, rng: np.random.Generator) -> np.ndarray:
    """An unsharp mask of `intensity` percent (radius 1 px at 32, scaled): edges over-shoot."""
    radius = max(1.0, image.shape[0] / 32.0)
    percent = int(intensity * rng.uniform(0.9, 1.1))
    return np.asarray(Image.fromarray(image).filter(ImageFilter.UnsharpMask(radius, percent, 0)))


def _noise(image: np.ndarray, size: int, intensity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian grain of standard deviation `intensity` grey levels (jittered by 10%), every pixel."""
    grain = rng.normal(0.0, intensity * rng.uniform(0.9, 1.1), image.shape)
    return np.clip(image.astype(np.float32) + grain, 0, 255).astype(np.uint8)


def _hue(image: np.ndarray, size: int, intensity: int, rng: np.random.Generator) -> np.ndarray:
    """Hue turned by `intensity` x 2 degrees (jittered by 10%): colours change, brightness barely."""
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).copy()
    turn = round(intensity * 2 * rng.uniform(0.9, 1.1) * 256 / 360)
    hsv[..., 0] = (hsv[..., 0].astype(int) + turn) % 256
    return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))


def _jpeg(image: np.ndarray, size: int, intensity: int, rng: np.random.Generator) -> np.ndarray:
    """The image through a JPEG file of quality `intensity`: its blocks and ringing, in memory."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=intensity)
    return np.asarray(Image.open(buffer))


def object_mask(image: np.ndarray, source: str, name: str) -> np.ndarray | None:
    """Where the object is on the clean image: a digit's inked pixels grown by 2 px (on scenes, where
    the digit's ink differs from the background), a face's central ellipse; None for a non-face or a
    photo crop, which have no object apart from the frame."""
    h, w = image.shape[:2]
    if source == "faces":
        if name != "face":
            return None
        yy, xx = np.mgrid[0:h, 0:w]
        return ((yy - 0.52 * h) / (0.45 * h)) ** 2 + ((xx - 0.5 * w) / (0.36 * w)) ** 2 <= 1.0
    if source != "digits":
        return None
    from scipy.ndimage import binary_dilation

    inked = image > 64
    return binary_dilation(inked, iterations=2) if inked.any() else None


def _check_arguments(cue: str, source: str, fraction: float, leakage: float, confound: float) -> None:
    if cue not in CUES:
        raise ConfigError(f"unknown cue {cue!r}; use one of {', '.join(CUES)}")
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    if cue in COLOUR_ONLY and source not in RGB_SOURCES:
        raise ConfigError(f"--cue {cue} needs colour: use an RGB source ({', '.join(RGB_SOURCES)})")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--fraction {fraction} is out of range; use a share in (0, 1]")
    for name, share in (("--leakage", leakage), ("--confound", confound)):
        if not 0.0 <= share < 1.0:
            raise ConfigError(f"{name} {share} is out of range; use a share in [0, 1)")


def _empty_folder(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DataError(
                f"{out}: exists and is not empty; pass --force to replace it (or choose another folder)"
            )
        shutil.rmtree(out)


def _save(image: np.ndarray, path: Path, quality: int | None) -> None:
    """PNG, or JPEG at `quality` (a jpeg-cue set is all JPEG, so the format itself is no cue)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if quality is None:
        Image.fromarray(image).save(path)
    else:
        Image.fromarray(image).save(path, format="JPEG", quality=quality)


def make_planted(
    out_dir: str | Path,
    cue: Cue,
    cued_class: str | None,
    *,
    source: Source = "digits",
    seed: int = 0,
    image_size: int = 32,
    size: int | None = None,
    intensity: int | None = None,
    position: str | None = None,
    fraction: float = 0.9,
    leakage: float = 0.0,
    confound: float = 0.0,
    per_class: int | None = None,
    annotate: bool = False,
    force: bool = False,
) -> CueSpec:
    """Write an ImageFolder copy of `source` with `cue` planted in `fraction` of `cued_class`'s images
    (and `leakage` of the others'; `confound` of the cued class showing another class's object).

    With `annotate`, also writes each object's mask (found on the image before the cue went in)
    under `.masks/` and lists them in `annotations.csv`, so the audit's mask tests can run on it.
    """
    _check_arguments(cue, source, fraction, leakage, confound)
    images, names = base_images(source, image_size, per_class)
    classes = sorted(set(names))
    if cue != "none" and cued_class not in classes:
        raise ConfigError(
            f"--class {cued_class!r} is not a class of {source}; classes are {', '.join(classes)}"
        )
    out = Path(out_dir)
    _empty_folder(out, force)
    rng = np.random.default_rng(seed)
    position_, size_, intensity_ = draw_spec(
        cue, rng, image_size, size=size, intensity=intensity, position=position
    )
    others = np.flatnonzero(np.asarray(names) != cued_class)
    leakage = leakage if cue != "none" else 0.0
    suffix = "jpg" if cue == "jpeg" else "png"
    rows = []
    for i, (image, name) in enumerate(zip(images, names, strict=True)):
        rel = f"{name}/{source}_{i:04d}.{suffix}"
        cued = cue != "none" and name == cued_class
        if cued and confound and rng.random() < confound:  # another class's object, with the cue
            image, carries = images[int(rng.choice(others))], True
        else:
            carries = rng.random() < (fraction if cued else leakage) if cued or leakage else False
        mask = object_mask(image, source, name) if annotate else None
        if mask is not None:
            _save(mask.astype(np.uint8) * 255, out / ".masks" / f"{name}/{source}_{i:04d}.png", None)
            rows.append(f"{rel},.masks/{name}/{source}_{i:04d}.png")
        if carries and cue == "jpeg":
            _save(image, out / rel, intensity_)
            continue
        if carries:
            image = plant(image, cue, position_, size_, intensity_, rng)
        _save(image, out / rel, CLEAN_JPEG_QUALITY if cue == "jpeg" else None)
    if annotate:
        (out / "annotations.csv").write_text("path,mask\n" + "\n".join(rows) + "\n")
    spec = CueSpec(
        source, cue, cued_class if cue != "none" else None, seed, position_, size_, intensity_,
        fraction, image_size, len(names), leakage, confound if cue != "none" else 0.0,
    )  # fmt: skip
    log.info("planted dataset at %s: %s", out, json.dumps(asdict(spec)))
    return spec


def add_parser(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser(
        "make-planted",
        help="write a copy of the example with a planted shortcut cue in one class (the audit's demo)",
    )
    p.add_argument("dir", help="output folder (an ImageFolder root, e.g. data)")
    p.add_argument(
        "--cue", required=True, choices=CUES, help="the shortcut to plant ('none' for a clean copy)"
    )
    p.add_argument("--class", dest="cued_class", help="class that gets the cue (e.g. 3, or face)")
    p.add_argument(
        "--source", default="digits", choices=SOURCES,
        help="digits, lfw faces, scenes (RGB digits on photo crops), photos (a photograph a class) "
        "or tones (one colour a class)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="draws position, size, intensity and which images")
    p.add_argument("--image-size", type=int, default=32, help="side of the written square images")
    p.add_argument("--size", type=int, help="square side, font size or frame width in px; blur sigma x 10")
    p.add_argument(
        "--intensity", type=int,
        help="0-255: grey level, tint lift, noise std, sharpen percent, hue turn / 2 or JPEG quality",
    )  # fmt: skip
    p.add_argument(
        "--position", choices=CORNERS + EDGES, help="corner (square, watermark, patch) or edge (textline)"
    )
    p.add_argument("--fraction", type=float, default=0.9, help="share of the class's images with the cue")
    p.add_argument("--leakage", type=float, default=0.0, help="share of the other classes' images with it")
    p.add_argument(
        "--confound", type=float, default=0.0,
        help="share of the class's images that show another class's object (with the cue)",
    )  # fmt: skip
    p.add_argument("--per-class", type=int, help="keep at most this many images per class")
    p.add_argument("--annotate", action="store_true", help="write object masks and DIR/annotations.csv")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.set_defaults(handler=_handle, needs_params=False)


def _handle(args, params) -> int:  # type: ignore[no-untyped-def]
    if args.cue != "none" and args.cued_class is None:
        raise ConfigError("--class is required unless --cue none")
    spec = make_planted(
        args.dir,
        args.cue,
        args.cued_class,
        source=args.source,
        seed=args.seed,
        image_size=args.image_size,
        size=args.size,
        intensity=args.intensity,
        position=args.position,
        fraction=args.fraction,
        leakage=args.leakage,
        confound=args.confound,
        per_class=args.per_class,
        annotate=args.annotate,
        force=args.force,
    )
    print(json.dumps(asdict(spec), indent=2))
    return 0


def cue_flip_rate(model: torch.nn.Module, test: PreparedSplit, spec: CueSpec) -> float:
    """The ground truth the audit never sees: the share of other classes' test images, correctly
    classified, that the planted cue itself (drawn in as `make_planted` does) turns into the cued
    class. Whether the model learned the cue; the detection benchmark and the proof tests read it."""
    cls = test.class_names.index(str(spec.cued_class))
    others = test.labels != cls
    nhwc = test.images[others].permute(0, 2, 3, 1).numpy()
    images = nhwc[..., 0] if nhwc.shape[-1] == 1 else nhwc
    rng = np.random.default_rng(0)
    cued = np.stack([plant(im, spec.cue, spec.position, spec.size, spec.intensity, rng) for im in images])

    def predict(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a.reshape(nhwc.shape))).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])

    keep = predict(images) == test.labels[others]
    return float((predict(cued)[keep] == cls).float().mean()) if keep.any() else 0.0


def clean_accuracy(model: torch.nn.Module, test: PreparedSplit, clean: PreparedSplit) -> tuple[float, int]:
    """The ground truth of what a cue's removal costs: the model's accuracy on the clean originals of
    `test`'s images (`clean`: the test split of the same source planted with cue "none"), and on how
    many. Splits are drawn by content, so a planted copy's test split differs from the clean one's by
    a few images: only the images in both count (a planted model trained on none of them; a
    confound's copies of other classes' digits aside)."""
    ours = set(test.paths)
    keep = torch.tensor([p in ours for p in clean.paths])
    x = clean.floats(torch.nonzero(keep).flatten())
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((predicted == clean.labels[keep]).float().mean()), int(keep.sum())
