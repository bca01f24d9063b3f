"""Gradient accumulation with the step: ``loss_scale=1/K`` on each of K micro-batches gives the
gradients of one batch of their concatenation, and under two-process gloo DDP ``sync=False``
keeps every backward of the non-final micro-batches from all-reducing."""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mixing.base import soft_target_cross_entropy
from mixing.baselines import Mixup
from mixing.step import TwoPassStep
from tests.test_step import K, SaliencyMixup, assert_grads_close, data, make_mixer, one_hot, step_grads

MICRO = 2


class NoNormNet(nn.Module):
    """TinyNet without BatchNorm, so that a batch's gradient is the mean of its images' (the
    accumulation of micro-batches then equals the concatenated batch exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage(self.stem(x))).flatten(1))


RUNS = {  # name: (mixer, TwoPassStep kwargs, mix)
    "grafting": (lambda: make_mixer("feature"), {"eta": 0.3}, True),
    "gradient": (lambda: SaliencyMixup(K), {"clean_weight": 1.0, "mixed_weight": 1.0}, True),
    "gradient_eta1": (lambda: SaliencyMixup(K), {"eta": 1.0}, True),
    "mixup": (lambda: Mixup(K), {}, True),
    "unmixed": (lambda: make_mixer("feature"), {}, False),
}


def micro_batch(step: TwoPassStep, seed: int, last: bool) -> dict:
    """One micro-batch at loss_scale 1/MICRO, synced if ``last``: what it was fed and what the
    step made of it."""
    images, labels = data(n=4, seed=seed)
    clean = images.clone()
    out = step(images, labels, generator=torch.Generator().manual_seed(seed), mix=step.mix_on,
               sync=last, loss_scale=1 / MICRO)
    return {"clean": clean, "labels": labels, "mixed": images, "saliency": out.saliency,
            "targets": out.mix.targets if out.mix is not None else None}


def stack(micro: list[dict]) -> dict:
    return {key: [m[key] for m in micro] for key in micro[0]}


def concatenated_grads(model: nn.Module, step: TwoPassStep, batches: dict) -> list[torch.Tensor]:
    """What one step on the concatenated batch accumulates: clean_weight * g(clean images) +
    mixed_weight * g(mixed images) of a two-pass step, g(mixed) of one pass, g(clean) unmixed."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    two_pass = step.mix_on and step.mixer.two_pass
    clean_w, mixed_w = (step.clean_weight, step.mixed_weight) if two_pass else \
        (0.0, 1.0) if step.mix_on else (1.0, 0.0)
    loss = 0.0
    if clean_w:
        clean = torch.cat(batches["clean"])
        loss = loss + clean_w * soft_target_cross_entropy(ref(clean), one_hot(torch.cat(batches["labels"])))
    if mixed_w:
        mixed = torch.cat(batches["mixed"])
        loss = loss + mixed_w * soft_target_cross_entropy(ref(mixed), torch.cat(batches["targets"]))
    return list(torch.autograd.grad(loss, params))


def make_step(model: nn.Module, name: str) -> TwoPassStep:
    mixer, kwargs, mix = RUNS[name]
    step = TwoPassStep(model, mixer(), **kwargs)
    step.mix_on = mix
    return step


@pytest.mark.parametrize("name", list(RUNS))
def test_loss_scale_accumulates_the_concatenated_batch(name):
    """K = 2 micro-batches at loss_scale 1/2: the gradients of one batch of their concatenation;
    the saliency (and so the mix) is that of loss_scale 1."""
    torch.manual_seed(0)
    model = NoNormNet()
    step = make_step(model, name)
    batches = stack([micro_batch(step, seed, last=seed == MICRO) for seed in range(1, MICRO + 1)])
    assert_grads_close(step_grads(model), concatenated_grads(model, step, batches), rtol=1e-5, atol=1e-7)
    if batches["saliency"][0] is not None:
        full = make_step(copy.deepcopy(model), name)
        images, labels = data(n=4, seed=1)
        out = full(images, labels, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(batches["saliency"][0], out.saliency, rtol=1e-5, atol=1e-8)


def _ddp_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = NoNormNet()
    ddp = nn.parallel.DistributedDataParallel(model)
    reductions: list[int] = []

    def count(state, bucket):
        reductions.append(1)
        return default_hooks.allreduce_hook(state, bucket)
    ddp.register_comm_hook(None, count)
    images, labels = data(n=4, seed=99)
    soft_target_cross_entropy(ddp(images), one_hot(labels)).backward()  # buckets per backward
    per_backward = len(reductions)
    for i, (name, wrapped) in enumerate([(name, ddp) for name in RUNS] +
                                         [("grafting", torch.compile(ddp, backend="eager"))]):
        step = make_step(wrapped, name)  # the DDP module is found inside torch.compile's wrapper
        model.zero_grad(set_to_none=True)
        fed = []
        for k in range(MICRO):
            reductions.clear()
            fed.append(micro_batch(step, 100 * rank + 10 * i + k, last=k == MICRO - 1))  # data per rank
            want = per_backward if k == MICRO - 1 else 0
            assert len(reductions) == want, f"{name}: micro-batch {k} all-reduced {len(reductions)} buckets"
        step.remove()  # before copying the model: the hook refers to the DDP module
        grads = concatenated_grads(model, step, stack(fed))
        for g in grads:
            dist.all_reduce(g)
            g /= world
        assert_grads_close(step_grads(model), grads, rtol=1e-4, atol=1e-6)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_accumulation_all_reduces_once_on_the_last_micro_batch():
    """2 gloo ranks, K = 2 micro-batches each with sync only on the last, for two-pass
    (feature and gradient saliency, eta and explicit weights), single-pass and unmixed steps,
    and a two-pass step on ``torch.compile(ddp)``:
    no bucket is all-reduced during the first micro-batch, one backward's worth during the
    last, and the gradients are the ranks' mean of their concatenated batches' gradients."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port), nprocs=2, join=True)
