"""Shared by the trainer tests: a tiny demo dataset and a fast command line on the CPU."""
from __future__ import annotations

from pathlib import Path

import torch

import train_imagenet as ti
from pipelines.demo import write_demo_dataset

EPOCHS = 2


def small_demo(root: Path) -> Path:
    """10 classes, 8 train and 3 val images per class (30 val images)."""
    write_demo_dataset(root, train_per_class=8, val_per_class=3)
    return root


def args(demo: Path, out: Path, *extra: str) -> list[str]:
    """A fast configuration: resnet18 at 32 px, batch 16, on the CPU."""
    return ["--data", str(demo), "--arch", "resnet18", "--epochs", str(EPOCHS),
            "--batch-size", "16", "--data.resolution", "32", "--data.val_resolution", "32",
            "--data.workers", "1", "--optim.lr", "0.05", "--optim.lr_peak_epoch", "1",
            "--out", str(out), "--run.progress", "false", "--data.beton_dir", str(out / "ffcv"),
            *extra]


def run(demo: Path, out: Path, *extra: str) -> dict:
    return ti.main(args(demo, out, *extra))


def checkpoint(out: Path, name: str, epoch: int) -> dict:
    return torch.load(out / name / "checkpoints" / f"ckpt_epoch{epoch:04d}.pt", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
