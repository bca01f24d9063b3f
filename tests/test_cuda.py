"""On a GPU (skipped without CUDA, collected everywhere): the mixers mix in place with at most
one batch-sized temporary, the fp16 two-pass step takes saliency from the unscaled gradient and
an overflow is the GradScaler's skipped step, DDP over NCCL runs the step, and the trainer runs
two epochs on CUDA with the folder loader."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from mixing.baselines import CutMix, Mixup
from mixing.grafting import SaliencyGrafting
from mixing.sage import SAGE
from mixing.saliency import gradient_saliency
from mixing.step import TwoPassStep
from tests.trainrun import free_port, run, small_demo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MIXERS = {"mixup": Mixup, "cutmix": CutMix, "grafting": SaliencyGrafting, "sage": SAGE}


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).cuda()


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixing_in_place_takes_at_most_one_batch_sized_temporary(name):
    x = torch.randn(64, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (64,), device="cuda")
    saliency = torch.rand(64, 7, 7, device="cuda")
    mixer = MIXERS[name](10)
    gen = torch.Generator().manual_seed(0)
    mixer(x, labels, saliency, generator=gen)  # warm-up: scratch buffers, kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    pointer = x.data_ptr()
    mixer(x, labels, saliency, generator=gen)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    batch = x.numel() * x.element_size()
    assert x.data_ptr() == pointer and x.is_contiguous(memory_format=torch.channels_last)
    assert extra <= 1.25 * batch + (16 << 20), f"{name}: {extra / batch:.2f} batches of scratch"


def test_fp16_saliency_is_the_unscaled_gradient_and_an_overflow_is_a_skipped_step():
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    labels = torch.randint(0, 10, (8,), device="cuda")
    reference = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(reference).float(), labels)
    loss.backward()
    expected = gradient_saliency(reference.grad)
    model.zero_grad(set_to_none=True)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16)
    step = TwoPassStep(model, SAGE(10), eta=1.0, scaler=scaler, amp_dtype=torch.float16)
    out = step(x.clone(), labels, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.saliency, expected, rtol=2e-2, atol=1e-6 * expected.max().item())

    overflow = torch.amp.GradScaler("cuda", init_scale=2.0 ** 60, backoff_factor=2.0 ** -50)
    step = TwoPassStep(model, SAGE(10), eta=0.5, scaler=overflow, amp_dtype=torch.float16)
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    out = step(x.clone(), labels, generator=torch.Generator().manual_seed(1))
    overflow.step(optimizer)
    overflow.update()
    assert out.mix is not None and torch.isfinite(out.mix.weight).all()  # a defined mix
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))  # skipped
    optimizer.zero_grad(set_to_none=True)
    out = step(x.clone(), labels, generator=torch.Generator().manual_seed(2))
    overflow.step(optimizer)
    overflow.update()
    assert torch.isfinite(out.loss) and not all(
        torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_ddp_over_nccl_at_world_size_one_runs_the_two_pass_step(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(small_net(), device_ids=[0])
        step = TwoPassStep(model, SaliencyGrafting(10), eta=0.5)
        x = torch.randn(8, 3, 32, 32, device="cuda")
        out = step(x, torch.randint(0, 10, (8,), device="cuda"), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss)
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_the_trainer_runs_two_epochs_on_cuda_with_the_folder_loader(tmp_path):
    demo = small_demo(tmp_path / "demo")
    summary = run(demo, tmp_path / "out", "--mix", "grafting", "--data.workers", "2")
    assert summary["final"]["val_images"] == 30
    assert torch.isfinite(torch.tensor(summary["final"]["train_loss"]))
    assert os.path.isfile(tmp_path / "out" / "run" / "checkpoints" / "ckpt_epoch0001.pt")
