"""`cnnops evaluate`: the best checkpoint on the un-augmented test split, added to the model's run.

Writes reports/metrics.json (a DVC metrics file: accuracy, balanced accuracy, macro-F1, top-k,
ECE, per-class precision/recall/F1/AUROC/average precision, bootstrap confidence intervals, and
the temperature fitted on the validation split with the test ECE before and after it), the
per-image confusion data DVC plots renders with its confusion template, one-vs-rest ROC and PR
curves (a CSV per class) and reliability bins for DVC plots, and their PNG figures; the same
numbers and files go to the MLflow run that `train` created (its id is in the train report).
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnops import atomic
from cnnops.config import Params
from cnnops.data.loaders import SplitDataset, eval_loader
from cnnops.data.splits import PreparedSplit, load_split_for
from cnnops.data.transforms import EvalPreset
from cnnops.models import Classifier
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs
from cnnops.training import plots
from cnnops.training.calibration import fit_temperature, nll, softmax
from cnnops.training.engine import EvalOutput, LoopSettings, evaluate_epoch
from cnnops.training.metrics import (
    ClassCurves,
    bootstrap_intervals,
    classification_report,
    expected_calibration_error,
    group_report,
    one_vs_rest,
    reliability_bins,
)

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
    # roc/ and pr/ (a CSV per class), reliability.csv, roc_pr.png and reliability.png
    curves: Path | None = path_arg(None, "folder of the ROC, PR and reliability data and figures "
                                   "(default: the folder of --confusion)")  # fmt: skip

    @property
    def curves_dir(self) -> Path:
        return self.curves if self.curves is not None else self.confusion.parent


@dataclass(frozen=True)
class EvaluateResult:
    run_id: str  # the model's MLflow run, which the metrics were added to
    metrics: dict[str, Any]  # what `paths.metrics` holds


def run(params: Params, paths: EvaluatePaths = EvaluatePaths()) -> EvaluateResult:
    """Evaluate `paths.model` on the test split of `paths.prepared`, calibrate it on the validation
    split; write and log the metrics and plots."""
    model, run_id = runs.load_run_model(paths.model, paths.train_report)
    test = load_split_for(model.spec, paths.prepared, paths.model)
    output = _outputs(model, test)
    e = params.evaluate
    report = classification_report(
        output.logits, output.labels, test.class_names, top_k=e.top_k, ece_bins=e.ece_bins
    )
    matrix = report.pop("confusion_matrix")
    logits, labels = output.logits.float().numpy(), output.labels.numpy()
    probs = softmax(logits)
    curves = one_vs_rest(probs, labels, test.class_names)
    _add_areas(report, curves)
    intervals = bootstrap_intervals(
        probs, labels, resamples=e.bootstrap_resamples, confidence=e.confidence, seed=params.base.seed
    )
    calibration = _calibrate(model, paths, logits, labels, e.ece_bins)
    metrics = {
        **report,
        "loss": output.stats.loss,
        "n_test": len(test),
        "intervals": {"confidence": e.confidence, "resamples": e.bootstrap_resamples, **intervals},
        "calibration": calibration,
    }
    if test.groups is not None:  # data/groups.csv: accuracy per patient / site, the worst by name
        metrics["groups"] = group_report(labels, logits.argmax(1), test.groups, worst=e.worst_groups)
    atomic.write_json(paths.metrics, metrics)
    _write_confusion(paths.confusion, test, output.logits.argmax(1))
    plots.confusion_matrix(matrix, test.class_names, paths.confusion_png)
    figures = _write_curves(paths.curves_dir, curves, probs, logits, labels, calibration, e.ece_bins)
    _log(params, run_id, paths, metrics, matrix, figures)
    summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece"))
    acc = intervals["accuracy"]
    log.info(
        "test %s (accuracy %.0f%% interval %.4f-%.4f) on %d images, ECE %.4f at temperature %.3g "
        "(MLflow run %s)",
        summary,
        100 * e.confidence,
        acc["low"],
        acc["high"],
        len(test),
        calibration["test_ece_after"],
        calibration["temperature"],
        run_id,
    )
    return EvaluateResult(run_id, metrics)


def _outputs(model: Classifier, split: PreparedSplit) -> EvalOutput:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_epoch(
        model.to(device),
        eval_loader(SplitDataset(split, EvalPreset(model.spec.image_size)), batch_size=EVAL_BATCH),
        LoopSettings(device),
    )


def _add_areas(report: dict[str, Any], curves: dict[str, ClassCurves]) -> None:
    """AUROC and average precision per class (None: no curve, see metrics.one_vs_rest) and their
    means over the classes that have one."""
    for name, figures in report["per_class"].items():
        c = curves.get(name)
        figures["auroc"] = None if c is None else c.auroc
        figures["average_precision"] = None if c is None else c.average_precision
    missing = [name for name in report["per_class"] if name not in curves]
    if missing:
        log.warning(
            "no ROC or PR curve for class(es) %s: the test split has no image of them (or only them); "
            "macro AUROC and AP average the other classes",
            ", ".join(repr(m[:40]) for m in missing[:10]),
        )
    report["macro_auroc"] = float(np.mean([c.auroc for c in curves.values()])) if curves else None
    report["macro_average_precision"] = (
        float(np.mean([c.average_precision for c in curves.values()])) if curves else None
    )


def _calibrate(
    model: Classifier, paths: EvaluatePaths, logits: np.ndarray, labels: np.ndarray, bins: int
) -> dict[str, Any]:
    """Temperature scaling fitted on the validation split, judged on the test split."""
    val = load_split_for(model.spec, paths.prepared, paths.model, "val")
    val_output = _outputs(model, val)
    temperature = fit_temperature(val_output.logits.float().numpy(), val_output.labels.numpy())
    return {
        "temperature": temperature,
        "fitted_on": "val",
        "val_images": len(val),
        "test_ece_before": expected_calibration_error(softmax(logits), labels, bins),
        "test_ece_after": expected_calibration_error(softmax(logits, temperature), labels, bins),
        "test_nll_before": nll(logits, labels),
        "test_nll_after": nll(logits, labels, temperature),
    }


def _write_confusion(path: Path, split: PreparedSplit, predicted: torch.Tensor) -> None:
    """One row per test image (actual, predicted class names): the input of DVC's confusion template."""
    names = split.class_names
    with atomic.atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "actual", "predicted"])
        for image, actual, pred in zip(split.paths, split.labels.tolist(), predicted.tolist(), strict=True):
            writer.writerow([image, names[actual], names[pred]])


