"""Figures for people (PNG, logged to MLflow) beside the CSV data DVC plots renders."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt
from PIL import Image

from cnnops import atomic
from cnnops.training.metrics import ClassCurves, ReliabilityBin

# Class names are folder names, user input: drawn as typed, never as mathtext ($...$) or LaTeX, whose
# parser raises on a name like "$\undefinedcmd$" (and a user's matplotlibrc may turn usetex on).
PLAIN_TEXT = {"parse_math": False, "usetex": False}


def training_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train beside validation."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        ax_acc.plot(epochs, [row[f"{split}_accuracy"] for row in history], marker="o", label=split)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path) -> Path:
    """Counts with true classes as rows and predictions as columns."""
    n = len(class_names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), class_names, rotation=90, **PLAIN_TEXT)
    ax.set_yticks(range(n), class_names, **PLAIN_TEXT)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if n <= 30:
        peak = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                colour = "white" if count > peak / 2 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=colour)
    return _save(fig, path)


def figure_image(fig: plt.Figure) -> Image.Image:
    """The figure as an RGB image, closed: for pages that embed it (the audit gallery)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


MAX_LEGEND = 20  # classes named in a legend; past it the curves are drawn unnamed


def roc_pr_curves(curves: Mapping[str, ClassCurves], path: str | Path) -> Path:
    """One-vs-rest ROC and precision-recall curves, a line per class, areas in the legend."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, c in curves.items():
        ax_roc.plot(c.fpr, c.tpr, label=f"{name} (AUROC {c.auroc:.3f})")
        ax_pr.plot(c.recall, c.precision, label=f"{name} (AP {c.average_precision:.3f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for ax, x, y, title in (
        (ax_roc, "false positive rate", "true positive rate", "ROC, one vs rest"),
        (ax_pr, "recall", "precision", "precision-recall, one vs rest"),
    ):
        ax.set(xlabel=x, ylabel=y, title=title, xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if 0 < len(curves) <= MAX_LEGEND:
            legend = ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
            for text in legend.get_texts():
                text.set(**PLAIN_TEXT)
    return _save(fig, path)


def reliability_diagram(
    before: Sequence[ReliabilityBin], after: Sequence[ReliabilityBin], temperature: float, path: str | Path
) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling, with the counts."""
    fig, (ax, ax_count) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for bins, label, marker in ((before, "raw", "o"), (after, f"temperature {temperature:.2f}", "s")):
        full = [b for b in bins if b.count]
        ax.plot([b.confidence for b in full], [b.accuracy for b in full], marker=marker, label=label)
        ax_count.bar(
            [(b.lower + b.upper) / 2 for b in bins],
            [b.count for b in bins],
            width=(bins[0].upper - bins[0].lower) * (0.45 if marker == "o" else 0.3),
            alpha=0.6,
            label=label,
        )
    ax.set(ylabel="accuracy", title="reliability on the test split", xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_count.set(xlabel="top-class confidence", ylabel="images")
    return _save(fig, path)
