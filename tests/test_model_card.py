"""The model card release writes for every registered version: from a real train run's checkpoint,
a real evaluate, an exported ONNX file and a real MLflow registry, with a hostile class name."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import yaml
from fixtures_export import model_run, stage_params, synthetic_split
from mlflow import MlflowClient
from PIL import Image

from cnnops.config import ReleaseParams, TrackingParams
from cnnops.export.onnx_model import OnnxMetadata, export_classifier
from cnnops.models import Classifier
from cnnops.stages import evaluate, release

pytestmark = [pytest.mark.integration]
HOSTILE = "<script>document.title='pwned'</script>|x"
NAMES = [HOSTILE, "b", "c"]
SENTENCE = "class 'b': <img src=x onerror=alert(1)> pasted corner flips 30% of images"


def hostile_split(counts: tuple[int, ...], seed: int):
    split = synthetic_split(counts, seed=seed)
    paths = [p.replace("a/", f"{HOSTILE}/", 1) for p in split.paths]
    return replace(split, class_names=NAMES, paths=paths)


def released_card(root: Path, tracking: TrackingParams, model: Classifier, project: Path) -> dict:
    """train's leftovers, a real evaluate, an export, a hand-written audit and validation report and a
    gallery folder (one real overlay, one that is not a PNG), then release."""
    prepared = root / "prepared"
    for name, seed in (("train", 1), ("val", 2), ("test", 3)):
        hostile_split((10, 8, 8), seed).save(prepared, name)
    model = copy.deepcopy(model)
    model.spec = replace(model.spec, class_names=NAMES)
    checkpoint, train_report = model_run(root, "m", model, tracking)
    run_id = json.loads(train_report.read_text())["run_id"]
    reports = root / "reports"
    params = stage_params(tracking, release=ReleaseParams.from_defaults(model_name="card"))
    evaluate.run(
        params,
        evaluate.EvaluatePaths(
            checkpoint, prepared, train_report, reports / "metrics.json", reports / "confusion.csv",
            reports / "confusion.png",
        ),
    )  # fmt: skip
    spec = model.spec
    meta = OnnxMetadata(NAMES, spec.image_size, "L", "logits", spec.model, run_id, "abc123", "d41d8.dir")
    onnx_path = root / "model.onnx"
    export_classifier(model, onnx_path, opset=18, metadata=meta)
    audit = {"verdict": "pass", "warnings": [{"class": "b", "test": "t", "sentence": SENTENCE}],
             "failures": [], "at_warning": ["property"], "annotated_images": 0,
             "thresholds": {"max_images_per_class": 100}}  # fmt: skip
    (reports / "audit.json").write_text(json.dumps(audit))
    (reports / "validation.json").write_text(
        json.dumps({"success": True, "n_files": 78, "failed_errors": [], "failed_warnings": [HOSTILE]})
    )
    overlays = reports / "audit" / "overlays"
    overlays.mkdir(parents=True)
    Image.new("RGB", (64, 32), (200, 30, 30)).save(overlays / "c000_00.png")
    (overlays / "c001_00.png").write_bytes(b"<script>alert(1)</script>")
    paths = release.ReleasePaths(
        onnx_path, checkpoint, prepared, train_report, reports / "audit.json", reports / "release.json",
        project, reports / "metrics.json", reports / "validation.json", reports / "audit",
    )  # fmt: skip
    return release.run(params, paths).report


def test_release_writes_an_escaped_self_contained_card_and_attaches_it(
    tmp_path: Path, mlflow_store: TrackingParams, good_model: Classifier, committed_repo: Path
) -> None:
    report = released_card(tmp_path, mlflow_store, good_model, committed_repo)
    assert report["promoted"] and report["version"] == "1"
    reports = tmp_path / "reports"
    md = (reports / "model_card.md").read_text()
    page = (reports / "model_card.html").read_text()
    metrics = json.loads((reports / "metrics.json").read_text())
    for card in (md, page):
        assert "<script" not in card and "onerror=alert" not in card.replace("&lt;img src=x onerror", "")
        assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in card  # the class, escaped
        assert "&lt;img src=x onerror=alert(1)&gt; pasted corner flips 30% of images" in card  # the finding
        acc = metrics["intervals"]["accuracy"]
        assert f"{acc['low']:.4f} - {acc['high']:.4f}" in card  # the interval
        assert f"Temperature {metrics['calibration']['temperature']:.3g}" in card
        assert "d41d8.dir" in card and "abc123" in card  # data version and commit from the ONNX file
        assert "Validation passed on 78 files" in card and "Verdict: pass." in card
        assert "Test families run at warning (they could not fail the audit): property." in card
        assert "audit passed" in card and "there is no champion yet" in card  # the release decision
        assert "| 10 | 10 | 10 |" in md or "<td>10</td><td>10</td><td>10</td>" in card  # counts per split
    assert "\\|x" in md  # a pipe in a class name does not break the Markdown table
    assert page.count("data:image/png;base64,") == 1  # the real overlay; the fake PNG is left out
    assert "http" not in page  # nothing is fetched

    client = MlflowClient(mlflow_store.uri)
    version = client.get_model_version("card", "1")
    uri = f"runs:/{version.run_id}/model_card/model_card.html"
    assert version.tags["model_card"] == uri and uri in version.description
    assert version.description.startswith("champion: audit passed")
    mlflow.set_tracking_uri(mlflow_store.uri)
    logged = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    assert logged.read_text() == page

    # MLflow 3's lineage: the registered ONNX model carries its test figures on the test dataset
    model = client.get_logged_model(version.source.removeprefix("models:/"))  # the logged ONNX model
    linked = {m.key: m for m in model.metrics}
    assert linked["test_accuracy"].value == report["score"] == 1.0
    test_input = {i.tags[0].value: i.dataset for i in client.get_run(version.run_id).inputs.dataset_inputs}
    test_input = test_input["testing"]
    assert (linked["test_accuracy"].dataset_name, linked["test_accuracy"].dataset_digest) == (
        test_input.name,
        test_input.digest,
    )
    flavor = yaml.safe_load(Path(mlflow.artifacts.download_artifacts("models:/card/1/MLmodel")).read_text())
    assert flavor["flavors"]["onnx"]["providers"] == ["CPUExecutionProvider"]  # no GPU here
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run `apt-get install -y chromium` (scripts/test does)")
    # a private profile, as the other Chromium tests use: xdist workers must not share the default one
    profile = f"--user-data-dir={tmp_path / 'chromium-profile'}"
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        profile,
        "--dump-dom",
    ]
    dom = subprocess.run(
        [*command, (reports / "model_card.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "<title>Model card: card version 1</title>" in dom and "pwned" not in dom.split("</title>")[0]
