"""`cnnops validate`: the real Great Expectations suite on real image files."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from fixtures_data import with_data_store
from PIL import Image

from cnnops.config import parse_params
from cnnops.errors import TRANSIENT_EXIT, DataError, ValidationFailed
from cnnops.stages import validate


def _noise(path: Path, seed: int, size: int = 16) -> Path:
    """A distinct random image (perceptual hashes of different seeds are far apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def _corpus(root: Path) -> dict[str, Path]:
    """Two healthy classes plus one file for each problem validate must report."""
    for i in range(12):
        _noise(root / "a" / f"{i:02d}.png", i)
        _noise(root / "b" / f"{i:02d}.png", 100 + i)
    bad = {
        "zero": root / "a" / "zero.png",
        "text": root / "a" / "notes.txt",
        "truncated": root / "a" / "truncated.png",
        "bomb": root / "a" / "bomb.png",
        "tiny": root / "b" / "tiny.png",
        "jpeg": root / "b" / "photo.jpg",
        "deep": root / "b" / "deep.png",
        "conflict": root / "b" / "copy_of_a00.png",
        "near": root / "a" / "00_touched.png",
    }
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("a note that is not an image")
    bad["truncated"].write_bytes((root / "a" / "01.png").read_bytes()[:80])
    Image.new("L", (200, 200), 3).save(bad["bomb"])
    _noise(bad["tiny"], 7, size=4)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(bad["jpeg"])
    Image.fromarray(np.full((16, 16), 4000, np.uint16)).save(bad["deep"])
    shutil.copy(root / "a" / "00.png", bad["conflict"])
    touched = np.asarray(Image.open(root / "a" / "00.png")).copy()
    touched[0, 0] ^= 1
    Image.fromarray(touched).save(bad["near"])
    return bad


PARAMS = {
    "data": {"color_mode": "L", "max_image_pixels": 100 * 100, "near_duplicate_distance": 2},
    "validate": {
        "allowed_formats": ["PNG"],
        "allowed_modes": ["L"],
        "min_width": 8,
        "min_height": 8,
        "min_images_per_class": 5,
    },
}


def test_bad_corpus_fails_with_every_file_named_and_a_full_report(tmp_path: Path) -> None:
    root = tmp_path / "data"
    bad = _corpus(root)
    store = tmp_path / "mlflow.db"
    params = parse_params(
        {
            **PARAMS,
            "tracking": {
                "uri": f"sqlite:///{store}",
                "artifact_location": str(tmp_path / "art"),
                "experiment": "t",
            },
        }
    )
    report_path, docs = tmp_path / "reports" / "validation.json", tmp_path / "reports" / "docs"
    with pytest.raises(ValidationFailed) as info:
        validate.run(params, validate.ValidatePaths(root, report_path, docs))
    message = str(info.value)
    for key in ("zero", "text", "truncated", "bomb", "tiny", "jpeg", "deep", "conflict"):
        assert str(bad[key]) in message, key
    assert str(report_path) in message and "validate.severity" in message

    report = json.loads(report_path.read_text())  # written before the failure was raised
    assert report["success"] is False
    assert report["failed_errors"] == ["decodes", "format", "label_conflict", "mode", "size"]
    assert report["failed_warnings"] == ["exact_duplicates", "near_duplicates"]
    failed = {c["check"]: set(c["files"]) for c in report["checks"] if c["success"] is False}
    assert failed["decodes"] == {"a/zero.png", "a/notes.txt", "a/truncated.png", "a/bomb.png"}
    assert failed["format"] == {"b/photo.jpg"} and failed["mode"] == {"b/photo.jpg", "b/deep.png"}
    assert failed["size"] == {"b/tiny.png"}
    assert failed["label_conflict"] == failed["exact_duplicates"] == {"a/00.png", "b/copy_of_a00.png"}
    assert {"a/00.png", "a/00_touched.png"} <= failed["near_duplicates"]
    passed = {c["check"] for c in report["checks"] if c["success"] is True}
    assert passed == {"min_classes", "min_images_per_class", "imbalance"}
    decode = next(c for c in report["checks"] if c["check"] == "decodes")
    assert any("is empty" in o["value"] for o in decode["offending"])
    manifest = {row["path"]: row for row in report["manifest"]}
    assert len(manifest) == 24 + len(bad)
    assert manifest["b/deep.png"]["mode"] == "I;16" and manifest["b/deep.png"]["bit_depth"] == 16
    assert manifest["a/zero.png"]["bytes"] == 0 and manifest["a/zero.png"]["sha256"] is None
    assert ["a/00.png", "a/00_touched.png", "b/copy_of_a00.png"] in report["duplicate_groups"]
    assert (docs / "index.html").exists()
    assert list((docs / "validations").rglob("*.html"))

    # The failure is on record too: the data run of experiment `t-data` holds the report and docs.
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("t-data").experiment_id])
    assert run.data.tags["cnnops.validation"] == "fail" and run.data.metrics["n_failed_errors"] == 5
    assert run.data.params["data.near_duplicate_distance"] == "2" and "train.lr" not in run.data.params
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "validate")}
    assert logged == {"validate/validation.json", "validate/docs"}


