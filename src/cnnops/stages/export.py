"""`cnnops export`: the checkpoint as a self-describing ONNX file, proven equal to PyTorch and timed.

The graph is written to a staging folder first and moved to `--out` only after onnx.checker, the
parity check on the test split and the optional compression succeed, so a failed export leaves
the previous model.onnx in place. Figures go to the report (a DVC metrics file) and the model's
MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cnnops import atomic
from cnnops.config import ExportParams, Params, TrackingParams
from cnnops.data.digest import file_sha256
from cnnops.data.splits import PreparedSplit, load_split_for
from cnnops.errors import StageInputError
from cnnops.export.compression import Compression, SplitCalibration, compress, refusal
from cnnops.export.latency import compare, compare_sessions
from cnnops.export.onnx_model import (
    MAX_TEMPERATURE,
    OnnxMetadata,
    available_providers,
    check_parity,
    export_classifier,
    infer,
    open_session,
    with_output,
)
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs
from cnnops.tracking.lineage import lineage

log = logging.getLogger(__name__)
COMPRESSED_NAME = "model.{kind}.onnx"


@dataclass(frozen=True)
class ExportPaths:
    """The stage's inputs and outputs (the paths dvc.yaml gives the CLI)."""

    checkpoint: Path = path_arg("models/model.pt", "checkpoint", POSITIONAL)
    prepared: Path = path_arg(
        "prepared", "prepare's output folder: its test split is the parity and accuracy images"
    )
    train_report: Path = path_arg("reports/train.json", "train report: the model's MLflow run id")
    out: Path = path_arg("models/model.onnx", "ONNX file")
    compressed_dir: Path = path_arg("models/compressed", "folder of the INT8 or FP16 copy")
    report: Path = path_arg("reports/export.json", "JSON report")
    # dvc.yaml gives it; without it the graph is uncalibrated (temperature 1), as the report says
    metrics: Path | None = path_arg(
        None, "evaluate's metrics JSON: its calibration temperature is divided into the graph's logits"
    )


@dataclass(frozen=True)
class ExportResult:
    run_id: str  # the model's MLflow run, which the export was added to
    report: dict[str, Any]  # what `paths.report` holds: parity, accuracy, latency, compression


def run(params: Params, paths: ExportPaths = ExportPaths()) -> ExportResult:
    """Export, check parity, time, optionally compress; write the ONNX file(s) and the report, and
    log them to the model's run. Files land only after every check passed (staged beside `out`)."""
    e = params.export
    model, run_id = runs.load_run_model(paths.checkpoint, paths.train_report)
    test = load_split_for(model.spec, paths.prepared, paths.checkpoint)
    static = e.compression == "int8_static"  # calibrated on the train split, never on test
    train = load_split_for(model.spec, paths.prepared, paths.checkpoint, "train") if static else None
    temperature = _temperature(paths.metrics)
    metadata = OnnxMetadata(
        class_names=list(model.spec.class_names),
        input_size=model.spec.image_size,
        color_mode=model.spec.color_mode,
        output=e.output,
        model=model.spec.model,
        mlflow_run_id=run_id,
        **lineage().as_tags(),
        resize_size=model.spec.stored_size,
        temperature=temperature,
        window=model.spec.window,
    )
    labels, batch, size = test.labels.numpy(), e.throughput_batch, model.spec.image_size
    paths.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.out.parent, prefix=".export-") as tmp:
        staged = Path(tmp) / paths.out.name
        export_classifier(model, staged, opset=e.opset, metadata=metadata)
        graph = with_output(model, e.output, temperature)
        reference = _outputs(_torch_fn(graph), test, batch, size)
        onnx_out = _outputs(_onnx_fn(open_session(staged), batch), test, batch, size)
        result: dict[str, Any] = {
            "run_id": run_id,
            "onnx": str(paths.out),
            "opset": e.opset,
            "output": e.output,
            "size_mb": staged.stat().st_size / 2**20,
            "parity": check_parity(reference, onnx_out, e.parity_atol, staged.name, e.output),
            "accuracy": {"pytorch": _accuracy(reference, labels), "onnx": _accuracy(onnx_out, labels)},
            "temperature": temperature,
            "latency": _latency(e, graph, staged, test.floats(slice(0, 1), size)[0]),
            "compression": _compress(e, staged, (test, onnx_out, train), size),
            "lineage": {"git_commit": metadata.git_commit, "data_version": metadata.data_version},
        }
        _publish(staged, paths.out, paths.compressed_dir, e.compression)
        if result["compression"].get("published"):
            result["compression"]["path"] = str(
                paths.compressed_dir / COMPRESSED_NAME.format(kind=e.compression)
            )
    atomic.write_json(paths.report, result)
    _log_to_mlflow(params.tracking, run_id, result, paths.out, paths.report)
    return ExportResult(run_id, result)


def _temperature(metrics: Path | None) -> float:
    """The calibration temperature evaluate fitted for this run (1: no metrics file given)."""
    if metrics is None:
        log.warning("export: no --metrics given, so the graph is not calibrated (temperature 1)")
        return 1.0
    try:
        calibration = json.loads(metrics.read_text())["calibration"]
        temperature = calibration["temperature"]
    except (OSError, ValueError, KeyError, TypeError):
        raise StageInputError(
            f"{metrics}: no calibration.temperature in it; run `cnnops evaluate` (or `dvc repro evaluate`)"
        ) from None
    if not isinstance(temperature, float) or not 0.0 < temperature <= MAX_TEMPERATURE:
        raise StageInputError(
            f"{metrics}: calibration.temperature is {str(temperature)[:40]}, expected a number in "
            f"(0, {MAX_TEMPERATURE:g}]; re-run `cnnops evaluate`"
        )
    return temperature


