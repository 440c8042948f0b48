"""`cnnops export` end to end: real torch.onnx, ONNX Runtime and an MLflow SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from fixtures_export import model_run, stage_params, synthetic_split

from cnnops.config import ExportParams, TrackingParams
from cnnops.errors import StageInputError
from cnnops.export.onnx_model import read_metadata
from cnnops.stages import export

pytestmark = pytest.mark.integration
CNNOPS = str(Path(sys.executable).with_name("cnnops"))


def test_cli_export_writes_checked_model_report_and_mlflow_record(
    tmp_path: Path, mlflow_store: TrackingParams, prepared_synthetic: dict[str, Path], good_model
) -> None:
    tracking = mlflow_store
    checkpoint, train_report = model_run(tmp_path, "m", good_model, tracking)
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "tracking": tracking.model_dump(),
                "export": {
                    "output": "probabilities",
                    "compression": "int8",
                    "latency_runs": 5,
                    "throughput_batch": 8,
                },
            }
        )
    )
    out, report = tmp_path / "models" / "model.onnx", tmp_path / "reports" / "export.json"
    cmd = [
        CNNOPS,
        "--params",
        str(params),
        "export",
        str(checkpoint),
        "--prepared",
        str(prepared_synthetic["L"]),
    ]
    cmd += ["--train-report", str(train_report), "--out", str(out), "--report", str(report)]
    cmd += ["--compressed-dir", str(tmp_path / "models" / "compressed")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=300)
    assert done.returncode == 0, done.stderr

    result = json.loads(report.read_text())
    run_id = json.loads(train_report.read_text())["run_id"]
    meta = read_metadata(out)
    assert (meta.mlflow_run_id, meta.output, meta.class_names) == (run_id, "probabilities", ["a", "b", "c"])
    assert meta.git_commit == "unknown" and meta.data_version == "unknown"  # tmp_path: no git, no data.dvc
    assert result["parity"]["images"] == 13 and result["parity"]["max_abs_diff"] <= 1e-4
    assert result["parity"]["argmax_agreement"] == 1.0
    assert result["accuracy"] == {"pytorch": 1.0, "onnx": 1.0}
    assert set(result["latency"]) == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})
    cpu = result["latency"]["cpu"]
    assert 0 < cpu["ort_batch1_p50_ms"] <= cpu["ort_batch1_p95_ms"] and cpu["torch_images_per_s"] > 0
    compressed = result["compression"]
    assert compressed["kind"] == "int8" and compressed["calibration_images"] == 0  # dynamic: no calibration
    assert compressed["accuracy_change"] == compressed["accuracy"] - 1.0
    speed = compressed["latency"]  # timed against fp32, both in ONNX Runtime
    assert speed["speedup_batch1"] == speed["fp32_batch1_p50_ms"] / speed["compressed_batch1_p50_ms"]
    written = tmp_path / "models" / "compressed" / "model.int8.onnx"
    assert compressed["published"] == (compressed["refused"] is None) == written.is_file()

    mlflow.set_tracking_uri(tracking.uri)
    logged = mlflow.get_run(run_id)
    assert logged.data.metrics["export.parity.max_abs_diff"] == result["parity"]["max_abs_diff"]
    assert logged.data.metrics["export.compression.accuracy_change"] == compressed["accuracy_change"]
    assert logged.data.tags["export.output"] == "probabilities"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "export")]
    assert artifacts == ["export/export.json"]


def test_failed_export_leaves_previous_outputs(
    tmp_path: Path, mlflow_store: TrackingParams, prepared_synthetic: dict[str, Path], good_model
) -> None:
    tracking = mlflow_store
    checkpoint, train_report = model_run(tmp_path, "m", good_model, tracking)
    out, report = tmp_path / "model.onnx", tmp_path / "export.json"

    def paths(split: str) -> export.ExportPaths:
        return export.ExportPaths(
            checkpoint, prepared_synthetic[split], train_report, out, tmp_path / "c", report
        )

    params = stage_params(
        tracking, export=ExportParams.from_defaults(latency_runs=5, throughput_batch=8, compression="fp16")
    )
    published = export.run(params, paths("L")).report["compression"]["published"]
    assert (tmp_path / "c" / "model.fp16.onnx").is_file() == published  # refused when slower than fp32
    before = out.read_bytes(), report.read_text()

    with pytest.raises(
        StageInputError, match=r"test.json \(classes \['a', 'b', 'c'\], RGB, \[16, 16\]\) does not match"
    ):
        export.run(params, paths("RGB"))
    assert (out.read_bytes(), report.read_text()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export-")] == []

    export.run(
        stage_params(tracking, export=ExportParams.from_defaults(latency_runs=5, throughput_batch=8)),
        paths("L"),
    )
    assert list((tmp_path / "c").iterdir()) == []  # compression off: no stale fp16 copy


def test_static_int8_is_calibrated_on_train_timed_and_refused_when_it_does_not_help(
    tmp_path: Path, mlflow_store: TrackingParams, good_model
) -> None:
    """export.compression int8_static through the stage: calibrated on the train split, scored on
    test, timed against fp32; published only when it is faster and loses at most
    export.max_accuracy_drop, else reported with the reason and not written."""
    prepared = tmp_path / "prepared"
    synthetic_split((12, 12, 12), seed=1).save(prepared, "train")
    synthetic_split((7, 3, 3)).save(prepared, "test")
    checkpoint, train_report = model_run(tmp_path, "m", good_model, mlflow_store)
    paths = export.ExportPaths(
        checkpoint, prepared, train_report, tmp_path / "model.onnx", tmp_path / "c", tmp_path / "export.json"
    )
    section = ExportParams.from_defaults(
        latency_runs=5, throughput_batch=8, compression="int8_static", calibration_images=30
    )
    result = export.run(stage_params(mlflow_store, export=section), paths).report["compression"]
    assert result["kind"] == "int8_static" and result["calibration_images"] == 30
    assert result["fp32_accuracy"] == 1.0 and result["argmax_agreement_with_fp32"] >= 0.9
    speed = result["latency"]
    faster = speed["compressed_batch1_p50_ms"] <= speed["fp32_batch1_p50_ms"]
    assert result["published"] == (faster and result["accuracy"] >= 0.99)
    assert (tmp_path / "c" / "model.int8_static.onnx").is_file() == result["published"]
    if not result["published"]:
        assert result["refused"].startswith("int8_static copy refused: ") and "path" not in result

    with pytest.raises(StageInputError, match=r"train.json: prepared split not found"):
        (prepared / "train.json").unlink()
        export.run(stage_params(mlflow_store, export=section), paths)
