"""Data-parallel (DDP) helpers. With no process group (one device) each is a no-op, so the trainer reads the same.

`torchrun --nproc-per-node N` starts N processes; each calls `init_from_env()`, takes every N-th batch
(`RankShard`), trains the `DistributedDataParallel`-wrapped model (gradients averaged across ranks after each
backward) and leaves files and logging to rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs metrics and saves the model."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def agree(value: float) -> float:
    """Rank 0's value on every rank: decisions taken from it (best epoch, early stop) stay identical."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def init_from_env(cuda: bool, timeout_minutes: int = 30) -> str:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR…); returns this rank's device.

    With `cuda`, NCCL and one GPU per rank (LOCAL_RANK); else gloo on CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return f"cuda:{local}" if cuda else "cpu"


def wrap(model: nn.Module, device: str) -> nn.Module:
    """The DDP wrapper when several processes train, else the model itself.

    `find_unused_parameters`: an encoder's pooler (or a frozen-by-config block) may get no gradient in a step."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


class RankShard(Sequence[T]):
    """This rank's batches of an epoch: batch i is `batches[i * world + rank]`.

    Every rank gets the same count (the last `len % world` batches are dropped), so no rank waits forever
    in an all-reduce the others never reach."""

    def __init__(self, batches: Sequence[T], rank_: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank_, world

    def __len__(self) -> int:
        return len(self.batches) // self.world

    def __getitem__(self, i: Any) -> T:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.batches[i * self.world + self.rank]


def shard(batches: Sequence[T]) -> Sequence[T]:
    return RankShard(batches, rank(), world_size()) if active() else batches
