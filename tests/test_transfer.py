"""Transfer learning that transfers: a ResNet-18 pretrained on digits 0-4 helps on digits 5-9."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import run_prepare
from fixtures_model import digits_train_params, one_thread, publish_weights, saved
from PIL import Image
from torchvision.models import get_model, get_model_weights

from cnnops.config import Params, parse_params
from cnnops.data.example import digit_images
from cnnops.models import load_classifier
from cnnops.stages import evaluate, train

RESNET18 = get_model_weights("resnet18").IMAGENET1K_V1
CANVAS = 16  # each 8x8 digit at a random place of a 16x16 field, enlarged 2x to 32 px
SOURCE = {"0", "1", "2", "3", "4"}


def write_tasks(root: Path) -> tuple[Path, Path]:
    """sklearn's digits, each placed at a seeded random offset, as two ImageFolders: 0-4 and 5-9."""
    images, labels = digit_images()
    rng = np.random.default_rng(0)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        field = np.zeros((CANVAS, CANVAS))
        top, left = rng.integers(0, CANVAS - 8 + 1, size=2)
        field[top : top + 8, left : left + 8] = image
        task = "source" if label in SOURCE else "target"
        path = root / task / "data" / label / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(np.rint(field).astype(np.uint8), np.ones((2, 2), np.uint8))).save(path)
    return root / "source", root / "target"


def prepared(task: Path, params: Params) -> Path:
    run_prepare(task / "data", task, params)
    return task / "prepared"


def train_and_test(root: Path, split: Path, params: Params) -> float:
    """The real train stage, then the real evaluate stage: test accuracy of the best checkpoint."""
    reports = root / "reports"
    tp = train.TrainPaths(
        prepared=split, model=root / "model.pt", report=reports / "train.json",
        history=reports / "history.csv", curves=reports / "history.png", state=root / "state.pt",
    )  # fmt: skip
    ep = evaluate.EvaluatePaths(
        model=tp.model, prepared=split, train_report=tp.report, metrics=reports / "metrics.json",
        confusion=reports / "confusion.csv", confusion_png=reports / "confusion.png",
    )  # fmt: skip
    with one_thread():
        train.run(params, tp)
        return float(evaluate.run(params, ep).metrics["accuracy"])


def as_weights_file(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A cnnops resnet18 checkpoint as torchvision's resnet18 state dict, what the enum's file holds:
    its backbone, and a fresh 1000-class head (every cnnops training replaces the head)."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    backbone = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    fresh = get_model("resnet18", weights=None).state_dict()
    return {**fresh, **{k: v for k, v in backbone.items() if not k.startswith("fc.")}}


@pytest.mark.slow
@pytest.mark.integration
def test_resnet18_pretrained_on_digits_0_to_4_transfers_to_5_to_9(
    tmp_path: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pretrain on 0-4 with the train stage, cache the result as resnet18.IMAGENET1K_V1 (so the real
    weights-API path loads it: enum -> TORCH_HOME file -> hash check), then probe and fine-tune on 5-9.

    Baseline: a linear probe of the same ResNet-18 freshly initialised (seeded), published as the
    same enum member and loaded the same way; resnet18 has no second member, and `linear_probe`
    without weights is refused by the params schema. So only the weights differ.

    Digits at random places, not centred: on the plain centred digits (32 px, all images) the digits
    are almost linearly separable in pixels, random ResNet features keep the pixels, and the probes
    tied (0.955 random, 0.955 pretrained; sklearn logistic regression on the features: 0.977 random,
    0.89-0.96 pretrained, whose 512 features collapse onto the five source classes). Moved digits
    need shapes found anywhere, which the source teaches and random weights lack. Measured here
    (2 shared cores, one thread; deterministic): pretrain 10 epochs, above 0.9 on 0-4; linear probe on
    5-9, 8 epochs: random 0.348, pretrained 0.538; fine-tune 2 epochs 0.720 (scratch, 2 epochs:
    0.674); 78 s in all.
    """
    # near_duplicate_distance 0: mostly-black fields have close perceptual hashes, and chained groups
    # (kept in one split by prepare) would skew the splits
    params = parse_params(
        {"data": {"color_mode": "L", "near_duplicate_distance": 0}, "prepare": {"image_size": [32, 32]}},
        "transfer test",
    )
    source, target = write_tasks(tmp_path)
    source_split, target_split = prepared(source, params), prepared(target, params)
    augment = {"random_resized_crop": True, "crop_scale": [0.6, 1.0]}
    pretrain = digits_train_params(tmp_path / "pre", params, model="resnet18", epochs=10, augment=augment)
    assert train_and_test(tmp_path / "pre", source_split, pretrain) >= 0.9
    pretrained = as_weights_file(tmp_path / "pre" / "model.pt")

    def on_target(name: str, state: dict[str, torch.Tensor], **train_params: object) -> float:
        publish_weights(torch_home, monkeypatch, RESNET18, saved(state))
        settings = {"model": "resnet18", "weights": "IMAGENET1K_V1", **train_params}
        return train_and_test(
            tmp_path / name, target_split, digits_train_params(tmp_path / name, params, **settings)
        )

    torch.manual_seed(7)
    random_probe = on_target(
        "random", get_model("resnet18", weights=None).state_dict(), mode="linear_probe", epochs=8, lr=0.01
    )
    probe = on_target("probe", pretrained, mode="linear_probe", epochs=8, lr=0.01)
    finetune = on_target("finetune", pretrained, mode="finetune", epochs=2)
    print(f"linear probe: random {random_probe:.3f}, pretrained {probe:.3f}; finetune {finetune:.3f}")

    loaded, _ = load_classifier(tmp_path / "probe" / "model.pt")
    assert torch.equal(loaded.net.layer3[0].conv1.weight, pretrained["layer3.0.conv1.weight"])
    assert probe >= random_probe + 0.1  # measured +0.19
    assert finetune >= probe
