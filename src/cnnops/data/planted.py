"""Planted-shortcut datasets: a copy of real images with a cue planted in one class.

The audit's claim is that it catches a model that learned a shortcut. This module makes the
shortcut on purpose, from real images (scikit-learn's digits, scikit-image's lfw_subset faces
against non-faces), so a user sees a failing audit in one command and the tests and the detection
benchmark have ground truth. The cue's position, size and intensity are drawn from the seed, so
runs differ the way real shortcuts do (a scanner tag here, a ruler there), and each image jitters
slightly around them.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnnops.data.example import digit_images
from cnnops.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Cue = Literal["corner", "watermark", "frame", "tint", "none"]
Source = Literal["digits", "faces"]
CUES: tuple[str, ...] = ("corner", "watermark", "frame", "tint", "none")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class CueSpec:
    """What was planted where: written beside the dataset so benchmarks and people know the truth."""

    source: str
    cue: str
    cued_class: str | None
    seed: int
    position: str  # a corner name, or "all" for frame and tint
    size: int  # pixels: square side, font size, frame width; 0 for tint
    intensity: int  # 0-255: cue grey level (corner, watermark, frame) or background lift (tint)
    fraction: float  # share of the class's images that carry the cue
    image_size: int
    n_images: int


def base_images(
    source: Source, image_size: int, per_class: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Real grey images (N x S x S uint8) with their class names (one per image), from bundled data."""
    if source == "digits":
        scaled, names = digit_images()
        raw = scaled.astype(np.uint8)  # truncated, as every planted set was made (the example rounds)
    elif source == "faces":
        from skimage.data import lfw_subset

        raw = (lfw_subset() * 255.0).astype(np.uint8)  # first 100 are faces, the next 100 are not
        names = ["face"] * 100 + ["nonface"] * 100
    else:
        raise ConfigError(f"unknown source {source!r}; use 'digits' or 'faces'")
    keep = _first_per_class(names, per_class)
    resized = np.stack(
        [np.asarray(Image.fromarray(raw[i]).resize((image_size, image_size), Image.BILINEAR)) for i in keep]
    )
    return (even_tone(resized) if source == "faces" else resized), [names[i] for i in keep]


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
    ranges = {  # (size range, intensity range) at 32x32, chosen so the cue is small beside the object
        "corner": ((3, 5), (170, 255)),
        "watermark": ((7, 9), (150, 230)),
        "frame": ((1, 2), (130, 230)),
        "tint": ((0, 0), (45, 90)),
        "none": ((0, 0), (0, 0)),
    }
    (s_lo, s_hi), (i_lo, i_hi) = ranges[cue]
    if size is None:
        size = round(int(rng.integers(s_lo, s_hi + 1)) * scale)
    if intensity is None:
        intensity = int(rng.integers(i_lo, i_hi + 1))
    if position is None:
        position = str(rng.choice(CORNERS)) if cue in ("corner", "watermark") else "all"
    if cue in ("corner", "watermark") and position not in CORNERS:
        raise ConfigError(f"--position {position!r} is not a corner; use one of {', '.join(CORNERS)}")
    if not 0 <= intensity <= 255:
        raise ConfigError(f"--intensity {intensity} is out of range; use 0-255")
    if cue in ("corner", "watermark", "frame") and not 1 <= size <= image_size // 3:
        raise ConfigError(f"--size {size} is out of range for {image_size}px images; use 1-{image_size // 3}")
    return position, size, intensity


