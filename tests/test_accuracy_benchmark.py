"""Smoke test of benchmarks/accuracy.py's measurements (its training is the trainer's, tested
elsewhere): val top-1 through the folder loader and the localisation score through the
loader's own sample transform, on a real demo set with an untrained ResNet-18.

What it catches is an interface the benchmark shares with the library drifting (the folder
loader's sample keys, the saliency hook, the demo's boxes); the figures of an untrained model
mean nothing beyond their ranges.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torchvision

from pipelines.demo import ensure_demo_dataset

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark",
                                                  ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_top1_and_localisation_run_on_a_demo_set(tmp_path):
    bench = load_benchmark()
    demo = ensure_demo_dataset(tmp_path / "demo", train_per_class=1, val_per_class=2)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    acc = bench.top1(model, demo / "val", 32, 8)
    share, area = bench.localisation(model, demo, 32, 8)
    assert acc in {k / 20 for k in range(21)}  # 20 val images
    assert 0 < share < 1 and 0 < area < 1
    occluded = bench.ensure_occluded(demo / "val", tmp_path / "occluded")
    assert len(list(occluded.rglob("*.jpg")) + list(occluded.rglob("*.JPEG"))) == 20
