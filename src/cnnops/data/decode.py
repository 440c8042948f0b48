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
   - With a window (low, high) (params `data.window`: fixed, or percentiles measured on the train
     split; stored in the checkpoint and the ONNX metadata, so predict applies the same), these
     high-bit modes map [low, high] linearly onto 0..255 instead, clipping outside it: a 12-bit X-ray
     in a 16-bit file keeps its contrast instead of landing in 0..16. 8-bit images ignore it.
   - "P" (palette) -> "RGBA" when it declares transparency, else "RGB"; "PA" -> "RGBA".
   - "CMYK", "YCbCr", "RGBX" -> "RGB" with Pillow's conversion (no ICC colour management); modes
     with no faithful conversion (LAB, HSV) are refused.
4. Flatten alpha ("LA", "RGBA", palette transparency) by compositing onto a white background, the
   colour a viewer shows behind a transparent image; the hidden colour of fully transparent pixels
   therefore never leaks into the data.
5. Convert to the target: "L" uses Pillow's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B);
   "RGB" from grey repeats the channel.

`load_tensor` then resizes to (height, width) the way torchvision's reference recipe does: scaled
with antialiased bilinear interpolation, keeping the aspect ratio, until it covers the size (for a
square size: the short side), then centre-cropped; it returns a uint8 CHW tensor. So a photo is
never stretched, and only the margins of its long side are cut.

Finding the files is `cnnops.data.folder`'s job.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import warnings
from dataclasses import dataclass
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
Window = tuple[float, float]  # (low, high) of a high-bit image mapped onto 0..255
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default, as in params `data.max_image_pixels`
WHITE = {"L": 255, "RGB": (255, 255, 255)}
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # single channel, more than 8 bits
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
    path: str | Path,
    *,
    color_mode: ColorMode,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    window: Window | None = None,
) -> DecodedImage:
    """Decode `path` and convert it to `color_mode` by the module's rules (`window`: step 3).

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
    converted = _to_color_mode(image, color_mode, path, window)
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


def _to_color_mode(
    image: Image.Image, color_mode: ColorMode, path: Path, window: Window | None
) -> Image.Image:
    """Steps 3-5 of the module docstring: 8 bits per channel, alpha flattened, target mode."""
    mode = image.mode
    if mode == "1":
        image = image.convert("L")
    elif mode in HIGH_BIT_MODES and window is not None:
        image = _window_to_l(high_bit_values(image, path), window)
    elif mode in HIGH_BIT_MODES:
        image = _scale_to_l(np.asarray(image), 1.0 if mode == "F" else 65535.0, path, mode)
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


def read_high_bit(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """The upright values of a high-bit single-channel image (float64), None for any other mode:
    what a percentile window is measured on."""
    path = Path(path)
    image, _, mode = _decode(path, path.read_bytes(), max_pixels)
    return high_bit_values(image, path) if mode in HIGH_BIT_MODES else None


def high_bit_values(image: Image.Image, path: Path) -> np.ndarray:
    """The values of a 16-bit, 32-bit int or float image as float64; NaN or inf is refused."""
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: mode {image.mode!r} holds NaN or inf; save finite values")
    return values


def _window_to_l(values: np.ndarray, window: Window) -> Image.Image:
    low, high = window
    scaled = (np.clip(values, low, high) - low) * (255.0 / (high - low))
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A contract-converted PIL image as a uint8 CHW tensor, resized to cover (height, width) with
    its aspect ratio kept, then centre-cropped to it, if a size is given."""
    tensor = F.pil_to_tensor(image)
    if size is None or tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    (h, w), (height, width) = tensor.shape[-2:], size
    scale = max(height / h, width / w)
    covering = [max(height, round(h * scale)), max(width, round(w * scale))]
    tensor = F.resize(tensor, covering, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(tensor, [height, width])


def load_tensor(
    path: str | Path,
    *,
    color_mode: ColorMode,
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    window: Window | None = None,
) -> torch.Tensor:
    """Read `path` through the contract and return it as a uint8 CHW tensor of `size` (H, W)."""
    decoded = read_image(path, color_mode=color_mode, max_pixels=max_pixels, window=window)
    return to_tensor(decoded.image, size)


def perceptual_hash(image: Image.Image) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits, for near-duplicate search."""
    return str(imagehash.phash(image))
