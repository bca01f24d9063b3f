"""Saliency Grafting (Park et al., AAAI 2022): graft randomly sampled salient regions of one
image onto another and mix the labels by the saliency each image keeps (sections 4.1-4.3).

Per batch: the saliency map (N, h, w) is resampled to a g x g grid (g drawn from
``grid_sizes``); softmax with temperature T over the grid, thresholded at k times its mean,
gives the eligible regions; a region-wise Bernoulli(p), p ~ Beta(alpha, alpha), keeps some of
them. That binary mask M picks image i's pixels, the rest come from its partner j = perm[i],
and the label weight of image i is Eq. 5:
``lambda = I(S_i, M) / (I(S_i, M) + I(S_j, 1 - M))`` with ``I(S, M) = ||S * M||_2 / ||S||_2``.

Where the paper is silent this module chooses, and the functions below document:

* resampling to the grid: adaptive average pooling (a region's saliency is the mean of the
  feature cells it overlaps), for up- and down-sampling alike;
* the softmax acts on the map min-max normalised per image, so T works on a fixed [0, 1]
  range whatever the layer's scale (on raw feature sums, T = 0.2 would always be one-hot);
* the label formula uses the same grid-level map S (not the softmax S');
* guards: a flat map (e.g. all zero) makes every region eligible, counts as uniform saliency
  in Eq. 5, and a 0/0 in Eq. 5 falls back to the area share of the mask.

On the CPU the work on the grid (tiny ops) and the partner gather run on one intra-op thread
and the gather writes into a scratch tensor kept between calls (:mod:`mixing.fastpath`); the
graft, a batch-sized blend, uses all threads.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from .base import (MixResult, Mixer, check_batch, check_perm, check_saliency, generator_device,
                   is_int, random_beta, random_int, random_perm, to_device)
from .fastpath import cpu_threads

LabelMix = Literal["saliency", "area"]


def default_grid_sizes(height: int, width: int) -> tuple[int, ...]:
    """Appendix B: {4, 8} for 64 px images (Tiny-ImageNet), {4, 7, 8} for larger (ImageNet)."""
    return (4, 8) if max(height, width) <= 64 else (4, 7, 8)


def region_saliency(saliency: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, h, w) -> (N, grid, grid): each region's mean saliency (adaptive average pooling).

    When the grid is a whole multiple of the map (2 x 2 features on a 4 or 8 grid), each region
    lies in one feature cell and its mean is that cell's value: the map is repeated, in one copy
    (cheaper than the pooling kernel on these tiny maps).
    """
    n, h, w = saliency.shape
    if grid % h == 0 and grid % w == 0:
        ky, kx = grid // h, grid // w
        return saliency[:, :, None, :, None].expand(n, h, ky, w, kx).reshape(n, grid, grid)
    return F.adaptive_avg_pool2d(saliency[:, None], grid)[:, 0]


def salient_regions(saliency: torch.Tensor, temperature: float, threshold: float = 1.0) -> torch.Tensor:
    """Section 4.1 softmax thresholding: bool (N, g, g), regions with S' > threshold * mean(S').

    ``S' = softmax(S~ / T)`` over the grid, with ``S~`` the map min-max normalised per image.
    A flat map (no spatial preference, e.g. all zero) makes every region eligible.
    """
    flat = saliency.flatten(1)
    lo, hi = flat.aminmax(dim=1, keepdim=True)
    span = hi - lo
    soft = torch.softmax((flat - lo) / (span.clamp_min(torch.finfo(flat.dtype).tiny) * temperature), dim=1)
    eligible = (soft > threshold * soft.mean(dim=1, keepdim=True)) | (span == 0)
    return eligible.view_as(saliency)


