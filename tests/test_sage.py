"""SAGE (mixing/sage.py) against a plainly written reference of the paper's formulas.

The reference below works per pair with Python loops in float64: Gaussian smoothing by its
definition (reflect padding), normalisation, the zero-filled translation of Eq. 3 on an explicit
canvas, Eq. 4 through the mask of Eq. 2, the argmax, the mixed image and gamma (Algorithm 1).
Tolerances: float32 results agree to 1e-5 (maps and masks) and 1e-5 (images); float16 and
bfloat16 images to the dtype's rounding of values of magnitude <= 4 (2e-3 and 2e-2).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from mixing.sage import (SAGE, mixing_mask_, normalize_, random_shifts, rearrangement_scores,
                         shifted_partner, smooth, zero_out_of_frame_)

ZETA = 1e-16


# ----------------------------------------------------------------------------- reference

def ref_smooth(s: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """2-D Gaussian blur of one map by its definition, reflect padding."""
    half = kernel_size // 2
    offsets = np.arange(-half, half + 1)
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    g /= g.sum()
    padded = np.pad(s, half, mode="reflect")
    h, w = s.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = (padded[i:i + kernel_size, j:j + kernel_size] * np.outer(g, g)).sum()
    return out


def ref_normalize(s: np.ndarray) -> np.ndarray:
    total = s.sum()
    return s / total if total > 0 else np.full_like(s, 1.0 / s.size)


def ref_translate(z: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Eq. 3: out[i, j] = z[i - dy, j - dx] inside the frame, 0 elsewhere (last two axes)."""
    h, w = z.shape[-2:]
    out = np.zeros_like(z)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[..., i, j] = z[..., i - dy, j - dx]
    return out


def ref_mask(s0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """Eq. 2 with the clamp against division by zero."""
    return s0 / np.maximum(s0 + t1, ZETA)


def ref_score(s0: np.ndarray, s1: np.ndarray, dy: int, dx: int) -> float:
    """Eq. 4: total saliency over the frame after translating s1 and mixing with Eq. 2."""
    t1 = ref_translate(s1, dy, dx)
    m = ref_mask(s0, t1)
    return float((s0 * m + t1 * (1 - m)).sum())


def ref_sage(x, labels, saliency, perm, lam, shifts, num_classes, *, factor=1, kernel_size=5,
             sigma=1.0, rearrange=True, soft=True, smoothing=0.0):
    """Algorithm 1 for every pair, one at a time; returns mixed x, mask, shift, gamma, targets."""
    x = x.double().numpy()
    sal = saliency.double().numpy()
    n, _, h, w = x.shape
    maps = [ref_normalize(ref_smooth(sal[i], kernel_size, sigma)) for i in range(n)]
    w0, w1 = max(lam, 1e-12), max(1 - lam, 1e-12)
    mixed, masks, chosen, gammas = [], [], [], []
    for i in range(n):
        j = int(perm[i])
        s0, s1 = w0 * maps[i], w1 * maps[j]
        if rearrange:
            g0, g1 = (m.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
                      for m in (s0, s1))
            scores = [ref_score(g0, g1, dy, dx) for dy, dx in shifts.tolist()]
            dy, dx = (factor * v for v in shifts[int(np.argmax(scores))].tolist())
        else:
            dy, dx = 0, 0
        m = ref_mask(s0, ref_translate(s1, dy, dx))
        if not soft:
            m = (m > 0.5).astype(np.float64)
        mixed.append(m * x[i] + (1 - m) * ref_translate(x[j], dy, dx))
        masks.append(m)
        chosen.append((dy, dx))
        gammas.append(m.mean())
    targets = np.zeros((n, num_classes))
    for i in range(n):
        targets[i, int(labels[i])] += gammas[i]
        targets[i, int(labels[perm[i]])] += 1 - gammas[i]
    targets = targets * (1 - smoothing) + smoothing / num_classes
    return (np.stack(mixed), np.stack(masks)[:, None], np.array(chosen), np.array(gammas), targets)


def batch(n=4, c=3, h=12, w=12, dtype=torch.float32, seed=0, saliency_size=None):
    """Images, labels and gradient-like saliency: one blob per image, times speckle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).clamp_(-4, 4).to(dtype)
    labels = torch.randint(0, 5, (n,), generator=g)
    sh, sw = saliency_size or (h, w)
    yy = torch.arange(sh, dtype=torch.float32)[:, None]
    xx = torch.arange(sw, dtype=torch.float32)[None, :]
    centre = torch.rand(n, 2, generator=g) * torch.tensor([sh, sw])
    blobs = torch.exp(-((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2)
                      / (2 * (sh / 5) ** 2))
    sal = (blobs + 0.02) * torch.rand(n, sh, sw, generator=g)
    return x, labels, sal


# ------------------------------------------------------------------------ building blocks

@pytest.mark.parametrize("kernel_size, sigma", [(5, 1.0), (3, 0.7), (7, 2.0)])
def test_smooth_is_the_reflect_padded_gaussian_blur(kernel_size, sigma):
    """smooth() = the Gaussian of its definition with reflect padding, and = torchvision's
    GaussianBlur, which the authors' code applies."""
    s = torch.rand(3, 9, 11)
    out = smooth(s, kernel_size, sigma)
    ref = np.stack([ref_smooth(m, kernel_size, sigma) for m in s.double().numpy()])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    tv = gaussian_blur(s[:, None], [kernel_size, kernel_size], [sigma, sigma])[:, 0]
    torch.testing.assert_close(out, tv, rtol=1e-5, atol=1e-6)


def test_normalize_makes_each_map_sum_to_one_and_an_empty_map_uniform():
    """Each map is divided by its sum; an all-zero map becomes uniform (no 0/0)."""
    s = torch.rand(3, 5, 6)
    s[1] = 0
    ref = np.stack([ref_normalize(m) for m in s.double().numpy()])
    out = normalize_(s.clone())
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)
    torch.testing.assert_close(out.sum(dim=(1, 2)), torch.ones(3))
    assert torch.all(out[1] == 1 / 30)


