"""The saliency-free baselines, Mixup and CutMix, in place on the batch (one lambda per batch).

Both draw ``lambda ~ Beta(alpha, alpha)`` with alpha = 1 by default, as the Saliency Grafting
paper's baselines (appendix B.1). CutMix follows timm's ``mixup.py``: a box of area
``(1 - lambda) H W`` centred uniformly at random, clipped at the border, filled from the
partner image, and lambda corrected to the area actually kept.
"""
from __future__ import annotations

import math

import torch

from .base import MixResult, Mixer, blend_, check_batch, check_perm, random_beta, random_int, random_perm


class _LambdaMixer(Mixer):
    """A mixer with one ``lambda ~ Beta(alpha, alpha)`` per batch and a random pairing."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, *, alpha: float = 1.0) -> None:
        super().__init__(num_classes, label_smoothing)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def _draw(self, x: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor | None,
              lam: float | None, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
        """Check the batch; the pairing and lambda, explicit or drawn from ``generator``."""
        check_batch(x, labels, self.num_classes)
        n = x.shape[0]
        perm = random_perm(n, x.device, generator) if perm is None else check_perm(perm, n, x.device)
        if lam is None:
            lam = random_beta(self.alpha, generator)
        elif not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        return perm, float(lam)

    def _result(self, labels: torch.Tensor, perm: torch.Tensor, lam: float,
                mask: torch.Tensor | None = None) -> MixResult:
        weight = torch.full((labels.shape[0],), lam, device=labels.device)
        return MixResult(self._targets(labels, perm, weight), perm, weight, mask=mask)


class Mixup(_LambdaMixer):
    """Mixup (Zhang et al., 2018): ``x_i = lam * x_i + (1 - lam) * x_perm(i)``, in one lerp."""

    def mix(self, x: torch.Tensor, labels: torch.Tensor, saliency: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, perm: torch.Tensor | None = None,
            lam: float | None = None) -> MixResult:
        """Mix in place; ``perm`` and ``lam`` may be given explicitly (``saliency`` is unused)."""
        perm, lam = self._draw(x, labels, perm, lam, generator)
        blend_(x, x[perm], lam)
        return self._result(labels, perm, lam)


def cutmix_box(height: int, width: int, lam: float, center: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: a box of area ``(1 - lam) H W`` centred at ``center``, clipped at the border."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = center
    return (min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height),
            min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width))


class CutMix(_LambdaMixer):
    """CutMix (Yun et al., 2019): one box per batch is pasted from the partner image.

    Only the box is written (the gathered partner pixels are box-sized); the returned weight
    is lambda corrected to the box actually pasted (``1 - box area / image area``).
    """

    def mix(self, x: torch.Tensor, labels: torch.Tensor, saliency: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, perm: torch.Tensor | None = None,
            lam: float | None = None, center: tuple[int, int] | None = None) -> MixResult:
        """Paste in place; ``perm``, ``lam`` and the box ``center`` (y, x) may be given explicitly."""
        perm, lam = self._draw(x, labels, perm, lam, generator)
        h, w = x.shape[-2:]
        if center is None:
            center = (random_int(h, generator), random_int(w, generator))
        elif not (0 <= center[0] < h and 0 <= center[1] < w):
            raise ValueError(f"center must lie inside the {h}x{w} image, got {center}")
        y0, y1, x0, x1 = cutmix_box(h, w, lam, center)
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        mask = torch.ones(1, 1, h, w, device=x.device)
        mask[..., y0:y1, x0:x1] = 0
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        return self._result(labels, perm, lam, mask.expand(x.shape[0], -1, -1, -1))

