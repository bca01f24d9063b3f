"""The two-pass step on a ``torch.compile``'d model (inductor, on the CPU): the feature hook
fires inside the compiled graphs, SAGE's input gradient comes through the compiled backward,
and the step gives the eager step's saliency, mix and gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mixing.grafting import SaliencyGrafting
from mixing.sage import SAGE
from mixing.step import TwoPassStep
from tests.test_step import K, assert_grads_close, step_grads


class ConvNet(nn.Module):
    """Three small convolutions; ``stage`` is the last spatial stage (8x8 at 32 px)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(self.stem(x)))


MIXERS = {"grafting": lambda: SaliencyGrafting(K, grid_sizes=[4]), "sage": lambda: SAGE(K)}


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(K, (4,), generator=g))
            for _ in range(steps)]


def run(model: nn.Module, name: str, compiled: bool) -> list:
    """Two steps (the second, after an SGD update, reuses the compiled graphs): per step the
    saliency, mixed images, perm, targets and gradients."""
    torch.manual_seed(0)
    net = model if not compiled else torch.compile(model, backend="inductor")
    step = TwoPassStep(net, MIXERS[name](), clean_weight=1.0, mixed_weight=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    results = []
    for i, (images, labels) in enumerate(batches(2)):
        optimizer.zero_grad(set_to_none=True)
        out = step(images, labels, generator=torch.Generator().manual_seed(i))
        results.append((out.saliency, images, out.mix.perm, out.mix.targets,
                        [g.clone() for g in step_grads(model)]))
        optimizer.step()
    step.remove()
    return results


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(MIXERS))
def test_compiled_step_matches_eager(name):
    """Grafting (forward-hook saliency) and SAGE (input-gradient saliency) on
    ``torch.compile(model)``: the same saliency, mix and gradients as the eager model."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvNet()
    eager = run(copy.deepcopy(model), name, compiled=False)
    compiled = run(model, name, compiled=True)
    for (s_e, x_e, p_e, t_e, g_e), (s_c, x_c, p_c, t_c, g_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(s_c, s_e, rtol=1e-4, atol=1e-6)
        assert torch.equal(p_c, p_e)
        torch.testing.assert_close(x_c, x_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t_c, t_e, rtol=1e-4, atol=1e-6)
        assert_grads_close(g_c, g_e, rtol=1e-3, atol=1e-5)


def test_hook_registered_after_the_first_compiled_call_is_a_clear_error():
    """A compiled model that ran before the step existed was traced without the hook, and
    Dynamo by default does not guard on hooks: the step raises, saying so, rather than mixing
    on nothing (aot_eager: no C compiler needed, quick). The default is set here: the trainer
    turns the guards on for its own compiled model, process-wide."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvNet()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        net = torch.compile(model, backend="aot_eager")
        (images, labels), = batches(1)
        net(images).sum().backward()  # traced now, training mode, input without grad
        step = TwoPassStep(net, MIXERS["grafting"](), feature_layer="stage")
        with pytest.raises(RuntimeError, match="did not run inside capture.*torch.compile'd model "
                                               "only runs hooks registered before its first call"):
            step(images, labels)
    torch._dynamo.reset()
