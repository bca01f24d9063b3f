"""How the mixers run fast on the CPU, kept apart from their maths.

Everything here is an optimisation with the same result as the plain op it replaces: a
mixer's code reads as its formulas and calls these helpers where the CPU needs help. On
other devices each helper is the plain op (or does nothing). Measurements behind them:
``docs/design/mixing.md`` and ``benchmarks/mixing.py``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int = 1) -> Iterator[None]:
    """Within the block, ops on the CPU use at most ``threads`` intra-op threads (restored
    after); nothing changes for another device.

    For a mixer's many small, cache-sized ops: a fork-join per op costs more than the op
    saves, and on shared cores each join waits for a descheduled thread.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; a float32 CPU tensor of 4 MB or more
    comes from numpy's allocator, which asks for transparent huge pages (fewer page faults).
    For a result that must be new memory on every call."""
    if device.type == "cpu" and dtype == torch.float32 and 4 * math.prod(shape) >= 4 << 20:
        return torch.from_numpy(np.empty(shape, dtype=np.float32))
    return torch.empty(shape, dtype=dtype, device=device)


def kept_scratch(buffers: dict, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """An uninitialised tensor; on the CPU kept in ``buffers`` under ``name`` for the next call.

    A fresh batch-sized CPU tensor is untouched pages whose faults cost more than the pass
    that fills them; other devices' allocators cache freed memory themselves.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    buf = buffers.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device \
            or not buf.is_contiguous(memory_format=memory_format):
        buffers[name] = None                      # free the old one first
        buf = buffers[name] = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return buf


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (drawn on the CPU) on ``device``; to CUDA through pinned memory, without making
    the host wait for the device."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def cpu_channel_norm(t: torch.Tensor, ord: int) -> torch.Tensor:
    """``sum_c |t_c|`` (ord 1) or ``sqrt(sum_c t_c^2)`` (ord 2) over dim 1 of a CPU tensor
    (N, C, h, w), float32, for either layout and any float dtype.

    The CPU kernel of ``torch.linalg.vector_norm(..., dtype=float32)`` is many times slower
    than these plain ops (``benchmarks/mixing.py``). Few channels (an image gradient): accumulated channel by channel into
    the float32 result, no batch-sized temporary. Many (a feature map): summed in blocks of
    channels, so a float16/bfloat16 map is never copied to float32 whole.
    """
    c = t.shape[1]
    if c <= 4:
        out = t[:, 0].to(torch.float32, copy=True)
        out = out.abs_() if ord == 1 else out.square_()
        for i in range(1, c):
            if ord == 1:
                out.add_(t[:, i].abs())
            else:
                out.addcmul_(t[:, i], t[:, i])
    else:
        block = c if t.dtype == torch.float32 else 64
        out = None
        for lo in range(0, c, block):
            part = t[:, lo:lo + block]
            part = part.abs() if ord == 1 else part.to(torch.float32).square_()
            part = part.sum(1, dtype=torch.float32)
            out = part if out is None else out.add_(part)
    return out if ord == 1 else out.sqrt_()
