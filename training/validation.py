"""What the trainer's configuration fields' declared bounds cannot express: checks that relate
fields, probe the model or the launcher. Every failure is a ConfigError naming the field.

Run before anything else starts (``validate`` after parsing, ``check_world`` before any
process group exists), so that a bad configuration costs no data preparation and no ranks.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Mapping

import torch

from mixing.base import Mixer
from mixing.saliency import find_feature_layer, get_layer
from pipelines.resolution import Phases, schedule_from_dict

from . import config as conf
from .config import ConfigError
from .models import check_arch, create_model


def _need(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}")


def resume_overrides(cfg: Any) -> list[str]:
    """The fields ``run.resume_override`` lets differ from a checkpoint's config."""
    return [k.strip() for k in (cfg.run.resume_override or "").split(",") if k.strip()]


def validate(cfg: Any, mixers: Mapping[str, type[Mixer]]) -> None:
    """Check the settings' bounds, then what relates fields: the LR knots, the resolution
    schedules, every mixer section (each built once with a made-up class count), the feature
    layer of a feature-saliency mixer (probed on the architecture), the resume overrides."""
    conf.check_settings(cfg)
    check_arch(cfg.model.arch)
    _need(cfg.mix.off_epoch is None or cfg.mix.off_epoch >= cfg.mix.warmup_epochs, "mix.off_epoch",
          f"must be >= mix.warmup_epochs ({cfg.mix.warmup_epochs}) or null")
    _need(not cfg.run.wandb or importlib.util.find_spec("wandb") is not None, "run.wandb",
          "Weights & Biases is not installed (pip install wandb)")
    _need(0 <= cfg.optim.lr_peak_epoch <= cfg.optim.epochs, "optim.lr_peak_epoch",
          f"must lie in [0, epochs={cfg.optim.epochs}]")
    weights = (cfg.mix.clean_weight, cfg.mix.mixed_weight)
    _need(weights.count(None) in (0, 2), "mix.clean_weight",
          "set it together with mix.mixed_weight (or neither: eta's convex pair)")
    _need(None in weights or (min(weights) >= 0 and max(weights) > 0), "mix.clean_weight",
          "the pass weights must be >= 0 and not both 0")
    _check_data(cfg)
    if cfg.optim.lr_schedule == "piecewise":
        _check_knots(cfg.optim.lr_knots)
    for name, cls in mixers.items():  # every section, used or not
        try:
            cls(1000, label_smoothing=cfg.optim.label_smoothing,
                **dataclasses.asdict(getattr(cfg, name)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: {e}") from None
    if mixers.get(cfg.mix.kind, Mixer).saliency_kind == "feature":
        _check_feature_layer(cfg)
    names = conf.sections(cfg)
    for key in resume_overrides(cfg):
        section, _, name = key.partition(".")
        _need(section in names and name in {f.name for f in dataclasses.fields(getattr(cfg, section))},
              "run.resume_override", f"unknown config field {key!r}")


def _check_data(cfg: Any) -> None:
    data = cfg.data
    _need(data.ffcv_order == "random" or data.loader == "ffcv", "data.ffcv_order",
          f"only the ffcv loader has this order ({data.loader} shuffles the whole dataset)")
    _need(data.decode == "auto" or data.loader == "folder", "data.decode",
          f"only the folder loader decodes on request ({data.loader} decodes on the GPU itself)")
    _need(data.decode != "gpu" or torch.cuda.is_available(), "data.decode",
          "gpu needs CUDA, and none is present (auto decodes on the GPU only when there is one)")
    _need(data.workers is None or data.workers >= (data.loader != "folder"), "data.workers",
          "must be >= 1 for dali and ffcv (threads/processes), >= 0 for folder "
          "(0: load in the main process)")
    for key, spec in (("data.resolution", data.resolution),
                      ("data.val_resolution", data.val_resolution)):
        try:
            schedule_from_dict(spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None


def _check_knots(knots: Any) -> None:
    _need(bool(knots) and all(isinstance(k, (list, tuple)) and len(k) == 2 for k in knots),
          "optim.lr_knots", "piecewise schedule needs [[epoch, lr], ...]")
    _need(all(isinstance(v, (int, float)) and not isinstance(v, bool) for k in knots for v in k),
          "optim.lr_knots", "epochs and learning rates must be numbers")
    epochs = [float(k[0]) for k in knots]
    _need(all(b >= a for a, b in zip(epochs, epochs[1:])), "optim.lr_knots",
          "epochs must not decrease")
    _need(all(float(k[1]) >= 0 for k in knots), "optim.lr_knots", "learning rates must be >= 0")


def _check_feature_layer(cfg: Any) -> None:
    """The named layer exists, or one is found at the first mixed epoch's resolution."""
    model = create_model(cfg.model.arch, 1000)
    size = schedule_from_dict(cfg.data.resolution).resolution(cfg.mix.warmup_epochs)
    try:
        if cfg.mix.feature_layer is not None:
            get_layer(model, cfg.mix.feature_layer)
        else:
            find_feature_layer(model, size, min_size=cfg.mix.feature_min_size)
    except (AttributeError, KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"mix.feature_layer: {e}") from None


def check_world(cfg: Any, world_size: int) -> None:
    """Batch sizes must split evenly over the ranks (and each rank's into the micro-batches)."""
    sizes = [("data.batch_size", cfg.data.batch_size),
             ("data.val_batch_size", cfg.data.val_batch_size or cfg.data.batch_size)]
    schedule = schedule_from_dict(cfg.data.resolution)
    phases = schedule.phases if isinstance(schedule, Phases) else ()
    sizes += [(f"data.resolution (phase from epoch {p.start_epoch})", p.bs) for p in phases if p.bs]
    k = cfg.optim.accum_steps
    for key, bs in sizes:
        if bs % world_size:
            raise ConfigError(f"{key}: batch size {bs} is not divisible by the world size "
                              f"{world_size}")
        if key != "data.val_batch_size" and bs // world_size % k:
            raise ConfigError(f"{key}: the per-rank batch {bs // world_size} does not split "
                              f"into optim.accum_steps={k} equal micro-batches")
