"""`cnnops make-example DIR`: the bundled example dataset, scikit-learn's handwritten digits.

The 1,797 8x8 digits ship inside scikit-learn (no download). They are written as 8-bit grayscale
PNG in ImageFolder layout (`DIR/<digit>/<index>.png`), ink white on black as in the source,
scaled from 0..16 to 0..255 and enlarged by pixel repetition (exact, no resampling filter) so a
person can look at them. Names and bytes depend only on the source data, so the DVC hash of the
example never changes between runs.
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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-example", help="write scikit-learn's digits as PNG in ImageFolder layout (the example data)"
    )
    parser.add_argument("out_dir", metavar="DIR", help="an empty or new folder, e.g. data")
    parser.add_argument(
        "--scale", type=positive_int, default=4, help="enlargement factor of the 8x8 digits (default 4)"
    )
    parser.add_argument(
        "--per-class", type=positive_int, default=None, help="keep only the first N images per digit"
    )
    parser.set_defaults(handler=_main, needs_params=False)


def _main(args: argparse.Namespace, params: object) -> int:
    write_digits(args.out_dir, scale=args.scale, per_class=args.per_class)
    return 0