def test_warnings_never_stop_and_off_checks_are_left_out(
    tmp_path: Path, digits_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = parse_params(
        {
            "data": {"color_mode": "L"},
            "validate": {
                "min_images_per_class": 50,  # the fixture has 40 per class
                "severity": {"min_images_per_class": "warning", "imbalance": "off"},
            },
        }
    )
    with caplog.at_level(logging.WARNING, logger="cnnops.stages.validate"):
        paths = validate.ValidatePaths(digits_folder, tmp_path / "v.json", tmp_path / "docs")
        report = validate.run(with_data_store(params), paths).report
    assert report["success"] is True and report["n_files"] == 400 and report["n_classes"] == 10
    assert "min_images_per_class" in report["failed_warnings"]
    assert "min_images_per_class" in caplog.text
    imbalance = [c for c in report["checks"] if c["check"] == "imbalance"]
    assert imbalance == [{"check": "imbalance", "severity": "off", "success": None}]
    assert json.loads((tmp_path / "v.json").read_text()) == report


def _validate_one_small_class(
    root: Path, params: dict, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`cnnops validate` through the CLI on a data folder of one class of three images."""
    for i in range(3):
        _noise(root / "data" / "only" / f"{i}.png", i)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cnnops = Path(sys.executable).with_name("cnnops")
    return subprocess.run(
        [str(cnnops), "validate", "data", "--report", "reports/v.json", "--docs", "reports/docs"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{cnnops.parent}{os.pathsep}{os.environ['PATH']}", **(env or {})},
    )


def test_a_tracking_server_that_does_not_answer_exits_as_worth_a_retry(tmp_path: Path) -> None:
    """The flows retry a stage for this exit status only (pipelines/dvc_cli.py), never for words."""
    params = {"data": {"color_mode": "L"}, "tracking": {"uri": "http://127.0.0.1:9"}}  # nothing listens
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    result = _validate_one_small_class(tmp_path, params, quick)
    assert result.returncode == TRANSIENT_EXIT, result.stderr
    assert "cnnops validate: error: MlflowException: " in result.stderr
    assert "(a server or database did not answer: worth running again)" in result.stderr


def test_one_small_class_fails_through_the_cli(tmp_path: Path) -> None:
    result = _validate_one_small_class(tmp_path, {"data": {"color_mode": "L"}})
    assert result.returncode == 1, result.stderr
    assert "cnnops validate: error: 2 error-level check(s) failed on data" in result.stderr
    assert "min_classes" in result.stderr and "1 class folder(s), need at least 2" in result.stderr
    assert "classes ['only'] have fewer than 10 images" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((tmp_path / "reports" / "v.json").read_text())["n_classes"] == 1


def test_docs_folder_survives_a_missing_data_folder(tmp_path: Path) -> None:
    """The docs folder is only cleared once the data folder is known good: a typo in the data path
    must not delete the last run's docs (or a folder passed to --docs by mistake)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.html").write_text("last run's docs")
    paths = validate.ValidatePaths(tmp_path / "no-such-data", tmp_path / "v.json", docs)
    with pytest.raises(DataError, match="no-such-data: data folder not found"):
        validate.run(parse_params({}), paths)
    assert (docs / "index.html").read_text() == "last run's docs"


class _Elements(HTMLParser):
    """Every element of an HTML page with its attributes, and the text a browser shows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_file_and_class_names_are_text_in_the_data_docs_never_markup(tmp_path: Path) -> None:
    root, evil = tmp_path / "data", "<img src=x onerror=alert(1)>"
    for i in range(6):
        _noise(root / "a" / f"{i}.png", i)
        _noise(root / evil / f"{i}.png", 100 + i)
    (root / evil / f"{evil}.png").write_text("not an image")  # in the unexpected-values table
    (root / "a" / "<svg onload=alert(2)>.png").write_text("not an image")
    params = with_data_store(
        parse_params({"data": {"color_mode": "L"}, "validate": {"min_images_per_class": 5}})
    )
    paths = validate.ValidatePaths(root, tmp_path / "v.json", tmp_path / "docs")
    with pytest.raises(ValidationFailed):
        validate.run(params, paths)
    pages = list((tmp_path / "docs").rglob("*.html"))
    assert len(pages) >= 3  # the index, the suite and the manifest's validation
    shown = ""
    for page in pages:
        parsed = _Elements()
        parsed.feed(page.read_text())
        scripted = [
            (tag, a) for tag, a in parsed.elements if tag in ("img", "svg") and {"onerror", "onload"} & set(a)
        ]
        assert scripted == [], f"{page}: markup from a file name: {scripted}"
        shown += "".join(parsed.text)
    assert f"{evil}/{evil}.png" in shown and "<svg onload=alert(2)>.png" in shown, "shown as text"
    report = json.loads(paths.report.read_text())  # the report keeps the names as they are
    assert f"{evil}/{evil}.png" in next(c for c in report["checks"] if c["check"] == "decodes")["files"]


def test_name_that_is_not_utf8_stops_validate_with_its_bytes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(3):
        _noise(root / "a" / f"{i}.png", i)
        _noise(root / "b" / f"{i}.png", 10 + i)
    bad = os.fsencode(root / "a") + b"/caf\xe9.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(os.fsdecode(bad))
    paths = validate.ValidatePaths(root, tmp_path / "v.json", tmp_path / "docs")
    with pytest.raises(DataError, match=re.escape(f"{bad!r}: the name is not valid UTF-8; rename it")):
        validate.run(parse_params({}), paths)
