"""data/annotations.csv: where the objects are, when the user knows (a mask image or a box).

Columns: `path` (the image, relative to data/), then `mask` (a mask image relative to data/, where
non-zero pixels are the object) and/or `box` ("x0 y0 x1 y1" in the image's own pixels, corners
inclusive-exclusive). Put masks in a hidden folder such as data/.masks/ so they are not read as a
class. Paths are user input: any that resolves outside data/ is refused. Masks are images under
the data contract (`cnnops.data.decode`: pixel limit, EXIF orientation, 8-bit grey), and a box must
be finite and lie within its upright image.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from cnnops.data.decode import DEFAULT_MAX_PIXELS, read_image
from cnnops.data.folder import ANNOTATIONS_FILE
from cnnops.errors import DataError


def _inside(root: Path, rel: str, csv_path: Path, line: int, column: str) -> Path:
    """`root / rel`, refused when it resolves (through `..` or a symlink) outside `root`."""
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DataError(
            f"{csv_path}:{line}: {column} {rel!r} resolves outside {root}; annotation paths must stay inside "
            "the data folder (write them relative to it, without '..')"
        )
    return resolved


def _box(text: str, csv_path: Path, line: int) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise DataError(f"{csv_path}:{line}: box {text!r} is not four numbers 'x0 y0 x1 y1'") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise DataError(
            f"{csv_path}:{line}: box {text!r} holds inf or nan; write four finite pixel coordinates"
        )
    if not (x1 > x0 and y1 > y0):
        raise DataError(
            f"{csv_path}:{line}: box {text!r} is empty; write 'x0 y0 x1 y1' with x1 > x0, y1 > y0"
        )
    return x0, y0, x1, y1


def _decoded(path: Path, csv_path: Path, line: int, max_pixels: int) -> Image.Image:
    """A mask or image through the data contract (pixel limit, EXIF orientation, 8-bit grey), so a
    mask means the same pixels as the image it outlines; a bad file is named with its CSV line."""
    try:
        return read_image(path, color_mode="L", max_pixels=max_pixels).image
    except DataError as exc:
        raise DataError(f"{csv_path}:{line}: {exc}") from None


def _mask_file(path: Path, size: tuple[int, int], csv_path: Path, line: int, max_pixels: int) -> np.ndarray:
    mask = _decoded(path, csv_path, line, max_pixels)
    if not mask.getbbox():
        raise DataError(
            f"{csv_path}:{line}: mask {path} has no non-zero pixel as 8-bit grey (object pixels of a 16-bit "
            "mask must be >= 129); save masks as 8-bit grey with the object at 255"
        )
    h, w = size
    return np.asarray(mask.resize((w, h), Image.NEAREST)) > 0


def _box_mask(
    text: str, image_path: Path, size: tuple[int, int], csv_path: Path, line: int, max_pixels: int
) -> np.ndarray:
    """The box, in the upright image's own pixels, as a mask at the prepared `size`."""
    x0, y0, x1, y1 = _box(text, csv_path, line)
    image = _decoded(image_path, csv_path, line, max_pixels)
    if x0 < 0 or y0 < 0 or x1 > image.width or y1 > image.height:
        raise DataError(
            f"{csv_path}:{line}: box {text!r} leaves {image_path} ({image.width}x{image.height} upright); "
            f"write corners within 0 <= x <= {image.width}, 0 <= y <= {image.height}"
        )
    h, w = size
    sx, sy = w / image.width, h / image.height
    mask = np.zeros((h, w), dtype=bool)
    mask[int(y0 * sy) : max(int(np.ceil(y1 * sy)), int(y0 * sy) + 1),
         int(x0 * sx) : max(int(np.ceil(x1 * sx)), int(x0 * sx) + 1)] = True  # fmt: skip
    return mask


def load_object_masks(
    data_dir: str | Path, paths: list[str], size: tuple[int, int], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Object masks (bool H x W at the prepared `size`) for the images of `paths` that are annotated.

    No annotations file means an empty dict: the audit then estimates objects from pixels. Masks
    and images are read like every image (`read_image`, refusing more than `max_pixels`).
    """
    root = Path(data_dir)
    csv_path = root / ANNOTATIONS_FILE
    if not csv_path.exists():
        return {}
    wanted = set(paths)
    out: dict[str, np.ndarray] = {}
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if (
            reader.fieldnames is None
            or "path" not in reader.fieldnames
            or not {"mask", "box"} & set(reader.fieldnames)
        ):
            raise DataError(
                f"{csv_path}: needs a header 'path,mask' or 'path,box' (or both); got {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            image_path = _inside(root, rel, csv_path, line, "path")
            mask_rel, box_text = (row.get("mask") or "").strip(), (row.get("box") or "").strip()
            if mask_rel:
                mask_path = _inside(root, mask_rel, csv_path, line, "mask")
                if not mask_path.is_file():
                    raise DataError(f"{csv_path}:{line}: mask {mask_rel!r} not found under {root}")
                mask = _mask_file(mask_path, size, csv_path, line, max_pixels)
            elif box_text:
                if not image_path.is_file():
                    raise DataError(f"{csv_path}:{line}: image {rel!r} not found under {root}")
                mask = _box_mask(box_text, image_path, size, csv_path, line, max_pixels)
            else:
                raise DataError(f"{csv_path}:{line}: row for {rel!r} has neither a mask nor a box")
            if rel in wanted:
                out[rel] = out[rel] | mask if rel in out else mask
    return out
