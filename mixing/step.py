"""One training step with mixing: the two-pass step of the saliency-guided mixers.

Saliency-guided mixers (Saliency Grafting, SAGE) need the model's saliency on the clean batch.
Rather than throw that pass away, its gradients are kept (SAGE section 3.4):

    clean forward (saliency captured) -> clean backward weighted by (1 - eta)
    -> mix in place -> mixed forward -> backward weighted by eta

so the parameters receive ``eta * g_mixed + (1 - eta) * g_clean``. Here **eta weights the
mixed pass**; the SAGE paper writes ``g = eta * g_s + (1 - eta) * g_a`` with eta on the
*clean* gradient, so the paper's best eta = 0.7 is ``eta=0.3`` here.

Mixup, CutMix and ``mixer=None`` take one pass; ``mix=False`` (warm-up epochs) is a plain pass
on label-smoothed one-hot targets. The step only accumulates ``.grad``: the caller zeroes
gradients, unscales/clips, calls ``optimizer.step()`` and updates the scaler.

Nothing in the step reads a device value on the host: pass a CPU ``generator`` for the
mixer's draws (:mod:`mixing.base`); the labels are checked once per step (their value range
on the CPU only).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from .base import (FLOAT_DTYPES, MixResult, Mixer, check_batch, check_labels, labels_checked,
                   one_hot_targets, soft_target_cross_entropy)
from .saliency import GRADIENT_REDUCTIONS, FeatureSaliency, GradientReduction, gradient_saliency

Stage = Callable[[str], ContextManager]


def no_stage(name: str) -> ContextManager:
    """The stage callable that does nothing (a step's default ``stage``)."""
    return contextlib.nullcontext()


@dataclass
class StepOutput:
    """What one step computed; every tensor is detached (reading it is the caller's sync)."""

    loss: torch.Tensor
    """0-d float32: the loss the gradients belong to (``eta * mixed + (1 - eta) * clean``)."""
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
        model: the network (DistributedDataParallel allowed: the clean pass runs under
            ``no_sync()``, so gradients are all-reduced once per step).
        mixer: ``None`` for no mixing.
        eta: weight in [0, 1] of the mixed pass in a two-pass step (see the module docstring).
            ``eta=1``: the clean pass only gives saliency (no parameter gradient);
            ``eta=0``: the mixed pass would have no weight, so the step is a plain clean pass.
        feature_layer: dotted name of the layer giving forward saliency (feature mixers only;
            default: the last convolutional stage).
        gradient_reduction: channel reduction of the input gradient (gradient mixers only):
            ``"mean_abs"`` (SAGE's released code) or ``"l2"`` (SAGE's Eq. 1).
        label_smoothing: for the unmixed targets; ``None`` takes the mixer's (or 0). It must
            agree with the mixer's, which smooths the mixed targets.
        scaler: a ``torch.amp.GradScaler`` used for every backward (the caller steps it).
        amp_dtype: run forward passes under autocast with this dtype (float16 or bfloat16).
    """

    def __init__(self, model: nn.Module, mixer: Mixer | None = None, *, eta: float = 0.5,
                 feature_layer: str | None = None, gradient_reduction: GradientReduction = "mean_abs",
                 label_smoothing: float | None = None, scaler: torch.amp.GradScaler | None = None,
                 amp_dtype: torch.dtype | None = None) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta (the weight of the mixed pass) must lie in [0, 1], got {eta}")
        if gradient_reduction not in GRADIENT_REDUCTIONS:
            raise ValueError(f"gradient_reduction must be one of {GRADIENT_REDUCTIONS}, "
                             f"got {gradient_reduction!r}")
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be torch.float16, torch.bfloat16 or None, got {amp_dtype}")
        kind = mixer.saliency_kind if mixer is not None else "none"
        if feature_layer is not None and kind != "feature":
            raise ValueError(f"feature_layer={feature_layer!r} is only used by feature-saliency "
                             f"mixers, not by {type(mixer).__name__}")
        mixer_smoothing = mixer.label_smoothing if mixer is not None else 0.0
        if label_smoothing is None:
            label_smoothing = mixer_smoothing
        elif mixer is not None and label_smoothing != mixer_smoothing:
            raise ValueError(f"label_smoothing={label_smoothing} differs from the mixer's "
                             f"{mixer_smoothing}; set it in one place")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.model, self.mixer, self.eta = model, mixer, eta
        self.gradient_reduction, self.label_smoothing = gradient_reduction, label_smoothing
        self.scaler, self.amp_dtype = scaler, amp_dtype
        self.features = FeatureSaliency(model, feature_layer) if kind == "feature" else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, mix: bool = True,
                 generator: torch.Generator | None = None, stage: Stage | None = None) -> StepOutput:
        return self.step(images, labels, mix=mix, generator=generator, stage=stage)

    def step(self, images: torch.Tensor, labels: torch.Tensor, *, mix: bool = True,
             generator: torch.Generator | None = None, stage: Stage | None = None) -> StepOutput:
        """Accumulate this batch's gradients; ``images`` is mixed in place when mixing.

        ``stage(name)``, if given, wraps the stages "clean" (clean forward+backward),
        "saliency" (captured features/gradients to maps), "mix" (the mixer) and "mixed"
        (mixed forward+backward); a single-pass step has "mix" and "mixed", an unmixed one "clean".
        """
        stage = stage or no_stage
        if self.mixer is None or not mix or (self.mixer.two_pass and self.eta == 0):
            return self._plain(images, labels, stage)
        check_batch(images, labels, self.mixer.num_classes)
        with labels_checked(labels, self.mixer.num_classes):
            if self.mixer.two_pass:
                return self._two_pass(images, labels, generator, stage)
            with stage("mix"):
                result = self.mixer.mix(images, labels, generator=generator)
        with stage("mixed"):
            logits, loss = self._pass(images, result.targets, weight=1.0)
        return StepOutput(loss, None, loss, logits, result, None)

    def _plain(self, images: torch.Tensor, labels: torch.Tensor, stage: Stage) -> StepOutput:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype not in FLOAT_DTYPES:
            raise ValueError(f"images must be a float32, float16 or bfloat16 (N, C, H, W) tensor, "
                             f"got {getattr(images, 'dtype', type(images).__name__)} "
                             f"{tuple(getattr(images, 'shape', ()))}")
        num_classes = self.mixer.num_classes if self.mixer is not None else None
        with stage("clean"):
            with self._autocast(images):
                logits = self.model(images)
            targets = self._one_hot(labels, images, num_classes or logits.shape[-1])
            loss = soft_target_cross_entropy(logits, targets)
            self._scale(loss).backward()
        loss = loss.detach()
        return StepOutput(loss, loss, None, logits.detach(), None, None)

    def _two_pass(self, images: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator | None, stage: Stage) -> StepOutput:
        eta, gradient = self.eta, self.mixer.saliency_kind == "gradient"
        if gradient and images.requires_grad:
            raise ValueError("images must not require grad: the step takes their gradient itself")
        targets = self._one_hot(labels, images, self.mixer.num_classes)
        with stage("clean"):
            capture = self.features.capture() if self.features else contextlib.nullcontext()
            with self._no_sync(), capture, self._input_grad(images, gradient):
                if eta < 1:
                    clean_logits, clean_loss = self._pass(images, targets, weight=1 - eta)
                    grad = images.grad
                elif gradient:  # saliency only: a gradient for the input, none for the parameters
                    clean_logits, clean_loss = self._forward(images, targets)
                    grad, = torch.autograd.grad(self._scale(clean_loss), images)
                else:  # feature saliency only: no backward at all
                    with torch.no_grad():
                        clean_logits, clean_loss = self._forward(images, targets)
        with stage("saliency"):
            if gradient:  # grad is that of scale * w * loss: w = 1 - eta, or 1 for autograd.grad
                factor = self._scale(torch.full((), 1 - eta if eta < 1 else 1.0, device=images.device))
                saliency = gradient_saliency(grad, self.gradient_reduction).div_(factor)
            else:
                saliency = self.features.pop()
            if self.scaler is not None and self.scaler.is_enabled():
                # An fp16 overflow, for which the scaler will skip the step: keep the mix defined.
                saliency = torch.nan_to_num(saliency, nan=0.0, posinf=0.0, neginf=0.0)
        with stage("mix"):
            result = self.mixer.mix(images, labels, saliency, generator=generator)
        with stage("mixed"):
            _, mixed_loss = self._pass(images, result.targets, weight=eta)
        clean_loss = clean_loss.detach()
        loss = eta * mixed_loss + (1 - eta) * clean_loss
        return StepOutput(loss, clean_loss, mixed_loss, clean_logits.detach(), result, saliency)

    def _forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast(images):
            logits = self.model(images)
        return logits, soft_target_cross_entropy(logits, targets)

    def _pass(self, images: torch.Tensor, targets: torch.Tensor,
              weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of ``weight * loss``; detached (logits, loss)."""
        logits, loss = self._forward(images, targets)
        self._scale(loss * weight).backward()
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

    def _no_sync(self) -> ContextManager:
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _one_hot(self, labels: torch.Tensor, images: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Label-smoothed one-hot targets (N, K), float32."""
        check_labels(labels, images.shape[0], images.device, num_classes)
        return one_hot_targets(labels, num_classes, self.label_smoothing)

    def remove(self) -> None:
        """Take the feature hook off the model."""
        if self.features is not None:
            self.features.remove()
