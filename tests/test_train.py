"""The trainer end to end on a tiny demo dataset: schedules, every mixer with every loader,
2-process DDP with gloo, bitwise resume, NaN handling, profiling, preview and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
import yaml

import train_imagenet as ti
from tests.trainrun import (EPOCHS, args, assert_same_state, checkpoint, free_port, run,
                            small_demo)
from training.checkpoint import Checkpoints, load_checkpoint
from training.report import STAGES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return small_demo(tmp_path_factory.mktemp("demo"))


# -- schedules and parameter groups -------------------------------------------------------------

def test_lr_matches_the_triangular_formula_at_every_iteration(demo, tmp_path):
    """The LR set before each optimizer step is FFCV's cyclic formula at epoch + i / steps."""
    cfg = ti.parse_config(args(demo, tmp_path, "--optim.lr", "0.8", "--optim.lr_peak_epoch", "1",
                               "--optim.lr_start_factor", "0.1"))
    trainer = ti.Trainer(cfg)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: seen.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    steps = len(trainer.data.train)
    assert len(seen) == EPOCHS * steps
    for it, lr in enumerate(seen):
        t = it / steps  # fractional epoch
        expected = 0.08 + (0.8 - 0.08) * t if t <= 1 else 0.8 * (EPOCHS - t) / (EPOCHS - 1)
        assert lr == pytest.approx(expected, rel=1e-9), f"iteration {it}"
    assert all(g["lr"] == seen[-1] for g in trainer.optimizer.param_groups)


def test_piecewise_lr_interpolates_between_knots():
    """Step i of an epoch takes the LR at epoch + (i + 1) / steps, as Wong et al.'s and
    PuzzleMix's code (the piecewise presets' sources) set it."""
    optim = ti.OptimConfig(epochs=15, lr_schedule="piecewise",
                           lr_knots=[[0, 0.0], [1, 0.4], [6, 0.04], [12, 0.004], [15, 0.0004]])
    lr = ti.lr_schedule(optim)
    assert lr(0) == 0.0 and lr(1) == pytest.approx(0.4) and lr(0.5) == pytest.approx(0.2)
    assert lr(3.5) == pytest.approx(0.4 + (0.04 - 0.4) * 2.5 / 5)
    assert lr.at(13, 50, 100) == pytest.approx(0.004 + (0.0004 - 0.004) * 1.51 / 3)
    assert lr.at(0, 99, 100) == pytest.approx(0.4)


