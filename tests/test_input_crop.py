"""Images stored larger than the network's input (torchvision's 256 -> 224 recipe, here 40 -> 32):
training crops at random, evaluation and the ONNX contract centre-crop, and `cnnops predict` on the
original file sees exactly the pixels evaluation saw; the audit looks at those crops too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_data import run_prepare
from fixtures_model import digits_train_params, one_thread

from cnnops.config import AuditParams, ExportParams, parse_params
from cnnops.data.splits import PreparedSplit
from cnnops.errors import StageInputError
from cnnops.export.onnx_model import infer, open_session, probabilities, read_metadata
from cnnops.export.predict import predict
from cnnops.models import load_classifier
from cnnops.stages import audit, evaluate, export, train


@pytest.mark.slow
@pytest.mark.integration
def test_a_model_cropped_from_larger_stored_images_predicts_what_evaluation_saw(
    tmp_path: Path, digits_folder: Path
) -> None:
    base = parse_params({"data": {"color_mode": "L"}, "prepare": {"image_size": [40, 40]}})
    run_prepare(digits_folder, tmp_path, base)
    prepared = tmp_path / "prepared"
    params = digits_train_params(tmp_path, base, epochs=2, input_size=[32, 32])
    params = params.model_copy(update={"export": ExportParams.from_defaults(latency_runs=5)})
    reports, checkpoint = tmp_path / "reports", tmp_path / "models" / "model.pt"
    tp = train.TrainPaths(prepared, checkpoint, reports / "train.json", reports / "h.csv", reports / "h.png")
    with one_thread():
        train.run(params, tp)
    model, _ = load_classifier(checkpoint)
    assert (model.spec.image_size, model.spec.stored_size) == ((32, 32), (40, 40))
    metrics = evaluate.run(
        params,
        evaluate.EvaluatePaths(
            checkpoint, prepared, tp.report, reports / "m.json", reports / "c.csv", reports / "c.png"
        ),
    )
    assert metrics.metrics["n_test"] > 0

    onnx_path = tmp_path / "models" / "model.onnx"
    xp = export.ExportPaths(checkpoint, prepared, tp.report, onnx_path, tmp_path / "c", reports / "x.json")
    assert export.run(params, xp).report["parity"]["argmax_agreement"] == 1.0
    meta = read_metadata(onnx_path)
    assert (meta.input_size, meta.resize_size) == ((32, 32), (40, 40))
    test = PreparedSplit.load(prepared, "test")
    (prediction,), failures = predict(onnx_path, [digits_folder / test.paths[0]])
    expected = probabilities(infer(open_session(onnx_path), test.floats([0], (32, 32)).numpy(), 1), "logits")
    assert failures == []
    np.testing.assert_allclose(list(prediction.probabilities.values()), expected[0], atol=1e-5)

    ap = audit.AuditPaths(
        checkpoint, prepared, tp.report, None, None, reports / "a.json", tmp_path / "gallery"
    )
    audited = audit.run(
        params.model_copy(update={"audit": AuditParams.from_defaults(methods=["gradcam"])}), ap
    )
    assert audited.report.n_images > 0 and audited.report.decision.verdict in ("pass", "fail", "inconclusive")

    too_big = digits_train_params(tmp_path / "big", base, input_size=[48, 48])
    with pytest.raises(
        StageInputError, match=r"train.input_size \[48, 48\] is larger than the prepared images"
    ):
        train.run(too_big, train.TrainPaths(prepared, tmp_path / "big" / "m.pt"))
