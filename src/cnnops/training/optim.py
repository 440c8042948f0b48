"""Optimizer and learning-rate schedule factories with explicit keyword arguments."""

from __future__ import annotations

from torch import optim

from cnnops.models import Classifier

WARMUP_START_FACTOR = 0.01  # warmup ramps the lr linearly from 1% of its value


def build_optimizer(
    model: Classifier,
    *,
    name: str,
    lr: float,
    backbone_lr: float,
    weight_decay: float,
    momentum: float,
) -> optim.Optimizer:
    """AdamW or SGD over two groups: backbone at `backbone_lr`, head at `lr` (frozen params excluded)."""
    backbone, head = model.parameter_groups()
    groups = [g for g in ({"params": backbone, "lr": backbone_lr}, {"params": head, "lr": lr}) if g["params"]]
    if name == "adamw":
        return optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; use 'adamw' or 'sgd'")


def build_scheduler(
    optimizer: optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> optim.lr_scheduler.LRScheduler:
    """Linear warmup for `warmup_steps`, then cosine decay to zero at `total_steps` (stepped per batch)."""
    cosine_steps = max(1, total_steps - warmup_steps)
    cosine = optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cosine_steps)
    if warmup_steps <= 0:
        return cosine
    warmup = optim.lr_scheduler.LinearLR(
        optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup_steps
    )
    return optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
