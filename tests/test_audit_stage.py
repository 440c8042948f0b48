"""The audit end to end on real images: planted shortcuts fail, clean data passes.

Each case writes a planted copy of scikit-learn's digits (or scikit-image's lfw faces) with
`cnnops.data.planted`, then runs the real validate, prepare, train and audit stages on it with a real
MLflow SQLite store. The cue kind, position, size and intensity vary with the seed.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from fixtures_audit import Case, case_params, plant, run_stages
from fixtures_model import one_thread

from cnnops.audit import gallery
from cnnops.audit.contract import Decision, Finding, to_json
from cnnops.config import Params
from cnnops.data.planted import CueSpec
from cnnops.stages import audit

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PER_CLASS = 60  # 600 digits: trains in seconds on one thread, enough test images per class


@dataclass(frozen=True)
class Audited:
    root: Path
    spec: CueSpec
    result: audit.AuditResult
    params: Params
    paths: audit.AuditPaths
    run_id: str


def _pipeline(
    root: Path, cue: str, cls: str | None, seed: int, source: str = "digits", **cue_args
) -> Audited:
    case = Case(
        cue, cls, seed, source, per_class=PER_CLASS if source == "digits" else None,
        epochs=4 if source == "digits" else 25, cue_args=tuple(cue_args.items()),
    )  # fmt: skip
    spec = plant(root, case)
    params = case_params(root, case)
    ran = run_stages(root, params)
    trained, result, paths = ran.trained, ran.audited, ran.paths
    assert trained.run_id is not None and result.run_id == trained.run_id
    assert json.loads(paths.report.read_text()) == to_json(result.report)  # what it returns is what it wrote
    assert set(result.written) >= {paths.report, paths.gallery / "index.html"}
    assert result.metrics["audit_fail"] == float(result.report.decision.verdict == "fail")
    return Audited(root, spec, result, params, paths, trained.run_id)


# (cue, cued class, seed, source, fixed cue arguments): seeds move position, size and intensity.
PLANTED = {
    "corner": ("corner", "3", 1, "digits", {"annotate": True}),  # with boxes: the mask tests run too
    "watermark": ("watermark", "7", 2, "digits", {}),
    "frame": ("frame", "5", 3, "digits", {}),
    "tint": ("tint", "2", 4, "digits", {"intensity": 90}),
    "faces-corner": ("corner", "face", 5, "faces", {"size": 4}),
    "faces-frame": ("frame", "nonface", 1, "faces", {}),
    "faces-tint": ("tint", "face", 0, "faces", {}),
}


_RUNS: dict[str, Audited] = {}  # one pipeline per case per session, shared by the tests below


def _planted(name: str, factory: pytest.TempPathFactory) -> Audited:
    if name not in _RUNS:
        cue, cls, seed, source, extra = PLANTED[name]
        _RUNS[name] = _pipeline(factory.mktemp(f"planted-{name}"), cue, cls, seed, source, **extra)
    return _RUNS[name]


@pytest.fixture(params=list(PLANTED))
def planted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Audited:
    return _planted(request.param, tmp_path_factory)


@pytest.fixture
def planted_corner(tmp_path_factory: pytest.TempPathFactory) -> Audited:
    return _planted("corner", tmp_path_factory)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Audited:
    return _pipeline(tmp_path_factory.mktemp("clean"), "none", None, 0, annotate=True)


def test_planted_cue_fails_naming_the_cued_class(planted: Audited) -> None:
    report = json.loads(planted.paths.report.read_text())
    cued = planted.spec.cued_class
    assert report["verdict"] == "fail", report["failures"]
    assert report["failures"][0]["class"] == cued  # the worst finding names the cued class
    assert report["failures"][0]["test"] in {"transplant_top", "transplant_tone", "deletion"} or report[
        "failures"
    ][0]["test"].startswith(("transplant:", "transplant_mean:", "patch:"))
    assert f"class '{cued}'" in report["failures"][0]["sentence"]
    if planted.spec.cue == "corner":  # a finding on the cued class says where to look
        where = f"{planted.spec.position} corner"
        assert any(where in f["sentence"] for f in report["failures"] if f["class"] == cued)
    assert any(char.isdigit() for char in report["failures"][0]["sentence"])
    figures = report["classes"][cued]
    assert set(figures) >= {"attention", "energy", "transplant_top", "transplant_regions", "deletion"}


def test_clean_data_passes(clean: Audited) -> None:
    report = json.loads(clean.paths.report.read_text())
    assert report["verdict"] == "pass", report["failures"]
    assert set(report["classes"]) == {str(d) for d in range(10)}
    for figures in report["classes"].values():
        top = figures["transplant_top"]
        assert top["flip_rate"] - top["control_flip_rate"] < clean.params.audit.transplant_flip_threshold


def test_clean_faces_pass_though_the_face_fills_the_frame(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two classes, tight face crops against smooth patches: the outer band is the face itself."""
    faces = _pipeline(tmp_path_factory.mktemp("clean-faces"), "none", None, 0, source="faces")
    report = json.loads(faces.paths.report.read_text())
    assert report["verdict"] == "pass", report["failures"]
    assert set(report["classes"]) == {"face", "nonface"}
    band = report["classes"]["face"]["transplant_regions"]["outer band"]
    assert band["control_flip_rate"] == max(band["other_classes_flip_rate"], band["shuffled_flip_rate"])


