"""The data contract: how every stage finds, decodes and converts an image.

Every stage that reads an image file (validate, prepare, evaluate, audit, predict) goes through
`read_image` / `load_tensor`, so an image means the same pixels everywhere. The conversion to the
configured colour mode ("RGB" or "L") is fixed and documented here:

1. Decode fully (a truncated file fails here, not later), refusing decompression bombs above
   `max_pixels` (params `data.max_image_pixels`).
2. Apply the EXIF orientation (`ImageOps.exif_transpose`), so a rotated phone photo is upright.
3. Bring the mode to 8 bits per channel:
   - "1" (1-bit) -> "L" with 0/255.
   - "I;16*" (16-bit) -> "L" scaled by the type's range: v8 = round(v16 * 255 / 65535).
   - "I" (32-bit int, what Pillow gives for many 16-bit TIFF/PNG files) is read as 16-bit data:
     values must lie in 0..65535 and scale like "I;16"; anything outside is refused, never clipped.
   - "F" (32-bit float) is read as intensities in [0, 1] -> round(v * 255); values outside [0, 1]
     or NaN are refused, never clipped.
   - "P" (palette) -> "RGBA" when it declares transparency, else "RGB"; "PA" -> "RGBA".
   - "CMYK", "YCbCr", "RGBX" -> "RGB" with Pillow's conversion (no ICC colour management); modes
     with no faithful conversion (LAB, HSV) are refused.
4. Flatten alpha ("LA", "RGBA", palette transparency) by compositing onto a white background, the
   colour a viewer shows behind a transparent image; the hidden colour of fully transparent pixels
   therefore never leaks into the data.
5. Convert to the target: "L" uses Pillow's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B);
   "RGB" from grey repeats the channel.

`load_tensor` then resizes to (height, width) with antialiased bilinear interpolation (torchvision
v2), ignoring the aspect ratio so no border is cropped away, and returns a uint8 CHW tensor.

`scan_image_folder` turns an ImageFolder root (`<root>/<class>/<image>`) into records and decides
what is refused or skipped; see its docstring for every case.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import imagehash
import numpy as np
import torch
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

from cnnops.errors import DataError

log = logging.getLogger(__name__)

ColorMode = Literal["RGB", "L"]
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default, as in params `data.max_image_pixels`
ANNOTATIONS_FILE = "annotations.csv"  # the one file allowed directly in the data root (audit masks/boxes)
WHITE = {"L": 255, "RGB": (255, 255, 255)}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PILLOW_LIMIT = threading.Lock()  # guards Pillow's module-level MAX_IMAGE_PIXELS
_PILLOW_CONVERTS = {"PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "RGBX": "RGB"}  # Pillow's own conversions


@dataclass(frozen=True)
class DecodedImage:
    """An image converted through the contract, with what the file itself declared."""

    image: Image.Image  # in the target colour mode, upright
    format: str  # Pillow format name, e.g. "PNG", "JPEG"
    mode: str  # Pillow mode as stored in the file, e.g. "P", "I;16", "RGBA"
    width: int  # after EXIF orientation
    height: int
    bit_depth: int  # bits per channel of the stored mode (1, 8, 16 or 32)
    sha256: str  # of the file's bytes


def bit_depth(mode: str) -> int:
    """Bits per channel of a Pillow mode ("1" is 1 bit, "I;16" 16, "RGB" 8)."""
    if mode == "1":
        return 1
    return np.dtype(ImageMode.getmode(mode).typestr).itemsize * 8


def read_image(
    path: str | Path, *, color_mode: ColorMode, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode `path` and convert it to `color_mode` by the module's rules.

    Every failure (missing, empty, not an image, truncated, bomb, unsupported values) is a
    `DataError` that names the file and says what to do; a Pillow traceback never escapes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot be read ({exc.strerror or exc}); check that it exists and is readable"
        ) from None
    if not data:
        raise DataError(
            f"{path}: is empty (0 bytes), probably a failed copy or download; re-copy it or delete it"
        )
    image, fmt, mode = _decode(path, data, max_pixels)
    converted = _to_color_mode(image, color_mode, path)
    return DecodedImage(
        image=converted,
        format=fmt,
        mode=mode,
        width=converted.width,
        height=converted.height,
        bit_depth=bit_depth(mode),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _decode(path: Path, data: bytes, max_pixels: int) -> tuple[Image.Image, str, str]:
    """Open and fully load the bytes; a bomb warning is an error at our limit, not Pillow's global."""
    try:
        image = _open_within(data, max_pixels)
        fmt, mode = image.format or "unknown", image.mode
        image.load()
        image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"{path}: refused as a possible decompression bomb (more than {max_pixels:,} pixels); "
            "shrink the image, or raise data.max_image_pixels in params.yaml if it is genuine"
        ) from None
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: is not an image Pillow can read; "
            "remove it from the data folder or convert it to PNG/JPEG"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(
            f"{path}: is corrupt or truncated ({exc}); re-export or re-copy it, or delete it"
        ) from None
    return image, fmt, mode


