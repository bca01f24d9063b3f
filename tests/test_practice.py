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
