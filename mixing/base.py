"""What every mixer shares: the call interface, input checks and soft targets.

A mixer takes a batch ``x`` (N, C, H, W; float32, float16 or bfloat16; NCHW or channels-last),
integer ``labels`` (N,) and, for the saliency-guided mixers, a ``saliency`` map (N, h, w).
It mixes ``x`` **in place** (image ``i`` becomes a mix of ``x[i]`` and its partner
``x[perm[i]]``) and returns soft targets (N, num_classes), float32, rows summing to 1, with
label smoothing folded in.

Every random choice (pairing, lambda, Bernoulli draws, SAGE's candidate shifts) is either
passed explicitly or drawn from ``generator``, so a run is reproducible and the maths can be
checked against an independent implementation.

No device-to-host reads in the hot path: the per-batch random choices are drawn on the
generator's device and moved to the batch's device without blocking (:func:`to_device`);
everything else stays on the batch's device. Pass a **CPU generator** (or None, the global
CPU generator) with CUDA batches: the scalar choices (lambda, grid size, candidate shifts)
are then read on the host for free. A generator on the batch's device still works (the
same seed gives the same mix), but each scalar choice is then a device-to-host read.

Value checks (label range, non-finite or negative saliency) run on CPU tensors only, where
reading values costs no device sync; on other devices the shapes, dtypes and devices are
still checked (an out-of-range label there trips the device-side index assert of the
target scatter). Within :func:`labels_checked` a batch's labels are not checked again.
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .fastpath import cpu_threads, kept_scratch, new_empty, to_device  # noqa: F401 (re-exported)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SaliencyKind = Literal["none", "feature", "gradient"]


@dataclass
class MixResult:
    """Everything a mix decided, for the loss, for tests and for the trainer's preview."""

    targets: torch.Tensor
    """(N, num_classes) float32 soft targets."""
    perm: torch.Tensor
    """(N,) int64: image ``i`` was mixed with the original image ``perm[i]``."""
    weight: torch.Tensor
    """(N,) float32 label weight of image ``i``'s own class; ``perm[i]``'s class gets 1 - weight."""
    mask: torch.Tensor | None = None
    """(N, 1, h, w): share of image ``i`` at each position, on the grid it was built (h, w may
    be coarser than the image); None when the share is one scalar per image (Mixup)."""
    shift: torch.Tensor | None = None
    """(N, 2) int64 (dy, dx) translation applied to the partner image, in pixels (SAGE)."""


def check_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Raise a ValueError naming the problem unless ``x``/``labels`` form a mixable batch."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor (N, C, H, W), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"images must be float32, float16 or bfloat16, got {x.dtype}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"mixing needs a batch of at least 2 images, got {n}")
    check_labels(labels, n, x.device, num_classes)


_CHECKED_LABELS: contextvars.ContextVar[tuple[torch.Tensor, int] | None] = \
    contextvars.ContextVar("checked_labels", default=None)


@contextlib.contextmanager
def labels_checked(labels: torch.Tensor, num_classes: int) -> Iterator[None]:
    """Within the block, :func:`check_labels` of these very ``labels`` for ``num_classes``
    skips the value check already done (the training step checks a batch once)."""
    token = _CHECKED_LABELS.set((labels, num_classes))
    try:
        yield
    finally:
        _CHECKED_LABELS.reset(token)


def check_labels(labels: torch.Tensor, n: int, device: torch.device, num_classes: int) -> None:
    """Raise a ValueError naming the problem unless ``labels`` are ``n`` class indices on
    ``device``; the value range is checked for CPU tensors only (no device sync)."""
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the images, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but images on {device}")
    checked = _CHECKED_LABELS.get()
    if labels.device.type != "cpu" or (checked is not None and checked[0] is labels
                                       and checked[1] == num_classes):
        return
    lo, hi = torch.stack(torch.aminmax(labels)).tolist()
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


class NonFiniteSaliency(ValueError):
    """The saliency map holds NaN or inf: the clean pass diverged (or overflowed)."""


