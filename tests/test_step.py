"""The training step: two-pass gradients = eta * g_mixed + (1 - eta) * g_clean (checked against
passes computed separately), the eta edge cases, single-pass and unmixed steps, stages, AMP
with a GradScaler, two-process gloo DDP, and clear errors for bad input."""
from __future__ import annotations

import copy
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mixing.base import (MixResult, Mixer, blend_, check_batch, check_saliency, random_perm,
                         soft_target_cross_entropy)
from mixing.baselines import CutMix, Mixup
from mixing.grafting import SaliencyGrafting
from mixing.step import TwoPassStep

K = 5


class TinyNet(nn.Module):
    """A small real CNN with BatchNorm; its last spatial stage is ``stage`` (8x8 at 16 px)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage(self.stem(x))).flatten(1))


class SaliencyMixup(Mixer):
    """A small gradient-saliency mixer for these tests: M = s_i / (s_i + s_j) per pixel (SAGE's
    Eq. 2 without smoothing or shifts), label weight mean(M)."""

    saliency_kind = "gradient"

    def mix(self, x, labels, saliency=None, *, generator=None):
        check_batch(x, labels, self.num_classes)
        s = check_saliency(saliency, x)
        perm = random_perm(x.shape[0], x.device, generator)
        share = (s / (s + s[perm]).clamp_min(1e-20))[:, None]
        blend_(x, x[perm], share)
        weight = share.mean(dim=(1, 2, 3))
        return MixResult(self._targets(labels, perm, weight), perm, weight, share)


def data(n=6, size=16, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(K, (n,), generator=g)


def one_hot(labels, smoothing=0.0):
    return nn.functional.one_hot(labels, K).float() * (1 - smoothing) + smoothing / K


def reference(model, mixer, images, labels, eta, seed, smoothing=0.0, reduction="mean_abs", amp=None,
              weights=None):
    """Each pass separately on a copy of the model: (expected grads, saliency, mixed images,
    MixResult, clean loss, mixed loss); the passes weighted (1 - eta, eta) or ``weights``
    (clean, mixed)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    autocast = lambda: torch.autocast("cpu", amp, enabled=amp is not None)  # noqa: E731
    x = images.clone().requires_grad_(True)
    with autocast():
        clean = soft_target_cross_entropy(model(x), one_hot(labels, smoothing))
    g_clean = torch.autograd.grad(clean, params, retain_graph=True)
    if mixer.saliency_kind == "gradient":
        gx = torch.autograd.grad(clean, x)[0].float()
        saliency = gx.abs().mean(1) if reduction == "mean_abs" else gx.square().sum(1).sqrt()
    else:
        with torch.no_grad(), autocast():
            saliency = model.stage(model.stem(images)).float().abs().sum(1)
    mixed_x = images.clone()
    result = mixer.mix(mixed_x, labels, saliency, generator=torch.Generator().manual_seed(seed))
    with autocast():
        mixed = soft_target_cross_entropy(model(mixed_x), result.targets)
    g_mixed = torch.autograd.grad(mixed, params)
    clean_w, mixed_w = weights or (1 - eta, eta)
    grads = [mixed_w * m + clean_w * c for m, c in zip(g_mixed, g_clean)]
    return grads, saliency, mixed_x, result, clean.detach(), mixed.detach()


def pass_grads(model, images, targets):
    """Parameter gradients of one pass of a copy of ``model``."""
    ref = copy.deepcopy(model)
    return torch.autograd.grad(soft_target_cross_entropy(ref(images), targets), list(ref.parameters()))


def step_grads(model):
    return [p.grad for p in model.parameters()]


