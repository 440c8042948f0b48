"""Classification metrics from logits and labels, in plain Python types ready for JSON and MLflow.

scikit-learn computes the standard ones; expected calibration error has no scikit-learn function,
so it is written here (the usual equal-width confidence bins of Guo et al., 2017). The significance
tests release decides with are exact binomial tests from scipy (statsmodels is not a dependency).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest
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


def majority_baseline(labels: np.ndarray, correct: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Whether a model's accuracy is above always answering the split's largest class.

    One-sided exact binomial test of its correct count against that class's share (the
    "no-information rate" test of caret's confusionMatrix). A split of one class gives p = 1: no
    accuracy can show skill there.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    largest = int(counts.argmax())
    share = float(counts[largest] / len(labels))
    hits = int(correct.sum())
    return {
        "majority_class": class_names[largest],
        "accuracy": share,
        "model_accuracy": hits / len(labels),
        "test": "binomial, one-sided (model accuracy > majority-class share)",
        "p_value": float(binomtest(hits, len(labels), share, alternative="greater").pvalue),
    }


def mcnemar(challenger: np.ndarray, champion: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test, one-sided, of two models' per-image correctness on the same images.

    Only the images exactly one model gets right count; under "no difference" either model is as
    likely to be the one, so the challenger's share of them is Binomial(n, 1/2): the exact
    McNemar test (statsmodels' `mcnemar(exact=True)` is the two-sided form of it). No such image:
    p = 1, nothing shows the challenger better.
    """
    only_challenger = int((challenger & ~champion).sum())
    only_champion = int((~challenger & champion).sum())
    discordant = only_challenger + only_champion
    p = binomtest(only_challenger, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    return {
        "test": "McNemar exact, one-sided (challenger better)",
        "images": len(challenger),
        "challenger_correct": int(challenger.sum()),
        "champion_correct": int(champion.sum()),
        "challenger_only_correct": only_challenger,
        "champion_only_correct": only_champion,
        "p_value": float(p),
    }