def check_saliency(saliency: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Return ``saliency`` as float32 (N, h, w) on ``x``'s device, or raise naming the problem.

    Values (NaN, inf, negative) are checked for CPU tensors only: elsewhere that would be a
    device sync per batch. A non-finite map there makes the mixed loss non-finite, which the
    caller sees (the training step zeroes non-finite saliency under a GradScaler)."""
    if saliency is None:
        raise ValueError("this mixer needs a saliency map (N, h, w); got None")
    if saliency.dim() == 4 and saliency.shape[1] == 1:
        saliency = saliency[:, 0]
    if saliency.dim() != 3 or saliency.shape[0] != x.shape[0]:
        raise ValueError(f"saliency must have shape (N={x.shape[0]}, h, w), got {tuple(saliency.shape)}")
    if not saliency.is_floating_point():
        raise ValueError(f"saliency must be a float tensor, got {saliency.dtype}")
    saliency = saliency.to(device=x.device, dtype=torch.float32)
    if saliency.device.type != "cpu":
        return saliency
    # One pass (NaN propagates into both), cheaper on the CPU than isfinite() and a comparison.
    lo, hi = torch.stack(torch.aminmax(saliency)).tolist() if saliency.numel() else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NonFiniteSaliency("saliency contains NaN or inf (did the clean pass overflow?)")
    if lo < 0:
        raise ValueError("saliency must be non-negative")
    return saliency


def mix_targets(labels: torch.Tensor, perm: torch.Tensor, weight: torch.Tensor,
                num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets ``weight * y_i + (1 - weight) * y_perm(i)``, smoothed: float32 (N, K)."""
    n = labels.shape[0]
    w = weight.to(device=labels.device, dtype=torch.float32).expand(n)
    targets = torch.zeros(n, num_classes, device=labels.device, dtype=torch.float32)
    targets.scatter_add_(1, labels.long()[:, None], w[:, None])
    targets.scatter_add_(1, labels.long()[perm][:, None], (1 - w)[:, None])
    return smooth_targets_(targets, smoothing)


def one_hot_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed one-hot targets (N, K), float32."""
    return smooth_targets_(F.one_hot(labels.long(), num_classes).float(), smoothing)


def smooth_targets_(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """In place: ``(1 - smoothing) * targets + smoothing / K``."""
    if smoothing:
        targets.mul_(1 - smoothing).add_(smoothing / targets.shape[-1])
    return targets


def blend_(x: torch.Tensor, partner: torch.Tensor, share: torch.Tensor | float) -> torch.Tensor:
    """In place: ``x = share * x + (1 - share) * partner`` (a tensor share broadcasts over x;
    a float one is passed to ``lerp_`` as a Python scalar, never as a CPU tensor)."""
    if isinstance(share, torch.Tensor):
        return x.lerp_(partner, (1 - share).to(x.dtype))
    return x.lerp_(partner, 1.0 - share)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k t_k log softmax(logits)_k``, computed in float32."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where random draws from ``generator`` happen (the CPU for the global generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def random_perm(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """A random pairing ``perm`` of the batch, drawn on the generator's device, on ``device``."""
    return to_device(torch.randperm(n, generator=generator, device=generator_device(generator)), device)


def random_beta(alpha: float, generator: torch.Generator | None) -> float:
    """One draw of Beta(alpha, alpha), reproducible from ``generator``.

    torch's Beta sampler takes no generator, so numpy's is seeded with one draw from it.
    """
    return float(np.random.default_rng(random_int(2**62, generator)).beta(alpha, alpha))


def random_int(high: int, generator: torch.Generator | None) -> int:
    """One uniform int in [0, high) from ``generator`` (a host read for a device generator)."""
    return int(torch.randint(high, (), generator=generator, device=generator_device(generator)))


def random_uniform(generator: torch.Generator | None) -> float:
    """One uniform float in [0, 1) from ``generator`` (a host read for a device generator)."""
    return torch.rand((), generator=generator, device=generator_device(generator)).item()


def check_perm(perm: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Validate an explicit pairing, a permutation of ``range(n)``, and return it on ``device``
    (checked where it was given: one host read if that is a device)."""
    perm = torch.as_tensor(perm, dtype=torch.int64)
    if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n, device=perm.device)):
        raise ValueError(f"perm must be a permutation of range({n}), got {perm.tolist()}")
    return to_device(perm, device)


def is_int(value: object) -> bool:
    """Whether ``value`` is a Python int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


class Mixer(abc.ABC):
    """Base class: ``targets = mixer(x, labels, saliency)`` mixes ``x`` in place.

    ``saliency_kind`` tells the training step which saliency to capture in the clean pass:
    ``'none'`` (single-pass mixers), ``'feature'`` (forward hook) or ``'gradient'``
    (input gradient).
    """

    saliency_kind: ClassVar[SaliencyKind] = "none"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    @property
    def two_pass(self) -> bool:
        """Whether the step needs a clean pass first (saliency-guided mixers)."""
        return self.saliency_kind != "none"

    def __call__(self, x: torch.Tensor, labels: torch.Tensor,
                 saliency: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.mix(x, labels, saliency, **kwargs).targets

    @abc.abstractmethod
    def mix(self, x: torch.Tensor, labels: torch.Tensor, saliency: torch.Tensor | None = None,
            *, generator: torch.Generator | None = None, **explicit) -> MixResult:
        """Mix ``x`` in place and return the full :class:`MixResult`."""

    def _targets(self, labels: torch.Tensor, perm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return mix_targets(labels, perm, weight, self.num_classes, self.label_smoothing)

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """An uninitialised scratch tensor, on the CPU kept on the mixer between calls
        (:func:`mixing.fastpath.kept_scratch`). A mixer holding scratch tensors is not
        re-entrant (one call at a time); they are not pickled or copied."""
        return kept_scratch(self.__dict__.setdefault("_scratch_buffers", {}), name, shape, dtype,
                            device, memory_format)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_scratch_buffers"}
