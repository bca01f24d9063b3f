"""SAGE: saliency-guided mixup with optimal rearrangements (Ma et al., 2022), in place on the batch.

Image ``i`` (the anchor ``x0 = x[i]``) is mixed with its partner ``x1 = x[perm[i]]``, shifted by
the translation that maximises the total saliency of the mix (Eq. 4), pixel by pixel in
proportion to the two smoothed saliency maps (Eq. 2, Algorithm 1)::

    s0 = lam * normalize(smooth(s[i])),   s1 = (1 - lam) * normalize(smooth(s[perm[i]]))
    tau = argmax over the candidate shifts of  sum over the frame of  s0 M + T(s1) (1 - M)
    M = s0 / (s0 + T(s1)),   x' = M x0 + (1 - M) T(x1),   gamma = mean(M)

``T`` translates with zero fill (Eq. 3). Where the paper is silent this follows the authors'
released code, github.com/SamsungLabs/SAGE, ``utils_SAGE.py`` (``sage``, ``normalize_grad``) and
``main.py`` (``train``, its SAGE branch):

- smoothing is torchvision's ``GaussianBlur(kernel_size=5, sigma=1)`` of the channel-reduced
  gradient map (a normalised Gaussian, reflect padding), applied before anything else;
- each smoothed map is divided by its sum, then multiplied by ``max(lam, 1e-12)`` (anchor) or
  ``max(1 - lam, 1e-12)`` (partner); ``lam`` is one draw per batch (``get_lambda() *
  upper_lambda``: U(0, u) in the paper's setting);
- the candidates are the first ``int(P * fraction)`` of a ``randperm`` of all
  ``P = (2h - 1)(2w - 1)`` offsets, one set for the whole batch; the zero shift is not forced in
  (the line that would add it is commented out);
- a candidate's score sums Eq. 4 over the anchor's frame only; the first maximum wins;
- the mask is ``s0 / clamp(s0 + T(s1), min=1e-16)`` and gamma its mean over the frame.

Two deliberate differences, both invisible wherever the smoothed maps are positive:

- an all-zero map (no gradient signal) counts as uniform; the authors' code divides by zero;
- where both maps are exactly 0, ``M = 1`` (the anchor's pixel), not 0 (the partner's pixel, or
  black out of frame): M is computed as ``1 - T(s1) / clamp(s0 + T(s1), min=1e-16)``, exactly 1
  wherever ``T(s1) = 0``. Out of the partner's frame its pixels therefore get weight exactly 0,
  so the image gather needs no zero fill (:func:`shifted_partner`).

For large images the search runs on the smoothed maps area-downsampled by an integer factor f
(at most ``search_size`` pixels a side); candidates are shifts on that grid, applied times f at
full resolution (for 224 px this picks the full-resolution search's shift for nearly every
pair: ``docs/design/mixing.md``). Images up to ``full_res_search`` pixels are searched at full
resolution.

How it runs, with the same formulas: on the CPU the mix uses one intra-op thread, the
full-resolution work goes over cache-sized chunks of the batch (:data:`CHUNK_BYTES`) and the
temporaries are scratch tensors kept between calls (:mod:`mixing.fastpath`); only the order of
some float32 sums in the search differs from a per-map sum (~2e-7 relative). The candidate
shifts are read on the host from the CPU generator's draws; nothing reads a device value.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .base import (MixResult, Mixer, check_batch, check_perm, check_saliency, generator_device,
                   is_int, random_perm, random_uniform, to_device)
from .fastpath import cpu_threads, new_empty

ZETA = 1e-16
"""Clamp on the mask's denominator (the authors' value)."""
MIN_SCALE = 1e-12
"""Floor on the ``lam`` and ``1 - lam`` rescaling, so no map vanishes (the authors' value)."""


def gaussian_kernel1d(kernel_size: int, sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """The normalised 1-D Gaussian of torchvision's ``GaussianBlur`` (float32, sums to 1)."""
    half = (kernel_size - 1) / 2
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size, device=device) / sigma) ** 2)
    return pdf / pdf.sum()