def _open_within(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open with our pixel limit: Pillow reads its module-level limit there, so it is swapped
    in under a lock (threads decoding at once must not see each other's limit), and Pillow's
    "warning zone" between 1x and 2x the limit is an error too."""
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _to_color_mode(image: Image.Image, color_mode: ColorMode, path: Path) -> Image.Image:
    """Steps 3-5 of the module docstring: 8 bits per channel, alpha flattened, target mode."""
    mode = image.mode
    if mode == "1":
        image = image.convert("L")
    elif mode in _SIXTEEN_BIT_MODES or mode == "I":
        image = _scale_to_l(np.asarray(image), 65535.0, path, mode)
    elif mode == "F":
        image = _scale_to_l(np.asarray(image), 1.0, path, mode)
    elif mode == "P":
        transparent = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if transparent else "RGB")
    elif mode in _PILLOW_CONVERTS:
        image = image.convert(_PILLOW_CONVERTS[mode])
    elif mode not in ("L", "LA", "La", "RGB", "RGBA", "RGBa"):
        # e.g. LAB or HSV: Pillow "converts" them without colour science, so the pixels would be wrong.
        raise DataError(f"{path}: mode {mode!r} has no faithful conversion; save it as RGB or grayscale")
    if image.mode in ("LA", "RGBA", "La", "RGBa"):
        base = "L" if image.mode[0] == "L" else "RGB"
        image = image.convert(base + "A")  # undo premultiplication ("La"/"RGBa") before compositing
        background = Image.new(base, image.size, WHITE[base])
        background.paste(image, mask=image.getchannel("A"))
        image = background
    return image if image.mode == color_mode else image.convert(color_mode)


def _scale_to_l(values: np.ndarray, full_scale: float, path: Path, mode: str) -> Image.Image:
    """Map [0, full_scale] linearly onto 0..255; out-of-range values are refused, never clipped."""
    values = values.astype(np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > full_scale):
        found = f"{np.nanmin(values):g}..{np.nanmax(values):g}" if np.isfinite(values).any() else "NaN"
        raise DataError(
            f"{path}: mode {mode!r} holds values {found}, outside the accepted 0..{full_scale:g}; "
            "save it as 8- or 16-bit unsigned, or as float in [0, 1]"
        )
    return Image.fromarray(np.rint(values * (255.0 / full_scale)).astype(np.uint8), mode="L")


def to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A contract-converted PIL image as a uint8 CHW tensor, resized to (height, width) if given."""
    tensor = F.pil_to_tensor(image)
    if size is not None and tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.resize(tensor, list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return tensor


def load_tensor(
    path: str | Path, *, color_mode: ColorMode, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Read `path` through the contract and return it as a uint8 CHW tensor of `size` (H, W)."""
    return to_tensor(read_image(path, color_mode=color_mode, max_pixels=max_pixels).image, size)


def perceptual_hash(image: Image.Image) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits, for near-duplicate search."""
    return str(imagehash.phash(image))


# ----------------------------------------------------------------------------------------------
# ImageFolder scanning


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # the file as found under the root (root / relpath)
    relpath: str  # POSIX path relative to the root, e.g. "cat/001.png"
    label: str  # class folder name


@dataclass(frozen=True)
class FolderScan:
    root: Path
    class_names: list[str]  # sorted class folder names; index = label id
    records: list[ImageRecord]  # sorted by relpath
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why), each also logged


def scan_image_folder(
    root: str | Path, *, hidden_files: Literal["error", "skip"] = "skip", min_classes: int = 2
) -> FolderScan:
    """List `<root>/<class>/**/<file>` as (path, class) records, refusing what breaks the layout.

    - root missing or not a folder, or with no class folder: DataError.
    - fewer than `min_classes` class folders: DataError (validate passes 1 and reports it itself).
    - a file directly in the root (not in a class folder): DataError, except `annotations.csv`.
    - an empty class folder (nothing left after skips): DataError.
    - hidden files/folders (name starts with "."): DataError when `hidden_files="error"`, else
      skipped with a warning and listed in `skipped`.
    - a symlink whose target is outside the root, or that is broken: DataError (DVC would track
      the link, not the image). Symlinks inside the root are followed.
    - every other file is a record, whatever its name: non-image, zero-byte and corrupt files
      are refused when decoded (`read_image`), so validate can report them all at once.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: data folder not found; run `dvc pull` to restore the example or put your images in "
            f"{root}/<class>/<image>"
        )
    real_root = root.resolve()
    skipped: list[tuple[str, str]] = []
    class_dirs: list[Path] = []
    for entry, rel in _entries(root, root, real_root, hidden_files, skipped):
        if entry.is_dir():
            class_dirs.append(entry)
        elif entry.name != ANNOTATIONS_FILE:
            raise DataError(
                f"{root / rel}: is directly in the data root, outside any class folder; move it into "
                f"{root}/<class>/ (each sub-folder of {root} is a class) or out of {root}"
            )
    if not class_dirs:
        raise DataError(
            f"{root}: has no class folders; put images in {root}/<class>/<image>, one folder per class"
        )
    if len(class_dirs) < min_classes:
        raise DataError(
            f"{root}: has {len(class_dirs)} class folder(s) ({', '.join(d.name for d in class_dirs)}), a "
            f"classifier needs at least {min_classes}; add a folder of images per class"
        )
    records: list[ImageRecord] = []
    for class_dir in class_dirs:
        found = [
            ImageRecord(path=root / rel, relpath=rel, label=class_dir.name)
            for rel in _walk_class(class_dir, root, real_root, hidden_files, skipped)
        ]
        if not found:
            raise DataError(
                f"{class_dir}/: class folder has no images; add images to it or remove the folder"
            )
        records.extend(found)
    records.sort(key=lambda r: r.relpath)
    return FolderScan(root=root, class_names=[d.name for d in class_dirs], records=records, skipped=skipped)


def _walk_class(
    directory: Path, root: Path, real_root: Path, hidden_files: str, skipped: list[tuple[str, str]]
) -> Iterator[str]:
    """Relative POSIX paths of the files under a class folder, depth first, sorted, loop-safe."""
    seen: set[Path] = set()
    stack = [directory]
    while stack:
        current = stack.pop()
        real = current.resolve()
        if real in seen:  # an in-root symlink loop: each real folder is listed once
            continue
        seen.add(real)
        for entry, rel in _entries(current, root, real_root, hidden_files, skipped, reverse=True):
            if entry.is_dir():
                stack.append(entry)
            elif entry.is_file():
                yield rel
            else:  # a FIFO or device would block or mislead the decoder
                raise DataError(f"{root / rel}: is not a regular file; remove it from {root}")


def _entries(
    directory: Path,
    root: Path,
    real_root: Path,
    hidden_files: str,
    skipped: list[tuple[str, str]],
    *,
    reverse: bool = False,
) -> Iterator[tuple[Path, str]]:
    """The sorted entries of `directory` with their root-relative paths: hidden ones skipped or
    refused, links leaving the root refused, the same rules at every depth."""
    for entry in sorted(directory.iterdir(), reverse=reverse):
        rel = entry.relative_to(root).as_posix()
        if entry.name.startswith("."):
            _hidden(rel, root, hidden_files, skipped)
            continue
        _check_link(entry, rel, root, real_root)
        yield entry, rel


def _hidden(rel: str, root: Path, policy: str, skipped: list[tuple[str, str]]) -> None:
    if policy == "error":
        raise DataError(
            f"{root / rel}: is a hidden file or folder; "
            "delete it, or set data.hidden_files: skip in params.yaml"
        )
    log.warning("skipping hidden %s (data.hidden_files: skip)", root / rel)
    skipped.append((rel, "hidden"))


def _check_link(entry: Path, rel: str, root: Path, real_root: Path) -> None:
    if not entry.is_symlink():
        return
    target = Path(os.path.realpath(entry))
    if not target.exists():
        raise DataError(
            f"{root / rel}: is a broken symlink (to {target}); remove it or copy the image in its place"
        )
    if not target.is_relative_to(real_root):
        raise DataError(
            f"{root / rel}: is a symlink to {target}, outside {root}; copy the file into {root} instead "
            "(DVC tracks the link, not the image, so the data would not be versioned)"
        )
