"""The epoch meter. Divergence under a GradScaler is a run of skipped steps, not one
overflow; without a scaler a non-finite loss is divergence. With a real GradScaler on the CPU and an injected inf loss."""
from __future__ import annotations

import torch
from torch import nn

from training.meter import EpochMeter


def step(model, optimizer, scaler, guard, loss_value: float | None) -> None:
    optimizer.zero_grad()
    loss = model(torch.ones(4, 3)).square().mean()
    if loss_value is not None:  # an overflow: the loss (and so every gradient) is inf
        loss = loss * loss_value
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    guard.record(loss, 4)


def setup(enabled: bool):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=enabled)
    return model, optimizer, scaler, EpochMeter(scaler, max_skipped=3, device=torch.device("cpu"))


def test_an_overflow_under_a_scaler_is_a_skipped_step_not_divergence():
    model, optimizer, scaler, guard = setup(enabled=True)
    step(model, optimizer, scaler, guard, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, optimizer, scaler, guard, float("inf"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped
    assert guard.skipped_in_a_row == 1 and not guard.diverged()
    step(model, optimizer, scaler, guard, None)
    assert guard.skipped_in_a_row == 0 and not guard.diverged()
    assert torch.isfinite(guard.loss_sum) and guard.images.item() == 8  # the inf step left out


def test_a_run_of_skipped_steps_longer_than_the_limit_is_divergence():
    model, optimizer, scaler, guard = setup(enabled=True)
    for i in range(4):
        assert not guard.diverged(), i
        step(model, optimizer, scaler, guard, float("inf"))
    assert guard.diverged() and "skipped 4 steps in a row" in guard.reason()


def test_without_a_scaler_one_non_finite_loss_is_divergence():
    model, optimizer, scaler, guard = setup(enabled=False)
    step(model, optimizer, scaler, guard, None)
    assert not guard.diverged()
    step(model, optimizer, scaler, guard, float("nan"))
    assert guard.diverged() and guard.reason() == "non-finite training loss"


def test_the_state_of_a_mid_epoch_meter_restores_every_counter():
    """A resumed epoch continues the interrupted one's sums: loss, images with a finite loss,
    images seen (the inf step's too), mixed steps, the skip streak and the scale."""
    model, optimizer, scaler, meter = setup(enabled=True)
    step(model, optimizer, scaler, meter, None)
    step(model, optimizer, scaler, meter, float("inf"))
    meter.record(torch.tensor(2.0), 6, mixed=True)
    saved = meter.state_dict()
    fresh = setup(enabled=True)[3]
    fresh.load_state_dict(saved)
    assert fresh.totals() == meter.totals() and fresh.totals()[1:] == [10.0, 14.0]
    assert (fresh.mixed, fresh.skipped_in_a_row, fresh.diverged()) == (1, 0, False)
    assert fresh.mean_loss() == meter.mean_loss()
    fresh.start_epoch()
    assert fresh.totals() == [0.0, 0.0, 0.0] and fresh.mixed == 0
