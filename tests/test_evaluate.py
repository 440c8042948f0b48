"""The evaluate stage: metrics, DVC plot data and figures, added to the model's MLflow run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from fixtures_model import TrainedDigits

from cnnops.data.splits import PreparedSplit
from cnnops.errors import StageInputError
from cnnops.models import load_classifier
from cnnops.stages import audit, evaluate, export


def test_metrics_match_the_model_on_the_test_split(trained_digits: TrainedDigits) -> None:
    t = trained_digits
    metrics = json.loads(t.metrics.read_text())
    test = PreparedSplit.load(t.prepared, "test")
    model, _ = load_classifier(t.model)
    with torch.no_grad():
        predicted = model(test.floats()).argmax(1)
    assert metrics["accuracy"] == pytest.approx(float((predicted == test.labels).float().mean()))
    assert metrics["n_test"] == len(test)
    for key in ("balanced_accuracy", "macro_f1", "top3_accuracy", "ece", "loss"):
        assert 0.0 <= metrics[key] <= (1.0 if key != "loss" else 100.0)
    assert set(metrics["per_class"]) == set(test.class_names)
    rows = list(csv.DictReader((t.root / "reports" / "plots" / "confusion.csv").open()))
    assert [r["path"] for r in rows] == test.paths
    assert [r["predicted"] for r in rows] == [test.class_names[i] for i in predicted.tolist()]
    assert (t.root / "reports" / "plots" / "confusion.png").stat().st_size > 1000


def test_evaluate_adds_to_the_training_run(trained_digits: TrainedDigits) -> None:
    t = trained_digits
    client = mlflow.MlflowClient(t.tracking.resolved_uri)
    run = client.get_run(t.run_id)
    metrics = json.loads(t.metrics.read_text())
    assert run.data.metrics["test_accuracy"] == metrics["accuracy"]
    assert run.data.metrics["test_macro_f1"] == metrics["macro_f1"]
    assert len(run.data.tags["cnnops.test_data_sha256"]) == 64
    assert {a.path for a in client.list_artifacts(t.run_id, "evaluate")} == {
        "evaluate/confusion.csv",
        "evaluate/confusion.png",
        "evaluate/metrics.json",
    }


def test_checkpoint_from_another_run_is_refused(trained_digits: TrainedDigits, tmp_path: Path) -> None:
    """Every stage that adds to the model's run refuses a checkpoint that the train report disowns."""
    t = trained_digits
    report = tmp_path / "train.json"
    report.write_text(json.dumps({"run_id": "0123456789abcdef"}))
    stale = r"trained in MLflow run .* rerun `cnnops train`"
    with pytest.raises(StageInputError, match=stale):
        evaluate.run(t.params, evaluate.EvaluatePaths(t.model, t.prepared, report, tmp_path / "m.json"))
    with pytest.raises(StageInputError, match=stale):
        audit.run(
            t.params, audit.AuditPaths(t.model, t.prepared, report, None, None, tmp_path / "a.json", tmp_path)
        )
    with pytest.raises(StageInputError, match=stale):
        export.run(t.params, export.ExportPaths(
            t.model, t.prepared, report, tmp_path / "m.onnx", tmp_path / "c", tmp_path / "e.json"
        ))  # fmt: skip
    assert not [p.name for p in tmp_path.iterdir() if p.name != "train.json"]


def test_test_split_with_other_classes_is_refused(trained_digits: TrainedDigits, tmp_path: Path) -> None:
    t = trained_digits
    test = PreparedSplit.load(t.prepared, "test")
    prepared = tmp_path / "prepared"
    shutil.copytree(t.prepared, prepared)
    other = PreparedSplit(test.images, test.labels, test.paths, [f"c{i}" for i in range(10)], test.color_mode)
    other.save(prepared, "test")
    with pytest.raises(StageInputError, match="differ from the model's"):
        evaluate.run(t.params, evaluate.EvaluatePaths(t.model, prepared, t.train_report, tmp_path / "m.json"))


def test_damaged_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    for name, content in (("torn.pt", b"PK\x03\x04 torn"), ("foreign.pt", None)):
        path = tmp_path / name
        if content is None:
            torch.save({"weights": torch.zeros(2)}, path)  # a tensor file, but not a cnnops checkpoint
        else:
            path.write_bytes(content)
        with pytest.raises(StageInputError, match=rf"{name}: not a cnnops checkpoint, or a damaged one"):
            load_classifier(path)