def assert_grads_close(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


def make_mixer(kind, smoothing=0.0):
    return SaliencyGrafting(K, smoothing, grid_sizes=[4]) if kind == "feature" else SaliencyMixup(K, smoothing)


# -- the two-pass step ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["feature", "gradient"])
@pytest.mark.parametrize("eta", [0.3, 0.5, 1.0])
def test_two_pass_gradients_are_the_eta_weighted_sum(kind, eta):
    """Parameter gradients = eta * g_mixed + (1 - eta) * g_clean, with the same saliency, mix,
    targets and losses as passes computed one by one (eta = 1: the clean pass only gives the
    saliency, no parameter gradient)."""
    torch.manual_seed(0)
    model, (images, labels) = TinyNet(), data()
    mixer = make_mixer(kind, smoothing=0.1)
    grads, saliency, mixed_x, result, clean, mixed = reference(model, mixer, images, labels, eta, seed=3,
                                                               smoothing=0.1)
    out = TwoPassStep(model, mixer, eta=eta)(images, labels, generator=torch.Generator().manual_seed(3))
    assert_grads_close(step_grads(model), grads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.saliency, saliency, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(images, mixed_x)
    assert torch.equal(out.mix.perm, result.perm)
    torch.testing.assert_close(out.mix.targets, result.targets)
    torch.testing.assert_close(out.clean_loss, clean)
    torch.testing.assert_close(out.mixed_loss, mixed)
    torch.testing.assert_close(out.loss, eta * mixed + (1 - eta) * clean)
    assert out.logits.shape == (len(labels), K) and not out.logits.requires_grad


@pytest.mark.parametrize("reduction", ["mean_abs", "l2"])
def test_gradient_saliency_reduction_is_configurable(reduction):
    """The step's gradient saliency is |grad_x loss| reduced as asked (mean_abs by default)."""
    torch.manual_seed(0)
    model, (images, labels) = TinyNet(), data()
    _, saliency, *_ = reference(model, SaliencyMixup(K), images, labels, 0.5, seed=0, reduction=reduction)
    out = TwoPassStep(model, SaliencyMixup(K), gradient_reduction=reduction)(images, labels)
    torch.testing.assert_close(out.saliency, saliency, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["feature", "gradient"])
def test_eta_zero_is_a_plain_clean_step(kind):
    """eta = 0 gives the mixed pass no weight: one clean pass, nothing mixed."""
    torch.manual_seed(0)
    model, (images, labels) = TinyNet(), data()
    grads, *_ = reference(model, make_mixer(kind), images, labels, 0.0, seed=0)
    before = images.clone()
    names = []
    out = TwoPassStep(model, make_mixer(kind), eta=0.0)(images, labels, stage=recorder(names))
    assert_grads_close(step_grads(model), grads, rtol=1e-5, atol=1e-6)
    assert torch.equal(images, before) and out.mix is None and out.mixed_loss is None
    assert names == ["clean"]


def test_unmixed_step_uses_label_smoothed_one_hot_targets():
    """mix=False (warm-up): one pass on the unmixed batch with smoothed one-hot targets."""
    torch.manual_seed(0)
    model, (images, labels) = TinyNet(), data()
    want = pass_grads(model, images, one_hot(labels, 0.2))
    before, names = images.clone(), []
    out = TwoPassStep(model, make_mixer("feature", 0.2))(images, labels, mix=False, stage=recorder(names))
    assert_grads_close(step_grads(model), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(images, before) and out.mix is None and out.saliency is None
    assert names == ["clean"] and out.loss == out.clean_loss


def test_no_mixer_takes_the_classes_from_the_logits():
    """mixer=None: a plain pass, the number of classes read from the logits."""
    torch.manual_seed(0)
    model, (images, labels) = TinyNet(), data()
    want = pass_grads(model, images, one_hot(labels, 0.1))
    TwoPassStep(model, None, label_smoothing=0.1)(images, labels)
    assert_grads_close(step_grads(model), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [Mixup, CutMix])
def test_single_pass_mixers_take_one_full_weight_pass(cls):
    """Mixup and CutMix: gradients of the mixed pass alone (eta does not apply)."""
    torch.manual_seed(0)
    model, (images, labels) = TinyNet(), data()
    mixed_x = images.clone()
    result = cls(K).mix(mixed_x, labels, generator=torch.Generator().manual_seed(1))
    want = pass_grads(model, mixed_x, result.targets)
    names = []
    out = TwoPassStep(model, cls(K), eta=0.3)(images, labels, generator=torch.Generator().manual_seed(1),
                                               stage=recorder(names))
    assert_grads_close(step_grads(model), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(images, mixed_x) and out.clean_loss is None and out.saliency is None
    assert names == ["mix", "mixed"]


def recorder(names):
    """A stage callable that records the stage names in order."""
    def stage(name):
        names.append(name)
        return torch.autograd.profiler.record_function(name)
    return stage


@pytest.mark.parametrize("kind", ["feature", "gradient"])
def test_stages_are_named_in_order_and_input_is_left_clean(kind):
    """Stages clean, saliency, mix, mixed; the batch keeps its storage and channels-last layout,
    and no longer requires grad nor holds a gradient."""
    torch.manual_seed(0)
    model = TinyNet().to(memory_format=torch.channels_last)
    images, labels = data(channels_last=True)
    ptr, names = images.data_ptr(), []
    TwoPassStep(model, make_mixer(kind))(images, labels, stage=recorder(names))
    assert names == ["clean", "saliency", "mix", "mixed"]
    assert images.data_ptr() == ptr and images.is_contiguous(memory_format=torch.channels_last)
    assert not images.requires_grad and images.grad is None


# -- mixed precision ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["feature", "gradient"])
def test_autocast_bfloat16_with_one_grad_scaler(kind):
    """Under bf16 autocast with a GradScaler over both backwards: once unscaled, the gradients
    (and the saliency, unscaled by the step) match the passes computed under autocast."""
    torch.manual_seed(0)
    model, (images, labels) = TinyNet(), data()
    grads, saliency, *_ = reference(model, make_mixer(kind), images, labels, 0.5, seed=2, amp=torch.bfloat16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    step = TwoPassStep(model, make_mixer(kind), scaler=scaler, amp_dtype=torch.bfloat16)
    out = step(images, labels, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(optimizer)
    assert_grads_close(step_grads(model), grads, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(out.saliency, saliency, rtol=2e-2, atol=1e-6)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


class SqrtAbs(nn.Module):
    """sqrt|x|: its input gradient is NaN where x == 0 (0 * inf), while the forward is finite."""

    def forward(self, x):
        return x.abs().sqrt()


def test_non_finite_gradient_saliency_is_an_error_unless_a_scaler_handles_it():
    """NaN input gradients: a clear error without a GradScaler; with one (an fp16 overflow the
    scaler deals with) those saliency values are zeroed and the step completes."""
    images, labels = data()
    images[:, :, :4, :4] = 0.0

    def model():
        torch.manual_seed(0)
        return nn.Sequential(SqrtAbs(), TinyNet())
    with pytest.raises(ValueError, match="saliency contains NaN or inf"):
        TwoPassStep(model(), SaliencyMixup(K))(images.clone(), labels)
    out = TwoPassStep(model(), SaliencyMixup(K), scaler=torch.amp.GradScaler("cpu"))(images.clone(), labels)
    assert torch.isfinite(out.saliency).all() and (out.saliency[:, :4, :4] == 0).all()


# -- DistributedDataParallel ----------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyNet()
    ddp = nn.parallel.DistributedDataParallel(model)
    reductions = []

    def count(state, bucket):
        reductions.append(1)
        return default_hooks.allreduce_hook(state, bucket)
    ddp.register_comm_hook(None, count)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = data(seed=99)
    soft_target_cross_entropy(ddp(images), one_hot(labels)).backward()  # buckets per backward
    per_backward = len(reductions)
    runs = [(make_mixer("feature"), 0.5), (SaliencyMixup(K), 0.5), (make_mixer("feature"), 1.0),
            (SaliencyMixup(K), 1.0)]
    for i, (mixer, eta) in enumerate(runs):
        step = TwoPassStep(ddp, mixer, eta=eta)
        images, labels = data(seed=10 * rank + i)            # different data on each rank
        grads, *_ = reference(model, mixer, images, labels, eta, seed=rank)
        for g in grads:                                       # what DDP must produce: the mean
            dist.all_reduce(g)
            g /= world
        optimizer.zero_grad()
        reductions.clear()
        step(images, labels, generator=torch.Generator().manual_seed(rank))
        assert step.features is None or step.features.layer == "stage"  # found through the wrapper
        assert len(reductions) == per_backward, "the clean pass must not all-reduce"
        assert_grads_close(step_grads(model), grads, rtol=1e-4, atol=1e-6)
        optimizer.step()
        step.remove()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered)
    dist.barrier()  # both ranks done communicating before either tears gloo down
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_ranks_all_reduce_once_and_stay_identical():
    """2 gloo ranks, different data: each two-pass step (feature and gradient saliency, eta 0.5
    and 1) all-reduces once, the gradients are the ranks' mean of eta * g_mixed + (1 - eta) *
    g_clean, and the parameters stay identical."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port), nprocs=2, join=True)


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"eta": -0.1}, "eta (the weight of the mixed pass) must lie in [0, 1]"),
    ({"eta": 1.5}, "must lie in [0, 1]"),
    ({"feature_layer": "stag"}, "TinyNet has no layer named 'stag'; close names: stage"),
    ({"gradient_reduction": "max"}, "gradient_reduction must be one of"),
    ({"amp_dtype": torch.float64}, "amp_dtype must be torch.float16, torch.bfloat16 or None"),
    ({"label_smoothing": 0.1}, "label_smoothing=0.1 differs from the mixer's 0.0"),
])
def test_bad_configuration_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TwoPassStep(TinyNet(), make_mixer("feature"), **kwargs)


def test_feature_layer_only_for_feature_mixers():
    with pytest.raises(ValueError, match="feature_layer='stage' is only used by feature-saliency mixers"):
        TwoPassStep(TinyNet(), Mixup(K), feature_layer="stage")


@pytest.mark.parametrize("mixer", [make_mixer("feature"), SaliencyMixup(K), Mixup(K), None],
                         ids=["grafting", "gradient", "mixup", "none"])
@pytest.mark.parametrize("images,labels,message", [
    (torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 5]), "labels must lie in [0, 5)"),
    (torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2]), "labels must have shape (4,)"),
    (torch.randn(4, 3, 16, 16).double(), torch.tensor([0, 1, 2, 3]), "float32, float16 or bfloat16"),
    (torch.randint(9, (4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]), "float32, float16 or bfloat16"),
    (torch.randn(3, 16, 16), torch.tensor([0, 1, 2]), "(N, C, H, W)"),
])
def test_bad_batches_raise_before_any_gradient(mixer, images, labels, message):
    """Bad images or labels: a ValueError naming the problem, and no gradient accumulated."""
    model = TinyNet()
    with pytest.raises(ValueError, match=re.escape(message)):
        TwoPassStep(model, mixer)(images, labels)
    assert all(p.grad is None for p in model.parameters())


def test_mixing_a_single_image_or_a_grad_requiring_batch_is_an_error():
    images, labels = data(n=1)
    with pytest.raises(ValueError, match="mixing needs a batch of at least 2 images"):
        TwoPassStep(TinyNet(), make_mixer("feature"))(images, labels)
    images, labels = data()
    with pytest.raises(ValueError, match="images must not require grad"):
        TwoPassStep(TinyNet(), SaliencyMixup(K))(images.requires_grad_(), labels)