def smooth(saliency: torch.Tensor, kernel_size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian-blur each map of (N, H, W) with reflect padding, as ``GaussianBlur`` does.

    One depthwise convolution with the maps as channels (on the CPU faster than a one-channel
    convolution over a batch of maps).
    """
    n = saliency.shape[0]
    pad = kernel_size // 2
    k1 = gaussian_kernel1d(kernel_size, sigma, saliency.device)
    weight = torch.outer(k1, k1).expand(n, 1, kernel_size, kernel_size)
    padded = F.pad(saliency[None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, weight, groups=n)[0]


def normalize_(saliency: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scale each map of (N, H, W) to sum 1 (in place, or into ``out``); an all-zero map
    becomes uniform."""
    out = saliency if out is None else out
    total = saliency.sum(dim=(1, 2), keepdim=True)
    empty = total == 0
    uniform = empty.to(saliency.dtype).mul_(1.0 / saliency[0].numel())  # 1/(hw) if empty, else 0
    # uniform + saliency / total in one pass; no host-side test of which maps are empty
    return torch.addcdiv(uniform, saliency, total.masked_fill_(empty, 1.0), out=out)


def random_shifts(h: int, w: int, fraction: float, generator: torch.Generator | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """A random ``fraction`` (at least one) of the (2h-1)(2w-1) shifts of an h x w grid: (K, 2)
    int64 (dy, dx), without repeats, drawn on the generator's device and returned on
    ``device`` (default: there)."""
    ny, nx = 2 * h - 1, 2 * w - 1
    k = max(1, int(fraction * ny * nx))
    index = torch.randperm(ny * nx, generator=generator, device=generator_device(generator))
    index = index[:k] if device is None else to_device(index[:k], torch.device(device))
    return torch.stack((index // nx - (h - 1), index % nx - (w - 1)), dim=1)


Scratch = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]
"""``scratch(name, shape, dtype)``: an uninitialised tensor for a temporary of the search (the
mixer passes one that keeps them between calls)."""


def _fresh(like: torch.Tensor) -> Scratch:
    """The default :data:`Scratch`: a new tensor on ``like``'s device every time."""
    return lambda name, shape, dtype: like.new_empty(shape, dtype=dtype)


def rearrangement_scores(s0: torch.Tensor, s1: torch.Tensor, shifts: torch.Tensor,
                         scratch: Scratch | None = None) -> torch.Tensor:
    """Eq. 4, the total saliency of the mix of every pair ``(s0[i], s1[i])`` (N, h, w) for every
    candidate shift (K, 2) of ``s1``: (N, K).

    Per pixel, with ``t = T(s1)`` and M of Eq. 2, ``s0 M + t (1 - M) = s0 + t - 2 / (1/s0 + 1/t)``.
    The first term sums to the same for every shift, the second to the partner's mass left in
    the frame (:func:`mass_in_frame`), and the harmonic term is 0 wherever either map is 0
    (1/0 = inf): only the overlap of the two frames is computed, without a clamp or a translated
    copy. The loop runs over the candidates, each scored for the whole batch in three ops, on
    the maps laid out (h, w, N): an overlap is then rows of ``ow * N`` contiguous values (in
    (N, h, w) rows of only ``ow``: a slower add). The loop reads the candidates on the host:
    pass ``shifts`` on the CPU (on a device they are copied to the host first, a sync).
    """
    n, h, w = s0.shape
    scratch = scratch or _fresh(s0)
    inv0 = _pixels_outer(s0, scratch("inv0", (h * w, n), s0.dtype)).reciprocal_()
    inv1 = _pixels_outer(s1, scratch("inv1", (h * w, n), s0.dtype)).reciprocal_()
    harmonic = s0.new_empty(len(shifts), n)
    work = scratch("work", (s0.numel(),), s0.dtype)
    row = w * n                                  # one view per operand: fewer calls per candidate
    for out, (dy, dx) in zip(harmonic.unbind(0), shifts.cpu().tolist()):
        rows, run = h - abs(dy), (w - abs(dx)) * n
        a = inv0.as_strided((rows, run), (row, 1), inv0.storage_offset() + max(dy, 0) * row + max(dx, 0) * n)
        b = inv1.as_strided((rows, run), (row, 1), inv1.storage_offset() + max(-dy, 0) * row + max(-dx, 0) * n)
        pair = torch.add(a, b, out=work.as_strided((rows, run), (run, 1))).reciprocal_()
        torch.sum(pair.view(-1, n), dim=0, out=out)
    mass = mass_in_frame(s1, to_device(shifts, s0.device), scratch)
    return s0.sum(dim=(1, 2))[:, None] + mass - 2 * harmonic.T


def _pixels_outer(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> its copy laid out (h, w, N), in ``out`` (h * w, N) (a blocked 2-D transpose)."""
    n, h, w = s.shape
    return out.copy_(s.reshape(n, h * w).t()).view(h, w, n)  # into 2-D: ATen's blocked transpose


def mass_in_frame(s: torch.Tensor, shifts: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """``sum(T(s[i], shift))`` for every map (N, h, w) and shift (K, 2): (N, K), from an integral
    image (float64: no cancellation)."""
    n, h, w = s.shape
    integral = (scratch or _fresh(s))("integral", (n, h + 1, w + 1), torch.float64)
    integral[:, 0].zero_()
    integral[:, 1:, 0].zero_()
    inner = integral[:, 1:, 1:]
    inner.copy_(s).cumsum_(2).cumsum_(1)                    # rows first: the contiguous scan
    dy, dx = shifts[:, 0], shifts[:, 1]
    r0, r1 = (-dy).clamp(min=0), h - dy.clamp(min=0)
    c0, c1 = (-dx).clamp(min=0), w - dx.clamp(min=0)
    corners = torch.cat((r1 * (w + 1) + c1, r0 * (w + 1) + c0, r0 * (w + 1) + c1, r1 * (w + 1) + c0))
    i11, i00, i01, i10 = integral.view(n, -1).index_select(1, corners).view(n, 4, -1).unbind(1)
    return (i11 + i00 - i01 - i10).to(s.dtype)


def shifted_partner(x: torch.Tensor, perm: torch.Tensor, shift: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[perm]`` (N, C, H, W) translated by ``shift`` (N, 2) in one gather: ``out[i, :, r, c]``
    is ``x[perm[i], :, r - dy, c - dx]`` where that lies in the frame, arbitrary elsewhere.

    A translated image of a dense (NCHW or channels-last) batch is the same memory read from a
    shifted start, so each partner is one window of ``x``'s storage and the gather runs at copy
    speed, twice as fast as a gather by pixel index on CPU. The windows of ``x[0]`` and
    ``x[-1]`` can run past the storage; those two partners are gathered by index. ``out``
    (optional) receives the result; it must have ``x``'s shape and layout.
    """
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        gathered = _index_gather(x, perm, shift)
        return gathered if out is None else out.copy_(gathered)
    n, size = x.shape[0], x[0].numel()
    windows = x.as_strided((x.numel() - size + 1, *x.shape[1:]), (1, *x.stride()[1:]),
                           x.storage_offset())
    start = perm * x.stride(0) - shift[:, 0] * x.stride(2) - shift[:, 1] * x.stride(3)
    start = start.clamp_(0, (n - 1) * size)
    if out is None:
        out = windows[start]
    else:
        torch.index_select(windows, 0, start, out=out)
    ends = torch.argsort(perm)[::max(n - 1, 1)]   # the images whose partner is x[0] or x[-1]
    out[ends] = _index_gather(x, perm[ends], shift[ends])
    return out


def _index_gather(x: torch.Tensor, source: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x[source]`` translated by ``shift``, by pixel index (out of frame: the nearest edge)."""
    _, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device) - shift[:, :1]).clamp_(0, h - 1)
    cols = (torch.arange(w, device=x.device) - shift[:, 1:]).clamp_(0, w - 1)
    channels = torch.arange(c, device=x.device)
    return x[source[:, None, None, None], channels[:, None, None], rows[:, None, :, None],
             cols[:, None, None, :]]


def zero_out_of_frame_(z: torch.Tensor, shift: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In place: zero what a translation of ``z`` (N, C, H, W) by ``shift`` (N, 2) brought in from
    outside the frame (completing :func:`shifted_partner` to Eq. 3), and scale the rest."""
    h, w = z.shape[-2:]
    rows = torch.arange(h, device=z.device) - shift[:, :1]
    cols = torch.arange(w, device=z.device) - shift[:, 1:]
    z.mul_((((rows >= 0) & (rows < h)) * scale).to(z.dtype)[:, None, :, None])
    return z.mul_(((cols >= 0) & (cols < w)).to(z.dtype)[:, None, None, :])


def mixing_mask_(s0: torch.Tensor, t1: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2, ``M = s0 / (s0 + t1)``, computed as ``1 - t1 / clamp(s0 + t1, ZETA)``: exactly 1
    wherever ``t1 = 0``. Overwrites ``s0``; returns M in ``out``, by default ``t1``'s storage."""
    den = s0.add_(t1).clamp_(min=ZETA)
    one = torch.ones((), dtype=t1.dtype, device=t1.device)
    return torch.addcdiv(one, t1, den, value=-1.0, out=t1 if out is None else out)  # 1 pass


CHUNK_BYTES = 2 << 20
"""On the CPU, the full-resolution work runs over chunks of the batch whose maps take about
this many bytes, so each chunk's temporaries stay in cache between the passes over them."""


class SAGE(Mixer):
    """SAGE (Ma et al., 2022), in place on the batch; needs the gradient saliency.

    Args:
        u: ``lam ~ U(0, u)``, one draw per batch, weighs the anchor's saliency against the
            partner's (paper: 0.5-0.7).
        sigma, kernel_size: the Gaussian smoothing of the saliency maps (paper: 1, 5).
        search_fraction: share of all (2h-1)(2w-1) shifts searched, one random set per batch
            (paper: 1 %).
        search_size: images above ``full_res_search`` px are searched on maps area-downsampled
            by the smallest integer factor that brings them to at most this size; None searches
            at full resolution. Default 32: see the module docstring for why.
        full_res_search: images whose longer side is at most this are searched at full
            resolution.
        rearrange: False is the "SAGE w/o OR" ablation: no search, shift 0.
        soft_mask: False is the "SAGE w/o SM" ablation: ``M > 0.5``, each pixel from the more
            salient image.

    Saliency maps (N, h, w) of another size than the images are resized to them (bilinear).
    """

    saliency_kind = "gradient"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, *, u: float = 0.5,
                 sigma: float = 1.0, kernel_size: int = 5, search_fraction: float = 0.01,
                 search_size: int | None = 32, full_res_search: int = 64, rearrange: bool = True,
                 soft_mask: bool = True) -> None:
        super().__init__(num_classes, label_smoothing)
        if not 0.0 < u <= 1.0:
            raise ValueError(f"u (the upper bound of lam) must lie in (0, 1], got {u}")
        if not 0.0 < search_fraction <= 1.0:
            raise ValueError(f"search_fraction must lie in (0, 1], got {search_fraction}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if search_size is not None and not (is_int(search_size) and search_size >= 1):
            raise ValueError(f"search_size must be a positive int or None, got {search_size!r}")
        if not is_int(full_res_search) or full_res_search < 0:
            raise ValueError(f"full_res_search must be an int >= 0, got {full_res_search!r}")
        self.u, self.sigma, self.kernel_size = float(u), float(sigma), kernel_size
        self.search_fraction, self.search_size = float(search_fraction), search_size
        self.full_res_search, self.rearrange, self.soft_mask = full_res_search, rearrange, soft_mask

    def mix(self, x: torch.Tensor, labels: torch.Tensor, saliency: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, perm: torch.Tensor | None = None,
            lam: float | None = None, shifts: torch.Tensor | None = None) -> MixResult:
        """Mix ``x`` in place. Explicit draws: ``perm``, ``lam`` and the candidate ``shifts``
        (K, 2) int64 (dy, dx) in pixels of the search grid (:meth:`search_factor`)."""
        with cpu_threads(x.device):
            check_batch(x, labels, self.num_classes)
            n, _, h, w = x.shape
            if min(h, w) <= self.kernel_size // 2:
                raise ValueError(f"images of {h} x {w} px are too small for the {self.kernel_size} x "
                                 f"{self.kernel_size} smoothing kernel (reflect padding)")
            s = check_saliency(saliency, x)
            if s.shape[-2:] != (h, w):
                s = F.interpolate(s[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            perm = random_perm(n, x.device, generator) if perm is None else check_perm(perm, n, x.device)
            lam = self._lam(lam, generator)
            w0, w1 = max(lam, MIN_SCALE), max(1.0 - lam, MIN_SCALE)
            if not self.rearrange and shifts is not None:
                raise ValueError("shifts were given, but rearrange=False (SAGE w/o OR) searches none")
            factor = self.search_factor(h, w) if self.rearrange else 0
            chunk = self._chunk(s)
            padded, grid = self._smoothed_maps(s, factor, chunk)
            shift = self._search(grid, factor, w0, w1, perm, shifts, generator)
            mask, gamma = self._mask_and_blend(x, padded, perm, shift, w0, w1, chunk)
            targets = self._targets(labels, perm, gamma)
        return MixResult(targets, perm, gamma, mask, shift)

    def search_factor(self, h: int, w: int) -> int:
        """The integer factor by which the search grid is coarser than h x w images."""
        if self.search_size is None or max(h, w) <= self.full_res_search:
            return 1
        return min(math.ceil(max(h, w) / self.search_size), h, w)

    def _lam(self, lam: float | None, generator: torch.Generator | None) -> float:
        if lam is None:
            return self.u * random_uniform(generator)
        lam = float(lam)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        return lam

    def _chunk(self, s: torch.Tensor) -> int:
        """How many maps (N, H, W) one chunk of the full-resolution work takes."""
        n, h, w = s.shape
        return max(1, min(n, CHUNK_BYTES // (4 * h * w))) if s.device.type == "cpu" else n

    def _smoothed_maps(self, s: torch.Tensor, factor: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Smoothed, normalised maps of (N, H, W) ``s``, and the search grid (None if ``factor``
        is 0, no search).

        The maps are returned inside a zero margin of one map on each side, (N + 2, H, W), so
        that every translated window of them lies in the storage (:meth:`_mask_and_blend`).
        """
        n, h, w = s.shape
        padded = self._scratch("maps", (n + 2, h, w), torch.float32, s.device)
        padded[0].zero_()
        padded[-1].zero_()
        maps = padded[1:-1]
        grid = maps if factor == 1 else s.new_empty(n, h // factor, w // factor) if factor else None
        for lo in range(0, n, chunk):
            part = normalize_(smooth(s[lo:lo + chunk], self.kernel_size, self.sigma), out=maps[lo:lo + chunk])
            if factor > 1:
                grid[lo:lo + chunk] = F.avg_pool2d(part[:, None], factor)[:, 0]
        return padded, grid

    def _search(self, grid: torch.Tensor | None, factor: int, w0: float, w1: float, perm: torch.Tensor,
                shifts: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """The best shift of each pair, (N, 2) int64 in pixels at full resolution."""
        n = perm.shape[0]
        if grid is None:
            return torch.zeros(n, 2, dtype=torch.int64, device=perm.device)
        gh, gw = grid.shape[-2:]
        if shifts is None:  # drawn on the generator's device: the CPU's for a CPU generator
            shifts = random_shifts(gh, gw, self.search_fraction, generator)
        else:
            shifts = _check_shifts(shifts, gh, gw)
        def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return self._scratch(f"search_{name}", shape, dtype, grid.device)
        s0 = torch.mul(grid, w0, out=scratch("s0", tuple(grid.shape), grid.dtype))
        s1 = torch.index_select(grid, 0, perm, out=scratch("s1", tuple(grid.shape), grid.dtype)).mul_(w1)
        scores = rearrangement_scores(s0, s1, shifts, scratch)
        return to_device(shifts, grid.device)[scores.argmax(dim=1)] * factor

    def _mask_and_blend(self, x: torch.Tensor, padded: torch.Tensor, perm: torch.Tensor,
                        shift: torch.Tensor, w0: float, w1: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2 and 3 at full resolution: the mask M (N, 1, H, W) float32 and gamma (N,), with
        ``x`` blended in place, chunk by chunk of the batch.

        The partners are gathered whole first (a chunk's partners may lie in chunks already
        blended). Each chunk's translated partner maps are one window gather from the padded
        maps (out of frame it reads margin or neighbouring maps, which the frame zeroing
        multiplies by 0), then M, the blend weight ``1 - M`` and gamma stay in cache. For a
        channels-last batch on the CPU the weight is first copied out across the channels: a
        lerp with a per-pixel weight broadcast over 3 innermost channel values runs several times
        slower than with a dense one, by more than the copy costs.
        """
        n, c, h, w = x.shape
        channels_last = c > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format  # x's own
        lanes = channels_last and x.device.type == "cpu"
        partner = shifted_partner(x, perm, shift, out=self._scratch("partner", tuple(x.shape), x.dtype,
                                                                      x.device, layout))
        maps = padded[1:-1]
        size = h * w
        windows = padded.as_strided(((n + 1) * size + 1, h, w), (1, w, 1), padded.storage_offset())
        start = (perm + 1) * size - shift[:, 0] * w - shift[:, 1]
        mask = new_empty((n, 1, h, w), torch.float32, x.device)
        gamma = torch.empty(n, dtype=torch.float32, device=x.device)
        b = min(chunk, n)
        t1 = self._scratch("chunk_t1", (b, 1, h, w), torch.float32, x.device)
        s0 = self._scratch("chunk_s0", (b, 1, h, w), torch.float32, x.device)
        spread = self._scratch("chunk_spread", (b, h, w, c), x.dtype, x.device) if lanes else None
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            part_t1, part_s0, m = t1[:hi - lo], s0[:hi - lo], mask[lo:hi]
            torch.index_select(windows, 0, start[lo:hi], out=part_t1[:, 0])
            zero_out_of_frame_(part_t1, shift[lo:hi], scale=w1)
            torch.mul(maps[lo:hi, None], w0, out=part_s0)
            mixing_mask_(part_s0, part_t1, out=m)
            if not self.soft_mask:
                m.copy_(m > 0.5)
            away = torch.sub(1, m, out=part_t1)              # the partner's weight, 1 - M
            if lanes:
                away = spread[:hi - lo].copy_(away[:, 0, :, :, None].expand(-1, -1, -1, c)).permute(0, 3, 1, 2)
            x[lo:hi].lerp_(partner[lo:hi], away.to(x.dtype))
            torch.mean(m, dim=(1, 2, 3), out=gamma[lo:hi])
        return mask, gamma


def _check_shifts(shifts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Validate an explicit candidate set, (K >= 1, 2) integer (dy, dx) on the h x w grid, and
    return it on the CPU (where the search reads it)."""
    if not isinstance(shifts, torch.Tensor) or shifts.dim() != 2 or shifts.shape[0] < 1 \
            or shifts.shape[1] != 2:
        raise ValueError(f"shifts must be a (K >= 1, 2) tensor of (dy, dx), got "
                         f"{tuple(getattr(shifts, 'shape', ())) or type(shifts).__name__}")
    if shifts.is_floating_point() or shifts.is_complex() or shifts.dtype == torch.bool:
        raise ValueError(f"shifts must be integer pixel offsets, got {shifts.dtype}")
    shifts = shifts.to(device="cpu", dtype=torch.int64)
    if (shifts[:, 0].abs() >= h).any() or (shifts[:, 1].abs() >= w).any():
        lo, hi = shifts.min(dim=0).values.tolist(), shifts.max(dim=0).values.tolist()
        raise ValueError(f"shifts must lie within +-{h - 1} (dy) and +-{w - 1} (dx) on the "
                         f"{h} x {w} search grid, got dy in [{lo[0]}, {hi[0]}], dx in [{lo[1]}, {hi[1]}]")
    return shifts

