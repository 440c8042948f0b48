"""Class imbalance in training: inverse-frequency class weights and the figure that picks the best epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_export import stage_params, synthetic_split, tracking_params
from fixtures_model import one_thread

from cnnops.config import TrainParams
from cnnops.data.loaders import EpochWeightedSampler
from cnnops.stages import train
from cnnops.training.metrics import class_weights, sampling_weights, selection_score


def test_inverse_frequency_weights_are_sklearns_balanced_weights() -> None:
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 4)
    weights = class_weights("inverse_frequency", labels, 4, torch.device("cpu"))
    torch.testing.assert_close(weights, torch.tensor([12 / 24, 12 / 8, 12 / 16, 0.0]))  # class 3: no image
    assert class_weights("none", labels, 4, torch.device("cpu")) is None


def test_selection_scores_on_a_known_confusion() -> None:
    logits = torch.eye(2)[[0, 0, 0, 0, 1, 0]]  # true 0 0 0 0 1 1: the rare class half missed
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    assert selection_score("val_accuracy", logits, labels) == pytest.approx(5 / 6)
    assert selection_score("val_balanced_accuracy", logits, labels) == pytest.approx(0.75)
    assert selection_score("val_macro_f1", logits, labels) == pytest.approx((8 / 9 + 2 / 3) / 2)


@pytest.mark.slow
def test_train_stage_weights_the_loss_and_picks_the_epoch_by_macro_f1(tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    for name, counts, seed in (("train", (24, 4, 4), 1), ("val", (8, 2, 2), 2)):
        synthetic_split(counts, seed=seed).save(prepared, name)
    section = TrainParams.from_defaults(
        epochs=3, batch_size=8, warmup_epochs=0, class_weighting="inverse_frequency", select_by="val_macro_f1"
    )
    params = stage_params(tracking_params(tmp_path), train=section)
    paths = train.TrainPaths(
        prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "h.csv", tmp_path / "h.png",
        tmp_path / "state.pt",
    )  # fmt: skip
    with one_thread():
        result = train.run(params, paths)
    report = json.loads(paths.report.read_text())
    best = result.history[report["best_epoch"] - 1]
    assert report["best_val_accuracy"] == best["val_accuracy"]
    assert 0 < report["best_val_macro_f1"] <= 1 and "best_val_balanced_accuracy" not in report


def test_the_sampler_draws_classes_evenly_seeded_by_epoch_and_split_across_ranks() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = sampling_weights("sampler", labels, 2)
    assert sampling_weights("inverse_frequency", labels, 2) is None  # the loss carries those instead
    assert class_weights("sampler", labels, 2, torch.device("cpu")) is None
    sampler = EpochWeightedSampler(weights, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 100 and list(sampler) == first  # same epoch, same draw
    assert 30 <= int((labels[first] == 1).sum()) <= 70  # the rare class: about half, not a tenth
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # a resumed run redraws epoch 0 exactly
    ranks = [list(EpochWeightedSampler(weights, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [34, 34, 34]  # padded like DistributedSampler


@pytest.mark.slow
def test_train_stage_with_the_weighted_sampler_is_seeded(tmp_path: Path) -> None:
    """class_weighting: sampler through train.run: two runs of the same inputs train alike (the
    draw depends on seed and epoch only), and the sampler changes what is trained on."""
    prepared = tmp_path / "prepared"
    for name, counts, seed in (("train", (24, 4, 4), 1), ("val", (8, 2, 2), 2)):
        synthetic_split(counts, seed=seed).save(prepared, name)

    def history(folder: str, weighting: str) -> list[dict[str, float]]:
        section = TrainParams.from_defaults(
            epochs=2, batch_size=8, warmup_epochs=0, class_weighting=weighting
        )
        root = tmp_path / folder
        paths = train.TrainPaths(
            prepared,
            root / "model.pt",
            root / "train.json",
            root / "h.csv",
            root / "h.png",
            root / "state.pt",
        )
        with one_thread():
            return train.run(stage_params(tracking_params(root), train=section), paths).history

    first = history("a", "sampler")
    assert len(first) == 2 and history("b", "sampler") == first
    assert history("c", "none")[0]["train_loss"] != first[0]["train_loss"]
