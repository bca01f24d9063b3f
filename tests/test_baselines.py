"""Mixup and CutMix: the formulas against plainly written references, in place, reproducible,
and clear errors for bad input."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from mixing.baselines import CutMix, Mixup

K = 4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def batch(n=6, size=24, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size + 4, generator=g).to(dtype)  # not square: H and W kept apart
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(K, (n,), generator=g)


def ref_targets(labels, perm, lam, smoothing=0.0):
    t = np.zeros((len(labels), K))
    for i in range(len(labels)):
        t[i, labels[i]] += lam
        t[i, labels[perm[i]]] += 1 - lam
    return t * (1 - smoothing) + smoothing / K


def ref_cutmix_box(h, w, lam, cy, cx):
    """timm's rand_bbox: cut sides int(side * sqrt(1 - lam)), centred, clipped."""
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return clip(cy - cut_h // 2, h), clip(cy + cut_h // 2, h), clip(cx - cut_w // 2, w), clip(cx + cut_w // 2, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixup_matches_reference(dtype):
    """x_i = lam x_i + (1 - lam) x_perm(i) (to the dtype's precision) and lam-weighted targets."""
    x, labels = batch(dtype=dtype)
    perm, lam = torch.tensor([3, 0, 5, 1, 2, 4]), 0.3
    want = torch.stack([lam * x[i].double() + (1 - lam) * x[perm[i]].double() for i in range(len(x))])
    res = Mixup(K, label_smoothing=0.1).mix(x, labels, perm=perm, lam=lam)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(x.double(), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(res.targets.numpy(), ref_targets(labels, perm, lam, 0.1), rtol=1e-6)
    assert res.mask is None and torch.equal(res.weight, torch.full((len(x),), lam))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam,center", [(0.6, (12, 14)), (0.3, (0, 0)), (0.5, (23, 27)), (1.0, (5, 5)), (0.0, (12, 14))])
def test_cutmix_matches_reference(dtype, lam, center):
    """The box (area 1 - lam, clipped at the border) holds the partner's pixels, everything
    else is untouched, and lam is corrected to the box actually pasted."""
    x, labels = batch(dtype=dtype)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = ref_cutmix_box(h, w, lam, *center)
    want = x.clone()
    for i in range(len(x)):
        want[i, :, y0:y1, x0:x1] = x[perm[i], :, y0:y1, x0:x1]
    res = CutMix(K).mix(x, labels, perm=perm, lam=lam, center=center)
    kept = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    assert torch.equal(x, want)
    np.testing.assert_allclose(res.weight.numpy(), np.full(len(x), kept), rtol=1e-6)
    np.testing.assert_allclose(res.targets.numpy(), ref_targets(labels, perm, kept), rtol=1e-6)
    mask = np.ones((h, w))
    mask[y0:y1, x0:x1] = 0
    assert res.mask.shape == (len(x), 1, h, w) and np.array_equal(res.mask[2, 0].numpy(), mask)


def test_cutmix_box_clipped_at_the_border_corrects_lambda():
    """A box centred in a corner keeps only its quarter inside: lambda rises accordingly."""
    x, labels = batch(size=40)
    res = CutMix(K).mix(x, labels, lam=0.5, center=(0, 0))
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(0.5)), int(w * math.sqrt(0.5))
    assert float(res.weight[0]) == pytest.approx(1 - (cut_h // 2) * (cut_w // 2) / (h * w))


@pytest.mark.parametrize("mixer", [Mixup(K), CutMix(K)], ids=["mixup", "cutmix"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_in_place_keeps_storage_and_layout(mixer, channels_last):
    """The output is the input's storage: same data_ptr, strides and memory format."""
    x, labels = batch(channels_last=channels_last)
    ptr, strides, before = x.data_ptr(), x.stride(), x.clone()
    res = mixer.mix(x, labels, lam=0.5, center=(12, 12)) if isinstance(mixer, CutMix) \
        else mixer.mix(x, labels, lam=0.5)
    assert x.data_ptr() == ptr and x.stride() == strides and not torch.equal(x, before)
    assert (res.targets >= 0).all()
    torch.testing.assert_close(res.targets.sum(1), torch.ones(len(x)))


@pytest.mark.parametrize("cls", [Mixup, CutMix])
def test_fixed_generator_reproduces_the_run(cls):
    """Same seed: same pairing, lambda and images; another seed: a different mix."""
    def run(seed):
        x, labels = batch()
        return x, cls(K).mix(x, labels, generator=torch.Generator().manual_seed(seed))
    (x1, r1), (x2, r2), (x3, r3) = run(1), run(1), run(2)
    assert torch.equal(x1, x2) and torch.equal(r1.perm, r2.perm) and torch.equal(r1.weight, r2.weight)
    assert not torch.equal(x1, x3)


def test_lambda_is_beta_alpha_per_batch():
    """Mixup's lam ~ Beta(alpha, alpha), one per batch: mean 1/2, variance 1 / (4 (2 alpha + 1))
    (1/12 for the default alpha = 1). CutMix also keeps one (corrected) lam per batch."""
    gen = torch.Generator().manual_seed(0)
    x, labels = batch(size=8)
    for alpha in (1.0, 0.2):
        weights = [Mixup(K, alpha=alpha).mix(x.clone(), labels, generator=gen).weight for _ in range(400)]
        assert all(torch.all(w == w[0]) for w in weights)
        lams = np.array([float(w[0]) for w in weights])
        assert abs(lams.mean() - 0.5) < 0.05 and abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.02
    weights = [CutMix(K).mix(x.clone(), labels, generator=gen).weight for _ in range(20)]
    assert all(torch.all(w == w[0]) for w in weights) and len({float(w[0]) for w in weights}) > 10


def _x():
    return torch.randn(4, 3, 8, 8)


LABELS = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("cls", [Mixup, CutMix])
@pytest.mark.parametrize("call,message", [
    (lambda m: m.mix(torch.randn(4, 8, 8), LABELS), "4-D"),
    (lambda m: m.mix(_x().double(), LABELS), "float32, float16 or bfloat16"),
    (lambda m: m.mix(_x().long(), LABELS), "float32, float16 or bfloat16"),
    (lambda m: m.mix(_x()[:1], LABELS[:1]), "at least 2"),
    (lambda m: m.mix(_x(), torch.tensor([0, 1, 2, 4])), "labels must lie in [0, 4)"),
    (lambda m: m.mix(_x(), LABELS, lam=1.2), "lam must lie in [0, 1]"),
    (lambda m: m.mix(_x(), LABELS, perm=torch.tensor([0, 1, 2])), "permutation of range(4)"),
])
def test_bad_input_raises_a_clear_error(cls, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(cls(K))


def test_bad_cutmix_center_and_alpha_raise():
    with pytest.raises(ValueError, match="center must lie inside the 8x8 image"):
        CutMix(K).mix(_x(), LABELS, center=(8, 0))
    for cls in (Mixup, CutMix):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            cls(K, alpha=0.0)
