"""Process-group helpers for `torchrun`: the recipe never knows its launcher.

`torchrun --nproc_per_node=N cnnops train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; without them the
same code runs as a single process. Only rank 0 logs to MLflow and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (in place); a no-op when running alone."""
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(value: int, d: Dist) -> int:
    """The smallest of an int over ranks (the batch every rank's memory fits); itself when alone."""
    if not d.enabled:
        return value
    tensor = torch.tensor([value], device=d.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def broadcast_flag(flag: bool, d: Dist) -> bool:
    """Rank 0's decision (e.g. early stopping) for every rank, so all stop at the same epoch."""
    if not d.enabled:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
