"""data/annotations.csv: masks and boxes become object masks; paths outside data/ are refused."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnops.audit.annotations import load_object_masks
from cnnops.errors import DataError


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    (root / ".masks" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(root / "cat" / "a.png")
    mask = np.zeros((16, 32), np.uint8)
    mask[4:8, 16:24] = 255
    Image.fromarray(mask).save(root / ".masks" / "cat" / "a.png")
    return root


def test_mask_and_box_are_scaled_to_the_prepared_size(data: Path) -> None:
    (data / "annotations.csv").write_text("path,mask,box\ncat/a.png,.masks/cat/a.png,\n")
    masks = load_object_masks(data, ["cat/a.png", "cat/b.png"], (8, 8))
    assert set(masks) == {"cat/a.png"}
    assert masks["cat/a.png"][2:4, 4:6].all() and masks["cat/a.png"].sum() == 4
    (data / "annotations.csv").write_text("path,box\ncat/a.png,0 0 16 8\n")
    box = load_object_masks(data, ["cat/a.png"], (8, 8))["cat/a.png"]
    assert box[:4, :4].all() and box.sum() == 16


def test_no_annotations_file_means_no_masks(data: Path) -> None:
    assert load_object_masks(data, ["cat/a.png"], (8, 8)) == {}


@pytest.mark.parametrize(
    "row",
    [
        "../secret.png,.masks/cat/a.png,",
        "cat/a.png,../../etc/passwd,",
        "cat/a.png,/etc/passwd,",
        "cat/a.png,link/a.png,",
    ],
)
def test_paths_resolving_outside_data_are_refused(data: Path, row: str) -> None:
    (data.parent / "outside").mkdir()
    (data / "link").symlink_to(data.parent / "outside")
    (data / "annotations.csv").write_text(f"path,mask,box\n{row}\n")
    with pytest.raises(DataError, match=r"annotations.csv:2: .* resolves outside .*data"):
        load_object_masks(data, ["cat/a.png"], (8, 8))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,mask\ncat/a.png,x\n", "needs a header"),
        ("path,box\ncat/a.png,1 2 3\n", "not four numbers"),
        ("path,box\ncat/a.png,5 5 1 1\n", "is empty"),
        ("path,mask,box\ncat/a.png,,\n", "neither a mask nor a box"),
        ("path,mask\ncat/a.png,.masks/none.png\n", "not found"),
    ],
)
def test_bad_rows_name_the_line_and_the_fix(data: Path, content: str, message: str) -> None:
    (data / "annotations.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_object_masks(data, ["cat/a.png"], (8, 8))


def test_mask_gets_the_exif_orientation_its_image_would(data: Path) -> None:
    """A mask saved sideways with an orientation tag means the upright mask, as its image would."""
    upright = np.asarray(Image.open(data / ".masks" / "cat" / "a.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": store the pixels turned 90 CCW
    Image.fromarray(upright).transpose(Image.ROTATE_90).save(data / ".masks" / "cat" / "r.png", exif=exif)
    (data / "annotations.csv").write_text(
        "path,mask\ncat/a.png,.masks/cat/a.png\ncat/b.png,.masks/cat/r.png\n"
    )
    masks = load_object_masks(data, ["cat/a.png", "cat/b.png"], (8, 8))
    assert np.array_equal(masks["cat/b.png"], masks["cat/a.png"])


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda m: m.write_bytes(b""), r"annotations.csv:2: .*m\.png: is empty \(0 bytes\)"),
        (lambda m: m.write_bytes(b"not a png"), r"annotations.csv:2: .*m\.png: is not an image"),
        (lambda m: Image.new("L", (200, 200), 255).save(m), r"annotations.csv:2: .*decompression bomb"),
        (lambda m: Image.new("L", (8, 8), 0).save(m), r"annotations.csv:2: mask .*m\.png has no non-zero"),
    ],
    ids=["zero-bytes", "not-an-image", "bomb", "all-zero"],
)
def test_mask_files_go_through_the_data_contract(data: Path, arrange, message: str) -> None:
    arrange(data / ".masks" / "m.png")
    (data / "annotations.csv").write_text("path,mask\ncat/a.png,.masks/m.png\n")
    with pytest.raises(DataError, match=message):
        load_object_masks(data, ["cat/a.png"], (8, 8), max_pixels=100 * 100)


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ("0 0 inf 8", "holds inf or nan"),
        ("nan 0 4 8", "holds inf or nan"),
        ("0 0 1e309 8", "holds inf or nan"),
        ("0 0 33 8", r"leaves .*a\.png \(32x16 upright\)"),
        ("-1 0 4 4", r"leaves .*a\.png \(32x16 upright\)"),
        ("0 0 4 17", r"leaves .*a\.png"),
    ],
)
def test_boxes_must_be_finite_and_inside_their_image(data: Path, box: str, message: str) -> None:
    (data / "annotations.csv").write_text(f"path,box\ncat/a.png,{box}\n")
    with pytest.raises(DataError, match=rf"annotations.csv:2: box '{re.escape(box)}' {message}"):
        load_object_masks(data, ["cat/a.png"], (8, 8))


def test_box_image_is_read_within_the_pixel_limit(data: Path) -> None:
    (data / "annotations.csv").write_text("path,box\ncat/a.png,0 0 4 4\n")
    with pytest.raises(
        DataError, match=r"annotations.csv:2: .*a\.png: refused as a possible decompression bomb"
    ):
        load_object_masks(data, ["cat/a.png"], (8, 8), max_pixels=100)
