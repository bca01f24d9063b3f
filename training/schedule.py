"""The run's schedule over epochs and iterations: the learning rate, which epochs mix, and
the whole plan the dry run prints and draws."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import Shard
from pipelines.resolution import Phases, schedule_from_dict

from .data import count_train_images
from .report import schedule_table, write_schedule_png


@dataclass(frozen=True)
class PiecewiseLinearLR:
    """LR as a piecewise-linear function of the fractional epoch, evaluated per iteration at
    ``epoch + (step + offset) / steps``: offset 0 in FFCV's code, 1 in Wong et al.'s and
    PuzzleMix's (the LR of a step is the one at its end)."""

    epochs: tuple[float, ...]
    values: tuple[float, ...]
    offset: int = 0

    def __call__(self, epoch: float) -> float:
        """At a knot given twice (a phase boundary's jump) the first value: the LR that ends
        the phase before, as each phase's own knots give it."""
        i = int(np.searchsorted(self.epochs, epoch, side="left"))
        if i < len(self.epochs) and self.epochs[i] == epoch:
            return float(self.values[i])
        return float(np.interp(epoch, self.epochs, self.values))

    def at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        return self(epoch + (step + self.offset) / steps_per_epoch)


def lr_schedule(optim: Any) -> PiecewiseLinearLR:
    """Triangular (FFCV's cyclic: lr*start_factor -> lr at the peak -> 0, as FFCV evaluates
    it) or piecewise knots (as Wong et al.'s and PuzzleMix's code evaluate them)."""
    if optim.lr_schedule == "triangular":
        return PiecewiseLinearLR((0.0, float(optim.lr_peak_epoch), float(optim.epochs)),
                                 (optim.lr * optim.lr_start_factor, optim.lr, 0.0))
    knots = sorted((float(e), float(v)) for e, v in optim.lr_knots)
    return PiecewiseLinearLR(tuple(e for e, _ in knots), tuple(v for _, v in knots), offset=1)


def mixes_in(cfg: Any, epoch: int) -> bool:
    """Whether ``epoch`` mixes (after the warm-up, before mix.off_epoch; mix.prob per batch)."""
    return (cfg.mix.kind != "none" and epoch >= cfg.mix.warmup_epochs
            and (cfg.mix.off_epoch is None or epoch < cfg.mix.off_epoch))


def epoch_plan(cfg: Any, images: int, world_size: int, two_pass: bool) -> list[dict[str, Any]]:
    """Per epoch: its phase (index in a phase schedule, else 0), resolution, the crop's min
    scale, global and per-rank batch, steps, the LR at the first and the last step, mixing and
    the loss weights of its step (``two_pass``: a saliency mixer)."""
    schedule, lr = schedule_from_dict(cfg.data.resolution), lr_schedule(cfg.optim)
    weights = ([cfg.mix.clean_weight, cfg.mix.mixed_weight] if cfg.mix.clean_weight is not None
               else [1 - cfg.mix.eta, cfg.mix.eta])
    starts = [p.start_epoch for p in schedule.phases] if isinstance(schedule, Phases) else [0]
    rows = []
    for epoch in range(cfg.optim.epochs):
        batch = schedule.batch_size(epoch) or cfg.data.batch_size
        steps = Shard(0, world_size).split(images, batch // world_size, train=True).num_batches
        mixing = mixes_in(cfg, epoch)
        rows.append({"epoch": epoch, "phase": bisect.bisect_right(starts, epoch) - 1,
                     "resolution": schedule.resolution(epoch),
                     "min_scale": schedule.min_scale(epoch), "batch": batch,
                     "batch_per_rank": batch // world_size, "steps": steps,
                     "lr_first": lr.at(epoch, 0, steps), "lr_last": lr.at(epoch, steps - 1, steps),
                     "mixing": cfg.mix.kind if mixing else "none",
                     "mix_prob": cfg.mix.prob if mixing else 0.0,
                     "loss_weights": weights if mixing and two_pass else [1.0]})
    return rows


def dry_run(cfg: Any, two_pass: bool) -> list[dict[str, Any]]:
    """Count the training images (no decoding), print the schedule of every epoch and write
    ``schedule.png`` in the run folder; nothing is trained."""
    world_size = Shard.from_env().world_size
    images = count_train_images(cfg.data)
    rows = epoch_plan(cfg, images, world_size, two_pass)
    print(schedule_table(rows, images, world_size))
    path = write_schedule_png(rows, lr_schedule(cfg.optim),
                              Path(cfg.run.out_dir) / cfg.run.name / "schedule.png")
    print(f"wrote {path}")
    return rows
