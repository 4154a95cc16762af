"""Distributed data parallel under torchrun: process group set-up, sharding and metric reduction.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; with WORLD_SIZE > 1 the trainer joins a process group (nccl on
GPUs, gloo on CPUs), shards every epoch's seeded permutation across ranks (as DistributedSampler does: padded
to a multiple of the world size, then rank::world), averages gradients through DistributedDataParallel and
sums its counters over ranks. Only rank 0 writes files and prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def is_main_process() -> bool:
    """True on rank 0 of a torchrun job, and in a single process: the one that writes files and prints."""
    return _env_int("RANK", 0) == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel wrappers (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def setup_distributed(device: torch.device | str | None = None) -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1 (a no-op for a single process)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    local = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_indices(perm: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's part of an index permutation: padded to a multiple of the world size, then rank::world."""
    if not info.enabled:
        return perm
    n = len(perm)
    total = -(-n // info.world_size) * info.world_size
    if total > n:
        perm = torch.cat([perm, perm[: total - n]])
    return perm[info.rank::info.world_size]


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a list of numbers over all ranks (float64)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
