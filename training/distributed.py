"""The process group: NCCL on GPUs, gloo on the CPU, and the few collectives the trainer uses."""
from __future__ import annotations

import torch
import torch.distributed as dist

from pipelines import Shard


def init_distributed(shard: Shard) -> torch.device:
    """Start the process group for ``shard`` (when it has more than one rank); this rank's device."""
    if torch.cuda.is_available():
        torch.cuda.set_device(shard.local_rank)
        device = torch.device("cuda", shard.local_rank)
    else:
        device = torch.device("cpu")
    if shard.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=shard.rank, world_size=shard.world_size)
    return device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather(obj: object, world_size: int) -> list[object]:
    """``obj`` of every rank, in rank order (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
