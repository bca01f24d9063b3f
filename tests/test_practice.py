"""What practitioners expect from a trainer, end to end on the CPU: timm models, an EMA of the
weights (evaluated, saved, bitwise on resume), TensorBoard scalars and a CSV per epoch, and
timm's mixing schedule (mix.prob, mix.off_epoch)."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

import train_imagenet as ti
from tests.trainrun import EPOCHS, assert_same_state, checkpoint, run, small_demo
from training.ema import ModelEma


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("demo"))


def log_lines(out, name="run"):
    return [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]


def test_a_timm_model_trains_with_a_saliency_mixer(demo, tmp_path):
    pytest.importorskip("timm")
    summary = run(demo, tmp_path, "--arch", "timm/resnet10t", "--mix", "grafting", "--epochs", "1")
    assert summary["final"]["val_images"] == 30
    state = checkpoint(tmp_path, "run", 0)
    assert any(k.startswith("layer4.") for k in state["model"])  # timm's ResNet, not torchvision's


def test_unknown_timm_model_is_refused_with_suggestions():
    pytest.importorskip("timm")
    with pytest.raises(ti.ConfigError, match=r"model\.arch: unknown timm model 'resnet10x'.*resnet10t"):
        ti.parse_config(["--arch", "timm/resnet10x"])


def test_ema_is_the_formula_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = ModelEma(model, decay=0.75)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # moves BatchNorm's running statistics
    ema.update(model)
    for e, s, p in zip(ema.module.parameters(), start, model.parameters()):
        assert torch.allclose(e, 0.75 * s + 0.25 * p)
    for e, b in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(e, b)


@pytest.fixture(scope="module")
def ema_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    run(demo, out, "--model.ema_decay", "0.9", "--mix", "mixup", "--run.deterministic", "true")
    return out


def test_ema_is_evaluated_beside_the_model_and_saved(ema_run):
    log = log_lines(ema_run)
    assert all("val_top1_ema" in e and "val_top1" in e for e in log)
    state = checkpoint(ema_run, "run", EPOCHS - 1)
    assert state["ema"].keys() == state["model"].keys()
    assert not all(torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])


def test_ema_resumes_bitwise(demo, ema_run, tmp_path):
    common = ("--model.ema_decay", "0.9", "--mix", "mixup", "--run.deterministic", "true")
    run(demo, tmp_path, *common, "--run.stop_after", "1")
    run(demo, tmp_path, *common, "--resume", "auto")
    a, b = checkpoint(ema_run, "run", EPOCHS - 1), checkpoint(tmp_path, "run", EPOCHS - 1)
    assert_same_state(a["ema"], b["ema"])
    assert_same_state(a["model"], b["model"])


def test_tensorboard_scalars_and_a_csv_per_epoch(ema_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = list(csv.DictReader(open(ema_run / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    assert all(r["val_top1"] and r["val_top1_ema"] and r["mixing"] == "mixup" for r in rows)
    events = EventAccumulator(str(ema_run / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/resolution", "train/mix_weight_mean",
                "epoch/val_top1", "epoch/val_top5", "epoch/val_top1_ema", "epoch/images_per_second"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("epoch/val_top1")] == sorted(
        e.step for e in events.Scalars("epoch/val_top1"))


def test_wandb_asked_for_but_missing_is_one_error(demo, tmp_path):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ti.ConfigError, match=r"run\.wandb: .*pip install wandb"):
        run(demo, tmp_path, "--run.wandb", "salmix")


def test_mix_prob_mixes_that_share_of_batches_and_off_epoch_stops_mixing(demo, tmp_path):
    """With prob 0.5 some batches of each mixing epoch are mixed and some not (a two-pass
    step only for those); from mix.off_epoch on nothing is."""
    calls = []
    build = ti.build_step

    def counting(*a, **k):
        step = build(*a, **k)

        def call(images, labels, *, mix, **kw):
            calls.append(mix)
            return step(images, labels, mix=mix, **kw)
        return call

    ti.build_step = counting
    try:
        run(demo, tmp_path, "--mix", "grafting", "--mix.prob", "0.5", "--epochs", "3",
            "--mix.off_epoch", "2", "--optim.lr_peak_epoch", "1")
    finally:
        ti.build_step = build
    log = log_lines(tmp_path)
    steps = 80 // 16
    first, second, third = calls[:steps], calls[steps:2 * steps], calls[2 * steps:]
    assert 0 < sum(first + second) < 2 * steps
    assert not any(third) and log[2]["mixing"] == "none"
    assert [e["mixed_fraction"] for e in log[:2]] == [sum(first) / steps, sum(second) / steps]


def without_batchnorm(module: nn.Module) -> None:
    """BatchNorm's batch statistics differ between a batch and its halves: take them out."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)


def test_accumulated_micro_batches_give_the_update_of_one_batch(demo, tmp_path):
    """Two optimizer steps with K = 2 micro-batches equal two steps with the whole batch (to
    float tolerance, a model without BatchNorm, no mixing: a mixer pairs images within a
    micro-batch, so a mixed run differs by design)."""
    params = []
    for k in (1, 2):
        cfg = ti.parse_config(args_for(demo, tmp_path / f"k{k}", "--optim.accum_steps", str(k)))
        trainer = ti.Trainer(cfg)
        without_batchnorm(trainer.model)
        trainer.train_epoch(0, max_steps=2)
        params.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    for name in params[0]:
        assert torch.allclose(params[0][name], params[1][name], rtol=1e-4, atol=1e-6), name


def test_accumulation_runs_the_two_pass_step_on_each_micro_batch(demo, tmp_path):
    sizes = []
    build = ti.build_step

    def recording(*a, **k):
        step = build(*a, **k)

        def call(images, labels, **kw):
            sizes.append((images.shape[0], kw.get("sync", True)))
            return step(images, labels, **kw)
        return call

    ti.build_step = recording
    try:
        summary = run(demo, tmp_path, "--optim.accum_steps", "2", "--mix", "sage", "--epochs", "1")
    finally:
        ti.build_step = build
    assert sizes == [(8, False), (8, True)] * (80 // 16)
    assert torch.isfinite(torch.tensor(summary["final"]["train_loss"]))


def args_for(demo, out, *extra):
    from tests.trainrun import args
    return args(demo, out, "--optim.lr", "0.5", "--optim.momentum", "0", "--optim.weight_decay", "0",
                *extra)


@pytest.mark.slow
def test_a_compiled_model_trains_through_progressive_resizing(demo, tmp_path):
    """torch.compile (inductor) through a resolution change: one graph per size (the
    two-pass step's hook and input gradient under compile are tested in test_step_compile).
    Three graphs (two sizes, one val batch): about a minute of inductor on 2 cores."""
    phases = "{kind: phases, phases: [{start_epoch: 0, res: 32}, {start_epoch: 1, res: 48}]}"
    summary = run(demo, tmp_path, "--model.compile", "true", "--data.resolution", phases,
                  "--eval.every", "2", "--data.val_batch_size", "30")
    assert summary["final"]["val_images"] == 30
    assert torch.isfinite(torch.tensor(summary["final"]["train_loss"]))
