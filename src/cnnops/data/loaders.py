"""DataLoaders over prepared splits: uint8 tensors in memory, no image decoding while training."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, WeightedRandomSampler

from cnnops.data.splits import PreparedSplit


class SplitDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One prepared split with a per-image transform (a train or eval preset)."""

    def __init__(self, split: PreparedSplit, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.split.images[index]), self.split.labels[index]


def resolve_workers(num_workers: int | str) -> int:
    """`train.num_workers`: auto is one worker per core but one (the training process's), at most 8."""
    if num_workers == "auto":
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    return int(num_workers)


class EpochWeightedSampler(Sampler[int]):
    """torch's WeightedRandomSampler (with replacement), drawn afresh each epoch from a generator
    seeded by (seed, epoch) and split across ranks like DistributedSampler: `set_epoch` makes the
    order depend on (seed, epoch) only, so a resumed run draws the images an uninterrupted one would.

    WeightedRandomSampler alone keeps no epoch and has no ranks; this wraps it with both.
    """

    def __init__(self, weights: torch.Tensor, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.weights, self.seed, self.rank, self.world_size = weights.double(), seed, rank, world_size
        self.per_rank = math.ceil(len(weights) / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's seeding
        drawn = WeightedRandomSampler(self.weights, self.per_rank * self.world_size, generator=generator)
        return iter(list(drawn)[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.per_rank


def train_loader(
    dataset: SplitDataset,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    weights: torch.Tensor | None = None,
    collate_fn: Callable[[list], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> DataLoader:
    """Shuffled batches; call `loader.sampler.set_epoch(e)` each epoch for a seeded, resumable order.

    DistributedSampler is used even for one process: its order depends only on (seed, epoch), which
    is what makes a resumed run see exactly the batches an uninterrupted one would. Its workers are
    not persistent for the same reason: new workers each epoch take their augmentation seeds from
    the epoch's seed, where persistent ones would carry their random state across epochs and a
    resumed run would draw other crops than the uninterrupted one. `weights` (one per image):
    images are drawn with replacement in proportion to them (`EpochWeightedSampler`), the same
    number an epoch as without. `collate_fn`: a batch transform run after stacking (the cure's
    counterfactuals), in the workers.
    """
    drop_last = len(dataset) // world_size > batch_size  # no 1-image batch for BatchNorm, if avoidable
    sampler: Sampler[int]
    if weights is None:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = EpochWeightedSampler(weights, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )


def eval_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Every image once, in order; workers persist across epochs (no randomness to reseed)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
