"""Metrics against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from cnnops.training.calibration import fit_temperature, nll, softmax
from cnnops.training.metrics import (
    bootstrap_intervals,
    classification_report,
    expected_calibration_error,
    group_report,
    majority_baseline,
    mcnemar,
    one_vs_rest,
)
from cnnops.training.plots import confusion_matrix


def test_classification_report_on_a_known_confusion() -> None:
    # true: a a a b, predicted: a a b b; class c never appears
    logits = torch.tensor([[3.0, 0, 1], [3, 1, 0], [1, 3, 0], [1, 3, 0]])
    labels = torch.tensor([0, 0, 0, 1])
    report = classification_report(logits, labels, ["a", "b", "c"], top_k=2, ece_bins=10)
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert report["per_class"]["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": 0.8,
        "support": 3,
    }
    assert report["per_class"]["b"]["precision"] == 0.5
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert report["top2_accuracy"] == 1.0  # the third image has "a" second
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_top_k_is_capped_at_the_number_of_classes() -> None:
    report = classification_report(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), ["x", "y"], top_k=5)
    assert report["top2_accuracy"] == 1.0 and report["accuracy"] == 0.0


def test_ece_of_calibrated_and_overconfident_predictions() -> None:
    labels = np.array([0, 0, 0, 1])
    calibrated = np.array([[0.75, 0.25]] * 4)  # 75% confident, 75% right
    assert expected_calibration_error(calibrated, labels, bins=10) == pytest.approx(0.0)
    overconfident = np.array([[1.0, 0.0]] * 4)
    assert expected_calibration_error(overconfident, labels, bins=10) == pytest.approx(0.25)
    mixed = np.array(
        [[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]]
    )  # bins 0.9 (2 right), 0.6 (1 right, 1 right)
    assert expected_calibration_error(mixed, np.array([0, 0, 0, 1]), bins=10) == pytest.approx(
        0.5 * 0.1 + 0.5 * 0.4
    )


def test_confusion_plot_draws_class_names_as_typed(tmp_path: Path) -> None:
    """A folder named like mathtext used to crash evaluate's plot when matplotlib parsed it."""
    names = [r"$\undefinedcmd$", "a $b$ c", r"\frac{1}{2}"]
    path = confusion_matrix([[1, 0, 0], [0, 2, 0], [0, 0, 3]], names, tmp_path / "confusion.png")
    assert path.stat().st_size > 1000


def test_majority_baseline_is_an_exact_binomial_test_against_the_largest_class() -> None:
    labels = np.array([0] * 7 + [1] * 3 + [2] * 3)
    all_right = majority_baseline(labels, np.ones(13, bool), ["a", "b", "c"])
    assert (all_right["majority_class"], all_right["accuracy"]) == ("a", 7 / 13)
    assert all_right["p_value"] == pytest.approx((7 / 13) ** 13)  # P(13 of 13 | p = 7/13)
    constant = majority_baseline(labels, labels == 0, ["a", "b", "c"])
    assert constant["model_accuracy"] == 7 / 13 and constant["p_value"] > 0.5
    assert majority_baseline(np.zeros(5, int), np.ones(5, bool), ["a", "b"])["p_value"] == 1.0


def test_mcnemar_counts_only_the_images_one_model_gets_right() -> None:
    challenger = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)
    champion = np.array([1, 0, 0, 0, 0, 0, 1, 1], bool)
    result = mcnemar(challenger, champion)
    assert (result["challenger_only_correct"], result["champion_only_correct"]) == (4, 1)
    assert result["p_value"] == pytest.approx(6 / 32)  # P(4 or 5 of 5 | 1/2)
    assert mcnemar(champion, champion)["p_value"] == 1.0  # no disagreement: nothing shown


def test_temperature_scaling_recovers_the_temperature_that_made_logits_overconfident() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 4000)
    calibrated = rng.normal(size=(4000, 4))
    calibrated[np.arange(4000), labels] += 1.5  # drawn so that softmax(calibrated) is the truth:
    sampled = np.array([rng.choice(4, p=p) for p in softmax(calibrated)])  # labels drawn from it
    assert fit_temperature(3.0 * calibrated, sampled) == pytest.approx(3.0, rel=0.1)
    assert nll(3.0 * calibrated, sampled, 3.0) < nll(3.0 * calibrated, sampled)


def test_a_temperature_fit_that_runs_to_its_bound_is_not_applied(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.arange(40) % 4
    logits = np.eye(4)[labels] * 2.0  # every validation image right: the NLL falls for ever as T shrinks
    assert fit_temperature(logits, labels) == 1.0
    assert "not applied: T = 1 is kept" in caplog.text


def test_bootstrap_point_figures_are_sklearns_and_the_intervals_hold_them() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3))
    logits[np.arange(300), labels] += 1.0
    probs = softmax(logits)
    predicted = probs.argmax(1)
    result = bootstrap_intervals(probs, labels, resamples=500, confidence=0.9, seed=0)
    expected = {
        "accuracy": skm.accuracy_score(labels, predicted),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, predicted),
        "macro_f1": skm.f1_score(labels, predicted, average="macro"),
        "macro_auroc": skm.roc_auc_score(labels, probs, multi_class="ovr"),
    }
    for name, value in expected.items():
        assert result[name]["value"] == pytest.approx(value), name
        assert result[name]["low"] < value < result[name]["high"], name
    # with 4x the images the interval is about half as wide (1/sqrt(n))
    wide = result["accuracy"]["high"] - result["accuracy"]["low"]
    many = bootstrap_intervals(
        np.tile(probs, (4, 1)), np.tile(labels, 4), resamples=500, confidence=0.9, seed=0
    )
    assert 0.35 < (many["accuracy"]["high"] - many["accuracy"]["low"]) / wide < 0.7


def test_a_class_missing_from_the_test_split_has_no_curve() -> None:
    probs = softmax(np.array([[2.0, 0, 0], [0, 2, 0], [2, 0, 0], [0, 0, 2]]))
    curves = one_vs_rest(probs, np.array([0, 1, 0, 1]), ["a", "b", "c"])
    assert set(curves) == {"a", "b"} and curves["a"].auroc == 1.0


def test_group_report_lists_the_worst_groups_and_the_spread() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    predicted = np.array([0, 1, 1, 1, 0, 0, 1, 0])
    groups = ["p1", "p1", "p2", "p2", "p3", "p3", None, "p4"]
    report = group_report(labels, predicted, groups, worst=2)
    assert (report["n_groups"], report["grouped_images"], report["ungrouped_images"]) == (4, 7, 1)
    assert (report["accuracy_min"], report["accuracy_median"], report["accuracy_max"]) == (0.0, 0.5, 1.0)
    assert report["worst"] == [
        {"group": "p4", "images": 1, "accuracy": 0.0, "macro_f1": 0.0},
        {
            "group": "p2",
            "images": 2,
            "accuracy": 0.5,
            "macro_f1": pytest.approx(1 / 3),
        },  # p2 before p3: by name
    ]
    assert group_report(labels, predicted, [None] * 8, worst=2) is None
