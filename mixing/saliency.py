"""Saliency maps taken from the model being trained, as by-products of its clean pass.

* **Forward saliency** (Saliency Grafting, section 4.3): the channel-collapsed absolute feature
  map ``S = sum_c |A_c|`` of one layer, captured by a forward hook (:class:`FeatureSaliency`).
* **Gradient saliency** (SAGE, section 3.1): ``|grad_x loss|`` reduced over the colour channels
  (:func:`gradient_saliency`), read from the clean pass's backward.

Both give float32 maps (N, h, w) that never carry autograd history.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

from .fastpath import cpu_channel_norm

GradientReduction = Literal["mean_abs", "l2"]
GRADIENT_REDUCTIONS = ("mean_abs", "l2")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def find_feature_layer(model: nn.Module, probe_size: int = 128) -> str:
    """Name of the last direct child of ``model`` whose output is a spatial map (4-D, > 1x1).

    That is the last convolutional stage of torchvision and timm CNNs (``layer4`` of a ResNet,
    ``features`` of MobileNet/EfficientNet/DenseNet). Found by one no-grad forward of a
    ``probe_size`` square zero image in eval mode; every module's training mode is restored.
    """
    model = unwrap(model)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer to take a feature map from; "
                         f"name the feature layer explicitly")
    param = next(model.parameters())
    probe = torch.zeros(1, conv.in_channels, probe_size, probe_size, device=param.device,
                        dtype=param.dtype)
    shapes: list[tuple[str, torch.Size]] = []
    handles = [child.register_forward_hook(
        lambda _m, _i, out, name=name: shapes.append((name, getattr(out, "shape", ()))))
        for name, child in model.named_children()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    spatial = [name for name, shape in shapes if len(shape) == 4 and shape[-2] * shape[-1] > 1]
    if not spatial:
        raise ValueError(f"no direct child of {type(model).__name__} outputs a spatial map (N, C, h, w) "
                         f"with h * w > 1 for a {probe_size} px input; name the feature layer explicitly")
    return spatial[-1]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` (dotted) of the unwrapped model; the error lists close names."""
    model = unwrap(model)
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else f"; layers are: {', '.join(names[:20])}"
        raise ValueError(f"{type(model).__name__} has no layer named {name!r}{hint}")
    return model.get_submodule(name)


class FeatureSaliency:
    """Forward hook: while :meth:`capture` is active, keeps ``sum_c |A_c|`` of one layer's output.

    The map is computed inside the hook (in float32: fp16 features under autocast would
    overflow the channel sum), from the detached output, so it adds no autograd work and a
    later in-place op of the model cannot change it. Outside :meth:`capture` the hook does
    nothing. ``layer=None`` picks the last convolutional stage (:func:`find_feature_layer`).
    Use as a context manager or call :meth:`remove` to take the hook off.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, probe_size: int = 128) -> None:
        self.layer = layer if layer is not None else find_feature_layer(model, probe_size)
        self.module = get_layer(model, self.layer)
        self._enabled = False
        self._map: torch.Tensor | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._enabled:
            return
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ValueError(f"feature layer {self.layer!r} must output a (N, C, h, w) tensor, got "
                             f"{getattr(output, 'shape', type(output).__name__)}")
        self._map = channel_norm(output.detach(), 1)

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the map of every forward pass run inside this block (the last one wins)."""
        self._enabled, self._map = True, None
        try:
            yield
        finally:
            self._enabled = False

    def pop(self) -> torch.Tensor:
        """The captured map (N, h, w), float32; it is released here."""
        if self._map is None:
            raise RuntimeError(f"feature layer {self.layer!r} did not run inside capture()")
        saliency, self._map = self._map, None
        return saliency

    def remove(self) -> None:
        """Take the hook off the layer (idempotent)."""
        self._handle.remove()
        self._map = None

    def __enter__(self) -> FeatureSaliency:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def gradient_saliency(grad: torch.Tensor, reduction: GradientReduction = "mean_abs") -> torch.Tensor:
    """Input gradient (N, C, H, W) -> saliency (N, H, W), float32, reduced over channels.

    ``"mean_abs"`` (the default) is the mean of ``|g|`` over channels, as in the SAGE authors'
    released code; ``"l2"`` is the channel L2 norm of the SAGE paper's Eq. 1.
    """
    if reduction not in GRADIENT_REDUCTIONS:
        raise ValueError(f"gradient reduction must be one of {GRADIENT_REDUCTIONS}, got {reduction!r}")
    if grad.dim() != 4:
        raise ValueError(f"input gradient must be (N, C, H, W), got {tuple(grad.shape)}")
    if reduction == "l2":
        return channel_norm(grad, 2)
    return channel_norm(grad, 1).div_(grad.shape[1])


def channel_norm(t: torch.Tensor, ord: int) -> torch.Tensor:
    """``sum_c |t_c|`` (ord 1) or ``sqrt(sum_c t_c^2)`` (ord 2) of (N, C, h, w): (N, h, w)
    float32, accumulated in float32 for any float dtype and either layout.

    Off the CPU one fused reduction (it reads float16/bfloat16 directly); on the CPU, where
    that kernel is slow, plain ops (:func:`mixing.fastpath.cpu_channel_norm`).
    """
    if t.device.type == "cpu":
        return cpu_channel_norm(t, ord)
    return torch.linalg.vector_norm(t, ord, dim=1, dtype=torch.float32)
