"""Saliency Grafting: the maths of section 4 against a plainly written reference, its properties,
the ablations, the documented guards and the errors for bad input."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from mixing.grafting import SaliencyGrafting, region_saliency

K = 5  # classes
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# -- an independent reference: one image at a time, float64 numpy ------------------------------

def ref_regions(s: np.ndarray, g: int) -> np.ndarray:
    """Mean of the map over each cell of a g x g grid (cells overlap when g does not divide)."""
    h, w = s.shape
    out = np.empty((g, g))
    for a in range(g):
        for b in range(g):
            rows = slice(a * h // g, math.ceil((a + 1) * h / g))
            cols = slice(b * w // g, math.ceil((b + 1) * w / g))
            out[a, b] = s[rows, cols].mean()
    return out


def ref_eligible(s: np.ndarray, temperature: float, k: float) -> np.ndarray:
    if s.max() == s.min():
        return np.ones(s.shape, bool)
    z = (s - s.min()) / (s.max() - s.min())
    e = np.exp(z / temperature)
    soft = e / e.sum()
    return soft > k * soft.mean()


def ref_importance(s: np.ndarray, m: np.ndarray) -> float:
    if not s.any():
        s = np.ones_like(s)
    return np.linalg.norm(s * m) / np.linalg.norm(s)


def ref_graft(x, labels, saliency, perm, grid, draws, temperature=0.2, k=1.0, label_mix="saliency",
              smoothing=0.0):
    """Section 4 for one pair at a time: mixed images (x's dtype), weights, targets, masks."""
    n, c, h, w = x.shape
    xs = x.clone()
    sal = [ref_regions(saliency[i].double().numpy(), grid) for i in range(n)]
    weights, masks = [], []
    rows, cols = np.arange(h) * grid // h, np.arange(w) * grid // w
    for i in range(n):
        j = int(perm[i])
        m = ref_eligible(sal[i], temperature, k) & draws[i].numpy().astype(bool)
        pixel = torch.from_numpy(m[rows][:, cols])
        xs[i] = torch.where(pixel, x[i], x[j])
        if label_mix == "area":
            lam = m.mean()
        else:
            a, b = ref_importance(sal[i], m), ref_importance(sal[j], ~m)
            lam = a / (a + b) if a + b > 0 else m.mean()
        weights.append(lam)
        masks.append(m)
    targets = np.zeros((n, K))
    for i in range(n):
        targets[i, labels[i]] += weights[i]
        targets[i, labels[int(perm[i])]] += 1 - weights[i]
    targets = targets * (1 - smoothing) + smoothing / K
    return xs, np.array(weights), targets, np.array(masks)


def batch(n=6, size=32, dtype=torch.float32, sal_size=7, seed=0, channels_last=False, width=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, width or size, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(K, (n,), generator=g)
    saliency = torch.rand(n, sal_size, sal_size, generator=g) ** 3 * 50
    return x, labels, saliency


def explicit_draws(n, grid, seed=1, p=0.6):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g), (torch.rand(n, grid, grid, generator=g) < p)


# -- the formulas ---------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("height,width,grid", [(32, 32, 4), (32, 48, 8), (32, 32, 7), (56, 56, 7), (56, 40, 8),
                                               (24, 28, 7)])
def test_mix_matches_reference_in_every_dtype(dtype, height, width, grid, channels_last):
    """Images, label weights, targets and masks equal the reference, in each dtype and layout,
    for grids that divide the image (cell views) and that do not (an upsampled mask)."""
    x, labels, saliency = batch(size=height, width=width, dtype=dtype, channels_last=channels_last)
    perm, draws = explicit_draws(len(x), grid)
    want_x, want_w, want_t, want_m = ref_graft(x, labels, saliency, perm, grid, draws, smoothing=0.1)
    mixer = SaliencyGrafting(K, label_smoothing=0.1)
    res = mixer.mix(x, labels, saliency, perm=perm, bernoulli=draws)
    assert torch.equal(x, want_x)  # a binary blend copies pixels exactly, in any dtype
    assert np.array_equal(res.mask[:, 0].numpy().astype(bool), want_m)
    np.testing.assert_allclose(res.weight.numpy(), want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.targets.numpy(), want_t, rtol=1e-5, atol=1e-6)
    assert res.mask.shape == (len(x), 1, grid, grid) and torch.equal(res.perm, perm)


