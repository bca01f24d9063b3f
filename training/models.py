"""The networks: any torchvision classification model or timm model (``timm/NAME``), FFCV's
BlurPool, initialisation, the optimizer's parameter groups, DDP and compilation."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .config import ConfigError, suggest


def classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    """A torchvision model name or ``timm/NAME``; otherwise a ConfigError with suggestions."""
    if arch.startswith("timm/"):
        try:
            import timm
        except ImportError:
            raise ConfigError(f"model.arch: {arch} needs timm, which is not installed: "
                              "pip install 'salmix[timm]' (or pip install timm)") from None
        name = arch[len("timm/"):]
        if not timm.is_model(name):
            raise ConfigError(f"model.arch: unknown timm model {name!r}"
                              + suggest(name, timm.list_models()))
    elif arch not in classification_models():
        raise ConfigError(f"model.arch: unknown torchvision classification model {arch!r}"
                          + suggest(arch, classification_models()))


def create_model(arch: str, num_classes: int) -> nn.Module:
    """The randomly initialised network ``arch`` (torchvision, or timm with ``timm/``)."""
    if arch.startswith("timm/"):
        import timm
        return timm.create_model(arch[len("timm/"):], pretrained=False, num_classes=num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


class BlurPoolConv2d(nn.Module):
    """FFCV's anti-aliasing: a 3x3 binomial blur before a strided convolution."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        taps = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        self.conv = conv
        self.register_buffer("blur_filter", taps.repeat(conv.in_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.conv.in_channels)
        return self.conv(x)


def apply_blurpool(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            apply_blurpool(child)


def param_groups(model: nn.Module, weight_decay: float, biases: bool = True) -> list[dict[str, Any]]:
    """Two groups: BatchNorm parameters (and, with ``biases``, every module's bias) get no
    weight decay, the rest do. Decided by module type and by being a module's ``bias``, never
    by parameter names."""
    no_decay: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            no_decay.update({id(p): p for p in module.parameters(recurse=False)})
        bias = getattr(module, "bias", None)
        if biases and isinstance(bias, nn.Parameter):
            no_decay[id(bias)] = bias
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": list(no_decay.values()), "weight_decay": 0.0}]


@torch.no_grad()
def zero_init_residual(model: nn.Module) -> None:
    """Zero the last BatchNorm's weight of every residual block (torchvision's and timm's
    ResNet blocks), so each block starts as the identity."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    found = 0
    for m in model.modules():
        last = {BasicBlock: "bn2", Bottleneck: "bn3"}.get(type(m))
        if last is not None:
            nn.init.zeros_(getattr(m, last).weight)
            found += 1
        elif callable(getattr(m, "zero_init_last", None)):  # timm's blocks
            m.zero_init_last()
            found += 1
    if not found:
        raise ValueError(f"zero_init_residual: {type(model).__name__} has no ResNet-style "
                         "residual blocks")


@torch.no_grad()
def init_classifier(model: nn.Module, std: float) -> None:
    """Draw the classifier's (the last Linear layer's) weights from N(0, std^2)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"classifier_init_std: {type(model).__name__} has no Linear classifier")
    nn.init.normal_(linear[-1].weight, 0.0, std)


def distribute(model: nn.Module, device: torch.device, world_size: int,
               compile: bool) -> nn.Module:
    """The model the step runs: DDP over the ranks, then ``torch.compile`` (DDP first, so that
    DDP's optimizer splits the graph at its buckets), one static graph per input size."""
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.skip_nnmodule_hook_guards = False  # the feature hook is guarded
        model = torch.compile(model, dynamic=False)
    return model