def test_resolution_and_batch_size_follow_the_phase_schedule(demo, tmp_path):
    """Every batch of epoch e has the schedule's size for e; the log says so too; the loader
    crops at each phase's min scale."""
    phases = ("{kind: phases, phases: [{start_epoch: 0, res: 32, bs: 16}, "
              "{start_epoch: 1, res: 48, bs: 8, min_scale: 0.5}]}")
    cfg = ti.parse_config(args(demo, tmp_path, "--data.resolution", phases))
    trainer = ti.Trainer(cfg)
    assert [trainer.data.train.crop_scale_at(e) for e in (0, 1)] == [(0.08, 1.0), (0.5, 1.0)]
    shapes = []
    trainer.model.register_forward_pre_hook(lambda m, inp: shapes.append(tuple(inp[0].shape))
                                            if m.training else None)
    trainer.fit()
    n_train = trainer.data.train.num_samples
    assert shapes == [(16, 3, 32, 32)] * (n_train // 16) + [(8, 3, 48, 48)] * (n_train // 8)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(e["resolution"], e["batch_size"]) for e in log] == [(32, 16), (48, 8)]


def test_no_decay_group_holds_exactly_batchnorm_and_bias_parameters():
    """Chosen by module type and by being a module's bias, not by parameter names."""
    model = nn.Sequential(OrderedDict(
        bn_conv=nn.Conv2d(3, 8, 3, bias=False),    # named "bn" but a conv: decays
        features=nn.BatchNorm2d(8),                # a BatchNorm not named "bn": no decay
        conv=nn.Conv2d(8, 8, 3, bias=True),        # its bias: no decay
        head=nn.Linear(8, 4)))
    decay, no_decay = ti.param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "conv.bias", "features.bias", "features.weight", "head.bias"]
    assert sorted(names[id(p)] for p in decay["params"]) == ["bn_conv.weight", "conv.weight", "head.weight"]
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0

    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    decay, no_decay = ti.param_groups(net, 1e-4)
    expected = {id(p) for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    expected |= {id(m.bias) for m in net.modules() if getattr(m, "bias", None) is not None}
    assert {id(p) for p in no_decay["params"]} == expected
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


# -- every mixer with every loader --------------------------------------------------------------

@pytest.mark.parametrize("loader", ["folder", "dali", "ffcv"])
@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix", "grafting", "sage"])
def test_short_run_with_each_mixer_and_loader(demo, tmp_path_factory, loader, mix):
    """One epoch trains, evaluates every val image and writes a loadable checkpoint."""
    out = tmp_path_factory.mktemp(f"{loader}_{mix}")
    summary = run(demo, out, "--loader", loader, "--mix", mix, "--epochs", "1")
    assert summary["final"]["val_images"] == 30
    assert torch.isfinite(torch.tensor(summary["final"]["train_loss"]))
    assert summary["final"]["mixing"] == mix
    state = checkpoint(out, "run", 0)
    assert state["config"]["mix"]["kind"] == mix and state["config"]["data"]["loader"] == loader


def test_ffcv_quasi_random_order_trains_from_the_command_line(demo, tmp_path):
    summary = run(demo, tmp_path, "--loader", "ffcv", "--data.ffcv_order", "quasi_random",
                  "--epochs", "1")
    assert summary["final"]["val_images"] == 30
    assert checkpoint(tmp_path, "run", 0)["config"]["data"]["ffcv_order"] == "quasi_random"


# -- resume -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run(demo, out, "--mix", "grafting", "--run.deterministic", "true")
    return out


def test_resume_is_bitwise_identical_to_a_straight_run(demo, straight_run, tmp_path):
    """2 epochs straight == 1 epoch, a stop, and --resume auto for the second (CPU)."""
    run(demo, tmp_path, "--mix", "grafting", "--run.deterministic", "true", "--run.stop_after", "1")
    assert not (tmp_path / "run" / "checkpoints" / "ckpt_epoch0001.pt").exists()
    run(demo, tmp_path, "--mix", "grafting", "--run.deterministic", "true", "--resume", "auto")
    a, b = checkpoint(straight_run, "run", 1), checkpoint(tmp_path, "run", 1)
    assert_same_state(a["model"], b["model"])
    assert a["step"] == b["step"]

    # A checkpoint truncated on disk is skipped for the previous valid one: retraining the
    # second epoch from epoch 0's checkpoint gives the same weights again.
    newest = tmp_path / "run" / "checkpoints" / "ckpt_epoch0001.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    run(demo, tmp_path, "--mix", "grafting", "--run.deterministic", "true", "--resume", "auto")
    assert_same_state(a["model"], checkpoint(tmp_path, "run", 1)["model"])


def test_resume_refuses_a_config_that_changes_the_result(demo, straight_run):
    with pytest.raises(ti.ConfigError, match=r"optim\.lr was 0\.05 there but is 0\.07 now"):
        run(demo, straight_run, "--mix", "grafting", "--run.deterministic", "true",
            "--resume", "auto", "--optim.lr", "0.07")
    with pytest.raises(ti.ConfigError, match=r"mix\.kind was 'grafting' there but is 'sage' now"):
        run(demo, straight_run, "--mix", "sage", "--run.deterministic", "true", "--resume", "auto")


def test_a_finished_run_is_not_overwritten_without_resume(demo, straight_run):
    """Refused before anything is written: checkpoints and the saved config stay as they were."""
    folder = straight_run / "run"
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    with pytest.raises(ti.ConfigError, match="already holds checkpoints"):
        run(demo, straight_run, "--mix", "grafting", "--run.deterministic", "true",
            "--optim.lr", "0.07")
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo, tmp_path):
    """Epoch 0 trains normally; an exploding LR in epoch 1 must stop the run with a message."""
    knots = "[[0, 0.01], [1, 0.01], [1.01, 1.0e12], [2, 1.0e12]]"
    with pytest.raises(ti.NonFiniteLoss, match="ckpt_epoch0000.pt"):
        run(demo, tmp_path, "--optim.lr_schedule", "piecewise", "--optim.lr_knots", knots)
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in Checkpoints(folder, 3).paths()] == ["ckpt_epoch0000.pt"]
    state = load_checkpoint(folder / "ckpt_epoch0000.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# -- multi-process ------------------------------------------------------------------------------

DRIVER = """
import json, sys, torch
import train_imagenet as ti
out = sys.argv[1]
trainer = ti.Trainer(ti.parse_config(sys.argv[2:]))
summary = trainer.fit()
rank = trainer.dist.rank
torch.save(ti.unwrap(trainer.model).state_dict(), f"{out}/params_rank{rank}.pt")
json.dump(summary, open(f"{out}/summary_rank{rank}.json", "w"))
"""


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical_and_counts_val_once(demo, tmp_path):
    """torchrun with 2 CPU processes: same parameters on both ranks after training, and
    evaluation over the sharded val set equals a single-process evaluation of those weights."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(driver), str(tmp_path),
           *args(demo, tmp_path, "--mix", "grafting", "--data.val_batch_size", "8")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    p0, p1 = (torch.load(tmp_path / f"params_rank{r}.pt") for r in (0, 1))
    assert_same_state(p0, p1)
    summary = json.loads((tmp_path / "summary_rank0.json").read_text())
    assert summary["final"]["val_images"] == 30

    single = ti.Trainer(ti.parse_config(args(demo, tmp_path / "single", "--mix", "grafting")))
    ti.unwrap(single.model).load_state_dict(p0)
    assert single.evaluate()["val_top1"] == summary["final"]["val_top1"]


# -- profiling and preview ----------------------------------------------------------------------

def test_profile_reports_every_stage(demo, tmp_path):
    result = run(demo, tmp_path, "--mix", "grafting", "--profile", "2",
                 "--profile-trace", str(tmp_path / "trace.json"))
    stages = result["stages"]
    assert list(stages) == list(STAGES)
    for name in ("data", "clean", "saliency", "mix", "mixed", "optimizer"):
        assert stages[name]["seconds_per_step"] > 0, name
    assert sum(s["share"] for s in stages.values()) == pytest.approx(1.0)
    assert result["images_per_second"] > 0
    folder = tmp_path / "run"
    assert json.loads((folder / "profile.json").read_text())["steps"] == 2
    assert (folder / "profile.png").stat().st_size > 0
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert not (folder / "checkpoints").exists()


def test_profile_says_when_an_epoch_has_fewer_steps_and_what_is_per_rank(demo, tmp_path, capsys):
    result = run(demo, tmp_path, "--profile", "50")
    steps = 80 // 16
    assert result["steps"] == steps
    out = capsys.readouterr().out
    assert f"--profile 50: an epoch has {steps} steps here; profiling {steps}" in out
    assert "(rank 0 of 1)" in out and "images/s per rank" in out
    assert result["global_images_per_second"] == result["images_per_second"] * result["world_size"]


@pytest.mark.parametrize("mix, relative", [("grafting", True), ("sage", False)])
def test_preview_writes_a_grid_of_pairs(demo, tmp_path, mix, relative):
    """A grid of 4 pairs; a relative path lands in the run folder (so a second run never
    overwrites the first's), an absolute one where it says."""
    from PIL import Image

    png = tmp_path / "run" / "mix" / "preview.png" if relative else tmp_path / "elsewhere.png"
    run(demo, tmp_path, "--mix", mix, "--epochs", "1",
        "--preview", "mix/preview.png" if relative else str(png))
    with Image.open(png) as im:
        width, height = im.size
    assert width > 6 * 100 and height > 4 * 100  # 6 columns, 4 pairs


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, error, message", [
    (["--data", "/no/such/dir"], FileNotFoundError, "/no/such/dir does not exist"),
    (["--arch", "resnet19"], ti.ConfigError, "unknown torchvision classification model 'resnet19'.*resnet18"),
    (["--mix", "puzzlemix"], ti.ConfigError, r"mix\.kind: 'puzzlemix' is not one of"),
    (["--mix", "grafting", "--grafting.temperature", "-1"], ti.ConfigError, "grafting: .*temperature"),
    (["--mix", "sage", "--sage.u", "1.5"], ti.ConfigError, r"sage: .*\bu\b"),
    (["--loader", "dali", "--data.workers", "0"], ti.ConfigError, r"data\.workers: must be >= 1 for dali"),
    (["--optim.lr", "fast"], ti.ConfigError, r"optim\.lr: 'fast' is not a valid float"),
    (["--optim.lrr", "0.1"], ti.ConfigError, r"unknown config field 'optim\.lrr'; did you mean optim\.lr"),
    (["--batch-size", "4096"], ti.ConfigError, r"data: .*no batch of 4096 on rank 0 of 1"),
    (["--resume", "/no/such.pt"], FileNotFoundError, r"run\.resume: checkpoint /no/such\.pt does not exist"),
])
def test_bad_input_is_refused_before_training(demo, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        run(demo, tmp_path, *extra)
    assert not (tmp_path / "run").exists()


def test_batch_size_not_divisible_by_world_size_is_refused(demo, tmp_path, monkeypatch):
    """Checked from torchrun's environment before any process group is started."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ti.ConfigError, match="batch size 16 is not divisible by the world size 3"):
        run(demo, tmp_path)
    assert not torch.distributed.is_initialized()


def test_presets_parse_and_validate():
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        cfg = ti.parse_config(["--config", str(preset)])
        assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict(), preset
