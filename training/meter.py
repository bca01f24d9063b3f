"""One epoch's training counters on this rank, and what says that training diverged.

Without a GradScaler a non-finite loss is divergence. With one (fp16), an overflow now and then
is the scaler's job: it skips that step and lowers its scale, so a non-finite loss is left out
of the epoch's mean and only a run of skipped steps longer than ``max_skipped`` is divergence.
The sums stay on the device (no host sync per step); ``state_dict`` is what a mid-epoch
checkpoint keeps, so that a resumed epoch reports what an uninterrupted one would.
"""
from __future__ import annotations

import torch


class EpochMeter:
    def __init__(self, scaler: torch.amp.GradScaler, max_skipped: int, device: torch.device) -> None:
        self.scaler, self.max_skipped, self.device = scaler, max_skipped, device
        self.skipped_in_a_row = 0
        self._scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        self.start_epoch()

    def start_epoch(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.images = torch.zeros((), dtype=torch.float64, device=self.device)  # finite losses'
        self.non_finite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.seen = 0  # images through the step, finite loss or not
        self.mixed = 0  # steps that mixed

    def record(self, loss: torch.Tensor, n: int, mixed: bool = False) -> None:
        """Account one step's mean loss over ``n`` images, after ``scaler.update()``."""
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0) * n
        self.images += finite * n
        self.non_finite |= ~finite
        self.seen += n
        self.mixed += mixed
        if self.scaler.is_enabled():  # the scaler has read its overflow flag already: no new wait
            scale = self.scaler.get_scale()
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if scale < self._scale else 0
            self._scale = scale

    def mean_loss(self) -> float:
        """The epoch's mean loss so far (a host sync)."""
        return self.loss_sum.item() / max(self.images.item(), 1)

    def totals(self) -> list[float]:
        """Loss sum, images with a finite loss, images seen: what ranks add up (a host sync)."""
        return [self.loss_sum.item(), self.images.item(), float(self.seen)]

    def diverged(self) -> torch.Tensor:
        """A 0-d bool tensor: a non-finite loss without a scaler, or too many skipped steps."""
        if self.scaler.is_enabled():
            return torch.tensor(self.skipped_in_a_row > self.max_skipped, device=self.device)
        return self.non_finite.clone()

    def reason(self) -> str:
        if self.scaler.is_enabled():
            return (f"the GradScaler skipped {self.skipped_in_a_row} steps in a row (an fp16 "
                    f"overflow at every step; optim.max_skipped_steps is {self.max_skipped})")
        return "non-finite training loss"

    def state_dict(self) -> dict[str, object]:
        """The epoch's counters so far and the skip count, for a checkpoint in mid-epoch."""
        return {"loss_sum": self.loss_sum.cpu(), "images": self.images.cpu(),
                "non_finite": self.non_finite.cpu(), "seen": self.seen, "mixed": self.mixed,
                "skipped_in_a_row": self.skipped_in_a_row, "scale": self._scale}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.images = state["images"].to(self.device)
        self.non_finite = state["non_finite"].to(self.device)
        self.seen, self.mixed = state["seen"], state["mixed"]
        self.skipped_in_a_row, self._scale = state["skipped_in_a_row"], state["scale"]
