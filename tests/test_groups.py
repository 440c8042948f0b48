"""data/groups.csv: a patient's (site's, scanner's) images stay in one split, through the real stages."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import run_prepare, run_validate
from PIL import Image

from cnnops.config import parse_params
from cnnops.data.groups import load_groups, merged_components
from cnnops.data.splits import load_splits
from cnnops.errors import DataError

PARAMS = {"data": {"color_mode": "L"}, "prepare": {"image_size": [32, 32]}}
PATIENTS = 24


def _with_groups(digits_folder: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The digits folder with a groups.csv putting each image in one of 24 'patients' (every class)."""
    data = tmp_path / "data"
    shutil.copytree(digits_folder, data)
    images = sorted(str(p.relative_to(data).as_posix()) for p in data.rglob("*.png"))
    groups = {path: f"patient-{i % PATIENTS:02d}" for i, path in enumerate(images)}
    lines = ["path,group", *(f"{path},{group}" for path, group in groups.items())]
    (data / "groups.csv").write_text("\n".join(lines) + "\n")
    return data, groups


def test_every_group_lies_in_one_split_and_the_index_names_it(tmp_path: Path, digits_folder: Path) -> None:
    data, groups = _with_groups(digits_folder, tmp_path)
    report = run_prepare(data, tmp_path, parse_params(PARAMS))
    splits = load_splits(tmp_path / "prepared")
    split_of: dict[str, set[str]] = {}
    for name, split in splits.items():
        assert split.groups == [groups[p] for p in split.paths]
        for group in split.groups:
            split_of.setdefault(group, set()).add(name)
    assert all(len(found) == 1 for found in split_of.values()), split_of
    assert {len(s) for s in splits.values()} != {0}
    per_split = report["groups"]["groups"]
    assert sum(per_split.values()) == PATIENTS and all(per_split.values()), per_split
    # Without the file, the same images split by content alone: patients then straddle splits.
    plain = tmp_path / "plain"
    run_prepare(digits_folder, plain, parse_params(PARAMS))
    straddling = {groups[p] for s in load_splits(plain / "prepared").values() for p in s.paths}
    assert len(straddling) == PATIENTS
    mixed = {
        g for g in straddling
        if len({n for n, s in load_splits(plain / "prepared").items() for p in s.paths if groups[p] == g}) > 1
    }  # fmt: skip
    assert mixed, "the grouping is what keeps patients together"


def test_a_patients_split_does_not_move_when_scans_are_added(tmp_path: Path, digits_folder: Path) -> None:
    data, groups = _with_groups(digits_folder, tmp_path)
    run_prepare(data, tmp_path / "before", parse_params(PARAMS))
    before = {g: n for n, s in load_splits(tmp_path / "before/prepared").items() for g in s.groups}
    added, rng = [], np.random.default_rng(0)
    for path, group in list(groups.items())[:PATIENTS]:  # a new scan for every patient, no one's duplicate
        new = f"{Path(path).parent}/new-{Path(path).stem}.png"
        (data / new).write_bytes(_smallest_sha_png(rng))  # the patient's smallest SHA-256 changes
        added.append(f"{new},{group}")
    with (data / "groups.csv").open("a") as handle:
        handle.write("\n".join(added) + "\n")
    run_prepare(data, tmp_path / "after", parse_params(PARAMS))
    after = {g: n for n, s in load_splits(tmp_path / "after/prepared").items() for g in s.groups}
    assert after == before


def _smallest_sha_png(rng: np.random.Generator) -> bytes:
    """A noise PNG whose SHA-256 starts with 00: smaller than any of the digits'."""
    while True:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(buffer, "PNG")
        if hashlib.sha256(buffer.getvalue()).hexdigest().startswith("00"):
            return buffer.getvalue()


def test_duplicates_and_groups_chain_into_one_component() -> None:
    duplicates = np.array([0, 0, 1, 2, 3])  # images 0 and 1 are duplicates
    groups = ["a", None, "b", "a", None]  # 0 and 3 are one patient; 1 and 4 are not listed
    components = merged_components(duplicates, groups)
    assert components[0] == components[1] == components[3]
    assert len({components[0], components[2], components[4]}) == 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,group\n0/missing.png,p1\n", r"groups.csv:2: path '0/missing.png' is not an image"),
        ("path,group\n../outside.png,p1\n", r"groups.csv:2: path '../outside.png' is not an image"),
        ("path,group\n{0},p1\n{0},p2\n", r"groups.csv:3: .* is in group 'p1' and 'p2'"),
        ("file,patient\n{0},p1\n", r"needs a header 'path,group'"),
        ("path,group\n{0},\n", r"groups.csv:2: needs both a path and a group"),
        ("path,group\n{0},p1,extra\n", r"groups.csv:2: more fields than the header"),
    ],
)
def test_a_bad_groups_file_is_refused_by_line(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "groups.csv").write_text(text.format("0/a.png"))
    with pytest.raises(DataError, match=match):
        load_groups(tmp_path, ["0/a.png"])


def test_groups_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "groups.csv").write_bytes(b"path,group\n0/a.png,\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_groups(tmp_path, ["0/a.png"])


def test_unlisted_images_are_their_own_groups_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "groups.csv").write_text("path,group\n0/a.png,p1\n")
    with caplog.at_level(logging.WARNING):
        assert load_groups(tmp_path, ["0/a.png", "0/b.png"]) == {"0/a.png": "p1"}
    assert "no group for 1 of 2 images" in caplog.text


def test_validate_reports_groups_and_refuses_one_naming_a_missing_file(
    tmp_path: Path, digits_folder: Path
) -> None:
    data, _ = _with_groups(digits_folder, tmp_path)
    report = run_validate(data, tmp_path / "ok", parse_params(PARAMS))
    assert report["groups"]["groups"] == PATIENTS and report["groups"]["ungrouped_images"] == 0
    with (data / "groups.csv").open("a") as handle:
        handle.write("7/gone.png,patient-01\n")
    cnnops = str(Path(sys.executable).with_name("cnnops"))
    proc = subprocess.run(
        [cnnops, "validate", str(data), "--report", str(tmp_path / "v.json"), "--docs", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env={"PATH": str(Path(sys.executable).parent), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )
    assert proc.returncode != 0
    assert "groups.csv:" in proc.stderr and "'7/gone.png' is not an image" in proc.stderr
    assert "Traceback" not in proc.stderr
