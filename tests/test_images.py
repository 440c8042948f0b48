"""The data contract: colour conversion of every mode, and a clear error or a warned skip for bad input."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnops.data.decode import load_tensor, read_image
from cnnops.data.folder import scan_image_folder
from cnnops.errors import DataError


def _pixel(path: Path, color_mode: str) -> tuple[int, ...] | int:
    return read_image(path, color_mode=color_mode).image.getpixel((0, 0))


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


# --- conversion: every stored mode lands in the configured mode as documented -------------------------


@pytest.mark.parametrize(
    ("make", "suffix", "rgb", "gray"),
    [
        (lambda: Image.new("RGB", (9, 9), (255, 0, 0)), "png", (255, 0, 0), 76),  # ITU-R 601-2 luma
        (lambda: Image.new("L", (9, 9), 100), "png", (100, 100, 100), 100),
        (lambda: Image.new("1", (9, 9), 1), "png", (255, 255, 255), 255),
        (
            lambda: Image.new("RGBA", (9, 9), (255, 0, 0, 0)),
            "png",
            (255, 255, 255),
            255,
        ),  # transparent: white
        (lambda: Image.new("RGBA", (9, 9), (255, 0, 0, 255)), "png", (255, 0, 0), 76),
        (lambda: Image.new("RGBA", (9, 9), (0, 0, 0, 128)), "png", (127, 127, 127), 127),  # half over white
        (lambda: Image.new("LA", (9, 9), (0, 0)), "png", (255, 255, 255), 255),
        (lambda: Image.new("CMYK", (9, 9), (0, 255, 255, 0)), "tiff", (255, 0, 0), 76),
        (lambda: Image.fromarray(np.full((9, 9), 65535, np.uint16)), "png", (255, 255, 255), 255),
        (lambda: Image.fromarray(np.full((9, 9), 257 * 100, np.uint16)), "png", (100, 100, 100), 100),
        (lambda: Image.fromarray(np.full((9, 9), 257 * 100, np.int32)), "tiff", (100, 100, 100), 100),
        (lambda: Image.fromarray(np.full((9, 9), 0.5, np.float32)), "tiff", (128, 128, 128), 128),
    ],
    ids=[
        "RGB",
        "L",
        "1bit",
        "RGBA-clear",
        "RGBA-opaque",
        "RGBA-half",
        "LA",
        "CMYK",
        "I16-max",
        "I16",
        "I",
        "F",
    ],
)
def test_modes_convert_as_documented(tmp_path: Path, make, suffix: str, rgb, gray: int) -> None:
    path = _save(make(), tmp_path / f"x.{suffix}")
    assert _pixel(path, "RGB") == rgb
    assert _pixel(path, "L") == gray


def test_palette_transparency_is_flattened_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (9, 9), 1)
    image.putpalette([0, 0, 0, 255, 0, 0])
    opaque = _save(image, tmp_path / "opaque.png")
    clear = _save(image, tmp_path / "clear.png", transparency=1)
    assert _pixel(opaque, "RGB") == (255, 0, 0)
    assert _pixel(clear, "RGB") == (255, 255, 255)
    assert read_image(clear, color_mode="RGB").mode == "P"


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    decoded = read_image(path, color_mode="L")
    assert (decoded.width, decoded.height) == (10, 20)
    assert decoded.format == "JPEG"
    top, bottom = decoded.image.getpixel((5, 2)), decoded.image.getpixel((5, 17))
    assert top > 200 and bottom < 50  # the white left half is now on top


def test_decoded_facts_and_tensor(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.zeros((12, 16), np.uint16)), tmp_path / "deep.png")
    decoded = read_image(path, color_mode="RGB")
    assert (decoded.format, decoded.mode, decoded.bit_depth, decoded.width, decoded.height) == (
        "PNG",
        "I;16",
        16,
        16,
        12,
    )
    assert len(decoded.sha256) == 64
    tensor = load_tensor(path, color_mode="RGB", size=(8, 10))
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 8, 10)
    assert tuple(load_tensor(path, color_mode="L", size=(32, 32)).shape) == (1, 32, 32)


@pytest.mark.parametrize(
    ("array", "suffix"),
    [(np.full((9, 9), 2.0, np.float32), "tiff"), (np.full((9, 9), 70_000, np.int32), "tiff")],
    ids=["float-above-1", "int-above-16-bit"],
)
def test_out_of_range_values_are_refused_not_clipped(tmp_path: Path, array: np.ndarray, suffix: str) -> None:
    path = _save(Image.fromarray(array), tmp_path / f"odd.{suffix}")
    with pytest.raises(DataError, match=rf"{path}: mode .* outside the accepted"):
        read_image(path, color_mode="L")


# --- bad files: each one a DataError naming the file ---------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = _save(Image.new("L", (64, 64), 7), tmp_path / "good.png")
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    corrupt = tmp_path / "corrupt.jpg"
    jpeg = _save(Image.new("RGB", (64, 64), (1, 2, 3)), tmp_path / "ok.jpg").read_bytes()
    corrupt.write_bytes(jpeg[:200] + b"\x00" * 50)
    return {
        "zero-byte": (zero, "is empty"),
        "non-image": (text, "is not an image"),
        "truncated": (truncated, "corrupt or truncated"),
        "corrupt": (corrupt, "corrupt or truncated"),
        "missing": (tmp_path / "gone.png", "cannot be read"),
    }


@pytest.mark.parametrize("case", ["zero-byte", "non-image", "truncated", "corrupt", "missing"])
def test_bad_file_is_a_data_error_naming_it(tmp_path: Path, case: str) -> None:
    path, words = _bad_files(tmp_path)[case]
    with pytest.raises(DataError, match=words) as info:
        read_image(path, color_mode="RGB")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("pixels", [100 * 100 + 1, 2 * 100 * 100 + 1], ids=["warning-zone", "error-zone"])
def test_decompression_bomb_is_refused_at_the_configured_limit(tmp_path: Path, pixels: int) -> None:
    side = int(np.ceil(np.sqrt(pixels)))
    path = _save(Image.new("L", (side, side)), tmp_path / "bomb.png")
    with pytest.raises(DataError, match="decompression bomb") as info:
        read_image(path, color_mode="L", max_pixels=100 * 100)
    assert str(path) in str(info.value) and "data.max_image_pixels" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS != 100 * 100  # Pillow's global limit is restored
    read_image(path, color_mode="L", max_pixels=side * side)  # within a raised limit it decodes


# --- folder layout -------------------------------------------------------------------------------------


def _folder(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (16, 16), i).save(root / name / f"{i}.png")
    return root


def test_scan_lists_records_sorted_with_class_names(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"b": 2, "a": 1})
    (root / "a" / "nested").mkdir()
    Image.new("L", (16, 16)).save(root / "a" / "nested" / "deep.png")
    (root / "annotations.csv").write_text("path,box\n")  # the one file allowed in the root
    scan = scan_image_folder(root)
    assert scan.class_names == ["a", "b"]
    assert [(r.relpath, r.label) for r in scan.records] == [
        ("a/0.png", "a"),
        ("a/nested/deep.png", "a"),
        ("b/0.png", "b"),
        ("b/1.png", "b"),
    ]


@pytest.mark.parametrize(
    ("arrange", "culprit", "words"),
    [
        (lambda r: (r / "c").mkdir(), "c", "class folder has no images"),
        (lambda r: Image.new("L", (9, 9)).save(r / "loose.png"), "loose.png", "outside any class folder"),
        (lambda r: (r / "a" / ".DS_Store").write_bytes(b"x"), "a/.DS_Store", "hidden file"),
        (lambda r: (r / ".cache").mkdir(), ".cache", "hidden file"),
        (lambda r: (r / "a" / "out.png").symlink_to(r.parent / "outside.png"), "a/out.png", "outside"),
        (lambda r: (r / "b" / "dead.png").symlink_to(r / "nowhere.png"), "b/dead.png", "broken symlink"),
    ],
    ids=["empty-class", "file-in-root", "hidden-file", "hidden-folder", "symlink-outside", "broken-symlink"],
)
def test_layout_problems_name_the_path(tmp_path: Path, arrange, culprit: str, words: str) -> None:
    root = _folder(tmp_path / "data", {"a": 1, "b": 1})
    Image.new("L", (9, 9)).save(tmp_path / "outside.png")
    arrange(root)
    with pytest.raises(DataError, match=words) as info:
        scan_image_folder(root, hidden_files="error")
    assert str(root / culprit) in str(info.value)


def test_hidden_files_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path / "data", {"a": 1, "b": 1})
    (root / "a" / ".DS_Store").write_bytes(b"x")
    (root / ".git").mkdir()
    with caplog.at_level(logging.WARNING, logger="cnnops.data.decode"):
        scan = scan_image_folder(root, hidden_files="skip")
    assert scan.skipped == [(".git", "hidden"), ("a/.DS_Store", "hidden")]
    assert [r.relpath for r in scan.records] == ["a/0.png", "b/0.png"]
    assert str(root / "a" / ".DS_Store") in caplog.text and str(root / ".git") in caplog.text


def test_only_hidden_files_make_an_empty_class(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"a": 1})
    (root / "b").mkdir()
    (root / "b" / ".keep").write_bytes(b"")
    with pytest.raises(DataError, match=rf"{root / 'b'}/: class folder has no images"):
        scan_image_folder(root, min_classes=1)


def test_symlink_inside_the_root_is_followed(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"a": 1, "b": 1})
    (root / "b" / "alias.png").symlink_to(root / "a" / "0.png")
    assert "b/alias.png" in [r.relpath for r in scan_image_folder(root).records]


@pytest.mark.parametrize(
    ("classes", "words"),
    [({"only": 2}, "has 1 class folder"), ({}, "has no class folders")],
    ids=["one", "none"],
)
def test_too_few_classes(tmp_path: Path, classes: dict[str, int], words: str) -> None:
    root = _folder(tmp_path / "data", classes)
    root.mkdir(exist_ok=True)
    with pytest.raises(DataError, match=words) as info:
        scan_image_folder(root)
    assert str(root) in str(info.value)


def test_missing_root_says_how_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dvc pull"):
        scan_image_folder(tmp_path / "nope")


def test_mode_without_faithful_conversion_is_refused(tmp_path: Path) -> None:
    path = _save(Image.new("LAB", (9, 9), (50, 0, 0)), tmp_path / "lab.tif")
    with pytest.raises(DataError, match=rf"{path}: mode 'LAB' has no faithful conversion; save it as RGB"):
        read_image(path, color_mode="RGB")


def test_special_file_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"a": 1, "b": 1})
    os.mkfifo(root / "a" / "pipe.png")
    with pytest.raises(DataError, match="is not a regular file") as info:
        scan_image_folder(root)
    assert str(root / "a" / "pipe.png") in str(info.value)


@pytest.mark.parametrize(
    "culprit", [b"a/caf\xe9.png", b"caf\xe9", b"a/.caf\xe9"], ids=["file", "class", "hidden"]
)
def test_name_that_is_not_utf8_is_refused_by_its_bytes(tmp_path: Path, culprit: bytes) -> None:
    """Latin-1 names from an old archive: refused with the path's bytes and what to do, not a traceback
    later in validate's JSON or the gallery's HTML."""
    root = _folder(tmp_path / "data", {"a": 1, "b": 1})
    target = os.fsencode(root) + b"/" + culprit
    if culprit.endswith(b".png"):
        Image.new("L", (9, 9)).save(os.fsdecode(target))
    else:
        os.mkdir(target)
        Image.new("L", (9, 9)).save(os.fsdecode(target + b"/0.png"))
    with pytest.raises(DataError) as info:
        scan_image_folder(root)
    assert str(info.value) == (
        f"{target!r}: the name is not valid UTF-8; rename it to UTF-8 "
        "(e.g. `convmv -f latin1 -t utf8 --notest -r <data folder>`), then run the stage again"
    )


def test_resize_covers_the_size_keeping_the_aspect_then_centre_crops(tmp_path: Path) -> None:
    """A 20x40 picture to 10x10: scaled to 10x20 (never stretched), then its middle 10 columns."""
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white middle half: it must fill the whole square, no black margin
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    tensor = load_tensor(tmp_path / "wide.png", color_mode="L", size=(10, 10))
    # stretched (the old rule) it would be half black: mean about 128
    assert tuple(tensor.shape) == (1, 10, 10) and tensor.float().mean() > 230
