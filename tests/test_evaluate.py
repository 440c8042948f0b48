"""The evaluate stage: metrics, DVC plot data and figures, added to the model's MLflow run."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from fixtures_export import model_run, stage_params, synthetic_split
from fixtures_model import TrainedDigits
from sklearn.metrics import average_precision_score, roc_auc_score

from cnnops.data.splits import PreparedSplit, split_digest
from cnnops.errors import StageInputError
from cnnops.models import load_classifier
from cnnops.stages import audit, evaluate, export
from cnnops.tracking import model_card
from cnnops.training.calibration import nll


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
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}  # mlflow.data.context
    assert set(inputs) == {"training", "validation", "testing"}  # train logs train and val, evaluate test
    sha256 = split_digest(t.prepared, ("test",))
    profile = json.loads(inputs["testing"].profile)
    assert inputs["testing"].digest == sha256[:36] and profile["sha256"] == sha256
    assert profile["images"] == metrics["n_test"] and profile["classes"] == 10
    assert inputs["testing"].name.endswith("/test") and inputs["testing"].source_type == "local"
    assert json.loads(inputs["testing"].source)["uri"].endswith("/test.npy")
    assert {a.path for a in client.list_artifacts(t.run_id, "evaluate")} == {
        f"evaluate/{name}"
        for name in (
            "confusion.csv", "confusion.png", "metrics.json", "roc", "pr", "reliability.csv", "roc_pr.png",
            "reliability.png",
        )
    }  # fmt: skip
    assert len(client.list_artifacts(t.run_id, "evaluate/roc")) == 10
    assert (
        run.data.metrics["test_accuracy_low"] <= metrics["accuracy"] <= run.data.metrics["test_accuracy_high"]
    )
    assert run.data.metrics["temperature"] == metrics["calibration"]["temperature"]


def test_curves_intervals_and_calibration_a_reviewer_can_check(trained_digits: TrainedDigits) -> None:
    """AUROC and AP are sklearn's on the model's own probabilities, the intervals hold the point
    figures, and the temperature was fitted on the validation split (its NLL there is lowest)."""
    t = trained_digits
    metrics = json.loads(t.metrics.read_text())
    model, _ = load_classifier(t.model)
    probs, labels = {}, {}
    for split in ("test", "val"):
        data = PreparedSplit.load(t.prepared, split)
        with torch.no_grad():
            probs[split], labels[split] = model(data.floats()).double(), data.labels.numpy()
    test_probs = torch.softmax(probs["test"], 1).numpy()
    assert metrics["macro_auroc"] == pytest.approx(
        roc_auc_score(labels["test"], test_probs, multi_class="ovr"), abs=1e-6
    )
    positive = labels["test"] == 3
    assert metrics["per_class"]["3"]["average_precision"] == pytest.approx(
        average_precision_score(positive, test_probs[:, 3]), abs=1e-6
    )
    intervals = metrics["intervals"]
    assert (intervals["confidence"], intervals["resamples"]) == (0.95, 1000)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
        low, value, high = (intervals[name][k] for k in ("low", "value", "high"))
        assert 0 <= low <= value <= high <= 1, name
        assert value == pytest.approx(metrics[name])
    calibration = metrics["calibration"]
    val_logits = probs["val"].numpy()
    assert nll(val_logits, labels["val"], calibration["temperature"]) <= nll(val_logits, labels["val"])
    assert nll(val_logits, labels["val"], calibration["temperature"]) <= nll(
        val_logits, labels["val"], 1.1 * calibration["temperature"]
    )
    assert calibration["test_ece_before"] == pytest.approx(metrics["ece"], abs=1e-6)
    plots = t.root / "reports" / "plots"
    roc = sorted(p.name for p in (plots / "roc").iterdir())
    assert roc[0] == "000_0.csv" and len(roc) == 10 and len(list((plots / "pr").iterdir())) == 10
    with (plots / "roc" / "003_3.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert (rows[0]["fpr"], rows[-1]["tpr"]) == ("0.0", "1.0")
    reliability = list(csv.DictReader((plots / "reliability.csv").open()))
    assert len(reliability) == 15 and sum(int(r["images_raw"]) for r in reliability) == metrics["n_test"]
    assert (plots / "roc_pr.png").stat().st_size > 1000 and (plots / "reliability.png").stat().st_size > 1000


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


def test_evaluate_reports_accuracy_per_group_when_the_split_has_groups(
    tmp_path: Path, mlflow_store, good_model
) -> None:
    """A test split whose index holds data/groups.csv's groups: metrics.json gains the per-group
    report (the worst groups by name, the spread), and the model card shows it."""
    prepared = tmp_path / "prepared"
    split = synthetic_split((6, 4, 4), seed=3)
    groups = ["<b>site-1</b>"] * 7 + ["site-2"] * 6 + [None]
    replace(split, groups=groups).save(prepared, "test")
    synthetic_split((6, 4, 4), seed=4).save(prepared, "val")
    checkpoint, train_report = model_run(tmp_path, "m", good_model, mlflow_store)
    paths = evaluate.EvaluatePaths(
        checkpoint, prepared, train_report, tmp_path / "metrics.json", tmp_path / "c.csv", tmp_path / "c.png"
    )
    metrics = evaluate.run(stage_params(mlflow_store), paths).metrics
    report = metrics["groups"]
    assert (report["n_groups"], report["grouped_images"], report["ungrouped_images"]) == (2, 13, 1)
    assert [w["group"] for w in report["worst"]] == ["<b>site-1</b>", "site-2"]  # accuracy ties: by name
    assert report["worst"][0] == {"group": "<b>site-1</b>", "images": 7, "accuracy": 1.0, "macro_f1": 1.0}
    assert json.loads(paths.metrics.read_text())["groups"] == report
    section = model_card._groups(metrics)
    assert "&lt;b&gt;site-1&lt;/b&gt;" in section.tables[0][1][0][0] and "2 groups" in section.lines[0]
