"""An exponential moving average of the model's weights (timm's ``ModelEmaV3`` idea).

``ema = decay * ema + (1 - decay) * weights`` after every optimizer step, for every floating
parameter; buffers (BatchNorm's running statistics, counters) are copied. Every rank keeps its
own copy: DDP keeps the weights identical on all ranks, so the copies are identical too.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [p for p in self.module.parameters() if p.is_floating_point()]
        new = [p.detach() for p in model.parameters() if p.is_floating_point()]
        torch._foreach_lerp_(ema, new, 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