def _latency(e: ExportParams, model: nn.Module, onnx_path: Path, image: torch.Tensor) -> dict[str, Any]:
    """ONNX Runtime against PyTorch eager, per execution provider this machine has."""
    return {
        provider.removesuffix("ExecutionProvider").lower(): compare(
            model,
            open_session(onnx_path, provider),
            image,
            provider=provider,
            runs=e.latency_runs,
            throughput_batch=e.throughput_batch,
        )
        for provider in available_providers()
    }


def _outputs(
    fn: Callable[[torch.Tensor], np.ndarray], split: PreparedSplit, batch_size: int, size: tuple[int, int]
) -> np.ndarray:
    """A model's outputs over the whole split at its input `size`, a batch at a time (memory: one batch)."""
    return np.concatenate([fn(images) for images, _ in split.batches(batch_size, size)])


def _torch_fn(model: nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    def run(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(images).numpy()

    return run


def _onnx_fn(session: ort.InferenceSession, batch_size: int) -> Callable[[torch.Tensor], np.ndarray]:
    return lambda images: infer(session, images.numpy(), batch_size)


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(1) == labels).mean()) if len(labels) else 0.0


def _publish(staged: Path, out: Path, compressed_dir: Path, kind: str) -> None:
    """Move the checked files from the staging folder into place, dropping a stale compressed copy."""
    compressed_dir.mkdir(parents=True, exist_ok=True)
    for old in typing.get_args(Compression):
        compressed_dir.joinpath(COMPRESSED_NAME.format(kind=old)).unlink(missing_ok=True)
    if staged.with_name(COMPRESSED_NAME.format(kind=kind)).is_file():  # none, or refused: no copy
        name = COMPRESSED_NAME.format(kind=kind)
        staged.with_name(name).replace(compressed_dir / name)
    staged.replace(out)


def _compress(
    params: ExportParams,
    fp32: Path,
    splits: tuple[PreparedSplit, np.ndarray, PreparedSplit | None],
    size: tuple[int, int],
) -> dict[str, Any]:
    """Write the compressed copy (if asked) beside `fp32`, time it against fp32 and score it on the
    test split (`splits`: the test split, fp32's outputs on it, and the train split that calibrates
    int8_static); a copy that does not help is deleted, its figures and the reason in the report
    (`published` false)."""
    if params.compression == "none":
        return {"kind": "none"}
    test, fp32_out, train = splits
    path = fp32.with_name(COMPRESSED_NAME.format(kind=params.compression))
    calibration = None
    if train is not None:
        calibration = SplitCalibration(
            train, size, images=params.calibration_images, batch_size=params.throughput_batch
        )
    compress(fp32, path, params.compression, calibration)
    session, batch = open_session(path), params.throughput_batch
    outputs = _outputs(_onnx_fn(session, batch), test, batch, size)
    labels = test.labels.numpy()
    fp32_accuracy, accuracy = _accuracy(fp32_out, labels), _accuracy(outputs, labels)
    figures = {
        "kind": params.compression,
        "size_mb": path.stat().st_size / 2**20,
        "fp32_size_mb": fp32.stat().st_size / 2**20,
        "accuracy": accuracy,
        "fp32_accuracy": fp32_accuracy,
        "accuracy_change": accuracy - fp32_accuracy,
        "argmax_agreement_with_fp32": float((outputs.argmax(1) == fp32_out.argmax(1)).mean()),
        "max_abs_diff_from_fp32": float(np.abs(outputs - fp32_out).max()),
        "calibration_images": 0 if calibration is None else calibration.images,
        "latency": compare_sessions(
            open_session(fp32), session, test.floats(slice(0, 1), size)[0],
            runs=params.latency_runs, throughput_batch=batch,
        ),
    }  # fmt: skip
    refused = refusal(figures, params.max_accuracy_drop)
    figures |= {"published": not refused, "refused": refused or None}
    if refused:
        log.warning("export: %s; models/compressed stays empty (export.compression)", refused)
        path.unlink()
    return figures


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _log_to_mlflow(
    tracking_params: TrackingParams, run_id: str, result: dict[str, Any], onnx_path: Path, report: Path
) -> None:
    # Settings are tags, not params: MLflow refuses to change a param, and re-exporting the same run
    # with another opset or output is legitimate.
    with runs.continue_run(tracking_params, run_id):
        runs.log_metrics(_flatten(result, "export."))
        runs.set_tags(
            {
                "export.opset": result["opset"],
                "export.output": result["output"],
                "export.compression": result["compression"]["kind"],
                "export.onnx_sha256": file_sha256(onnx_path),
            }
        )
        runs.log_files([report], "export")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the model to ONNX, check parity with PyTorch, measure latency",
        description=__doc__,
    )
    add_path_arguments(parser, ExportPaths)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    paths = paths_from_args(ExportPaths, args)
    result = run(params, paths).report
    cpu = result["latency"]["cpu"]
    log.info(
        "exported %s: max abs diff %.2g, batch-1 p50 ORT %.2f ms vs PyTorch %.2f ms (%.2fx)",
        paths.out,
        result["parity"]["max_abs_diff"],
        cpu["ort_batch1_p50_ms"],
        cpu["torch_batch1_p50_ms"],
        cpu["speedup_batch1"],
    )
    compressed = result["compression"]
    if compressed.get("published"):
        log.info(
            "%s copy %s: %.2f MB, test accuracy %.4f (%+.4f against fp32), batch-1 %.2fx fp32's speed",
            compressed["kind"],
            compressed["path"],
            compressed["size_mb"],
            compressed["accuracy"],
            compressed["accuracy_change"],
            compressed["latency"]["speedup_batch1"],
        )
    return 0