def test_annotated_boxes_feed_the_mask_tests(clean: Audited, planted_corner: Audited) -> None:
    clean_masks = [f.masks for f in clean.result.report.classes.values()]
    assert all(m is not None and m.n > 0 for m in clean_masks)
    assert min(m.top_inside for m in clean_masks) >= clean.params.audit.mask_inside_threshold
    corner = planted_corner.result.report.classes
    cued = corner["3"].masks.top_inside
    assert cued < min(f.masks.top_inside for name, f in corner.items() if name != "3")
    assert planted_corner.result.report.annotated_images > 0


def test_audit_is_logged_to_the_models_run(clean: Audited) -> None:
    import mlflow

    client = mlflow.MlflowClient(clean.params.tracking.resolved_uri)
    run = client.get_run(clean.run_id)
    assert run.data.tags["cnnops.audit_verdict"] == "pass"
    assert run.data.metrics["audit_fail"] == 0.0
    logged = {a.path for a in client.list_artifacts(clean.run_id, "audit")}
    assert "audit/audit.json" in logged and "audit/audit" in logged
    gallery_files = {a.path for a in client.list_artifacts(clean.run_id, "audit/audit")}
    assert "audit/audit/index.html" in gallery_files


def _chromium_dom(page: Path, tmp_path: Path) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:  # scripts/test installs it; a developer machine without it must say so, not pass
        pytest.fail("chromium is not installed: run `apt-get install -y chromium` (scripts/test does)")
    out = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=3000", "--dump-dom", page.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout


def test_gallery_renders_verdict_and_images_in_chromium(planted_corner: Audited, tmp_path: Path) -> None:
    page = planted_corner.paths.gallery / "index.html"
    dom = _chromium_dom(page, tmp_path)
    assert 'id="verdict">FAIL<' in dom
    assert dom.count('class="overlay"') >= 10  # 8 per class by default
    assert "data:image/png;base64," in dom
    assert html.escape(planted_corner.result.report.decision.failures[0].sentence, quote=False) in dom
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # offline


def test_gallery_escapes_hostile_class_and_file_names(clean: Audited, tmp_path: Path) -> None:
    hostile = "<img src=x onerror=\"document.title='pwned'\">&'"
    clean_report = clean.result.report
    finding = Finding(class_name=hostile, test="x", value=1.0, threshold=0.2, sentence=hostile)
    report = replace(
        clean_report,
        classes={hostile: clean_report.classes["0"]},
        decision=Decision("fail", (hostile,), (finding,), clean_report.decision.warnings),
    )
    picture = gallery.overlay(np.zeros((1, 8, 8)), np.zeros((8, 8)))
    page = tmp_path / "index.html"
    gallery.render(page, report, {hostile: [(f"{hostile}/x<script>alert(1)</script>.png", "c", picture)]})
    text = page.read_text()
    assert "<script>" not in text and "<img src=x" not in text
    assert html.escape(hostile) in text
    dom = _chromium_dom(page, tmp_path)
    assert "<title>cnnops audit: fail</title>" in dom  # the onerror handler never ran


def test_audit_does_not_exit_nonzero_on_fail(planted_corner: Audited) -> None:
    planted = planted_corner
    from cnnops.cli import main

    params_file = planted.root / "params.yaml"
    params_file.write_text(json.dumps(planted.params.model_dump(mode="json", by_alias=True)))
    out = planted.root / "cli"
    root, reports = planted.root, planted.root / "reports"
    with one_thread():
        code = main([
            "--params", str(params_file), "audit", str(root / "models" / "model.pt"),
            "--prepared", str(root / "prepared"), "--train-report", str(reports / "train.json"),
            "--report", str(out / "audit.json"), "--gallery", str(out / "audit"),
            "--validation", str(reports / "validation.json"), "--data", str(root / "data"),
        ])  # fmt: skip
    assert code == 0
    assert json.loads((out / "audit.json").read_text())["verdict"] == "fail"
