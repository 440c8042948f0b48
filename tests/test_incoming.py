"""`cnnops check-incoming` on real digits: a data folder run through the real validate and prepare
stages is the reference; batches of held-back digits (good, broken, brighter, resized) are checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import run_prepare, run_validate
from PIL import Image

from cnnops.cli import main
from cnnops.config import parse_params
from cnnops.data.example import write_digits
from cnnops.errors import ValidationFailed
from cnnops.stages import incoming

PER_CLASS = 20  # of which HELD_BACK per class form the incoming batches
HELD_BACK = 4
CLASSES = [str(d) for d in range(10)]


def params(**orchestrate):
    return parse_params(
        {"data": {"color_mode": "L"}, "prepare": {"image_size": [32, 32]}, "orchestrate": orchestrate},
        "test_incoming",
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/ (16 digits a class) validated and prepared; held/ keeps the 4 more of each class."""
    base = tmp_path_factory.mktemp("incoming_reference")
    write_digits(base / "all", per_class=PER_CLASS)
    for cls in CLASSES:
        files = sorted((base / "all" / cls).iterdir())
        for target, batch in (("data", files[:-HELD_BACK]), ("held", files[-HELD_BACK:])):
            (base / target / cls).mkdir(parents=True)
            for path in batch:
                shutil.copy(path, base / target / cls / path.name)
    run_validate(base / "data", base, params())
    run_prepare(base / "data", base, params(), base / "validation.json")
    return base


@pytest.fixture
def batch(reference: Path, tmp_path: Path) -> Path:
    """A copy of the held-back digits as an incoming folder."""
    return Path(shutil.copytree(reference / "held", tmp_path / "incoming"))


def paths(reference: Path, batch: Path) -> incoming.IncomingPaths:
    report = batch.parent / "incoming.json"
    return incoming.IncomingPaths(
        batch, reference / "data", reference / "prepared", reference / "validation.json", report
    )


def listing(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def spoil(batch: Path, reference: Path) -> None:
    """A corrupt file, a folder of a class data/ does not have, and a copy of a data/ image."""
    (batch / "3" / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (batch / "cat").mkdir()
    shutil.copy(batch / "1" / sorted(p.name for p in (batch / "1").iterdir())[0], batch / "cat" / "c.png")
    shutil.copy(sorted((reference / "data" / "2").iterdir())[0], batch / "2" / "again.png")


def test_fail_mode_refuses_the_batch_naming_every_bad_file(reference: Path, batch: Path) -> None:
    spoil(batch, reference)
    before, data_before = listing(batch), listing(reference / "data")
    with pytest.raises(ValidationFailed) as raised:
        incoming.run(params(on_bad_incoming="fail"), paths(reference, batch))
    message = str(raised.value)
    assert "3 bad incoming file(s)" in message and "nothing merged" in message
    assert f"{batch / '3' / 'scan.png'}: is not an image Pillow can read" in message
    assert "new class 'cat'" in message
    assert f"{batch / '2' / 'again.png'}: the same bytes as {reference / 'data' / '2'}" in message
    report = json.loads((batch.parent / "incoming.json").read_text())
    assert not report["success"] and report["good"] == []
    assert [b["path"] for b in report["bad"]] == ["2/again.png", "3/scan.png", "cat/c.png"]
    assert listing(batch) == before and listing(reference / "data") == data_before, "nothing moved"


def test_skip_mode_passes_the_good_files_and_names_the_bad(reference: Path, batch: Path) -> None:
    spoil(batch, reference)
    result = incoming.run(params(on_bad_incoming="skip"), paths(reference, batch))
    assert result.bad == ["2/again.png", "3/scan.png", "cat/c.png"]
    assert result.good == sorted(listing(reference / "held")) and result.report["new"] == len(result.good)
    assert result.report["drift"]["measured"] and result.report["drift"]["batch_files"] == len(result.good)


def test_a_batch_like_the_training_data_passes_with_small_drift(reference: Path, batch: Path) -> None:
    result = incoming.run(params(), paths(reference, batch))
    drift = result.report["drift"]
    assert result.report["success"] and drift["exceeded"] == []
    scores = {name: p["kl_divergence"] for name, p in drift["properties"].items()}
    assert set(scores) == {"width", "height", "brightness", "contrast", "mode", "label"}
    assert max(scores.values()) < 0.5, scores
    assert scores["width"] == scores["height"] == scores["mode"] == 0.0  # all 32x32 "L", like data/


def test_a_brighter_batch_is_refused_with_the_figures(reference: Path, batch: Path) -> None:
    for path in batch.rglob("*.png"):
        pixels = np.asarray(Image.open(path), dtype=np.float64)
        Image.fromarray(np.rint(pixels * 0.5 + 128).astype(np.uint8)).save(path)
    with pytest.raises(ValidationFailed) as raised:
        incoming.run(params(max_drift=1.0), paths(reference, batch))
    message = str(raised.value)
    assert "drifted from the training data" in message and "brightness" in message
    drift = json.loads((batch.parent / "incoming.json").read_text())["drift"]
    assert "brightness" in drift["exceeded"] and drift["properties"]["brightness"]["kl_divergence"] > 2
    median = drift["properties"]["brightness"]["batch"]["median"]
    assert f"brightness {drift['properties']['brightness']['kl_divergence']:.3f} > max_drift" in message
    assert f"median {median:.4g}" in message


def test_a_batch_of_another_size_and_mode_is_refused(reference: Path, batch: Path) -> None:
    for path in batch.rglob("*.png"):
        Image.open(path).convert("RGB").resize((48, 40)).save(path)
    with pytest.raises(ValidationFailed):
        incoming.run(params(), paths(reference, batch))
    drift = json.loads((batch.parent / "incoming.json").read_text())["drift"]
    assert {"width", "height", "mode"} <= set(drift["exceeded"])
    assert drift["properties"]["width"]["batch"] == {"median": 48.0, "p5": 48.0, "p95": 48.0}


def test_files_already_merged_are_good_and_a_taken_name_is_bad(reference: Path, batch: Path) -> None:
    shutil.rmtree(batch)
    (batch / "4").mkdir(parents=True)
    first, second = sorted((reference / "data" / "4").iterdir())[:2]
    shutil.copy(first, batch / "4" / first.name)  # same name, same bytes: merged before
    shutil.copy(
        reference / "held" / "4" / sorted(listing(reference / "held" / "4"))[0], batch / "4" / second.name
    )
    result = incoming.run(params(on_bad_incoming="skip"), paths(reference, batch))
    assert result.good == [f"4/{first.name}"] and result.report["new"] == 0
    assert result.bad == [f"4/{second.name}"]
    assert "already exists with other bytes" in result.report["bad"][0]["reasons"][0]
    assert result.report["drift"] == {
        "measured": False,
        "reason": "no good new file to compare",
        "summary": "not measured (no good new file to compare)",
    }


def test_without_a_reference_drift_is_not_measured_and_said_so(
    reference: Path, batch: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    args = [
        "check-incoming",
        str(batch),
        "--data",
        str(reference / "data"),
        "--prepared",
        str(tmp_path / "none"),
    ]
    args += ["--validation", str(reference / "validation.json"), "--report", str(tmp_path / "r.json")]
    assert main(args) == 0
    drift = json.loads((tmp_path / "r.json").read_text())["drift"]
    assert not drift["measured"] and "there is no reference" in drift["reason"]
    assert "drift not checked" in capsys.readouterr().err + caplog.text