def test_random_shifts_draw_a_fraction_of_all_offsets_without_repeats():
    """K = int(fraction * (2h-1)(2w-1)) distinct in-range shifts (at least one); fraction 1 is
    every shift once."""
    g = torch.Generator().manual_seed(0)
    shifts = random_shifts(10, 7, 0.1, g)
    assert shifts.shape == (int(0.1 * 19 * 13), 2) and shifts.dtype == torch.int64
    assert len({tuple(v) for v in shifts.tolist()}) == len(shifts)
    assert shifts[:, 0].abs().max() <= 9 and shifts[:, 1].abs().max() <= 6
    every = random_shifts(4, 3, 1.0, g)
    assert sorted(map(tuple, every.tolist())) == [(dy, dx) for dy in range(-3, 4) for dx in range(-2, 3)]
    assert random_shifts(4, 3, 1e-6, g).shape == (1, 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_translation_with_zero_fill_matches_eq3(channels_last):
    """shifted_partner + zero_out_of_frame_ = Eq. 3 applied to x[perm], for shifts up to the
    full frame, including the partners at both ends of the batch's storage and a non-dense
    (sliced) batch."""
    x = torch.randn(5, 3, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    perm = torch.tensor([4, 0, 3, 1, 2])
    shift = torch.tensor([[6, -8], [-6, 8], [0, 0], [3, -2], [-1, 5]])
    ref = np.stack([ref_translate(x[int(p)].numpy(), *s) for p, s in zip(perm, shift.tolist())])
    out = zero_out_of_frame_(shifted_partner(x, perm, shift), shift)
    np.testing.assert_array_equal(out.numpy(), ref)
    sliced = x[:, :, 1:, 1:]                  # not dense: the per-pixel index path
    ref = np.stack([ref_translate(sliced[int(p)].numpy(), *s)
                    for p, s in zip(perm, (shift // 2).tolist())])
    out = zero_out_of_frame_(shifted_partner(sliced, perm, shift // 2), shift // 2)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_rearrangement_scores_are_eq4():
    """rearrangement_scores (overlap-only arithmetic) = Eq. 4 summed over the frame through the
    mask, for candidates from the zero shift to the farthest corners."""
    g = torch.Generator().manual_seed(1)
    s0, s1 = torch.rand(3, 6, 8, generator=g), torch.rand(3, 6, 8, generator=g)
    s0[0, :3] = 0                            # zeros in both: the clamp's case
    s1[0, :, :4] = 0
    shifts = torch.tensor([[0, 0], [5, 7], [-5, -7], [2, -3], [-1, 6], [5, -7]])
    out = rearrangement_scores(s0 * 0.3, s1 * 0.7, shifts)
    ref = [[ref_score(0.3 * a, 0.7 * b, dy, dx) for dy, dx in shifts.tolist()]
           for a, b in zip(s0.double().numpy(), s1.double().numpy())]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)


def test_rearrangement_scores_leave_their_inputs_untouched():
    """The scores work on copies (laid out (h, w, N)), also for a single map, where that
    layout is the input's own."""
    for n in (1, 3):
        s0, s1 = torch.rand(n, 5, 7), torch.rand(n, 5, 7)
        before = s0.clone(), s1.clone()
        out = rearrangement_scores(s0, s1, torch.tensor([[0, 0], [2, -3], [-4, 6]]))
        assert torch.equal(s0, before[0]) and torch.equal(s1, before[1])
        ref = [[ref_score(a, b, dy, dx) for dy, dx in ((0, 0), (2, -3), (-4, 6))]
               for a, b in zip(before[0].double().numpy(), before[1].double().numpy())]
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)


def test_mixing_mask_is_eq2_and_one_where_the_partner_has_no_saliency():
    """M = s0 / (s0 + t1); where t1 = 0 (out of the partner's frame) M is exactly 1, also
    where s0 = 0 too (the documented 0/0 convention)."""
    s0, t1 = torch.rand(2, 1, 5, 5), torch.rand(2, 1, 5, 5)
    t1[:, :, :2] = 0
    s0[:, :, 0] = 0
    m = mixing_mask_(s0.clone(), t1.clone())
    expected = ref_mask(s0.double().numpy(), t1.double().numpy())
    expected[:, :, 0] = 1
    np.testing.assert_allclose(m.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert torch.all(m[:, :, :2] == 1)


# ----------------------------------------------------------------------------- the mixer

@pytest.mark.parametrize("size, factor, mixer_kw", [
    (12, 1, {}),                                            # small image: full-res search
    (20, 4, {"search_size": 5, "full_res_search": 0}),      # coarse 5 x 5 grid, shift x 4
    (12, 1, {"label_smoothing": 0.1, "kernel_size": 3, "sigma": 0.5}),
])
def test_mix_matches_the_reference_in_float32(size, factor, mixer_kw):
    """Mixed images, mask, chosen shift, gamma and soft targets equal Algorithm 1 computed pair
    by pair (smoothing, normalisation, lambda rescaling, Eq. 4 search, Eq. 2 mask, Eq. 3)."""
    x, labels, sal = batch(h=size, w=size)
    perm, lam = torch.tensor([2, 0, 3, 1]), 0.35
    mixer = SAGE(5, **mixer_kw)
    assert mixer.search_factor(size, size) == factor
    shifts = random_shifts(size // factor, size // factor, 0.3, torch.Generator().manual_seed(3))
    ref = ref_sage(x, labels, sal, perm, lam, shifts, 5, factor=factor,
                   kernel_size=mixer.kernel_size, sigma=mixer.sigma,
                   smoothing=mixer.label_smoothing)
    out = x.clone()
    res = mixer.mix(out, labels, sal, perm=perm, lam=lam, shifts=shifts)
    np.testing.assert_array_equal(res.shift.numpy(), ref[2])
    assert res.shift.abs().max() > 0                       # the search did move something
    np.testing.assert_allclose(res.mask.numpy(), ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.weight.numpy(), ref[3], rtol=1e-5)
    np.testing.assert_allclose(res.targets.numpy(), ref[4], rtol=1e-5, atol=1e-6)
    assert torch.equal(res.perm, perm)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_mix_matches_the_reference_in_half_precision(dtype, atol):
    """In float16/bfloat16 (images and saliency) the maps stay float32: shift, mask and gamma
    equal the reference on the same rounded inputs; images agree to the dtype's rounding."""
    x, labels, sal = batch(h=12, w=12, dtype=dtype)
    sal = sal.to(dtype)
    perm, lam = torch.tensor([1, 2, 3, 0]), 0.2
    shifts = random_shifts(12, 12, 0.3, torch.Generator().manual_seed(4))
    ref = ref_sage(x.float(), labels, sal.float(), perm, lam, shifts, 5)
    out = x.clone()
    res = SAGE(5).mix(out, labels, sal, perm=perm, lam=lam, shifts=shifts)
    assert out.dtype == dtype
    np.testing.assert_array_equal(res.shift.numpy(), ref[2])
    np.testing.assert_allclose(res.mask.numpy(), ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.double().numpy(), ref[0], rtol=0, atol=atol)
    np.testing.assert_allclose(res.weight.numpy(), ref[3], rtol=1e-5)


def test_soft_targets_are_non_negative_and_sum_to_one():
    """Every row of the targets is a distribution (with label smoothing too), weights in [0, 1]."""
    x, labels, sal = batch(n=8, h=16, w=16)
    for smoothing in (0.0, 0.2):
        res = SAGE(5, label_smoothing=smoothing).mix(x.clone(), labels, sal,
                                                     generator=torch.Generator().manual_seed(0))
        assert torch.all(res.targets >= 0)
        torch.testing.assert_close(res.targets.sum(dim=1), torch.ones(8))
        assert torch.all((res.weight >= 0) & (res.weight <= 1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_mixes_in_place_in_the_input_storage(channels_last):
    """The batch is mixed in its own storage (same data_ptr), channels-last stays channels-last,
    and the images did change."""
    x, labels, sal = batch(h=16, w=16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before, ptr = x.clone(), x.data_ptr()
    SAGE(5)(x, labels, sal, generator=torch.Generator().manual_seed(0))
    assert x.data_ptr() == ptr
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert not torch.equal(x, before)


def test_a_fixed_generator_reproduces_a_run_exactly():
    """Same seed: identical images and results; another seed draws another mix."""
    x, labels, sal = batch(n=8, h=20, w=20)
    runs = []
    for seed in (7, 7, 8):
        out = x.clone()
        res = SAGE(5, search_fraction=0.05).mix(out, labels, sal,
                                                generator=torch.Generator().manual_seed(seed))
        runs.append((out, res))
    (a, ra), (b, rb), (c, rc) = runs
    assert torch.equal(a, b) and torch.equal(ra.targets, rb.targets)
    assert torch.equal(ra.perm, rb.perm) and torch.equal(ra.shift, rb.shift)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("mixer_kw, size", [({}, 14), ({"search_size": 6, "full_res_search": 0}, 24)])
def test_the_chosen_shift_is_the_best_of_its_candidates(mixer_kw, size):
    """Brute force: the chosen shift's Eq. 4 score (on the search grid) is the maximum over the
    candidate set, for every pair."""
    x, labels, sal = batch(n=6, h=size, w=size, seed=5)
    mixer = SAGE(5, **mixer_kw)
    f = mixer.search_factor(size, size)
    shifts = random_shifts(size // f, size // f, 0.2, torch.Generator().manual_seed(6))
    perm, lam = torch.tensor([5, 3, 4, 0, 1, 2]), 0.4
    res = mixer.mix(x.clone(), labels, sal, perm=perm, lam=lam, shifts=shifts)
    maps = normalize_(smooth(sal)).double()
    grid = F.avg_pool2d(maps[:, None], f)[:, 0].numpy()
    for i, j in enumerate(perm.tolist()):
        scores = [ref_score(lam * grid[i], (1 - lam) * grid[j], dy, dx) for dy, dx in shifts.tolist()]
        chosen = ref_score(lam * grid[i], (1 - lam) * grid[j], *(res.shift[i] // f).tolist())
        assert (res.shift[i] // f).tolist() in shifts.tolist()
        assert chosen >= max(scores) * (1 - 1e-6)


def test_the_coarse_search_moves_two_overlapping_blobs_apart():
    """Both images have one salient blob in the same place (96 px, searched on a 24 px grid):
    the chosen shift separates the blobs and keeps the partner's blob in frame, so the mask
    keeps each object from its own image."""
    n, size, sigma = 2, 96, 5.0
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    blob = torch.exp(-((yy - 48) ** 2 + (xx - 48) ** 2) / (2 * sigma ** 2))
    sal = blob.expand(n, size, size).clone()
    x = torch.zeros(n, 3, size, size)
    mixer = SAGE(5, search_size=24, full_res_search=64, search_fraction=1.0)
    assert mixer.search_factor(size, size) == 4
    res = mixer.mix(x, torch.tensor([0, 1]), sal, perm=torch.tensor([1, 0]), lam=0.5)
    for (dy, dx), m in zip(res.shift.tolist(), res.mask[:, 0]):
        assert math.hypot(dy, dx) >= 4 * sigma                  # the blobs no longer overlap
        assert 0 <= 48 + dy < size and 0 <= 48 + dx < size      # the partner's blob is in frame
        assert m[48, 48] > 0.99 and m[48 + dy, 48 + dx] < 0.01  # each object from its image


def test_without_rearrangement_the_shift_is_zero():
    """SAGE w/o OR: shift 0 for every pair, and the mix is Algorithm 1 at shift 0."""
    x, labels, sal = batch()
    perm, lam = torch.tensor([3, 2, 1, 0]), 0.3
    out = x.clone()
    res = SAGE(5, rearrange=False).mix(out, labels, sal, perm=perm, lam=lam)
    assert torch.equal(res.shift, torch.zeros(4, 2, dtype=torch.int64))
    ref = ref_sage(x, labels, sal, perm, lam, None, 5, rearrange=False)
    np.testing.assert_allclose(out.numpy(), ref[0], rtol=1e-5, atol=1e-5)


def test_without_soft_mask_the_mask_is_binary_from_the_more_salient_image():
    """SAGE w/o SM: M is 0/1, = (Eq. 2 mask > 0.5), gamma is its mean, the image takes each
    pixel whole from one of the two."""
    x, labels, sal = batch()
    perm, lam = torch.tensor([1, 0, 3, 2]), 0.45
    shifts = random_shifts(12, 12, 0.2, torch.Generator().manual_seed(2))
    out = x.clone()
    res = SAGE(5, soft_mask=False).mix(out, labels, sal, perm=perm, lam=lam, shifts=shifts)
    assert set(res.mask.unique().tolist()) <= {0.0, 1.0} and 0 < res.mask.mean() < 1
    ref = ref_sage(x, labels, sal, perm, lam, shifts, 5, soft=False)
    np.testing.assert_array_equal(res.mask.numpy(), ref[1])
    np.testing.assert_allclose(out.numpy(), ref[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.weight.numpy(), ref[3], rtol=1e-6)


def test_all_zero_saliency_counts_as_uniform():
    """Documented fallback: all-zero maps are uniform, so without a shift SAGE is Mixup with
    weight lam (no NaN); one empty map among others changes nothing for the rest."""
    x, labels, sal = batch()
    perm, lam = torch.tensor([1, 0, 3, 2]), 0.3
    out = x.clone()
    res = SAGE(5, rearrange=False).mix(out, labels, torch.zeros_like(sal), perm=perm, lam=lam)
    torch.testing.assert_close(res.mask, torch.full_like(res.mask, lam))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x[perm])
    sal[2] = 0
    out = x.clone()
    res = SAGE(5).mix(out, labels, sal, perm=perm, lam=lam, shifts=torch.tensor([[1, -2], [0, 3]]))
    ref = ref_sage(x, labels, sal, perm, lam, torch.tensor([[1, -2], [0, 3]]), 5)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), ref[0], rtol=1e-5, atol=1e-5)


def test_saliency_of_another_size_is_resized_bilinearly():
    """A (N, 6, 6) map for 12 px images gives the same mix as the map resized (bilinear) first."""
    x, labels, small = batch(saliency_size=(6, 6))
    resized = F.interpolate(small[:, None], size=(12, 12), mode="bilinear", align_corners=False)[:, 0]
    kw = dict(perm=torch.tensor([2, 3, 0, 1]), lam=0.25, shifts=torch.tensor([[2, 1], [-3, 0]]))
    a, b = x.clone(), x.clone()
    ra, rb = SAGE(5).mix(a, labels, small, **kw), SAGE(5).mix(b, labels, resized, **kw)
    assert torch.equal(a, b) and torch.equal(ra.mask, rb.mask)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_extreme_lambda_keeps_both_maps_alive(lam):
    """lam = 0 or 1: the rescaling is floored at 1e-12 (the authors' clip), so no NaN, and at
    shift 0 the mix is all partner resp. all anchor (M and gamma 0 resp. 1)."""
    x, labels, sal = batch()
    out = x.clone()
    res = SAGE(5).mix(out, labels, sal, perm=torch.tensor([1, 0, 3, 2]), lam=lam,
                      shifts=torch.tensor([[0, 0]]))
    assert torch.isfinite(out).all() and torch.isfinite(res.targets).all()
    np.testing.assert_allclose(res.mask.numpy(), lam, atol=1e-6)
    np.testing.assert_allclose(res.weight.numpy(), lam, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), (x if lam else x[[1, 0, 3, 2]]).numpy(), atol=1e-5)


@pytest.mark.parametrize("chunk_maps", [1, 3])
@pytest.mark.parametrize("channels_last, dtype, atol", [(False, torch.float32, 1e-5),
                                                        (True, torch.float32, 1e-5),
                                                        (True, torch.float16, 2e-3)])
def test_chunked_work_matches_the_reference(monkeypatch, chunk_maps, channels_last, dtype, atol):
    """With the full-resolution work split into chunks of 1 or 3 maps (partners in other
    chunks, a last partial chunk) and channels-last batches (the weight spread over channels),
    the mix still equals Algorithm 1; a second call reuses the scratch and equals it too."""
    import mixing.sage as sage
    size = 16
    monkeypatch.setattr(sage, "CHUNK_BYTES", chunk_maps * 4 * size * size)
    x, labels, sal = batch(n=7, h=size, w=size, dtype=dtype, seed=9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    perm, lam = torch.tensor([6, 0, 5, 1, 4, 2, 3]), 0.3
    shifts = random_shifts(size, size, 0.2, torch.Generator().manual_seed(5))
    ref = ref_sage(x.float(), labels, sal, perm, lam, shifts, 5)
    mixer = SAGE(5)
    assert mixer._chunk(sal) == chunk_maps
    for _ in range(2):
        out = x.clone()
        res = mixer.mix(out, labels, sal, perm=perm, lam=lam, shifts=shifts)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        np.testing.assert_array_equal(res.shift.numpy(), ref[2])
        np.testing.assert_allclose(res.mask.numpy(), ref[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.double().numpy(), ref[0], rtol=1e-5, atol=atol)
        np.testing.assert_allclose(res.weight.numpy(), ref[3], rtol=1e-5)


def test_results_do_not_share_the_scratch_and_threads_are_restored():
    """A result's mask is its own tensor (the next mix does not change it), the scratch is
    resized for a new batch shape, the thread setting is what it was, and a pickled or
    copied mixer carries no scratch."""
    import copy
    import pickle
    threads = torch.get_num_threads()
    mixer = SAGE(5)
    x, labels, sal = batch(n=6, h=20, w=20)
    first = mixer.mix(x.clone(), labels, sal, generator=torch.Generator().manual_seed(0))
    kept = first.mask.clone()
    mixer.mix(x.clone(), labels, sal, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first.mask, kept)
    x2, labels2, sal2 = batch(n=4, h=12, w=12)
    out = x2.clone()
    res = mixer.mix(out, labels2, sal2, perm=torch.tensor([1, 2, 3, 0]), lam=0.4,
                    shifts=torch.tensor([[1, 2], [-3, 0]]))
    ref = ref_sage(x2, labels2, sal2, torch.tensor([1, 2, 3, 0]), 0.4, torch.tensor([[1, 2], [-3, 0]]), 5)
    np.testing.assert_allclose(out.numpy(), ref[0], rtol=1e-5, atol=1e-5)
    assert res.mask.shape == (4, 1, 12, 12)
    assert torch.get_num_threads() == threads
    for clone in (pickle.loads(pickle.dumps(mixer)), copy.deepcopy(mixer)):
        assert "_scratch_buffers" not in clone.__dict__ and clone.u == mixer.u


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """On a GPU the same explicit draws give the CPU's result (the path is picked by device)."""
    x, labels, sal = batch(n=6, h=40, w=40)
    kw = dict(perm=torch.tensor([3, 4, 5, 0, 1, 2]), lam=0.3,
              shifts=random_shifts(40, 40, 0.05, torch.Generator().manual_seed(0)))
    cpu = x.clone()
    rc = SAGE(5).mix(cpu, labels, sal, **kw)
    gpu = x.cuda()
    rg = SAGE(5).mix(gpu, labels.cuda(), sal.cuda(), **{**kw, "perm": kw["perm"].cuda()})
    assert torch.equal(rg.shift.cpu(), rc.shift)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw, message", [
    ({"u": 0.0}, "u .* must lie in \\(0, 1\\]"),
    ({"u": 1.5}, "u .* must lie in \\(0, 1\\]"),
    ({"search_fraction": 0.0}, "search_fraction must lie in \\(0, 1\\]"),
    ({"search_fraction": 1.01}, "search_fraction must lie in \\(0, 1\\]"),
    ({"sigma": 0.0}, "sigma must be > 0"),
    ({"sigma": -1.0}, "sigma must be > 0"),
    ({"kernel_size": 4}, "kernel_size must be a positive odd int"),
    ({"kernel_size": 0}, "kernel_size must be a positive odd int"),
    ({"kernel_size": -3}, "kernel_size must be a positive odd int"),
    ({"kernel_size": 5.0}, "kernel_size must be a positive odd int"),
    ({"search_size": 0}, "search_size must be a positive int or None"),
    ({"full_res_search": -1}, "full_res_search must be an int >= 0"),
    ({"num_classes": 1}, "num_classes must be an int >= 2"),
])
def test_bad_hyperparameters_are_rejected(kw, message):
    """Each bad hyperparameter raises a ValueError naming it."""
    kw = {"num_classes": 5, **kw}
    with pytest.raises(ValueError, match=message):
        SAGE(**kw)


def _bad(x=None, labels=None, sal="default", mixer=None, **kw):
    bx, bl, bs = batch()
    return (mixer or SAGE(5)).mix(bx if x is None else x, bl if labels is None else labels,
                                  bs if isinstance(sal, str) else sal, **kw)


@pytest.mark.parametrize("call, message", [
    (lambda: _bad(x=torch.randn(3, 12, 12)), "4-D tensor"),
    (lambda: _bad(x=torch.randn(4, 3, 12, 12, dtype=torch.float64)), "float32, float16 or bfloat16"),
    (lambda: _bad(x=torch.zeros(4, 3, 12, 12, dtype=torch.uint8)), "float32, float16 or bfloat16"),
    (lambda: _bad(x=torch.randn(1, 3, 12, 12), labels=torch.tensor([0]), sal=torch.rand(1, 12, 12)),
     "at least 2 images"),
    (lambda: _bad(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])), "integer class indices"),
    (lambda: _bad(labels=torch.tensor([0, 1, 2, 9])), "labels must lie in"),
    (lambda: _bad(sal=None), "needs a saliency map"),
    (lambda: _bad(sal=torch.rand(5, 12, 12)), "saliency must have shape"),
    (lambda: _bad(sal=torch.rand(4, 12)), "saliency must have shape"),
    (lambda: _bad(sal=torch.ones(4, 12, 12, dtype=torch.int64)), "float tensor"),
    (lambda: _bad(sal=torch.full((4, 12, 12), float("nan"))), "NaN or inf"),
    (lambda: _bad(sal=torch.rand(4, 12, 12).index_fill_(1, torch.tensor([3]), float("inf"))), "NaN or inf"),
    (lambda: _bad(sal=-torch.rand(4, 12, 12)), "non-negative"),
    (lambda: _bad(x=torch.randn(4, 3, 2, 2), sal=torch.rand(4, 2, 2)), "too small for the 5 x 5"),
    (lambda: _bad(lam=1.5), "lam must lie in \\[0, 1\\]"),
    (lambda: _bad(perm=torch.tensor([0, 0, 1, 2])), "permutation"),
    (lambda: _bad(shifts=torch.tensor([1, 2])), "shifts must be a \\(K >= 1, 2\\)"),
    (lambda: _bad(shifts=torch.zeros(0, 2, dtype=torch.int64)), "shifts must be a \\(K >= 1, 2\\)"),
    (lambda: _bad(shifts=torch.tensor([[0.5, 1.0]])), "integer pixel offsets"),
    (lambda: _bad(shifts=torch.tensor([[12, 0]])), "within \\+-11 \\(dy\\)"),
    (lambda: _bad(shifts=torch.tensor([[0, 0]]), mixer=SAGE(5, rearrange=False)), "rearrange=False"),
])
def test_bad_input_is_rejected_with_a_clear_error(call, message):
    """Wrong ranks, shapes, dtypes, batch size 1, bad labels, missing / non-finite / negative
    saliency, images smaller than the kernel and bad explicit draws: ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        call()