def top_regions(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic ablation (section 5.4, Attentive CutMix): bool (N, g, g), the k most salient regions."""
    flat = saliency.flatten(1)
    top = torch.zeros_like(flat, dtype=torch.bool)
    return top.scatter_(1, flat.topk(k, dim=1).indices, True).view_as(saliency)


def calibrated_weight(saliency: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Eq. 5: (N,) label weight of image i, ``I(S_i, M_i) / (I(S_i, M_i) + I(S_j, 1 - M_i))``.

    ``saliency`` (N, g, g) and ``mask`` (N, 1, g, g) share the grid; ``j = perm[i]``. An
    all-zero map counts as uniform (``I`` is then the root of the mask's area share, as for
    any flat map); when both importances are 0 (each image's salient part is hidden) the
    weight is the area share of the mask, i.e. the label follows the pixels shown.
    """
    flat = saliency.flatten(1)
    peak = flat.amax(dim=1, keepdim=True)
    unit = torch.where(peak > 0, flat / peak, 1.0)  # scale-free; an all-zero map becomes flat
    m = mask.flatten(1)

    def importance(s: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(s * region, dim=1) / torch.linalg.vector_norm(s, dim=1)

    own, kept = importance(unit, m), importance(unit[perm], 1 - m)
    total = own + kept
    return torch.where(total > 0, own / total, m.mean(dim=1))


def graft_(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """In place: ``x = M * x + (1 - M) * partner``, M (N, 1, gh, gw) binary, nearest-upsampled to x.

    Pixel (y, x) takes cell (y * gh // H, x * gw // W). When the grid divides the image, the
    weight is upsampled only as far as the memory layout needs for long inner loops: not at
    all for channels-last (a cell row is W/gw * C contiguous values), along the width for
    NCHW; otherwise it is the full (N, 1, H, W) mask.
    """
    h, w = x.shape[-2:]
    gh, gw = mask.shape[-2:]
    away = (1 - mask).to(x.dtype)  # the partner's weight per cell
    if h % gh or w % gw:
        away = away.index_select(2, _cell_index(h, gh, x.device)).index_select(3, _cell_index(w, gw, x.device))
        return x.lerp_(partner, away)
    if x.is_contiguous(memory_format=torch.channels_last):
        def cells(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(3, (gw, w // gw)).unflatten(2, (gh, h // gh))
        cells(x).lerp_(cells(partner), away[:, :, :, None, :, None])
    else:
        def cell_rows(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(2, (gh, h // gh))
        cell_rows(x).lerp_(cell_rows(partner), away.repeat_interleave(w // gw, dim=3)[:, :, :, None])
    return x


def _cell_index(size: int, cells: int, device: torch.device) -> torch.Tensor:
    """The cell of each of ``size`` pixels along an axis split into ``cells`` (nearest)."""
    return torch.arange(size, device=device) * cells // size


class SaliencyGrafting(Mixer):
    """Saliency Grafting, in place on the batch; needs the forward (feature) saliency.

    Args:
        alpha: Bernoulli probability ``p ~ Beta(alpha, alpha)``, one draw per batch (paper: 2).
        temperature: softmax temperature T (paper: 0.2; 0.3 on ImageNet, appendix B.3).
        grid_sizes: grid sizes drawn from per batch; ``None`` picks by image size:
            {4, 8} up to 64 px, {4, 7, 8} above (appendix B.2, B.3).
        threshold: regions need ``S' > threshold * mean(S')`` (1 = the paper's sigma_mean;
            lower values are the threshold ablation of section 5.4, 0 makes all eligible).
        top_k: ablation: graft the k most salient regions, no sampling (deterministic).
        label_mix: ``"saliency"`` (Eq. 5) or ``"area"`` (ablation: lambda = mean of M).
    """

    saliency_kind = "feature"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, *, alpha: float = 2.0,
                 temperature: float = 0.2, grid_sizes: Sequence[int] | None = None,
                 threshold: float = 1.0, top_k: int | None = None,
                 label_mix: LabelMix = "saliency") -> None:
        super().__init__(num_classes, label_smoothing)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (a multiple of the mean), got {threshold}")
        if grid_sizes is not None:
            grid_sizes = tuple(grid_sizes)
            if not grid_sizes or not all(is_int(g) and g >= 1 for g in grid_sizes):
                raise ValueError(f"grid_sizes must be a non-empty list of ints >= 1, got {list(grid_sizes)}")
        if top_k is not None and not (is_int(top_k) and top_k >= 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
        if label_mix not in ("saliency", "area"):
            raise ValueError(f"label_mix must be 'saliency' or 'area', got {label_mix!r}")
        self.alpha, self.temperature, self.threshold = alpha, temperature, threshold
        self.grid_sizes, self.top_k, self.label_mix = grid_sizes, top_k, label_mix

    def mix(self, x: torch.Tensor, labels: torch.Tensor, saliency: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, perm: torch.Tensor | None = None,
            grid_size: int | None = None, p: float | None = None,
            bernoulli: torch.Tensor | None = None) -> MixResult:
        """Graft in place. Explicit draws: ``perm``, ``grid_size``, ``p`` and ``bernoulli``
        (N, g, g) 0/1 region draws (these fix g and make ``p`` unused; with ``top_k`` neither
        ``p`` nor the draws are used)."""
        with cpu_threads(x.device):                     # ops on the grid: tiny
            check_batch(x, labels, self.num_classes)
            saliency = check_saliency(saliency, x)
            n, _, h, w = x.shape
            perm = random_perm(n, x.device, generator) if perm is None else check_perm(perm, n, x.device)
            grid = self._grid(grid_size, bernoulli, h, w, generator)
            saliency = region_saliency(saliency, grid)
            if self.top_k is not None:
                if self.top_k > grid * grid:
                    raise ValueError(f"top_k={self.top_k} exceeds the {grid}x{grid} regions of the grid")
                regions = top_regions(saliency, self.top_k)
            else:
                draws = self._draws(bernoulli, p, (n, grid, grid), x.device, generator)
                regions = salient_regions(saliency, self.temperature, self.threshold) & draws
            mask = regions[:, None].float()
            if self.label_mix == "area":
                weight = mask.flatten(1).mean(dim=1)
            else:
                weight = calibrated_weight(saliency, mask, perm)
            targets = self._targets(labels, perm, weight)
            partners = self._partners(x, perm)
        graft_(x, partners, mask)                           # one batch-sized pass: all threads
        return MixResult(targets, perm, weight, mask=mask)

    def _partners(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """``x[perm]``, gathered into a scratch tensor of ``x``'s layout (called on one CPU
        thread: on shared cores a two-thread ``index_select`` into ``out`` can stall)."""
        layout = torch.channels_last if not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = self._scratch("partner", tuple(x.shape), x.dtype, x.device, layout)
        return torch.index_select(x, 0, perm, out=out)

    def _grid(self, grid_size: int | None, bernoulli: torch.Tensor | None, h: int, w: int,
              generator: torch.Generator | None) -> int:
        if bernoulli is not None:
            if bernoulli.dim() != 3 or bernoulli.shape[1] != bernoulli.shape[2]:
                raise ValueError(f"bernoulli draws must have shape (N, g, g), got {tuple(bernoulli.shape)}")
            if grid_size is not None and grid_size != bernoulli.shape[1]:
                raise ValueError(f"grid_size={grid_size} disagrees with bernoulli draws of shape "
                                 f"{tuple(bernoulli.shape)}")
            grid_size = bernoulli.shape[1]
        if grid_size is None:
            sizes = self.grid_sizes or default_grid_sizes(h, w)
            grid_size = sizes[random_int(len(sizes), generator)]
        if not is_int(grid_size) or not 1 <= grid_size <= min(h, w):
            raise ValueError(f"grid size must be an int in [1, {min(h, w)}] for {h}x{w} images, "
                             f"got {grid_size!r}")
        return grid_size

    def _draws(self, bernoulli: torch.Tensor | None, p: float | None, shape: tuple[int, int, int],
               device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """Region-wise i.i.d. Bernoulli(p) draws, bool ``shape``, with p ~ Beta(alpha, alpha)."""
        if bernoulli is not None:
            if bernoulli.shape != shape or not ((bernoulli == 0) | (bernoulli == 1)).all():
                raise ValueError(f"bernoulli draws must be 0/1 of shape {shape}, got "
                                 f"{tuple(bernoulli.shape)} {bernoulli.dtype}")
            return bernoulli.to(device=device, dtype=torch.bool)
        if p is None:
            p = random_beta(self.alpha, generator)
        elif not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        draws = torch.rand(shape, generator=generator, device=generator_device(generator)) < p
        return to_device(draws, device)

