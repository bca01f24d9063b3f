"""The papers' ImageNet protocol as presets: the dry run prints the schedule the reference
code would follow (PuzzleMix's imagenet_fast: each phase's own LR knots, np.interp at
epoch + (i + 1) / steps), and the preset's model and optimizer settings reach the model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import train_imagenet as ti
from training.data import per_rank_schedule

REPO = Path(__file__).resolve().parents[1]
PHASES = [  # configs_fast_phase{1,2,3}.yml: (first epoch, end epoch, crop, min scale, batch,
    #          lr_epochs, lr_values)
    (0, 15, 128, 0.08, 1024, (0, 8, 15), (0.5, 1.0, 0.125)),
    (15, 40, 224, 0.087, 448, (15, 40), (0.2, 0.02)),
    (40, 100, 224, 0.087, 448, (40, 65, 90, 100), (0.02, 0.002, 0.0002, 0.00002)),
]


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> Path:
    """An ImageFolder tree of 3,000 files: the dry run lists, it never decodes."""
    root = tmp_path_factory.mktemp("imagenet")
    for split, count in (("train", 300), ("val", 10)):
        for c in range(10):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.JPEG").touch()
    return root


@pytest.mark.parametrize("preset", ["rn50_grafting", "rn50_sage"])
def test_dry_run_prints_the_reference_schedule(listing, tmp_path, capsys, preset):
    rows = ti.main(["--config", str(REPO / "configs" / f"{preset}.yaml"), "--data", str(listing),
                    "--dry-run", "--out", str(tmp_path)])["schedule"]
    assert len(rows) == 100
    for phase, (first, end, crop, scale, batch, knots, values) in enumerate(PHASES):
        for row in rows[first:end]:
            e, steps = row["epoch"], 3000 // batch
            assert (row["phase"], row["resolution"], row["min_scale"], row["batch"],
                    row["steps"]) == (phase, crop, scale, batch, steps), e
            assert row["lr_first"] == pytest.approx(np.interp(e + 1 / steps, knots, values), rel=1e-12), e
            assert row["lr_last"] == pytest.approx(np.interp(e + 1, knots, values), rel=1e-12), e
    out = capsys.readouterr().out
    assert "3000 training images" in out and out.count("\n") > 100
    printed = {tuple(line.split()[:3]) for line in out.splitlines()}
    assert {("14", "128", "0.08"), ("15", "224", "0.087"), ("40", "224", "0.087")} <= printed
    assert (tmp_path / preset / "schedule.png").stat().st_size > 0
    mixing = [r["mixing"] for r in rows]
    warmup = 5 if preset == "rn50_grafting" else 0
    assert mixing == ["none"] * warmup + [preset.split("_")[1]] * (100 - warmup)
    weights = [1.0, 1.0] if preset == "rn50_grafting" else [0.7, 0.3]
    assert rows[-1]["loss_weights"] == weights


def test_the_grafting_preset_initialises_and_groups_as_the_reference():
    cfg = ti.parse_config(["--config", str(REPO / "configs" / "rn50_grafting.yaml"), "--arch", "resnet18"])
    torch.manual_seed(0)
    model = ti.build_model(cfg, 1000, torch.device("cpu"))
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert blocks and all(torch.all(b.bn2.weight == 0) for b in blocks)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    decay, no_decay = ti.param_groups(model, 1e-4, biases=cfg.optim.no_decay == "bn_bias")
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == bn  # BatchNorm only: fc.bias decays
    assert any(p is model.fc.bias for p in decay["params"])


def test_each_rank_loads_the_phases_crop_scale_with_its_share_of_the_batch():
    """The trainer divides each phase's global batch over the ranks; the phase's other fields
    (its crop scale) reach the loaders unchanged."""
    cfg = ti.parse_config(["--config", str(REPO / "configs" / "rn50_grafting.yaml")])
    schedule = per_rank_schedule(cfg.data.resolution, 4)
    assert [(schedule.batch_size(e), schedule.min_scale(e)) for e in (0, 14, 15, 99)] == [
        (256, 0.08), (256, 0.08), (112, 0.087), (112, 0.087)]
