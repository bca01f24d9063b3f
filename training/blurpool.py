"""FFCV's BlurPool: anti-aliased downsampling by a 3x3 binomial blur before strided convolutions."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
