"""Saliency maps taken from the model being trained, as by-products of its clean pass.

* **Forward saliency** (Saliency Grafting, section 4.3): the channel-collapsed absolute feature
  map ``S = sum_c |A_c|`` of one layer, captured by a forward hook (:class:`FeatureSaliency`).
* **Gradient saliency** (SAGE, section 3.1): ``|grad_x loss|`` reduced over the colour channels
  (:func:`gradient_saliency`), read from the clean pass's backward.

Both give float32 maps (N, h, w) that never carry autograd history.
"""
from __future__ import annotations

import difflib
import itertools
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

from .fastpath import cpu_channel_norm

GradientReduction = Literal["mean_abs", "l2"]
GRADIENT_REDUCTIONS = ("mean_abs", "l2")


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, then each module it wraps (DistributedDataParallel / DataParallel's ``module``,
    torch.compile's ``_orig_mod``), down to the user's model."""
    chain = [model]
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return chain
        chain.append(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    return wrapper_chain(model)[-1]


def is_compiled(model: nn.Module) -> bool:
    """Whether a ``torch.compile`` wrapper is among ``model``'s wrappers."""
    return any(isinstance(getattr(m, "_orig_mod", None), nn.Module) for m in wrapper_chain(model))


NAME_IT = "name the layer explicitly with feature_layer (mix.feature_layer in the trainer's config)"


def probe_outputs(model: nn.Module, probe: torch.Tensor) -> dict[str, tuple[tuple[int, ...], bool, int]]:
    """Run ``model`` (unwrapped) once on ``probe`` without grad in eval mode, restoring every
    module's training mode: for each submodule that ran, the shape of its (last) output,
    whether that output is its input itself, and the order in which it finished."""
    outputs: dict[str, tuple[tuple[int, ...], bool, int]] = {}

    def record(name: str):
        def hook(_module: nn.Module, inputs: tuple, out: object) -> None:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            passthrough = bool(inputs) and out is inputs[0]
            outputs[name] = (shape, passthrough, next(order))
        return hook
    order = itertools.count()
    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    except Exception as e:
        first_line = next(iter(str(e).splitlines()), "")
        raise ValueError(f"probing {type(model).__name__} with a {tuple(probe.shape)} input to find its "
                         f"feature layer failed ({type(e).__name__}: {first_line}); {NAME_IT}, or "
                         f"probe at a size the model accepts") from e
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return outputs


def find_feature_layer(model: nn.Module, probe_size: int = 128, *, min_size: int | None = None,
                       example: torch.Tensor | None = None) -> str:
    """Name of the layer of ``model`` whose output gives forward saliency: by default the last
    direct child whose output is a spatial map (N, C, h, w) with h * w > 1.

    That is the last convolutional stage of torchvision and timm CNNs: ``layer4`` of a ResNet
    (torchvision or timm's resnet50d), ``features`` of torchvision's MobileNet, EfficientNet,
    DenseNet, ``stages`` of timm's ConvNeXt, ``s4`` of its RegNets, ``bn2`` (the normalised
    final convolution) of its EfficientNets. A child that passes its input through unchanged
    (an ``nn.Identity`` such as timm's ``norm_pre``) is skipped: it would give the same map.

    ``min_size``: the last layer whose map is at least ``min_size`` cells a side. The spatial
    direct children are taken from the last backwards: a child whose map is that large, or
    else the last of its own children (one level down) whose map is. At 64 px with
    ``min_size=4``: ``layer3`` of a ResNet (``layer4`` is 2x2, and so are its blocks),
    ``features.8`` of MobileNetV3-small, ``stages.2`` of ConvNeXt, ``blocks.4`` of timm's
    EfficientNet.

    Found by one no-grad forward, in eval mode (every module's training mode is restored), of
    the first image of ``example`` (a batch at the run's resolution; its dtype and device are
    taken from the model's parameters) or else of a ``probe_size`` square zero image. Raises a
    ValueError naming ``feature_layer`` (the explicit choice) when the probe fails or no layer
    fits.
    """
    model = unwrap(model)
    if min_size is not None and (not isinstance(min_size, int) or min_size < 1):
        raise ValueError(f"min_size must be a positive int or None, got {min_size!r}")
    param = next(model.parameters(), None)
    if example is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None or param is None:
            raise ValueError(f"{type(model).__name__} has no Conv2d layer to take a feature map from; "
                             f"{NAME_IT}")
        probe = torch.zeros(1, conv.in_channels, probe_size, probe_size, device=param.device,
                            dtype=param.dtype)
    else:
        probe = example[:1] if param is None else example[:1].to(device=param.device, dtype=param.dtype)
    outputs = probe_outputs(model, probe)
    size = "x".join(map(str, probe.shape[2:]))

    def spatial(name: str) -> bool:
        shape, passthrough, _ = outputs.get(name, ((), False, 0))
        return len(shape) == 4 and shape[-2] * shape[-1] > 1 and not passthrough

    def fits(name: str) -> bool:
        return spatial(name) and (min_size is None or min(outputs[name][0][-2:]) >= min_size)

    def ran_children(name: str) -> list[str]:  # in the order they finished
        module = model.get_submodule(name) if name else model
        names = [f"{name}.{child}" if name else child for child, _ in module.named_children()]
        return sorted((n for n in names if n in outputs), key=lambda n: outputs[n][2])

    stages = [name for name in ran_children("") if spatial(name)]
    if not stages:
        inner = [name for name in sorted(outputs, key=lambda n: outputs[n][2]) if spatial(name)]
        where = (f"; inner layers that do: {', '.join(inner[-3:])}" if inner else
                 "; no layer of it does")
        raise ValueError(f"no direct child of {type(model).__name__} outputs a spatial map "
                         f"(N, C, h, w) with h * w > 1 for a {size} input{where}; {NAME_IT}")
    for name in reversed(stages):
        if fits(name):
            return name
        inside = [child for child in ran_children(name) if fits(child)]
        if inside:
            return inside[-1]
    raise ValueError(f"no layer of {type(model).__name__} outputs a map of at least {min_size}x"
                     f"{min_size} for a {size} input (its last stage {stages[-1]!r} gives "
                     f"{'x'.join(map(str, outputs[stages[-1]][0][-2:]))}); lower min_size, raise the "
                     f"resolution or {NAME_IT}")


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
    nothing. Use as a context manager or call :meth:`remove` to take the hook off.

    ``layer=None`` picks the layer with :func:`find_feature_layer` (``min_size`` is passed on):
    at construction by a ``probe_size`` probe, or with ``probe_size=None`` lazily, at the
    first :meth:`resolve` or :meth:`capture` given a batch (probed at that batch's size).

    Under ``torch.compile`` the hook sits on the layer of the original module and is traced
    into the compiled graphs, which run it (one graph with capturing on, one with it off).
    It must be registered before the compiled model's first call: Dynamo does not guard on
    module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph compiled
    before the hook existed never runs it (:meth:`pop` then raises); call
    ``torch.compiler.reset()`` first in that case.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, probe_size: int | None = 128, *,
                 min_size: int | None = None) -> None:
        if layer is not None and min_size is not None:
            raise ValueError(f"min_size={min_size} only applies to the automatic choice, not to "
                             f"the named layer {layer!r}")
        self.model, self.min_size = model, min_size
        self.layer: str | None = None
        self.module: nn.Module | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._enabled, self._removed = False, False
        self._map: torch.Tensor | None = None
        if layer is None and probe_size is not None:
            layer = find_feature_layer(model, probe_size, min_size=min_size)
        if layer is not None:
            self._attach(layer)

    def _attach(self, layer: str) -> None:
        module = get_layer(self.model, layer)
        self.layer, self.module = layer, module
        self._handle = module.register_forward_hook(self._hook)

    def resolve(self, example: torch.Tensor) -> str:
        """The layer's name; chosen now, by probing at ``example``'s size, if not chosen yet."""
        if self.layer is None and not self._removed:
            self._attach(find_feature_layer(self.model, min_size=self.min_size, example=example))
        return self.layer

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._enabled:
            return
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ValueError(f"feature layer {self.layer!r} must output a (N, C, h, w) tensor, got "
                             f"{getattr(output, 'shape', type(output).__name__)}")
        self._map = channel_norm(output.detach(), 1)

    @contextmanager
    def capture(self, example: torch.Tensor | None = None) -> Iterator[None]:
        """Record the map of every forward pass run inside this block (the last one wins);
        ``example`` (the batch) chooses the layer first if that is still to do."""
        if example is not None:
            self.resolve(example)
        elif self.layer is None and not self._removed:
            raise RuntimeError("the feature layer is not chosen yet: pass the batch to capture() "
                               "or resolve()")
        self._enabled, self._map = True, None
        try:
            yield
        finally:
            self._enabled = False

    def pop(self) -> torch.Tensor:
        """The captured map (N, h, w), float32; it is released here."""
        if self._map is None:
            hint = ("; a torch.compile'd model only runs hooks registered before its first call "
                    "(see FeatureSaliency)" if is_compiled(self.model) else "")
            raise RuntimeError(f"feature layer {self.layer!r} did not run inside capture(){hint}")
        saliency, self._map = self._map, None
        return saliency

    def remove(self) -> None:
        """Take the hook off the layer (idempotent); no layer is chosen after this."""
        if self._handle is not None:
            self._handle.remove()
        self._removed, self._map = True, None

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