def _write_curves(
    folder: Path,
    curves: dict[str, ClassCurves],
    probs: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    calibration: dict[str, Any],
    bins: int,
) -> list[Path]:
    """The DVC plots data (roc/ and pr/: a CSV per class; reliability.csv) and the PNGs; returns them."""
    for kind, columns in (("roc", ("fpr", "tpr")), ("pr", ("recall", "precision"))):
        target = folder / kind
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*.csv"):  # a class list that changed leaves no old curve behind
            stale.unlink()
        for i, (name, c) in enumerate(curves.items()):
            points = zip(*(getattr(c, column) for column in columns), strict=True)
            _write_rows(target / _file_name(i, name), columns, points)
    temperature = calibration["temperature"]
    before = reliability_bins(probs, labels, bins)
    after = reliability_bins(softmax(logits, temperature), labels, bins)
    rows = (
        ((b.lower + b.upper) / 2, b.accuracy, a.accuracy, b.count, a.count)
        for b, a in zip(before, after, strict=True)
    )
    columns = ("confidence", "accuracy_raw", "accuracy_calibrated", "images_raw", "images_calibrated")
    _write_rows(folder / "reliability.csv", columns, rows)
    return [
        folder / "roc",
        folder / "pr",
        folder / "reliability.csv",
        plots.roc_pr_curves(curves, folder / "roc_pr.png"),
        plots.reliability_diagram(before, after, temperature, folder / "reliability.png"),
    ]


def _file_name(index: int, class_name: str) -> str:
    """A class's CSV name: its index (unique) and its name made safe for any file system."""
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', class_name)[:60]}.csv"


def _write_rows(path: Path, columns: tuple[str, ...], rows: Any) -> None:
    with atomic.atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def _log(
    params: Params,
    run_id: str,
    paths: EvaluatePaths,
    metrics: dict[str, Any],
    matrix: list[list[int]],
    figures: list[Path],
) -> None:
    """The figures as test_* metrics (intervals as _low/_high), the files as artifacts of the run."""
    scalars = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    for name, interval in metrics["intervals"].items():
        if isinstance(interval, dict):
            scalars |= {f"test_{name}_low": interval["low"], f"test_{name}_high": interval["high"]}
    if metrics.get("groups"):
        scalars["test_group_accuracy_min"] = metrics["groups"]["accuracy_min"]
    calibration = metrics["calibration"]
    scalars |= {
        "temperature": calibration["temperature"],
        "test_ece_calibrated": calibration["test_ece_after"],
    }
    with runs.continue_run(params.tracking, run_id):
        runs.log_metrics({k: v for k, v in scalars.items() if v == v})  # NaN (an empty resample) is no figure
        runs.log_dict({**metrics, "confusion_matrix": matrix}, "evaluate/metrics.json")
        runs.log_files([paths.confusion, paths.confusion_png, *figures], "evaluate")
        # The test split as the run's input, its content hash the digest: runs compared on their
        # test figures can check they saw the same test set.
        runs.log_splits(paths.prepared, ("test",))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="test-split metrics and plots, added to the model's run")
    add_path_arguments(parser, EvaluatePaths)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(EvaluatePaths, args))
    return 0
