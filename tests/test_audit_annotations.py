"""data/annotations.csv: masks and boxes become object masks; paths outside data/ are refused."""

from __future__ import annotations

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
