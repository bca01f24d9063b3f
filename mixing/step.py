"""One training step with mixing: the two-pass step of the saliency-guided mixers.

Saliency-guided mixers (Saliency Grafting, SAGE) need the model's saliency on the clean batch.
Rather than throw that pass away, its gradients are kept (SAGE section 3.4):

    clean forward (saliency captured) -> clean backward weighted by clean_weight
    -> mix in place -> mixed forward -> backward weighted by mixed_weight

so the parameters receive ``mixed_weight * g_mixed + clean_weight * g_clean``. ``eta`` is the
convex shorthand ``(clean_weight, mixed_weight) = (1 - eta, eta)``: here **eta weights the
mixed pass**; the SAGE paper writes ``g = eta * g_s + (1 - eta) * g_a`` with eta on the
*clean* gradient, so the paper's best eta = 0.7 is ``eta=0.3`` here. PuzzleMix's and Saliency
Grafting's ImageNet protocol instead sums both passes at full weight (PuzzleMix's
``clean_lam: 1``): ``clean_weight=1, mixed_weight=1``.

Mixup, CutMix and ``mixer=None`` take one pass; ``mix=False`` (warm-up epochs) is a plain pass
on label-smoothed one-hot targets. The step only accumulates ``.grad``: the caller zeroes
gradients, unscales/clips, calls ``optimizer.step()`` and updates the scaler. For gradient
accumulation over K micro-batches, call the step with ``loss_scale=1 / K`` on each and
``sync=False`` on all but the last (under DDP the gradients are then all-reduced once).

Nothing in the step reads a device value on the host: pass a CPU ``generator`` for the
mixer's draws (:mod:`mixing.base`); the labels are checked once per step (their value range
on the CPU only).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from .base import (FLOAT_DTYPES, MixResult, Mixer, check_batch, check_labels, labels_checked,
                   one_hot_targets, soft_target_cross_entropy)
from .saliency import (GRADIENT_REDUCTIONS, FeatureSaliency, GradientReduction, gradient_saliency,
                       wrapper_chain)

Stage = Callable[[str], ContextManager]


def no_stage(name: str) -> ContextManager:
    """The stage callable that does nothing (a step's default ``stage``)."""
    return contextlib.nullcontext()


@dataclass
class StepOutput:
    """What one step computed; every tensor is detached (reading it is the caller's sync)."""

    loss: torch.Tensor
    """0-d float32: the loss the gradients belong to (``mixed_weight * mixed + clean_weight *
    clean``), before ``loss_scale``."""
    clean_loss: torch.Tensor | None
    """0-d float32 loss of the clean pass (None for single-pass mixing)."""
    mixed_loss: torch.Tensor | None
    """0-d float32 loss of the mixed pass (None for an unmixed step)."""
    logits: torch.Tensor
    """(N, K) logits of the clean pass, for train accuracy (of the mixed pass if it is the only one)."""
    mix: MixResult | None
    """What the mixer decided (None for an unmixed step)."""
    saliency: torch.Tensor | None
    """(N, h, w) float32 saliency maps given to the mixer (None without a two-pass mixer)."""


class TwoPassStep:
    """``step(images, labels)``: forward/backward (two passes for saliency mixers), in place.

    Args:
        model: the network. DistributedDataParallel allowed: the clean pass runs under
            ``no_sync()``, so gradients are all-reduced once per step (or once per
            accumulation, see :meth:`step`). ``torch.compile(model)`` allowed (also around
            DDP): the feature hook is registered on the original module's layer, before the
            step's first forward, and the compiled graphs run it (see
            :class:`mixing.saliency.FeatureSaliency`); build the step before the compiled
            model first runs. SAGE's input gradient comes through the compiled backward.
        mixer: ``None`` for no mixing.
        eta: weight in [0, 1] of the mixed pass, the clean pass taking ``1 - eta`` (a convex
            combination; the module docstring compares SAGE's convention). Default 0.5.
            ``eta=1``: the clean pass only gives saliency (no parameter gradient);
            ``eta=0``: the mixed pass would have no weight, so the step is a plain clean pass.
        clean_weight, mixed_weight: the two passes' weights, given together instead of
            ``eta`` (>= 0, not both 0): ``1, 1`` is PuzzleMix's ``clean_lam: 1`` protocol,
            which Saliency Grafting's ImageNet runs follow; SAGE's paper eta is
            ``clean_weight=eta, mixed_weight=1 - eta``. ``clean_weight=0`` and
            ``mixed_weight=0`` behave like ``eta=1`` and ``eta=0``. A one-pass step (single-
            pass mixer, ``mix=False``, no mixer) has weight 1.
        feature_layer: dotted name of the layer giving forward saliency (feature mixers only).
            Default: :func:`mixing.saliency.find_feature_layer`, probed lazily on one image of
            the first step's batch (its resolution; warm-up steps included), or at
            construction with ``feature_probe_size``.
        feature_min_size: for that automatic choice, the last layer whose map is at least this
            many cells a side (e.g. 4 at 64 px: ResNet's ``layer3`` rather than ``layer4``).
        feature_probe_size: probe the automatic choice at construction with a square image
            of this size instead.
        gradient_reduction: channel reduction of the input gradient (gradient mixers only):
            ``"mean_abs"`` (SAGE's released code) or ``"l2"`` (SAGE's Eq. 1).
        label_smoothing: for the unmixed targets; ``None`` takes the mixer's (or 0). It must
            agree with the mixer's, which smooths the mixed targets.
        scaler: a ``torch.amp.GradScaler`` used for every backward (the caller steps it).
        amp_dtype: run forward passes under autocast with this dtype (float16 or bfloat16).
    """

    def __init__(self, model: nn.Module, mixer: Mixer | None = None, *, eta: float | None = None,
                 clean_weight: float | None = None, mixed_weight: float | None = None,
                 feature_layer: str | None = None, feature_min_size: int | None = None,
                 feature_probe_size: int | None = None, gradient_reduction: GradientReduction = "mean_abs",
                 label_smoothing: float | None = None, scaler: torch.amp.GradScaler | None = None,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.clean_weight, self.mixed_weight = pass_weights(eta, clean_weight, mixed_weight)
        self.eta = self.mixed_weight if clean_weight is None and mixed_weight is None else None
        if gradient_reduction not in GRADIENT_REDUCTIONS:
            raise ValueError(f"gradient_reduction must be one of {GRADIENT_REDUCTIONS}, "
                             f"got {gradient_reduction!r}")
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be torch.float16, torch.bfloat16 or None, got {amp_dtype}")
        kind = mixer.saliency_kind if mixer is not None else "none"
        for option, value in (("feature_layer", feature_layer), ("feature_min_size", feature_min_size),
                              ("feature_probe_size", feature_probe_size)):
            if value is not None and kind != "feature":
                raise ValueError(f"{option}={value!r} is only used by feature-saliency "
                                 f"mixers, not by {type(mixer).__name__}")
        mixer_smoothing = mixer.label_smoothing if mixer is not None else 0.0
        if label_smoothing is None:
            label_smoothing = mixer_smoothing
        elif mixer is not None and label_smoothing != mixer_smoothing:
            raise ValueError(f"label_smoothing={label_smoothing} differs from the mixer's "
                             f"{mixer_smoothing}; set it in one place")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.model, self.mixer = model, mixer
        self.gradient_reduction, self.label_smoothing = gradient_reduction, label_smoothing
        self.scaler, self.amp_dtype = scaler, amp_dtype
        self.features = FeatureSaliency(model, feature_layer, feature_probe_size,
                                        min_size=feature_min_size) if kind == "feature" else None
        self._loss_scale, self._sync = 1.0, True  # of the step running
        self._ddp = next((m for m in wrapper_chain(model)
                          if isinstance(m, nn.parallel.DistributedDataParallel)), None)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, mix: bool = True,
                 generator: torch.Generator | None = None, stage: Stage | None = None,
                 sync: bool = True, loss_scale: float = 1.0) -> StepOutput:
        return self.step(images, labels, mix=mix, generator=generator, stage=stage, sync=sync,
                         loss_scale=loss_scale)

    def step(self, images: torch.Tensor, labels: torch.Tensor, *, mix: bool = True,
             generator: torch.Generator | None = None, stage: Stage | None = None,
             sync: bool = True, loss_scale: float = 1.0) -> StepOutput:
        """Accumulate this batch's gradients; ``images`` is mixed in place when mixing.

        ``stage(name)``, if given, wraps the stages "clean" (clean forward+backward),
        "saliency" (captured features/gradients to maps), "mix" (the mixer) and "mixed"
        (mixed forward+backward); a single-pass step has "mix" and "mixed", an unmixed one "clean".

        Gradient accumulation: ``loss_scale`` multiplies every backward of the step (``1 / K``
        for K micro-batches; the saliency and ``StepOutput``'s losses are not scaled), and
        ``sync=False`` runs every forward/backward of the step under a DDP model's
        ``no_sync()``, so that with ``sync=True`` on the last micro-batch only its last
        backward all-reduces (the accumulated gradients).
        """
        if not (isinstance(loss_scale, (int, float)) and math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
        stage = stage or no_stage
        self._loss_scale, self._sync = float(loss_scale), sync
        two_pass = self.mixer is not None and self.mixer.two_pass
        if self.mixer is None or not mix or (two_pass and self.mixed_weight == 0):
            return self._plain(images, labels, stage, self.clean_weight if mix and two_pass else 1.0)
        check_batch(images, labels, self.mixer.num_classes)
        self._resolve(images)
        with labels_checked(labels, self.mixer.num_classes):
            if two_pass:
                return self._two_pass(images, labels, generator, stage)
            with stage("mix"):
                result = self.mixer.mix(images, labels, generator=generator)
        with stage("mixed"), self._no_sync(last=True):
            logits, loss = self._pass(images, result.targets, weight=1.0)
        return StepOutput(loss, None, loss, logits, result, None)

    def _resolve(self, images: torch.Tensor) -> None:
        """Choose the feature layer at this batch's size if not done yet (before the model's
        first forward in the step, so that a compiled model is traced with the hook)."""
        if self.features is not None:
            self.features.resolve(images)

    def _plain(self, images: torch.Tensor, labels: torch.Tensor, stage: Stage, weight: float) -> StepOutput:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype not in FLOAT_DTYPES:
            raise ValueError(f"images must be a float32, float16 or bfloat16 (N, C, H, W) tensor, "
                             f"got {getattr(images, 'dtype', type(images).__name__)} "
                             f"{tuple(getattr(images, 'shape', ()))}")
        num_classes = self.mixer.num_classes if self.mixer is not None else None
        self._resolve(images)
        with stage("clean"), self._no_sync(last=True):
            with self._autocast(images):
                logits = self.model(images)
            targets = self._one_hot(labels, images, num_classes or logits.shape[-1])
            loss = soft_target_cross_entropy(logits, targets)
            self._scale(loss * (weight * self._loss_scale)).backward()
        loss = loss.detach()
        return StepOutput(loss * weight, loss, None, logits.detach(), None, None)

    def _two_pass(self, images: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator | None, stage: Stage) -> StepOutput:
        clean_w, mixed_w = self.clean_weight, self.mixed_weight
        gradient = self.mixer.saliency_kind == "gradient"
        if gradient and images.requires_grad:
            raise ValueError("images must not require grad: the step takes their gradient itself")
        targets = self._one_hot(labels, images, self.mixer.num_classes)
        with stage("clean"):
            capture = self.features.capture() if self.features else contextlib.nullcontext()
            with self._no_sync(last=False), capture, self._input_grad(images, gradient):
                if clean_w > 0:
                    clean_logits, clean_loss = self._pass(images, targets, weight=clean_w)
                    grad, grad_weight = images.grad, clean_w * self._loss_scale
                elif gradient:  # saliency only: a gradient for the input, none for the parameters
                    clean_logits, clean_loss = self._forward(images, targets)
                    (grad,), grad_weight = torch.autograd.grad(self._scale(clean_loss), images), 1.0
                else:  # feature saliency only: no backward at all
                    with torch.no_grad():
                        clean_logits, clean_loss = self._forward(images, targets)
        with stage("saliency"):
            if gradient:  # grad is that of scale * grad_weight * loss
                factor = self._scale(torch.full((), grad_weight, device=images.device))
                saliency = gradient_saliency(grad, self.gradient_reduction).div_(factor)
            else:
                saliency = self.features.pop()
            if self.scaler is not None and self.scaler.is_enabled():
                # An fp16 overflow, for which the scaler will skip the step: keep the mix defined.
                saliency = torch.nan_to_num(saliency, nan=0.0, posinf=0.0, neginf=0.0)
        with stage("mix"):
            result = self.mixer.mix(images, labels, saliency, generator=generator)
        with stage("mixed"), self._no_sync(last=True):
            _, mixed_loss = self._pass(images, result.targets, weight=mixed_w)
        clean_loss = clean_loss.detach()
        loss = mixed_w * mixed_loss + clean_w * clean_loss
        return StepOutput(loss, clean_loss, mixed_loss, clean_logits.detach(), result, saliency)

    def _forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast(images):
            logits = self.model(images)
        return logits, soft_target_cross_entropy(logits, targets)

    def _pass(self, images: torch.Tensor, targets: torch.Tensor,
              weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of ``weight * loss_scale * loss``; detached (logits, loss)."""
        logits, loss = self._forward(images, targets)
        self._scale(loss * (weight * self._loss_scale)).backward()
        return logits.detach(), loss.detach()

    def _scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _autocast(self, images: torch.Tensor) -> ContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(images.device.type, dtype=self.amp_dtype)

    @staticmethod
    @contextlib.contextmanager
    def _input_grad(images: torch.Tensor, enabled: bool) -> Iterator[None]:
        """Make ``images`` require grad inside the block (for gradient saliency), then clear it."""
        if not enabled:
            yield
            return
        images.requires_grad_(True)
        try:
            yield
        finally:
            images.grad = None
            images.requires_grad_(False)

    def _no_sync(self, last: bool) -> ContextManager:
        """DDP's ``no_sync()`` unless this is the step's last backward and the step syncs."""
        if self._ddp is None or (last and self._sync):
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def _one_hot(self, labels: torch.Tensor, images: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Label-smoothed one-hot targets (N, K), float32."""
        check_labels(labels, images.shape[0], images.device, num_classes)
        return one_hot_targets(labels, num_classes, self.label_smoothing)

    def remove(self) -> None:
        """Take the feature hook off the model."""
        if self.features is not None:
            self.features.remove()


def pass_weights(eta: float | None, clean_weight: float | None,
                 mixed_weight: float | None) -> tuple[float, float]:
    """``(clean_weight, mixed_weight)`` of a two-pass step from ``eta`` or the two weights."""
    if clean_weight is None and mixed_weight is None:
        eta = 0.5 if eta is None else eta
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta (the weight of the mixed pass) must lie in [0, 1], got {eta}")
        return 1.0 - eta, float(eta)
    if clean_weight is None or mixed_weight is None:
        raise ValueError("give clean_weight and mixed_weight together (or eta alone)")
    if eta is not None:
        raise ValueError(f"eta={eta} and clean_weight/mixed_weight both given; eta is the "
                         f"shorthand clean_weight = 1 - eta, mixed_weight = eta: give one")
    for name, w in (("clean_weight", clean_weight), ("mixed_weight", mixed_weight)):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    if clean_weight == 0 and mixed_weight == 0:
        raise ValueError("clean_weight and mixed_weight are both 0: the step would have no gradient")
    return float(clean_weight), float(mixed_weight)
