"""Classification metrics from logits and labels, in plain Python types ready for JSON and MLflow.

scikit-learn computes the standard ones; expected calibration error has no scikit-learn function,
so it is written here (the usual equal-width confidence bins of Guo et al., 2017). The significance
tests release decides with are exact binomial tests from scipy (statsmodels is not a dependency).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from scipy.stats import binomtest
from sklearn import metrics as skm


@dataclass(frozen=True)
class ReliabilityBin:
    """An equal-width bin of top-class confidence: what the model claimed there, how often it was right."""

    lower: float
    upper: float
    count: int
    confidence: float  # mean top-class probability of its images (0 when empty)
    accuracy: float  # share of them classified correctly (0 when empty)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[ReliabilityBin]:
    """The reliability diagram's data: images binned by top-class confidence."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.nan_to_num(np.bincount(which, confidence, bins) / count)
        mean_acc = np.nan_to_num(np.bincount(which, correct, bins) / count)
    return [
        ReliabilityBin(
            float(edges[b]), float(edges[b + 1]), int(count[b]), float(mean_conf[b]), float(mean_acc[b])
        )
        for b in range(bins)
    ]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Weighted mean |accuracy - confidence| over equal-width bins of the top-class confidence."""
    parts = reliability_bins(probs, labels, bins)
    total = max(1, sum(b.count for b in parts))
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in parts))


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


@dataclass(frozen=True)
class ClassCurves:
    """One class against the rest: its ROC and precision-recall curves and their areas (sklearn's)."""

    fpr: np.ndarray
    tpr: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    auroc: float
    average_precision: float


def one_vs_rest(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, ClassCurves]:
    """Per class with both positives and negatives in `labels` (the others have no curve: a class
    with no test image, or a split of one class, cannot rank anything)."""
    curves = {}
    for c, name in enumerate(class_names):
        positive = labels == c
        if not 0 < positive.sum() < len(labels):
            continue
        fpr, tpr, _ = skm.roc_curve(positive, probs[:, c])
        precision, recall, _ = skm.precision_recall_curve(positive, probs[:, c])
        curves[name] = ClassCurves(
            fpr,
            tpr,
            recall,
            precision,
            float(skm.roc_auc_score(positive, probs[:, c])),
            float(skm.average_precision_score(positive, probs[:, c])),
        )
    return curves


INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")
BOOTSTRAP_BUDGET = 2**22  # array elements a resampling batch may hold (32 MB of float64): memory bound


def bootstrap_intervals(
    probs: np.ndarray, labels: np.ndarray, *, resamples: int, confidence: float, seed: int
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap intervals (test images resampled with replacement) of INTERVAL_METRICS.

    scipy.stats.bootstrap draws the resamples and bounds memory with `batch`; the metrics are
    computed for a whole batch of resamples at once (confusion counts by bincount, AUROC by ranks:
    Mann-Whitney), since sklearn's take one resample a call. Percentile, not BCa: BCa's jackknife
    costs one evaluation per test image. macro AUROC averages the classes a resample can rank.
    """
    n, k = probs.shape
    predicted = probs.argmax(1)
    ranked = [c for c in range(k) if 0 < (labels == c).sum() < n]
    batch = max(1, min(BOOTSTRAP_BUDGET // (n * (2 + len(ranked))), BOOTSTRAP_BUDGET // (k * k)))

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        rows = np.atleast_2d(index).astype(np.intp)
        values = _resampled_metrics(probs, labels, predicted, ranked, rows)
        return values if index.ndim > 1 else values[:, 0]

    result = stats.bootstrap(
        (np.arange(n),),
        statistic,
        n_resamples=resamples,
        batch=batch,
        vectorized=True,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    point = statistic(np.arange(n))
    return {
        name: {"value": float(point[i]), "low": float(low[i]), "high": float(high[i])}
        for i, name in enumerate(INTERVAL_METRICS)
    }


def _resampled_metrics(
    probs: np.ndarray, labels: np.ndarray, predicted: np.ndarray, ranked: list[int], rows: np.ndarray
) -> np.ndarray:
    """INTERVAL_METRICS of each resample (a row of image indices), as sklearn defines them."""
    b, n = rows.shape
    k = probs.shape[1]
    y, p = labels[rows], predicted[rows]
    codes = ((np.arange(b)[:, None] * k + y) * k + p).ravel()
    confusion = np.bincount(codes, minlength=b * k * k).reshape(b, k, k)
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    support, chosen = confusion.sum(2), confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)  # balanced accuracy: classes present only
        f1 = np.where(support + chosen > 0, 2 * hits / (support + chosen), 0.0)  # zero_division=0
        aurocs = []
        for c in ranked:
            positive = y == c
            count = positive.sum(1)
            ranks = stats.rankdata(probs[rows, c], axis=1)
            u = (ranks * positive).sum(1) - count * (count + 1) / 2
            aurocs.append(np.where((count > 0) & (count < n), u / (count * (n - count)), np.nan))
        auroc = np.nanmean(np.stack(aurocs), 0) if aurocs else np.full(b, np.nan)
    return np.stack([hits.sum(1) / n, np.nanmean(recall, 1), f1.mean(1), auroc])


def selection_score(select_by: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The validation figure `train.select_by` names (val_accuracy, val_balanced_accuracy, val_macro_f1)."""
    y_true, y_pred = labels.numpy(), logits.argmax(1).numpy()
    if select_by == "val_balanced_accuracy":
        return float(skm.balanced_accuracy_score(y_true, y_pred))
    if select_by == "val_macro_f1":
        return float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    return float(skm.accuracy_score(y_true, y_pred))


def class_weights(
    weighting: str, labels: torch.Tensor, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    """Cross-entropy class weights for `train.class_weighting`: None (every image counts alike, or
    the sampler evens the classes instead) or inverse frequency, n / (classes x count), sklearn's
    "balanced" weights; a class with no training image gets 0 (it never appears in the loss anyway)."""
    if weighting != "inverse_frequency":
        return None
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), 0.0)
    return weights.float().to(device)


def sampling_weights(weighting: str, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """Per-image draw weights for `train.class_weighting: sampler`: the inverse-frequency weight of
    its class, so every class is drawn about equally often; None for the other settings."""
    if weighting != "sampler":
        return None
    return class_weights("inverse_frequency", labels, num_classes, torch.device("cpu"))[labels]


def group_report(
    labels: np.ndarray, predicted: np.ndarray, groups: list[str | None], *, worst: int
) -> dict[str, Any] | None:
    """Accuracy per group of the test images (data/groups.csv: a patient, a site), bounded: the
    spread over every group, and the `worst` groups by accuracy with their macro-F1 (over the classes
    in that group). Accuracy per group is one bincount; macro-F1 (sklearn, a call per group) only for
    the listed ones, so the cost stays bounded with 100k groups. None: no image has a group."""
    named = np.array([g is not None for g in groups], dtype=bool)
    if not named.any():
        return None
    names, index = np.unique(
        np.array([g for g in groups if g is not None], dtype=object), return_inverse=True
    )
    correct = (labels == predicted)[named]
    images = np.bincount(index, minlength=len(names))
    accuracy = np.bincount(index, correct, minlength=len(names)) / images
    order = np.lexsort((names.astype(str), accuracy))[:worst]  # lowest accuracy first, then by name
    listed = []
    for g in order.tolist():
        members = np.flatnonzero(named)[index == g]
        f1 = skm.f1_score(labels[members], predicted[members], average="macro", zero_division=0)
        listed.append(
            {
                "group": str(names[g]),
                "images": int(images[g]),
                "accuracy": float(accuracy[g]),
                "macro_f1": float(f1),
            }
        )
    return {
        "n_groups": len(names),
        "grouped_images": int(named.sum()),
        "ungrouped_images": int((~named).sum()),
        "accuracy_min": float(accuracy.min()),
        "accuracy_median": float(np.median(accuracy)),
        "accuracy_max": float(accuracy.max()),
        "worst": listed,
    }
