"""`cnnops evaluate`: the best checkpoint on the un-augmented test split, added to the model's run.

Writes reports/metrics.json (a DVC metrics file: accuracy, balanced accuracy, macro-F1, top-k,
ECE, per-class precision/recall/F1), the per-image confusion data DVC plots renders with its
confusion template, and a confusion-matrix PNG; the same numbers and files go to the MLflow run
that `train` created (its id is in the train report).
"""

from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnops import atomic
from cnnops.config import Params
from cnnops.data.loaders import SplitDataset, eval_loader
from cnnops.data.splits import PreparedSplit, load_split_for, split_digest
from cnnops.data.transforms import EvalPreset
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs
from cnnops.training import plots
from cnnops.training.engine import LoopSettings, evaluate_epoch
from cnnops.training.metrics import classification_report

log = logging.getLogger(__name__)

EVAL_BATCH = 256


@dataclass(frozen=True)
class EvaluatePaths:
    """The stage's inputs and outputs (the paths dvc.yaml gives the CLI)."""

    model: Path = path_arg("models/model.pt", "checkpoint", POSITIONAL)
    prepared: Path = path_arg("prepared", "prepare's output folder (its test split)")
    train_report: Path = path_arg("reports/train.json", "train report: the model's MLflow run id")
    metrics: Path = path_arg("reports/metrics.json", "metrics JSON")
    confusion: Path = path_arg("reports/plots/confusion.csv", "per-image CSV for DVC's confusion plot")
    confusion_png: Path = path_arg("reports/plots/confusion.png", "confusion matrix figure")


@dataclass(frozen=True)
class EvaluateResult:
    run_id: str  # the model's MLflow run, which the metrics were added to
    metrics: dict[str, Any]  # what `paths.metrics` holds


def run(params: Params, paths: EvaluatePaths = EvaluatePaths()) -> EvaluateResult:
    """Evaluate `paths.model` on the test split of `paths.prepared`; write and log the metrics and plots."""
    model, run_id = runs.load_run_model(paths.model, paths.train_report)
    test = load_split_for(model.spec, paths.prepared, paths.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output = evaluate_epoch(
        model.to(device),
        eval_loader(SplitDataset(test, EvalPreset(model.spec.image_size)), batch_size=EVAL_BATCH),
        LoopSettings(device),
    )
    report = classification_report(
        output.logits,
        output.labels,
        test.class_names,
        top_k=params.evaluate.top_k,
        ece_bins=params.evaluate.ece_bins,
    )
    matrix = report.pop("confusion_matrix")
    metrics = {**report, "loss": output.stats.loss, "n_test": len(test)}
    atomic.write_json(paths.metrics, metrics)
    _write_confusion(paths.confusion, test, output.logits.argmax(1))
    plots.confusion_matrix(matrix, test.class_names, paths.confusion_png)

    scalars = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    with runs.continue_run(params.tracking, run_id):
        runs.log_metrics(scalars)
        runs.log_dict({**metrics, "confusion_matrix": matrix}, "evaluate/metrics.json")
        runs.log_files([paths.confusion, paths.confusion_png], "evaluate")
        # The test split's content hash: a comparison between runs can check it used the same test set.
        runs.set_tags({"cnnops.test_data_sha256": split_digest(paths.prepared, ("test",))})
    summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece"))
    log.info("test %s on %d images (MLflow run %s)", summary, len(test), run_id)
    return EvaluateResult(run_id, metrics)


def _write_confusion(path: Path, split: PreparedSplit, predicted: torch.Tensor) -> None:
    """One row per test image (actual, predicted class names): the input of DVC's confusion template."""
    names = split.class_names
    with atomic.atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "actual", "predicted"])
        for image, actual, pred in zip(split.paths, split.labels.tolist(), predicted.tolist(), strict=True):
            writer.writerow([image, names[actual], names[pred]])


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="test-split metrics and plots, added to the model's run")
    add_path_arguments(parser, EvaluatePaths)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(EvaluatePaths, args))
    return 0
