"""The process group (NCCL on GPUs, gloo on the CPU), the collectives the trainer uses, and how
one rank's failure ends every rank.

A rank that fails writes its reason into the process group's key-value store; every rank runs
a watcher thread that polls the store once a second and ends its process with that reason. So
the others exit within seconds instead of waiting in their next collective until its timeout,
under torchrun, ``srun`` or any other launcher. Stops that every rank decides together (an
all-reduced flag at a step boundary) need no watcher: every rank stops at the same step.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from pipelines import Shard

FAILED_KEY = "salmix/failed"
EXIT_FAILED = 2
"""The exit code of a rank ended because another rank failed (the same as an ``error:`` stop)."""


class _Watcher(threading.Thread):
    """Ends this process when another rank writes its failure into the store."""

    def __init__(self, store: dist.Store, rank: int) -> None:
        super().__init__(name="salmix-rank-watcher", daemon=True)
        self.store, self.rank = store, rank
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                if not self.store.check([FAILED_KEY]):
                    continue
                reason = self.store.get(FAILED_KEY).decode()
            except Exception:  # the store's host is gone: a rank died without a word
                if self.stopped.wait(5.0):  # or the run ended normally meanwhile
                    return
                reason = "the process group's store is unreachable (a rank died)"
            if self.stopped.is_set():
                return
            print(f"error: stopping rank {self.rank}: {reason}", file=sys.stderr, flush=True)
            os._exit(EXIT_FAILED)


_watcher: _Watcher | None = None


def init_distributed(shard: Shard, timeout_s: float = 600.0) -> torch.device:
    """This rank's device; with more than one rank, start the process group and the watcher."""
    global _watcher
    if torch.cuda.is_available():
        torch.cuda.set_device(shard.local_rank)
        device = torch.device("cuda", shard.local_rank)
    else:
        device = torch.device("cpu")
    if shard.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=shard.rank, world_size=shard.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        _watcher = _Watcher(dist.distributed_c10d._get_default_store(), shard.rank)
        _watcher.start()
    return device


def launched_main_rank() -> bool:
    """Whether this process is rank 0 by the launcher's variables (True when they are bad:
    the error about them is printed once, here)."""
    try:
        return Shard.from_env().main
    except ValueError:
        return True


def report_failure(reason: str) -> None:
    """Tell every other rank that this one failed, so that they stop too."""
    if _watcher is None:
        return
    _watcher.stopped.set()
    try:
        _watcher.store.set(FAILED_KEY, f"rank {_watcher.rank} failed: {reason}")
        time.sleep(1.5)  # the others read it before this process (maybe the store's host) ends
    except Exception:
        pass


def shutdown(ok: bool) -> None:
    """End the process group; after a run that went well, once every rank got here."""
    global _watcher
    if dist.is_initialized():
        if ok:
            dist.barrier()
        if _watcher is not None:
            _watcher.stopped.set()
            _watcher = None
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flags: torch.Tensor) -> list[bool]:
    """Element-wise: whether any rank set each flag of ``flags`` (one small all-reduce)."""
    flags = flags.to(torch.int32).reshape(-1)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


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


def main_rank_first(shard: Shard, work: Callable[[], None], what: str,
                    report_every_s: float = 30.0) -> None:
    """Rank 0 does ``work`` (hours, for ImageNet's betons) while the others wait outside any
    collective (a collective would time out): they poll the store, saying every
    ``report_every_s`` that they are still waiting."""
    if not dist.is_initialized():
        work()
        return
    store = dist.distributed_c10d._get_default_store()
    key = f"salmix/done/{what}"
    if shard.main:
        work()
        store.set(key, "1")
        return
    print(f"rank {shard.rank}: waiting for rank 0 to {what}", flush=True)
    start = last = time.monotonic()
    while not store.check([key]):
        time.sleep(0.5)
        if time.monotonic() - last >= report_every_s:
            last = time.monotonic()
            print(f"rank {shard.rank}: waiting for rank 0 to {what} "
                  f"({last - start:.0f} s so far)", flush=True)
    print(f"rank {shard.rank}: rank 0 did {what} in {time.monotonic() - start:.1f} s", flush=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StopRequest:
    """The stop signal this process received (SIGTERM, SIGUSR1: SLURM's before a time limit),
    for the trainer to act on at its next agreed step; None while none came."""

    signal: str | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGUSR1 are recorded instead of ending the process
    (handlers need the main thread; elsewhere the signals keep their default action)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def record(signum: int, frame: object) -> None:
        request.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, record) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