@pytest.mark.parametrize("temperature,threshold", [(0.2, 1.0), (0.3, 1.0), (0.05, 1.0), (0.2, 0.5), (0.2, 1.5)])
def test_softmax_threshold_matches_reference(temperature, threshold):
    """The eligible regions follow Eq. 3-4 (softmax of the min-max normalised map over T,
    threshold a multiple of the mean) for several temperatures and thresholds."""
    x, labels, saliency = batch(n=8, size=32, sal_size=8, seed=3)
    perm, _ = explicit_draws(8, 8)
    ones = torch.ones(8, 8, 8, dtype=torch.bool)
    _, want_w, _, want_m = ref_graft(x, labels, saliency, perm, 8, ones, temperature, threshold)
    res = SaliencyGrafting(K, temperature=temperature, threshold=threshold).mix(
        x, labels, saliency, perm=perm, bernoulli=ones)
    assert np.array_equal(res.mask[:, 0].numpy().astype(bool), want_m)
    np.testing.assert_allclose(res.weight.numpy(), want_w, rtol=1e-5)


@pytest.mark.parametrize("src,grid", [(7, 4), (7, 8), (7, 7), (2, 4), (8, 4), (5, 3)])
def test_region_saliency_is_mean_over_overlapped_cells(src, grid):
    """Resampling to the grid: each region is the mean of the feature cells it overlaps."""
    s = torch.rand(3, src, src, dtype=torch.float64)
    want = np.stack([ref_regions(m.numpy(), grid) for m in s])
    np.testing.assert_allclose(region_saliency(s, grid).numpy(), want, rtol=1e-12)


def test_scale_of_the_saliency_does_not_matter():
    """Masks and weights depend on the shape of the map only (min-max normalised softmax,
    ratio of norms): feature sums in the thousands give the same mix as in [0, 1]."""
    x, labels, saliency = batch()
    perm, draws = explicit_draws(len(x), 8)
    a = SaliencyGrafting(K).mix(x.clone(), labels, saliency, perm=perm, bernoulli=draws)
    b = SaliencyGrafting(K).mix(x.clone(), labels, saliency * 3000, perm=perm, bernoulli=draws)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight)


def test_lower_temperature_selects_fewer_regions():
    """Appendix A: a small T keeps few regions, a large T about half (a linear ramp map)."""
    ramp = torch.arange(64.0).view(1, 8, 8).expand(2, 8, 8)
    x, labels, _ = batch(n=2)
    counts = []
    for t in (0.01, 0.2, 0.3, 100.0):
        res = SaliencyGrafting(K, temperature=t).mix(x.clone(), labels, ramp,
                                                     bernoulli=torch.ones(2, 8, 8))
        counts.append(int(res.mask[0].sum()))
    assert counts == sorted(counts) and counts[0] < counts[-1] and counts[-1] == 32


# -- properties -----------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixes_in_place_keeping_storage_and_layout(dtype, channels_last):
    """The output is the input's storage (same data_ptr and strides), channels-last kept."""
    x, labels, saliency = batch(size=64, dtype=dtype, channels_last=channels_last)
    before, ptr, strides = x.clone(), x.data_ptr(), x.stride()
    res = SaliencyGrafting(K).mix(x, labels, saliency, generator=torch.Generator().manual_seed(0))
    assert x.data_ptr() == ptr and x.stride() == strides and x.dtype == dtype
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert not torch.equal(x, before)
    assert set(res.mask.unique().tolist()) <= {0.0, 1.0}


