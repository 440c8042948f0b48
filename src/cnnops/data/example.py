"""`cnnops make-example DIR`: the bundled example datasets, made from data that packages ship.

The default is scikit-learn's handwritten digits. The 1,797 8x8 digits ship inside scikit-learn
(no download). They are written as 8-bit grayscale PNG in ImageFolder layout
(`DIR/<digit>/<index>.png`), ink white on black as in the source, scaled from 0..16 to 0..255 and
enlarged by pixel repetition (exact, no resampling filter) so a person can look at them.

`--photos` writes a real-photo RGB example instead: one class per colour photograph that
scikit-image ships inside its wheel (no pooch download), each image a random square crop of its
photograph at a random scale and place, resized to 224 px and saved as JPEG
(`DIR/<photo>/<index>.jpg`). It exercises what the digits cannot: RGB photographs, JPEG decoding
and networks at their ImageNet input size.

Names and bytes depend only on the source data (and the fixed seed of the crops), so the DVC hash
of an example never changes between runs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from cnnops.cli import positive_int
from cnnops.errors import DataError

log = logging.getLogger(__name__)


def digit_images() -> tuple[np.ndarray, list[str]]:
    """The digits (N x 8 x 8) scaled from 0..16 to 0..255, with each image's class name.

    The one reader of the digits for the example and the planted datasets. Float (exactly
    v * 255 / 16), so each keeps the rounding its files were always written with.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images * (255.0 / 16.0), [str(t) for t in digits.target]


def write_digits(out_dir: str | Path, *, scale: int = 4, per_class: int | None = None) -> int:
    """Write the digits as PNG under `out_dir/<digit>/<index>.png`; returns the number written.

    `per_class` keeps the first N images of each digit (by index) for small test copies.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: is not empty; remove it first or choose another folder")
    images, labels = digit_images()
    pixels = np.rint(images).astype(np.uint8)
    block = np.ones((scale, scale), dtype=np.uint8)
    written: dict[str, int] = {}
    for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        if per_class is not None and written.get(label, 0) >= per_class:
            continue
        path = out_dir / label / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(image, block), mode="L").save(path, format="PNG", optimize=False)
        written[label] = written.get(label, 0) + 1
    total = sum(written.values())
    log.info("wrote %d digit images in %d class folders under %s", total, len(written), out_dir)
    return total


# scikit-image's colour photographs that ship inside its wheel (skimage/data/, checked against its
# registry's hashes), in class order; the others (e.g. skimage.data.cells3d) need a pooch download.
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
PHOTO_CROPS = 40  # crops per photograph when --per-class is not given
PHOTO_SIZE = 224  # side of the written crops: torchvision's ImageNet input size
PHOTO_SCALES = (0.3, 0.9)  # crop side as a share of the photograph's short side
PHOTO_SEED = 0


def photograph(name: str) -> np.ndarray:
    """One of `PHOTOS` as H x W x 3 uint8, read from the scikit-image wheel (never downloaded)."""
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view
    return getattr(skimage.data, name)()


def _random_crop(photo: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A square crop of a random side in PHOTO_SCALES of the short side, at a random place, resized."""
    side = int(min(photo.size) * rng.uniform(*PHOTO_SCALES))
    left = int(rng.integers(0, photo.width - side + 1))
    top = int(rng.integers(0, photo.height - side + 1))
    return photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def write_photos(
    out_dir: str | Path, *, per_class: int = PHOTO_CROPS, classes: int = len(PHOTOS), size: int = PHOTO_SIZE
) -> int:
    """Write `per_class` random crops of each of the first `classes` photographs as JPEG under
    `out_dir/<photo>/<index>.jpg`; returns the number written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: is not empty; remove it first or choose another folder")
    if not 2 <= classes <= len(PHOTOS):
        raise DataError(f"--classes {classes}: choose 2 to {len(PHOTOS)} photographs ({', '.join(PHOTOS)})")
    rng = np.random.default_rng(PHOTO_SEED)
    for name in PHOTOS[:classes]:
        photo = Image.fromarray(photograph(name), mode="RGB")
        folder = out_dir / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            crop = _random_crop(photo, rng, size)
            crop.save(folder / f"{index:04d}.jpg", format="JPEG", quality=90)
    total = classes * per_class
    log.info("wrote %d photo crops in %d class folders under %s", total, classes, out_dir)
    return total


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-example",
        help="write scikit-learn's digits (or, with --photos, crops of scikit-image's photographs) in "
        "ImageFolder layout (the example data)",
    )
    parser.add_argument("out_dir", metavar="DIR", help="an empty or new folder, e.g. data")
    parser.add_argument(
        "--photos",
        action="store_true",
        help=f"write {PHOTO_SIZE}-px RGB JPEG crops of scikit-image's colour photographs, a class each",
    )
    parser.add_argument(
        "--scale", type=positive_int, default=4, help="digits: enlargement of the 8x8 digits (default 4)"
    )
    parser.add_argument(
        "--per-class",
        type=positive_int,
        default=None,
        help=f"digits: keep the first N images per digit; photos: N crops a photo (default {PHOTO_CROPS})",
    )
    parser.add_argument(
        "--classes",
        type=positive_int,
        default=len(PHOTOS),
        help=f"photos: use the first N of {', '.join(PHOTOS)} (default all {len(PHOTOS)})",
    )
    parser.add_argument(
        "--size", type=positive_int, default=PHOTO_SIZE, help=f"photos: side in px (default {PHOTO_SIZE})"
    )
    parser.set_defaults(handler=_main, needs_params=False)


def _main(args: argparse.Namespace, params: object) -> int:
    if args.photos:
        per_class = PHOTO_CROPS if args.per_class is None else args.per_class
        write_photos(args.out_dir, per_class=per_class, classes=args.classes, size=args.size)
    else:
        write_digits(args.out_dir, scale=args.scale, per_class=args.per_class)
    return 0
