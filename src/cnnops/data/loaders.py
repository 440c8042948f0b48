"""DataLoaders over prepared splits: uint8 tensors in memory, no image decoding while training."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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


def train_loader(
    dataset: SplitDataset,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """Shuffled batches; call `loader.sampler.set_epoch(e)` each epoch for a seeded, resumable order.

    DistributedSampler is used even for one process: its order depends only on (seed, epoch), which
    is what makes a resumed run see exactly the batches an uninterrupted one would.
    """
    drop_last = len(dataset) // world_size > batch_size  # no 1-image batch for BatchNorm, if avoidable
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last
    )


def eval_loader(dataset: SplitDataset, *, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Every image once, in order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
