"""Optimizer groups (lower backbone lr when fine-tuning) and the warmup-then-cosine schedule."""

from __future__ import annotations

import pytest
import torch

from cnnops.models import create_classifier, default_spec
from cnnops.training.optim import WARMUP_START_FACTOR, build_optimizer, build_scheduler


def model():
    return create_classifier(default_spec("convnet", ["a", "b"], "L", (16, 16)))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_backbone_and_head_groups_get_their_own_lr(name: str) -> None:
    optimizer = build_optimizer(model(), name=name, lr=0.1, backbone_lr=0.01, weight_decay=0.0, momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.1]
    assert len(optimizer.param_groups[1]["params"]) == 2  # head weight and bias


def test_frozen_backbone_leaves_only_the_head_group() -> None:
    m = model()
    m.freeze_backbone()
    optimizer = build_optimizer(m, name="adamw", lr=0.1, backbone_lr=0.01, weight_decay=0.0, momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1]


def test_warmup_then_cosine_to_zero() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(WARMUP_START_FACTOR)
    assert lrs[:5] == sorted(lrs[:5]) and lrs[4] == pytest.approx(1.0)
    assert lrs[4:] == sorted(lrs[4:], reverse=True)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
