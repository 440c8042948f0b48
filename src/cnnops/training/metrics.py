"""Classification metrics from logits and labels, in plain Python types ready for JSON and MLflow.

scikit-learn computes the standard ones; expected calibration error has no scikit-learn function,
so it is written here (the usual equal-width confidence bins of Guo et al., 2017).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Weighted mean |accuracy - confidence| over equal-width bins of the top-class confidence."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_report(
    logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], *, top_k: int = 3, ece_bins: int = 15
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, top-k, ECE, per-class P/R/F1 and the confusion matrix."""
    probs = torch.softmax(logits.float(), dim=1).numpy()
    y_true, y_pred = labels.numpy(), probs.argmax(axis=1)
    classes = list(range(len(class_names)))
    k = min(top_k, len(class_names))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        # torch.topk rather than sklearn's top_k_accuracy_score, which rejects a test set missing a class.
        f"top{k}_accuracy": float((logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean()),
        "ece": expected_calibration_error(probs, y_true, ece_bins),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }
