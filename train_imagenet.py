"""salmix: fast ImageNet training with saliency-guided mixing.

One command on one GPU, ``torchrun`` on many, and the same command on a CPU against the
embedded demo dataset::

    python train_imagenet.py --config configs/rn50_ffcv.yaml --data /imagenet --loader ffcv
    torchrun --nproc_per_node 8 train_imagenet.py --config configs/rn50_fast.yaml --data /imagenet
    python train_imagenet.py --config configs/demo.yaml          # CPU, demo dataset

The step: loader -> clean forward/backward (saliency captured) -> mix in place -> mixed
forward/backward (gradients accumulate) -> optimizer step with the per-iteration cyclic LR.
Configuration: typed sections below, set from a YAML file (``--config``) and the command line
(``--section.field value``; the command line wins), validated before anything runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import yaml

import pipelines
from mixing.baselines import CutMix, Mixup
from mixing.base import Mixer
from mixing.grafting import SaliencyGrafting
from mixing.sage import SAGE
from mixing.step import TwoPassStep
from pipelines.resolution import Phase, Phases, ResolutionSchedule, schedule_from_dict

MIXERS: dict[str, type[Mixer]] = {
    "mixup": Mixup, "cutmix": CutMix, "grafting": SaliencyGrafting, "sage": SAGE}
CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """Any torchvision classification model (``torchvision.models.list_models``)."""
    blurpool: bool = False
    """FFCV's BlurPool before every strided convolution."""
    channels_last: bool = True


@dataclass
class DataConfig:
    path: str | None = None
    """ImageFolder root with train/ and val/, or a folder with train.beton and val.beton;
    None: the embedded demo dataset."""
    loader: Literal["folder", "dali", "ffcv"] = "folder"
    batch_size: int = 512
    """Global batch size (all ranks together); a phase schedule may set its own."""
    resolution: Any = 224
    """Train resolution: an int or a schedule mapping (kind: fixed | ramp | phases)."""
    val_resolution: int = 224
    val_batch_size: int | None = None
    workers: int | None = None
    demo_root: str = "data/demo"
    beton_dir: str = "data/ffcv"
    dali_reader: Literal["feed", "file"] = "feed"
    """DALI only: ``feed`` (exact, resumable epoch order) or ``file`` (DALI's
    ``fn.readers.file``, NVIDIA's recipe; see ``pipelines/dali.py``)."""
    ffcv_max_resolution: int = 256
    ffcv_jpeg_quality: int = 90
    ffcv_compress_probability: float = 0.5


@dataclass
class OptimConfig:
    epochs: int = 16
    lr: float = 0.5
    """Peak learning rate of the triangular schedule."""
    lr_schedule: Literal["triangular", "piecewise"] = "triangular"
    lr_peak_epoch: float = 2.0
    lr_start_factor: float = 1e-4
    """Triangular: the LR starts at lr * lr_start_factor and ends at 0 (FFCV's 'cyclic')."""
    lr_knots: list | None = None
    """Piecewise-linear: [[epoch, lr], ...], interpolated per iteration."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: off)."""
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    """auto: fp16 on CUDA, none on the CPU."""


@dataclass
class MixConfig:
    kind: Literal["none", "mixup", "cutmix", "grafting", "sage"] = "none"
    warmup_epochs: int = 0
    """Epochs trained without mixing first (the Saliency Grafting paper warms up 5)."""
    eta: float = 0.5
    """Weight of the mixed pass in the two-pass step (the clean pass gets 1 - eta)."""
    feature_layer: str | None = None
    """Module whose output gives forward saliency (default: the last conv stage)."""
    gradient_reduction: Literal["mean_abs", "l2"] = "mean_abs"


@dataclass
class EvalConfig:
    every: int = 1
    """Evaluate every N epochs (and always at the end)."""
    flip_tta: bool = False
    """Average the logits of each image and its mirror image."""


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str = "run"
    seed: int = 0
    deterministic: bool = False
    resume: str | None = None
    """'auto' (the newest valid checkpoint of this run) or a checkpoint path."""
    keep_last: int = 3
    stop_after: int = 0
    """Stop after this many epochs in this session (0: train to the end), e.g. to fit a
    scheduler's time limit; continue with --resume auto."""
    profile: int = 0
    """Profile this many training steps, report where the time goes, and exit."""
    profile_trace: str | None = None
    """With ``profile``: also write a torch.profiler trace here (relative: in the run folder)."""
    preview: str | None = None
    """Write a PNG grid of mixed pairs at the first mixed step (relative: in the run folder)."""
    progress: bool = True


def _mixer_section(name: str, cls: type[Mixer]) -> type:
    """A config dataclass of ``cls``'s hyperparameters, with its own defaults (one source)."""
    hints = typing.get_type_hints(cls.__init__)
    fields = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "num_classes", "label_smoothing") or p.kind not in (
                p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        default = p.default
        spec = (field(default_factory=lambda d=default: type(d)(d))
                if isinstance(default, (list, dict, set)) else field(default=default))
        fields.append((p.name, hints.get(p.name, Any), spec))
    return dataclasses.make_dataclass(f"{name.capitalize()}Config", fields)


MixerSections = {name: _mixer_section(name, cls) for name, cls in MIXERS.items()}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mixup: Any = field(default_factory=MixerSections["mixup"])
    cutmix: Any = field(default_factory=MixerSections["cutmix"])
    grafting: Any = field(default_factory=MixerSections["grafting"])
    sage: Any = field(default_factory=MixerSections["sage"])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (lists, not tuples), as saved in config.yaml and in checkpoints."""
        return {s: _plain(dataclasses.asdict(getattr(self, s))) for s in SECTIONS}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


SECTIONS = [f.name for f in dataclasses.fields(Config)]

#: Fields that never change what training computes; every other field must match on resume.
RESULT_NEUTRAL = {"data.path", "data.workers", "data.demo_root", "data.beton_dir",
                  "data.val_batch_size", "eval.every", "eval.flip_tta", "data.val_resolution",
                  "run.out_dir", "run.name", "run.resume", "run.keep_last", "run.stop_after",
                  "run.profile", "run.profile_trace", "run.preview", "run.progress"}

ALIASES = {"--arch": "model.arch", "--data": "data.path", "--loader": "data.loader",
           "--mix": "mix.kind", "--epochs": "optim.epochs", "--batch-size": "data.batch_size",
           "--amp": "optim.amp", "--resume": "run.resume", "--profile": "run.profile",
           "--profile-trace": "run.profile_trace", "--preview": "run.preview",
           "--out": "run.out_dir", "--name": "run.name", "--seed": "run.seed"}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` if it fits ``hint`` (ints are accepted for floats), else raise."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_hint_name(hint)}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected None")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list")
        return list(value) if (origin or hint) is list else tuple(value)
    if isinstance(hint, type):
        if hint is int and isinstance(value, bool) or not isinstance(value, hint):
            raise ConfigError(f"{key}: {value!r} is not a valid {_hint_name(hint)}")
        return value
    return value


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _set(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {key!r}; sections: {SECTIONS}")
    obj = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ConfigError(f"unknown config field {key!r}" +
                          (f"; did you mean {', '.join(section + '.' + c for c in close)}?" if close
                           else f"; {section} has {names}"))
    hint = typing.get_type_hints(type(obj))[name]
    setattr(obj, name, _check_type(key, value, hint))


def _flatten(tree: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        for name, value in values.items():
            out[f"{section}.{name}"] = value
    return out


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults < YAML file (``--config``) < command line; then validate."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every field is also settable as --section.field VALUE (YAML syntax), e.g. "
               "--optim.lr 1.7 --grafting.temperature 0.3 --data.resolution "
               "'{kind: ramp, min_res: 160, max_res: 192, start_ramp: 11, end_ramp: 13}'.")
    parser.add_argument("--config", help="YAML preset (see configs/)")
    for flag, key in ALIASES.items():
        parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"= --{key}")
    cfg = Config()
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            parser.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}",
                                default=argparse.SUPPRESS, metavar="VALUE")
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        key = flag[2:].split("=")[0]
        if "." in key:
            _set(cfg, key, None)  # raises: unknown section or field, with suggestions
        options = ["--config", *ALIASES]
        raise ConfigError(f"unrecognised argument {flag!r}" + _suggest(flag, options))
    args = vars(known)
    preset = args.pop("config", None)
    if preset:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
        for key, value in _flatten(tree, str(path)).items():
            _set(cfg, key, value)
    for key, raw in args.items():
        _set(cfg, key, yaml.safe_load(raw) if isinstance(raw, str) else raw)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that types cannot express; raise ConfigError naming the field."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {what}")

    need(cfg.model.arch in classification_models(), "model.arch",
         f"unknown torchvision classification model {cfg.model.arch!r}"
         + _suggest(cfg.model.arch, classification_models()))
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(cfg.optim.epochs >= 1, "optim.epochs", "must be >= 1")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(0 <= cfg.optim.lr_peak_epoch <= cfg.optim.epochs, "optim.lr_peak_epoch",
         f"must lie in [0, epochs={cfg.optim.epochs}]")
    need(0 <= cfg.optim.momentum < 1, "optim.momentum", "must lie in [0, 1)")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing", "must lie in [0, 1)")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(0 <= cfg.mix.eta <= 1, "mix.eta", "must lie in [0, 1]")
    need(cfg.mix.warmup_epochs >= 0, "mix.warmup_epochs", "must be >= 0")
    need(cfg.data.workers is None or cfg.data.workers >= (cfg.data.loader != "folder"),
         "data.workers", "must be >= 1 for dali and ffcv (threads/processes), >= 0 for folder "
         "(0: load in the main process)")
    need(cfg.eval.every >= 1, "eval.every", "must be >= 1")
    need(cfg.run.keep_last >= 1, "run.keep_last", "must be >= 1")
    need(cfg.run.stop_after >= 0, "run.stop_after", "must be >= 0")
    need(cfg.run.profile >= 0, "run.profile", "must be >= 0")
    if cfg.optim.lr_schedule == "piecewise":
        knots = cfg.optim.lr_knots
        need(bool(knots) and all(isinstance(k, (list, tuple)) and len(k) == 2 for k in knots),
             "optim.lr_knots", "piecewise schedule needs [[epoch, lr], ...]")
        epochs = [float(k[0]) for k in knots]
        need(all(b >= a for a, b in zip(epochs, epochs[1:])), "optim.lr_knots",
             "epochs must not decrease")
        need(all(float(k[1]) >= 0 for k in knots), "optim.lr_knots", "learning rates must be >= 0")
    try:
        schedule_from_dict(cfg.data.resolution)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.resolution: {e}") from None
    if cfg.mix.kind != "none":  # the mixer's own checks, with a made-up class count
        try:
            build_mixer(cfg, num_classes=1000)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{cfg.mix.kind}: {e}") from None


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def result_fields(cfg_dict: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The flattened fields that change what training computes (unused mixers' don't)."""
    unused = set(MIXERS) - {cfg_dict["mix"]["kind"]}
    flat = _flatten({s: v for s, v in cfg_dict.items() if s not in unused}, "config")
    return {k: v for k, v in flat.items() if k not in RESULT_NEUTRAL}


# ------------------------------------------------------------------------------------------
# Distributed set-up
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> Dist:
    """Rank, world size and local rank as torchrun sets them (a single process otherwise)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def check_world(cfg: Config, world_size: int) -> None:
    """Batch sizes must split evenly over the ranks: checked before any process group starts."""
    sizes = [("data.batch_size", cfg.data.batch_size),
             ("data.val_batch_size", cfg.data.val_batch_size or cfg.data.batch_size)]
    schedule = schedule_from_dict(cfg.data.resolution)
    phases = schedule.phases if isinstance(schedule, Phases) else ()
    sizes += [(f"data.resolution (phase from epoch {p.start_epoch})", p.bs) for p in phases if p.bs]
    for key, bs in sizes:
        if bs % world_size:
            raise ConfigError(f"{key}: batch size {bs} is not divisible by the world size "
                              f"{world_size}")


def init_distributed() -> tuple[Dist, torch.device]:
    """Read torchrun's environment; NCCL on GPUs, gloo on the CPU."""
    rank, world_size, local_rank = dataclasses.astuple(world_from_env())
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank), device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------
# Model, optimizer, learning rate, mixer
# ------------------------------------------------------------------------------------------

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


def build_model(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    model = torchvision.models.get_model(cfg.model.arch, weights=None, num_classes=num_classes)
    if cfg.model.blurpool:
        apply_blurpool(model)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: BatchNorm parameters and biases get no weight decay, the rest do.

    Decided by module type and by being a module's ``bias``, never by parameter names.
    """
    no_decay: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            no_decay.update({id(p): p for p in module.parameters(recurse=False)})
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            no_decay[id(bias)] = bias
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": list(no_decay.values()), "weight_decay": 0.0}]


@dataclass(frozen=True)
class PiecewiseLinearLR:
    """LR as a piecewise-linear function of the fractional epoch, evaluated per iteration."""

    epochs: tuple[float, ...]
    values: tuple[float, ...]

    def __call__(self, epoch: float) -> float:
        return float(np.interp(epoch, self.epochs, self.values))

    def at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        return self(epoch + step / steps_per_epoch)


def lr_schedule(optim: OptimConfig) -> PiecewiseLinearLR:
    """Triangular (FFCV's cyclic: lr*start_factor -> lr at the peak -> 0) or piecewise knots."""
    if optim.lr_schedule == "triangular":
        return PiecewiseLinearLR((0.0, float(optim.lr_peak_epoch), float(optim.epochs)),
                                 (optim.lr * optim.lr_start_factor, optim.lr, 0.0))
    knots = sorted((float(e), float(v)) for e, v in optim.lr_knots)
    return PiecewiseLinearLR(tuple(e for e, _ in knots), tuple(v for _, v in knots))


def build_mixer(cfg: Config, num_classes: int) -> Mixer | None:
    if cfg.mix.kind == "none":
        return None
    params = dataclasses.asdict(getattr(cfg, cfg.mix.kind))
    return MIXERS[cfg.mix.kind](num_classes, label_smoothing=cfg.optim.label_smoothing, **params)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    amp = cfg.optim.amp
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

@dataclass
class Data:
    train: pipelines.Loader
    val: pipelines.Loader
    num_classes: int
    classes: list[str] | None


def per_rank_schedule(spec: Any, world_size: int) -> ResolutionSchedule:
    """The resolution schedule with its global batch sizes divided over the ranks."""
    schedule = schedule_from_dict(spec)
    if isinstance(schedule, Phases):
        return Phases(tuple(Phase(p.start_epoch, p.res, p.bs and p.bs // world_size)
                            for p in schedule.phases))
    if getattr(schedule, "bs", None):
        return dataclasses.replace(schedule, bs=schedule.bs // world_size)
    return schedule


def resolve_sources(cfg: Config, dist_: Dist) -> tuple[Any, Any]:
    """(train source, val source) for the chosen loader; writes the demo set / betons if needed."""
    if cfg.data.path is None:
        from pipelines.demo import ensure_demo_dataset
        root = Path(cfg.data.demo_root)
        if dist_.main:
            ensure_demo_dataset(root)
        barrier()
    else:
        root = Path(cfg.data.path)
        if not root.is_dir():
            raise FileNotFoundError(f"data.path: {root} does not exist or is not a directory")
    if cfg.data.loader == "ffcv":
        if (root / "train.beton").is_file() and (root / "val.beton").is_file():
            return root / "train.beton", root / "val.beton"
        from pipelines.ffcv import ensure_beton
        out = Path(cfg.data.beton_dir) / root.resolve().name
        tag = (f"r{cfg.data.ffcv_max_resolution}_q{cfg.data.ffcv_jpeg_quality}"
               f"_p{cfg.data.ffcv_compress_probability}")
        sources = []
        for split in ("train", "val"):
            beton = out / f"{split}_{tag}.beton"
            if dist_.main:
                ensure_beton(_split_dir(root, split), beton,
                             max_resolution=cfg.data.ffcv_max_resolution,
                             jpeg_quality=cfg.data.ffcv_jpeg_quality,
                             compress_probability=cfg.data.ffcv_compress_probability)
            sources.append(beton)
        barrier()
        return tuple(sources)
    return _split_dir(root, "train"), _split_dir(root, "val")


def _split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise FileNotFoundError(f"data.path: {root} has no {split}/ folder (expected an "
                                f"ImageFolder root with train/ and val/)")
    return path


def build_data(cfg: Config, dist_: Dist, device: torch.device, dtype: torch.dtype) -> Data:
    train_src, val_src = resolve_sources(cfg, dist_)
    ws = dist_.world_size
    output = pipelines.OutputSpec(device=device, dtype=dtype, channels_last=cfg.model.channels_last)
    shard = pipelines.Shard(dist_.rank, ws)
    common = dict(output=output, shard=shard, seed=cfg.run.seed, num_workers=cfg.data.workers)
    if cfg.data.loader == "dali":
        common["reader"] = cfg.data.dali_reader
    train = pipelines.make_loader(cfg.data.loader, train_src, train=True,
                                  batch_size=cfg.data.batch_size // ws,
                                  resolution=per_rank_schedule(cfg.data.resolution, ws), **common)
    val = pipelines.make_loader(cfg.data.loader, val_src, train=False,
                                batch_size=(cfg.data.val_batch_size or cfg.data.batch_size) // ws,
                                resolution=cfg.data.val_resolution, **common)
    if len(train) == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} leaves no full batch in the "
                          f"{train.num_samples} training images ({ws} rank(s))")
    if train.num_classes != val.num_classes:
        raise ValueError(f"train has {train.num_classes} classes but val has {val.num_classes}")
    classes = None
    if cfg.data.loader != "ffcv":
        from pipelines.imagefolder import scan_image_folder
        classes = list(scan_image_folder(train_src).classes)
    return Data(train, val, train.num_classes, classes)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------

def rng_state(mix_gen: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate(),
            "mix": mix_gen.get_state()}


def set_rng_state(state: dict[str, Any], mix_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    mix_gen.set_state(state["mix"])


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpoints:
    """``ckpt_epochNNNN.pt`` files of one run: the last K kept, plus ``best.pt``."""

    def __init__(self, folder: Path, keep_last: int) -> None:
        self.folder = folder
        self.keep_last = keep_last

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("ckpt_epoch*.pt"))

    def save(self, state: dict[str, Any], epoch: int, is_best: bool) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"ckpt_epoch{epoch:04d}.pt"
        atomic_save(state, path)
        if is_best:
            tmp = self.folder / ".best.pt.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, self.folder / "best.pt")
        for old in self.paths()[:-self.keep_last]:
            old.unlink()
        return path

    def load_newest_valid(self, log) -> tuple[Path, dict[str, Any]] | None:
        for path in reversed(self.paths()):
            try:
                return path, load_checkpoint(path)
            except Exception as e:  # a truncated or foreign file: fall back to the previous one
                log(f"skipping checkpoint {path}: cannot be loaded ({type(e).__name__}: {e})")
        return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a salmix checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def check_resumable(saved: dict[str, Any], cfg: Config, world_size: int, path: Path) -> None:
    """Refuse a checkpoint whose config differs in a field that changes the result."""
    old, new = result_fields(saved["config"]), result_fields(cfg.to_dict())
    old["world_size"], new["world_size"] = saved["world_size"], world_size
    for key in [*old, *(k for k in new if k not in old)]:  # config order: mix.kind first
        if old.get(key) != new.get(key):
            raise ConfigError(
                f"cannot resume from {path}: {key} was {old.get(key)!r} there but is "
                f"{new.get(key)!r} now; resume with the same value or start a new run "
                f"(--run.name)")


# ------------------------------------------------------------------------------------------
# Profiling, logging, preview
# ------------------------------------------------------------------------------------------

STAGES = ("data", "clean", "saliency", "mix", "mixed", "optimizer")


class StageTimer:
    """Wall time per stage; synchronises the device at stage edges (only used when profiling)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals = dict.fromkeys(STAGES, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start


def report_profile(timer: StageTimer, steps: int, images: int, out: Path, log) -> dict[str, Any]:
    total = sum(timer.totals.values())
    rows = {k: {"seconds_per_step": v / steps, "share": v / total if total else 0.0}
            for k, v in timer.totals.items()}
    result = {"steps": steps, "images": images, "images_per_second": images / total,
              "seconds_per_step": total / steps, "stages": rows}
    lines = [f"{'stage':<10} {'ms/step':>10} {'share':>7}"]
    lines += [f"{k:<10} {1e3 * r['seconds_per_step']:>10.1f} {100 * r['share']:>6.1f}%"
              for k, r in rows.items()]
    lines.append(f"{'total':<10} {1e3 * total / steps:>10.1f}   -> {result['images_per_second']:.1f} images/s")
    log("\n".join(lines))
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 2.2))
    left = 0.0
    for k, r in rows.items():
        ax.barh([0], [1e3 * r["seconds_per_step"]], left=left, label=f"{k} {100 * r['share']:.0f}%")
        left += 1e3 * r["seconds_per_step"]
    ax.set_yticks([])
    ax.set_xlabel("ms per step")
    ax.set_title(f"{result['images_per_second']:.1f} images/s")
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.savefig(out / "profile.png", bbox_inches="tight", dpi=120)
    plt.close(fig)
    return result


def write_preview(path: Path, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor,
                  out, classes: list[str] | None, count: int = 4) -> None:
    """A PNG grid per pair: source, partner, their saliency, the mask, the mix, label weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(pipelines.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(pipelines.IMAGENET_STD).view(3, 1, 1)

    def show(ax, img: torch.Tensor) -> None:
        ax.imshow((img.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())

    def heat(ax, m: torch.Tensor | None) -> None:
        if m is not None:
            ax.imshow(m.float().cpu().reshape(m.shape[-2:]).numpy(), cmap="magma", vmin=0)

    mix, sal = out.mix, out.saliency
    name = (lambda k: classes[k]) if classes else str
    n = min(count, before.shape[0])
    cols = ["source", "partner", "saliency src", "saliency partner", "mask", "mixed"]
    fig, axes = plt.subplots(n, len(cols), figsize=(2 * len(cols), 2.1 * n), squeeze=False)
    for i in range(n):
        j = int(mix.perm[i])
        show(axes[i, 0], before[i])
        show(axes[i, 1], before[j])
        heat(axes[i, 2], None if sal is None else sal[i])
        heat(axes[i, 3], None if sal is None else sal[j])
        heat(axes[i, 4], None if mix.mask is None else mix.mask[i])
        show(axes[i, 5], after[i])
        w = float(mix.weight[i])
        axes[i, 0].set_ylabel(f"{name(int(labels[i]))}: {w:.2f}\n{name(int(labels[j]))}: {1 - w:.2f}",
                              fontsize=8)
    for ax, title in zip(axes[0], cols):
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", dpi=100)
    plt.close(fig)


def epoch_line(stats: dict[str, Any], epochs: int) -> str:
    """One readable line per epoch (the JSON line in log.jsonl has every figure)."""
    line = (f"epoch {stats['epoch'] + 1}/{epochs}: train loss {stats['train_loss']:.3f}, "
            f"{stats['resolution']} px, mix {stats['mixing']}, "
            f"{stats['images_per_second']:.0f} img/s, {stats['epoch_seconds']:.0f} s")
    if "val_top1" in stats:
        line += f"; val top-1 {100 * stats['val_top1']:.1f}%, top-5 {100 * stats['val_top5']:.1f}%"
    return line


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


# ------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        check_world(cfg, world_from_env().world_size)
        self.dist, self.device = init_distributed()
        seed_everything(cfg.run.seed + self.dist.rank, cfg.run.deterministic)
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.data = build_data(cfg, self.dist, self.device, self.amp_dtype or torch.float32)
        self.num_classes = self.data.num_classes
        self.mixer = build_mixer(cfg, self.num_classes)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg, self.num_classes, self.device)
        self.model = model
        if self.dist.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(param_groups(model, cfg.optim.weight_decay), lr=0.0,
                                         momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.lr = lr_schedule(cfg.optim)
        self.step = TwoPassStep(self.model, self.mixer, eta=cfg.mix.eta,
                                feature_layer=cfg.mix.feature_layer,
                                gradient_reduction=cfg.mix.gradient_reduction,
                                label_smoothing=cfg.optim.label_smoothing,
                                scaler=self.scaler, amp_dtype=self.amp_dtype)
        self.mix_gen = torch.Generator(self.device).manual_seed(
            cfg.run.seed * 1_000_003 + self.dist.rank)
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", cfg.run.keep_last)
        self.start_epoch, self.global_step, self.best_top1 = 0, 0, -1.0
        self.preview_pending = cfg.run.preview is not None

    def log(self, msg: str) -> None:
        if self.dist.main:
            print(msg, flush=True)

    # -- run ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.log("config:\n" + config_yaml.rstrip())
        self.maybe_resume()  # first: a refused run leaves the folder's config.yaml as it was
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_yaml)
        if cfg.run.profile:
            return self.profile(cfg.run.profile)
        history = []
        end = cfg.optim.epochs
        if cfg.run.stop_after:
            end = min(end, self.start_epoch + cfg.run.stop_after)
        for epoch in range(self.start_epoch, end):
            stats = self.train_epoch(epoch)
            last = epoch + 1 == cfg.optim.epochs
            if last or (epoch + 1) % cfg.eval.every == 0:
                stats.update(self.evaluate())
            is_best = stats.get("val_top1", -1.0) > self.best_top1
            self.best_top1 = max(self.best_top1, stats.get("val_top1", -1.0))
            self.save(epoch, is_best)
            history.append(stats)
            self.log(epoch_line(stats, cfg.optim.epochs))
            if self.dist.main:
                with open(self.run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(stats) + "\n")
        summary = self.summary(history)
        return summary

    def maybe_resume(self) -> None:
        resume = self.cfg.run.resume
        if resume is None:
            if self.checkpoints.paths():
                raise ConfigError(
                    f"run.resume: {self.checkpoints.folder} already holds checkpoints; pass "
                    f"--resume auto to continue that run or --run.name NEW to start another")
            return
        if resume == "auto":
            found = self.checkpoints.load_newest_valid(self.log)
            if found is None:
                self.log(f"--resume auto: no valid checkpoint in {self.checkpoints.folder}; "
                         "starting from scratch")
                return
            path, state = found
        else:
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"run.resume: checkpoint {path} does not exist")
            state = load_checkpoint(path)
        check_resumable(state, self.cfg, self.dist.world_size, path)
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.dist.rank], self.mix_gen)
        self.start_epoch, self.global_step = state["epoch"] + 1, state["step"]
        self.best_top1 = state["best_top1"]
        self.log(f"resumed from {path}: next epoch {self.start_epoch}")

    def save(self, epoch: int, is_best: bool) -> None:
        states = [rng_state(self.mix_gen)]
        if dist.is_initialized():
            states = [None] * self.dist.world_size
            dist.all_gather_object(states, rng_state(self.mix_gen))
        if self.dist.main:
            state = {"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(),
                     "world_size": self.dist.world_size, "epoch": epoch, "step": self.global_step,
                     "model": unwrap(self.model).state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "rng": states, "best_top1": self.best_top1}
            self.checkpoints.save(state, epoch, is_best)
        barrier()

    # -- train -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, timer: StageTimer | None = None,
                    max_steps: int | None = None) -> dict[str, Any]:
        cfg, loader = self.cfg, self.data.train
        loader.set_epoch(epoch)
        self.model.train()
        steps = len(loader) if max_steps is None else min(max_steps, len(loader))
        mixing = self.mixer is not None and epoch >= cfg.mix.warmup_epochs
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seen, start = 0, time.perf_counter()
        stage = timer or (lambda name: contextlib.nullcontext())
        bar = self.progress(steps, f"epoch {epoch + 1}/{cfg.optim.epochs}")
        batches = iter(loader)
        for i in range(steps):
            with stage("data"):
                images, labels = next(batches)
            lr = self.lr.at(epoch, i, steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            before = images.clone() if mixing and self.preview_pending else None
            out = self.step(images, labels, mix=mixing, generator=self.mix_gen,
                            stage=timer)
            with stage("optimizer"):
                if cfg.optim.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            if before is not None:
                self.preview_pending = False
                if self.dist.main:
                    path = self.output_path(cfg.run.preview)
                    write_preview(path, before, images, labels, out, self.data.classes)
                    self.log(f"wrote mixing preview {path}")
            loss_sum += out.loss.detach().double() * labels.shape[0]
            seen += labels.shape[0]
            self.global_step += 1
            if (i + 1) % 10 == 0 or i + 1 == steps:  # a sync every 10 steps, not every step
                self.check_finite(loss_sum, epoch, i)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", lr=f"{lr:.4f}",
                                    res=loader.resolution,
                                    img_s=f"{seen * self.dist.world_size / (time.perf_counter() - start):.0f}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        total_loss, total_seen = all_reduce_sum([loss_sum.item(), float(seen)], self.device)
        return {"epoch": epoch, "train_loss": total_loss / total_seen, "lr": lr,
                "resolution": loader.resolution, "batch_size": loader.batch_size * self.dist.world_size,
                "mixing": cfg.mix.kind if mixing else "none",
                "images_per_second": total_seen / elapsed, "epoch_seconds": elapsed}

    def check_finite(self, loss_sum: torch.Tensor, epoch: int, step: int) -> None:
        if not torch.isfinite(loss_sum):
            kept = self.checkpoints.paths()
            raise NonFiniteLoss(
                f"non-finite training loss at epoch {epoch}, step {step}: stopping. "
                + (f"The last good checkpoint is {kept[-1]} (resume with --resume auto, e.g. "
                   "with a lower --optim.lr or --optim.grad_clip)." if kept
                   else "No checkpoint was written yet."))

    def progress(self, total: int, desc: str):
        if not (self.cfg.run.progress and self.dist.main):
            return None
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    # -- evaluate ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 over the whole val set; each rank counts its exact shard once."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # top1, top5, loss, n
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype,
                                  enabled=self.amp_dtype is not None)
        for images, labels in self.data.val:
            with autocast:
                logits = self.model(images).float()
                if self.cfg.eval.flip_tta:
                    logits = logits + self.model(torch.flip(images, dims=[3])).float()
            k = min(5, self.num_classes)
            top = logits.topk(k, dim=1).indices
            hit = top == labels[:, None]
            sums += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                                 F.cross_entropy(logits, labels, reduction="sum"),
                                 torch.tensor(labels.shape[0], device=self.device)]).double()
        top1, top5, loss, n = all_reduce_sum(sums.tolist(), self.device)
        self.model.train()
        return {"val_top1": top1 / n, "val_top5": top5 / n, "val_loss": loss / n,
                "val_images": int(n)}

    def output_path(self, name: str) -> Path:
        """Where the run writes the file ``name``: a relative path lies in the run folder, so
        another run never overwrites it. Its folder is created."""
        path = self.run_dir / name  # an absolute name stays as it is
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- profile -----------------------------------------------------------------------------
    def profile(self, steps: int) -> dict[str, Any]:
        """Time each stage over ``steps`` steps of the first epoch (after 2 warm-up steps)."""
        epoch = max(self.start_epoch, self.cfg.mix.warmup_epochs if self.mixer else 0)
        epoch = min(epoch, self.cfg.optim.epochs - 1)
        self.train_epoch(epoch, max_steps=2)
        timer = StageTimer(self.device)
        trace = self.cfg.run.profile_trace
        with (torch.profiler.profile(record_shapes=False) if trace else contextlib.nullcontext()) as prof:
            stats = self.train_epoch(epoch, timer=timer, max_steps=steps)
        if trace and self.dist.main:
            path = self.output_path(trace)
            prof.export_chrome_trace(str(path))
            self.log(f"wrote torch.profiler trace {path}")
        images = stats["batch_size"] // self.dist.world_size * min(steps, len(self.data.train))
        result = {}
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            result = report_profile(timer, min(steps, len(self.data.train)), images,
                                    self.run_dir, self.log)
        return result

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        final = history[-1] if history else {"epoch": self.start_epoch - 1, **self.evaluate()}
        summary = {"epochs": self.cfg.optim.epochs, "final": final,
                   "best_val_top1": self.best_top1, "run_dir": str(self.run_dir)}
        if self.dist.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if final["epoch"] + 1 < self.cfg.optim.epochs:
                self.log(f"stopped after epoch {final['epoch'] + 1} of {self.cfg.optim.epochs}; "
                         f"continue with --resume auto (run folder {self.run_dir})")
            if "val_top1" in final:
                self.log(f"done: val top-1 {100 * final['val_top1']:.2f}%, top-5 "
                         f"{100 * final['val_top5']:.2f}% on {final['val_images']} images "
                         f"(best top-1 {100 * self.best_top1:.2f}%); run folder {self.run_dir}")
        return summary


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        cfg = parse_config(argv)
        trainer = Trainer(cfg)
        return trainer.fit()
    except (ConfigError, FileNotFoundError, pipelines.MissingBackendError, NonFiniteLoss) as e:
        if __name__ == "__main__":
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