def test_masks_binary_and_targets_are_distributions():
    """Over many random batches: masks are 0/1, weights in [0, 1], targets >= 0 summing to 1."""
    gen = torch.Generator().manual_seed(5)
    mixer = SaliencyGrafting(K, label_smoothing=0.1)
    for seed in range(20):
        x, labels, saliency = batch(seed=seed)
        res = mixer.mix(x, labels, saliency, generator=gen)
        assert set(res.mask.unique().tolist()) <= {0.0, 1.0}
        assert ((res.weight >= 0) & (res.weight <= 1)).all()
        assert (res.targets >= 0).all()
        torch.testing.assert_close(res.targets.sum(1), torch.ones(len(x)))


def test_fixed_generator_reproduces_the_run():
    """Same generator seed: identical pairing, grid, mask, weights and images; another seed differs."""
    def run(seed):
        x, labels, saliency = batch(size=64)
        res = SaliencyGrafting(K).mix(x, labels, saliency, generator=torch.Generator().manual_seed(seed))
        return x, res
    (x1, r1), (x2, r2), (x3, r3) = run(7), run(7), run(8)
    assert torch.equal(x1, x2) and torch.equal(r1.mask, r2.mask) and torch.equal(r1.perm, r2.perm)
    assert torch.equal(r1.weight, r2.weight)
    assert not (torch.equal(x1, x3) and torch.equal(r1.perm, r3.perm))