def plant(
    image: np.ndarray, cue: Cue, position: str, size: int, intensity: int, rng: np.random.Generator
) -> np.ndarray:
    """A copy of one grey image with the cue drawn in, jittered by a pixel and a little intensity."""
    out = image.copy()
    h, w = out.shape
    level = int(np.clip(intensity + rng.integers(-12, 13), 0, 255))
    if cue == "tint":
        # Lift the dark pixels (the background) towards `level`, leaving bright strokes as they were.
        lifted = out.astype(np.float32) + level * (1.0 - out.astype(np.float32) / 255.0)
        return np.clip(lifted, 0, 255).astype(np.uint8)
    if cue == "frame":
        out[:size, :], out[-size:, :], out[:, :size], out[:, -size:] = level, level, level, level
        return out
    margin = 1 + int(rng.integers(0, 2))
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    if cue == "corner":
        box_w, box_h = size, size
    else:
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = draw.textbbox((0, 0), "TAG", font=font)
        box_w, box_h = right - left, bottom - top
    x = margin if position.endswith("left") else w - margin - box_w
    y = margin if position.startswith("top") else h - margin - box_h
    if cue == "corner":
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=level)
    else:
        draw.text((x - left, y - top), "TAG", fill=level, font=font)
    return np.asarray(pil)


def object_mask(image: np.ndarray, source: str, name: str) -> np.ndarray | None:
    """Where the object is on the clean image: a digit's inked pixels grown by 2 px, a face's
    central ellipse; None for a non-face, which has no object."""
    h, w = image.shape
    if source == "faces":
        if name != "face":
            return None
        yy, xx = np.mgrid[0:h, 0:w]
        return ((yy - 0.52 * h) / (0.45 * h)) ** 2 + ((xx - 0.5 * w) / (0.36 * w)) ** 2 <= 1.0
    from scipy.ndimage import binary_dilation

    inked = image > 64
    return binary_dilation(inked, iterations=2) if inked.any() else None


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
    per_class: int | None = None,
    annotate: bool = False,
    force: bool = False,
) -> CueSpec:
    """Write an ImageFolder copy of `source` with `cue` planted in `fraction` of `cued_class`'s images.

    With `annotate`, also writes each object's mask (found on the image before the cue went in)
    under `.masks/` and lists them in `annotations.csv`, so the audit's mask tests can run on it.
    """
    if cue not in CUES:
        raise ConfigError(f"unknown cue {cue!r}; use one of {', '.join(CUES)}")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--fraction {fraction} is out of range; use a share in (0, 1]")
    images, names = base_images(source, image_size, per_class)
    classes = sorted(set(names))
    if cue != "none" and cued_class not in classes:
        raise ConfigError(
            f"--class {cued_class!r} is not a class of {source}; classes are {', '.join(classes)}"
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DataError(
                f"{out}: exists and is not empty; pass --force to replace it (or choose another folder)"
            )
        shutil.rmtree(out)
    rng = np.random.default_rng(seed)
    position_, size_, intensity_ = draw_spec(
        cue, rng, image_size, size=size, intensity=intensity, position=position
    )
    rows = []
    for i, (image, name) in enumerate(zip(images, names, strict=True)):
        rel = f"{name}/{source}_{i:04d}.png"
        mask = object_mask(image, source, name) if annotate else None
        if mask is not None:
            (out / ".masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / ".masks" / rel)
            rows.append(f"{rel},.masks/{rel}")
        if cue != "none" and name == cued_class and rng.random() < fraction:
            image = plant(image, cue, position_, size_, intensity_, rng)
        (out / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / rel)
    if annotate:
        (out / "annotations.csv").write_text("path,mask\n" + "\n".join(rows) + "\n")
    spec = CueSpec(
        source,
        cue,
        cued_class if cue != "none" else None,
        seed,
        position_,
        size_,
        intensity_,
        fraction,
        image_size,
        len(names),
    )
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
        "--source", default="digits", choices=("digits", "faces"), help="sklearn digits or lfw faces"
    )
    p.add_argument("--seed", type=int, default=0, help="draws position, size, intensity and which images")
    p.add_argument("--image-size", type=int, default=32, help="side of the written square images")
    p.add_argument("--size", type=int, help="square side, font size or frame width in pixels")
    p.add_argument("--intensity", type=int, help="cue grey level 0-255 (tint: how much the background lifts)")
    p.add_argument("--position", choices=CORNERS, help="corner for the square or the watermark")
    p.add_argument("--fraction", type=float, default=0.9, help="share of the class's images with the cue")
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
        per_class=args.per_class,
        annotate=args.annotate,
        force=args.force,
    )
    print(json.dumps(asdict(spec), indent=2))
    return 0
