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
from fixtures_export import model_run, stage_params

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
    assert compressed["kind"] == "int8" and Path(compressed["path"]).is_file()
    assert compressed["accuracy_change"] == compressed["accuracy"] - 1.0

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
    export.run(params, paths("L"))
    assert (tmp_path / "c" / "model.fp16.onnx").is_file()
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