def test_repeated_mixes_reuse_the_scratch_without_aliasing():
    """Mixing again with the same mixer (the partners' scratch reused, then resized for a new
    shape and layout) matches the reference each time; the thread setting is restored."""
    threads = torch.get_num_threads()
    mixer = SaliencyGrafting(K)
    for size, channels_last, dtype in ((32, True, torch.float32), (32, True, torch.float32),
                                       (24, False, torch.float16), (32, True, torch.bfloat16)):
        x, labels, saliency = batch(size=size, dtype=dtype, channels_last=channels_last, seed=size)
        perm, draws = explicit_draws(len(x), 4)
        want_x, want_w, _, _ = ref_graft(x, labels, saliency, perm, 4, draws)
        res = mixer.mix(x, labels, saliency, perm=perm, bernoulli=draws)
        assert torch.equal(x, want_x)
        np.testing.assert_allclose(res.weight.numpy(), want_w, rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == threads


def test_full_mask_gives_weight_one_and_empty_mask_weight_zero():
    """M all ones: the image is unchanged and its label weight is 1; M empty: the image is
    its partner and the weight is 0."""
    x, labels, saliency = batch()
    perm = torch.roll(torch.arange(len(x)), 1)
    full = SaliencyGrafting(K, threshold=0.0)   # every region eligible
    y = x.clone()
    res = full.mix(y, labels, saliency, perm=perm, bernoulli=torch.ones(len(x), 4, 4))
    assert torch.equal(y, x) and torch.equal(res.weight, torch.ones(len(x)))
    y = x.clone()
    res = full.mix(y, labels, saliency, perm=perm, bernoulli=torch.zeros(len(x), 4, 4))
    assert torch.equal(y, x[perm]) and torch.equal(res.weight, torch.zeros(len(x)))


def test_default_grid_sizes_follow_the_image_size():
    """grid_sizes=None: {4, 8} for 64 px images (appendix B.2), {4, 7, 8} above (B.3)."""
    gen = torch.Generator().manual_seed(0)
    for size, want in ((64, {4, 8}), (96, {4, 7, 8})):
        x, labels, saliency = batch(n=2, size=size)
        seen = {SaliencyGrafting(K).mix(x, labels, saliency, generator=gen).mask.shape[-1]
                for _ in range(40)}
        assert seen == want
    x, labels, saliency = batch(n=2, size=64)
    seen = {SaliencyGrafting(K, grid_sizes=[2, 3]).mix(x, labels, saliency, generator=gen).mask.shape[-1]
            for _ in range(40)}
    assert seen == {2, 3}


def test_bernoulli_probability_comes_from_beta_per_batch():
    """p = 1 keeps every eligible region and p = 0 none; a drawn p ~ Beta(2, 2) keeps a share
    of them that varies from batch to batch."""
    x, labels, saliency = batch(n=16)
    mixer = SaliencyGrafting(K, threshold=0.0)
    assert mixer.mix(x.clone(), labels, saliency, grid_size=8, p=1.0).mask.mean() == 1
    assert mixer.mix(x.clone(), labels, saliency, grid_size=8, p=0.0).mask.mean() == 0
    gen = torch.Generator().manual_seed(0)
    shares = [float(mixer.mix(x.clone(), labels, saliency, grid_size=8, generator=gen).mask.mean())
              for _ in range(30)]
    assert 0.3 < np.mean(shares) < 0.7 and np.std(shares) > 0.1


# -- guards (documented fallbacks) ----------------------------------------------------------------

def test_all_zero_saliency_counts_as_flat():
    """An all-zero map: every region eligible (M = the Bernoulli draws) and, in Eq. 5, uniform
    saliency: I = sqrt(area share). Two zero maps give sqrt(a) / (sqrt(a) + sqrt(1 - a))."""
    x, labels, _ = batch(n=2)
    draws = torch.zeros(2, 4, 4, dtype=torch.bool)
    draws[:, :2] = True   # top half: a = 1/2 ... and a quarter for image 1
    draws[1, 1] = False
    res = SaliencyGrafting(K).mix(x, labels, torch.zeros(2, 7, 7), perm=torch.tensor([1, 0]), bernoulli=draws)
    assert torch.equal(res.mask[:, 0].bool(), draws)
    a = draws.flatten(1).float().mean(1)
    torch.testing.assert_close(res.weight, a.sqrt() / (a.sqrt() + (1 - a).sqrt()))


def test_zero_over_zero_falls_back_to_the_area_share():
    """Both importances 0 (image i salient only where it is covered, its partner only where it
    is covering): Eq. 5 is 0/0 and the weight is the area share of the pixels shown."""
    x, labels, _ = batch(n=2)
    s = torch.zeros(2, 4, 4)
    s[0, 2:] = 1.0   # image 0 salient in the bottom half ...
    s[1, :1] = 1.0   # ... its partner in the top row
    draws = torch.zeros(2, 4, 4)
    draws[:, :2] = 1  # M = top half for both
    res = SaliencyGrafting(K, threshold=0.0).mix(x, labels, s, perm=torch.tensor([1, 0]), bernoulli=draws)
    assert res.weight[0] == 0.5


# -- ablations ------------------------------------------------------------------------------------

def test_top_k_ablation_grafts_the_k_most_salient_regions():
    """top_k: exactly the k most salient grid regions, whatever p; with area labels."""
    x, labels, saliency = batch(sal_size=8)
    res = SaliencyGrafting(K, top_k=6, label_mix="area").mix(x, labels, saliency, grid_size=8, p=0.0)
    flat = saliency.flatten(1)
    want = torch.zeros_like(flat).scatter_(1, flat.topk(6, dim=1).indices, 1.0)
    assert torch.equal(res.mask.flatten(1), want)
    torch.testing.assert_close(res.weight, torch.full((len(x),), 6 / 64))


def test_area_labels_ablation_uses_the_mask_share():
    """label_mix='area': lambda = mean of M (the reference's area labels)."""
    x, labels, saliency = batch()
    perm, draws = explicit_draws(len(x), 8)
    _, want_w, _, _ = ref_graft(x, labels, saliency, perm, 8, draws, label_mix="area")
    res = SaliencyGrafting(K, label_mix="area").mix(x, labels, saliency, perm=perm, bernoulli=draws)
    np.testing.assert_allclose(res.weight.numpy(), want_w, rtol=1e-6)


# -- bad input ------------------------------------------------------------------------------------

def _x():
    return torch.randn(4, 3, 16, 16)


LABELS = torch.tensor([0, 1, 2, 3])
SAL = torch.rand(4, 4, 4)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.mix(torch.randn(3, 16, 16), LABELS, SAL), "4-D"),
    (lambda m: m.mix(_x().double(), LABELS, SAL), "float32, float16 or bfloat16"),
    (lambda m: m.mix((_x() * 100).to(torch.uint8), LABELS, SAL), "float32, float16 or bfloat16"),
    (lambda m: m.mix(_x()[:1], LABELS[:1], SAL[:1]), "at least 2"),
    (lambda m: m.mix(_x(), torch.tensor([0, 1, 2, 5]), SAL), "labels must lie in [0, 5)"),
    (lambda m: m.mix(_x(), torch.tensor([0, 1, 2, -1]), SAL), "labels must lie in"),
    (lambda m: m.mix(_x(), LABELS.float(), SAL), "integer class indices"),
    (lambda m: m.mix(_x(), LABELS[:3], SAL), "labels must have shape (4,)"),
    (lambda m: m.mix(_x(), LABELS, None), "needs a saliency map"),
    (lambda m: m.mix(_x(), LABELS, torch.rand(3, 4, 4)), "saliency must have shape"),
    (lambda m: m.mix(_x(), LABELS, torch.full((4, 4, 4), float("nan"))), "NaN or inf"),
    (lambda m: m.mix(_x(), LABELS, torch.full((4, 4, 4), float("inf"))), "NaN or inf"),
    (lambda m: m.mix(_x(), LABELS, -SAL), "non-negative"),
    (lambda m: m.mix(_x(), LABELS, SAL, grid_size=17), "grid size must be an int in [1, 16]"),
    (lambda m: m.mix(_x(), LABELS, SAL, p=1.5), "p must lie in [0, 1]"),
    (lambda m: m.mix(_x(), LABELS, SAL, bernoulli=torch.ones(4, 2, 3)), "(N, g, g)"),
    (lambda m: m.mix(_x(), LABELS, SAL, bernoulli=torch.ones(3, 2, 2)), "0/1 of shape (4, 2, 2)"),
    (lambda m: m.mix(_x(), LABELS, SAL, bernoulli=torch.full((4, 2, 2), 0.5)), "0/1 of shape"),
    (lambda m: m.mix(_x(), LABELS, SAL, grid_size=4, bernoulli=torch.ones(4, 2, 2)), "disagrees"),
    (lambda m: m.mix(_x(), LABELS, SAL, perm=torch.tensor([0, 0, 1, 2])), "permutation of range(4)"),
    (lambda m: SaliencyGrafting(K, top_k=20).mix(_x(), LABELS, SAL, grid_size=4), "top_k=20 exceeds"),
])
def test_bad_input_raises_a_clear_error(call, message):
    """Wrong rank, dtype, batch size 1, labels, saliency and explicit draws: ValueError naming it."""
    with pytest.raises(ValueError) as err:
        call(SaliencyGrafting(K))
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"alpha": 0}, "alpha must be > 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"threshold": -1}, "threshold must be >= 0"),
    ({"grid_sizes": []}, "grid_sizes must be a non-empty list"),
    ({"grid_sizes": [4, 0]}, "grid_sizes must be a non-empty list"),
    ({"grid_sizes": [4.5]}, "grid_sizes must be a non-empty list"),
    ({"top_k": 0}, "top_k must be an int >= 1"),
    ({"label_mix": "pixels"}, "label_mix must be 'saliency' or 'area'"),
    ({"label_smoothing": 1.0}, "label_smoothing must lie in [0, 1)"),
])
def test_bad_configuration_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SaliencyGrafting(K, **kwargs)
