"""The lecture's MLP (`train.model: mlp`) through every stage on the digits: the real train, evaluate,
export and predict, and an audit that refuses it by name (Grad-CAM needs a convolution)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_model import digits_train_params, one_thread

from cnnops.config import ExportParams
from cnnops.errors import ConfigError
from cnnops.export.onnx_model import read_metadata
from cnnops.export.predict import predict
from cnnops.models import load_classifier
from cnnops.stages import audit, evaluate, export, train


@pytest.mark.integration
def test_mlp_trains_evaluates_exports_and_predicts_but_is_not_audited(
    tmp_path: Path, prepared_digits: Path, digits_folder: Path, digits_params
) -> None:
    params = digits_train_params(tmp_path, digits_params, model="mlp", epochs=8)
    params = params.model_copy(
        update={"export": ExportParams.from_defaults(latency_runs=5, throughput_batch=8)}
    )
    reports, model = tmp_path / "reports", tmp_path / "models" / "model.pt"
    tp = train.TrainPaths(
        prepared=prepared_digits, model=model, report=reports / "train.json",
        history=reports / "history.csv", curves=reports / "history.png", state=tmp_path / "state.pt",
    )  # fmt: skip
    ep = evaluate.EvaluatePaths(
        model=model, prepared=prepared_digits, train_report=tp.report, metrics=reports / "metrics.json",
        confusion=reports / "confusion.csv", confusion_png=reports / "confusion.png",
    )  # fmt: skip
    with one_thread():
        train.run(params, tp)
        metrics = evaluate.run(params, ep).metrics
    classifier, extra = load_classifier(model)
    assert classifier.spec.model == "mlp" and extra["mode"] == "scratch"
    assert metrics["accuracy"] >= 0.9, metrics  # 400 digits, 8 epochs: measured 0.982 (57 test images)

    ap = audit.AuditPaths(
        model=model, prepared=prepared_digits, train_report=tp.report, validation=None, data=None,
        report=reports / "audit.json", gallery=reports / "audit",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"audit: mlp has no convolutional layer.*set train.model to a CNN"):
        audit.run(params, ap)
    assert not ap.report.exists()

    onnx = tmp_path / "models" / "model.onnx"
    xp = export.ExportPaths(
        model, prepared_digits, tp.report, onnx, tmp_path / "compressed", reports / "x.json"
    )
    export.run(params, xp)
    exported = json.loads(xp.report.read_text())
    assert exported["parity"]["argmax_agreement"] == 1.0 and read_metadata(onnx).model == "mlp"

    image = sorted((digits_folder / "7").glob("*.png"))[0]
    (prediction,), failures = predict(onnx, [image])
    assert failures == [] and prediction.label == "7"  # from the file, through the data contract
