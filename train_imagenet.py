"""salmix: fast ImageNet training with saliency-guided mixing.

One command on one GPU, ``torchrun`` on many, and the same command on a CPU against the
embedded demo dataset::

    python train_imagenet.py --config configs/rn50_ffcv.yaml --data /imagenet --loader ffcv
    torchrun --nproc_per_node 8 train_imagenet.py --config configs/rn50_grafting.yaml --data /imagenet
    python train_imagenet.py --config configs/demo.yaml          # CPU, demo dataset

The step: loader -> clean forward/backward (saliency captured) -> mix in place -> mixed
forward/backward (gradients accumulate) -> optimizer step with the per-iteration cyclic LR.
Configuration: typed sections below, set from a YAML file (``--config``) and the command line
(``--section.field value``; the command line wins), validated before anything runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import yaml

import pipelines
from mixing.base import Mixer, NonFiniteSaliency
from mixing.baselines import CutMix, Mixup
from mixing.grafting import SaliencyGrafting
from mixing.sage import SAGE
from mixing.saliency import unwrap
from mixing.step import StepOutput, TwoPassStep, no_stage
from pipelines import Shard
from training import config as conf
from training.checkpoint import (FORMAT, CheckpointError, Checkpoints, check_resumable,
                                 record_overrides, rng_state, set_rng_state)
from training.config import ConfigError, neutral, setting
from training.data import build_data
from training.distributed import (StopRequest, all_gather, all_reduce_sum, any_rank, barrier,
                                  init_distributed, launched_main_rank, report_failure, shutdown,
                                  stop_requests)
from training.ema import ModelEma
from training.evaluation import evaluate
from training.meter import EpochMeter
from training.models import (apply_blurpool, create_model, distribute, init_classifier,
                             param_groups, zero_init_residual)
from training.numerics import amp_dtype, amp_name, seed_everything
from training.report import (EpochLog, Scalars, StageTimer, epoch_line, progress_bar,
                             report_profile, step_scalars, write_csv, write_preview)
from training.schedule import dry_run, lr_schedule, mixes_in
from training.validation import check_world, resume_overrides, validate

MIXERS: dict[str, type[Mixer]] = {
    "mixup": Mixup, "cutmix": CutMix, "grafting": SaliencyGrafting, "sage": SAGE}


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """A torchvision classification model (``torchvision.models.list_models``) or
    ``timm/NAME``, any ``timm.create_model`` name (``pip install 'salmix[timm]'``)."""
    blurpool: bool = False
    """FFCV's BlurPool before every strided convolution."""
    zero_init_residual: bool = False
    """Start the last BatchNorm of every residual block at zero (Goyal et al.; PuzzleMix)."""
    classifier_init_std: float | None = setting(None, "> 0")
    """Initialise the classifier's weights from N(0, std^2) (PuzzleMix: 0.01); None: the
    architecture's own."""
    channels_last: bool = True
    compile: bool = False
    """``torch.compile`` the model (inductor): one graph per input size and pass kind, so a
    progressive-resizing schedule compiles once per resolution."""
    ema_decay: float = setting(0.0, "[0, 1)", note="0: no EMA")
    """Keep an exponential moving average of the weights with this decay (e.g. 0.9998) and
    evaluate it beside the model; 0: off."""


@dataclass
class DataConfig:
    path: str | None = neutral(None)
    """ImageFolder root with train/ and val/, or a folder with train.beton and val.beton;
    None: the embedded demo dataset."""
    loader: Literal["folder", "dali", "ffcv"] = "folder"
    batch_size: int = setting(512, ">= 1")
    """Global batch size (all ranks together); a phase schedule may set its own."""
    resolution: Any = 224
    """Train resolution: an int or a schedule mapping (kind: fixed | ramp | phases); each phase
    may set its batch size (bs) and random-resized-crop minimum scale (min_scale, 0.08)."""
    val_resolution: int = neutral(224)
    val_batch_size: int | None = neutral(None, ">= 1", note="or null: the training batch size")
    """None: the training batch size."""
    workers: int | None = neutral(None)
    demo_root: str = neutral("data/demo")
    beton_dir: str = neutral("data/ffcv")
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    """Folder loader: decode JPEGs with nvJPEG on the GPU (auto: when training on CUDA); the
    same crops and order as the CPU, pixels within about one level of 255."""
    dali_reader: Literal["feed", "file"] = "feed"
    """DALI only: ``feed`` (exact, resumable epoch order) or ``file`` (DALI's
    ``fn.readers.file``, NVIDIA's recipe); why both: ``docs/design/dali.md``."""
    ffcv_order: Literal["random", "quasi_random"] = "random"
    """FFCV training order: ``random``, or ``quasi_random`` (a random order of windows of the
    beton's pages, for machines with less RAM than the dataset; batches are less independent,
    see docs/design/loaders.md). Both give exact epochs and a bitwise mid-epoch resume."""
    ffcv_max_resolution: int = 256
    ffcv_jpeg_quality: int = 90
    ffcv_compress_probability: float = 0.5


@dataclass
class OptimConfig:
    epochs: int = setting(16, ">= 1")
    lr: float = setting(0.5, "> 0")
    """Peak learning rate of the triangular schedule."""
    lr_schedule: Literal["triangular", "piecewise"] = "triangular"
    lr_peak_epoch: float = 2.0
    lr_start_factor: float = 1e-4
    """Triangular: the LR starts at lr * lr_start_factor and ends at 0 (FFCV's 'cyclic')."""
    lr_knots: list | None = None
    """Piecewise-linear: [[epoch, lr], ...], interpolated per iteration."""
    momentum: float = setting(0.9, "[0, 1)")
    nesterov: bool = False
    weight_decay: float = setting(5e-5, ">= 0")
    no_decay: Literal["bn_bias", "bn"] = "bn_bias"
    """Parameters without weight decay: BatchNorm's and every bias (FFCV), or BatchNorm's only
    (Wong et al., PuzzleMix)."""
    label_smoothing: float = setting(0.1, "[0, 1)")
    accum_steps: int = setting(1, ">= 1")
    """Split each batch into this many micro-batches per optimizer step (gradients all-reduced
    once per step): the global batch of a recipe on fewer GPUs."""
    grad_clip: float = setting(0.0, ">= 0", note="0 disables clipping")
    """Clip the global gradient norm to this value (0: off)."""
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that have it (A100, H100), else fp16 on CUDA; none on the CPU."""
    max_skipped_steps: int = neutral(25, ">= 1")
    """fp16: stop when the GradScaler skips more steps than this in a row (one skip is an
    overflow it handles; a long run of them is divergence)."""


@dataclass
class MixConfig:
    kind: Literal["none", "mixup", "cutmix", "grafting", "sage"] = "none"
    warmup_epochs: int = setting(0, ">= 0")
    """Epochs trained without mixing first (the Saliency Grafting paper warms up 5)."""
    eta: float = setting(0.5, "[0, 1]")
    """Weight of the mixed pass in the two-pass step (the clean pass gets 1 - eta); SAGE's
    paper puts its eta on the clean pass, so its 0.7 is 0.3 here."""
    clean_weight: float | None = None
    mixed_weight: float | None = None
    """Both given: the two passes' loss weights instead of eta's convex pair (PuzzleMix's and
    the Saliency Grafting ImageNet protocol's ``clean_lam: 1`` is 1 and 1)."""
    prob: float = setting(1.0, "[0, 1]")
    """Probability that a batch is mixed (timm's ``--mixup-prob``); an unmixed batch takes
    one pass."""
    off_epoch: int | None = None
    """Stop mixing from this epoch on (timm's ``--mixup-off-epoch``); None: never."""
    feature_layer: str | None = None
    """Module whose output gives forward saliency (default: the last conv stage); only read
    by feature-saliency mixers (grafting)."""
    feature_min_size: int | None = setting(None, ">= 1")
    """Without feature_layer: the last stage whose map is at least this many cells a side at
    the run's resolution (the demo's 64 px asks 4: ResNet's layer3, MobileNet's features.8)."""
    gradient_reduction: Literal["mean_abs", "l2"] = "mean_abs"
    """Only read by gradient-saliency mixers (sage)."""


@dataclass
class EvalConfig:
    every: int = neutral(1, ">= 1")
    """Evaluate every N epochs (and always at the end)."""
    flip_tta: bool = neutral(False)
    """Average the logits of each image and its mirror image."""


@dataclass
class RunConfig:
    out_dir: str = neutral("runs")
    name: str = neutral("run")
    seed: int = 0
    deterministic: bool = False
    resume: str | None = neutral(None)
    """'auto' (the newest valid checkpoint of this run) or a checkpoint path."""
    resume_override: str | None = neutral(None)
    """Comma-separated fields that may differ from the checkpoint's config on resume (e.g.
    ``optim.lr,optim.grad_clip``); the changes are logged and kept in config_history.yaml."""
    keep_last: int = neutral(3, ">= 1")
    checkpoint_every_steps: int = neutral(0, ">= 0")
    """Also write a checkpoint every this many steps inside an epoch (0: at epoch ends only);
    a resume continues at that step."""
    stop_after: int = neutral(0, ">= 0")
    """Stop after this many epochs in this session (0: train to the end), e.g. to fit a
    scheduler's time limit; continue with --resume auto."""
    dry_run: bool = neutral(False)
    """List the images, print the whole schedule per epoch, write schedule.png, and exit."""
    profile: int = neutral(0, ">= 0")
    """Profile this many training steps, report where the time goes, and exit."""
    profile_trace: str | None = neutral(None)
    """With ``profile``: also write a torch.profiler trace here (relative: in the run folder)."""
    preview: str | None = neutral(None)
    """Write a PNG grid of mixed pairs at the first mixed step (relative: in the run folder)."""
    progress: bool = neutral(True)
    tensorboard: bool = neutral(True)
    """TensorBoard scalars in the run folder's ``tensorboard/`` (rank 0)."""
    wandb: str | None = neutral(None)
    """Also log to this Weights & Biases project (needs ``pip install wandb``)."""
    collective_timeout: float = neutral(600.0, "> 0")
    """Seconds a rank waits in a collective before the process group gives up (NCCL's
    default); data preparation on rank 0 waits outside collectives, however long."""


def _mixer_section(name: str) -> type:
    """A config section of mixer ``name``'s hyperparameters, with the mixer's own defaults."""
    return conf.dataclass_from_signature(f"{name.capitalize()}Config", MIXERS[name].__init__,
                                         skip=("num_classes", "label_smoothing"))


MixupConfig = _mixer_section("mixup")
CutmixConfig = _mixer_section("cutmix")
GraftingConfig = _mixer_section("grafting")
SageConfig = _mixer_section("sage")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    cutmix: CutmixConfig = field(default_factory=CutmixConfig)
    grafting: GraftingConfig = field(default_factory=GraftingConfig)
    sage: SageConfig = field(default_factory=SageConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return conf.to_dict(self)


ALIASES = {"--arch": "model.arch", "--data": "data.path", "--loader": "data.loader",
           "--mix": "mix.kind", "--epochs": "optim.epochs", "--batch-size": "data.batch_size",
           "--amp": "optim.amp", "--resume": "run.resume",
           "--resume-override": "run.resume_override", "--profile": "run.profile",
           "--profile-trace": "run.profile_trace", "--preview": "run.preview",
           "--out": "run.out_dir", "--name": "run.name", "--seed": "run.seed"}


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults < YAML file (``--config``) < command line; then validate
    (:mod:`training.validation`)."""
    cfg = conf.parse(Config(), argv, ALIASES, flags={"--dry-run": "run.dry_run"},
                     description=__doc__.split("\n\n")[0],
                     epilog="Every field is also settable as --section.field VALUE (YAML syntax), "
                            "e.g. --optim.lr 1.7 --grafting.temperature 0.3 --data.resolution "
                            "'{kind: ramp, min_res: 160, max_res: 192, start_ramp: 11, end_ramp: 13}'.")
    validate(cfg, MIXERS)
    return cfg


def result_fields(cfg_dict: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The flattened fields that change what training computes (unused mixers' don't)."""
    return conf.result_fields(cfg_dict, Config, unused=set(MIXERS) - {cfg_dict["mix"]["kind"]})


# ------------------------------------------------------------------------------------------
# Model, optimizer, learning rate, mixer
# ------------------------------------------------------------------------------------------

def build_model(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    model = create_model(cfg.model.arch, num_classes)
    try:
        if cfg.model.zero_init_residual:
            zero_init_residual(model)
        if cfg.model.classifier_init_std is not None:
            init_classifier(model, cfg.model.classifier_init_std)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.model.blurpool:
        apply_blurpool(model)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_mixer(cfg: Config, num_classes: int) -> Mixer | None:
    if cfg.mix.kind == "none":
        return None
    params = dataclasses.asdict(getattr(cfg, cfg.mix.kind))
    return MIXERS[cfg.mix.kind](num_classes, label_smoothing=cfg.optim.label_smoothing, **params)


def build_step(cfg: Config, model: nn.Module, mixer: Mixer | None, scaler: torch.amp.GradScaler,
               amp: torch.dtype | None) -> TwoPassStep:
    """The training step; each saliency setting goes only to the mixers that read it."""
    kind = mixer.saliency_kind if mixer is not None else "none"
    weights = ({} if cfg.mix.clean_weight is None else
               dict(clean_weight=cfg.mix.clean_weight, mixed_weight=cfg.mix.mixed_weight))
    feature = kind == "feature"
    return TwoPassStep(model, mixer, eta=None if weights else cfg.mix.eta, **weights,
                       feature_layer=cfg.mix.feature_layer if feature else None,
                       feature_min_size=cfg.mix.feature_min_size if feature else None,
                       gradient_reduction=cfg.mix.gradient_reduction,
                       label_smoothing=cfg.optim.label_smoothing, scaler=scaler, amp_dtype=amp)


# ------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    """Training diverged (a NaN or infinite loss); ``agreed``: every rank stops here at once."""

    def __init__(self, message: str, agreed: bool = True) -> None:
        super().__init__(message)
        self.agreed = agreed


class Preempted(RuntimeError):
    """A stop signal (SIGTERM, SIGUSR1: SLURM's before a time limit) ended the run at a step
    every rank agreed on, after a checkpoint there."""

    agreed = True


EXIT_PREEMPTED = 3


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        try:
            self.dist = Shard.from_env()
        except ValueError as e:
            raise ConfigError(f"launcher: {e}") from None
        check_world(cfg, self.dist.world_size)
        self.device = init_distributed(self.dist, cfg.run.collective_timeout)
        seed_everything(cfg.run.seed + self.dist.rank, cfg.run.deterministic)
        self.amp_dtype = amp_dtype(cfg.optim.amp, self.device)
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.data = build_data(cfg, self.dist, self.device, self.amp_dtype or torch.float32)
        self.num_classes = self.data.num_classes
        self.mixer = build_mixer(cfg, self.num_classes)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg, self.num_classes, self.device)
        self.model = distribute(model, self.device, self.dist.world_size, cfg.model.compile)
        self.optimizer = torch.optim.SGD(param_groups(model, cfg.optim.weight_decay,
                                                      biases=cfg.optim.no_decay == "bn_bias"), lr=0.0,
                                         momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.lr = lr_schedule(cfg.optim)
        self.meter = EpochMeter(self.scaler, cfg.optim.max_skipped_steps, self.device)
        self.ema = ModelEma(model, cfg.model.ema_decay) if cfg.model.ema_decay else None
        self.step = build_step(cfg, self.model, self.mixer, self.scaler, self.amp_dtype)
        # The mixer's draws come from a CPU generator: no device sync per draw, and the same
        # draws (and a resumable state) on every device.
        self.mix_gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + self.dist.rank)
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", cfg.run.keep_last)
        self.epoch_log = EpochLog(self.run_dir / "log.jsonl")
        self.start_epoch, self.start_batch, self.global_step, self.best_top1 = 0, 0, 0, -1.0
        self.resumed_progress: dict[str, Any] | None = None  # a mid-epoch checkpoint's counters
        self.stop = StopRequest()
        self.preview_pending = cfg.run.preview is not None
        self.scalars: Scalars | None = None

    def log(self, msg: str) -> None:
        if self.dist.main:
            print(msg, flush=True)

    def output_path(self, name: str) -> Path:
        """Where the run writes the file ``name``: a relative path lies in the run folder, so
        another run never overwrites it. Its folder is created."""
        path = self.run_dir / name  # an absolute name stays as it is
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

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
        if self.dist.main:
            self.scalars = Scalars(self.run_dir, cfg.run.tensorboard, cfg.run.wandb,
                                   cfg.to_dict(), self.global_step)
        history = []
        end = cfg.optim.epochs
        if cfg.run.stop_after:
            end = min(end, self.start_epoch + cfg.run.stop_after)
        with stop_requests() as self.stop:
            for epoch in range(self.start_epoch, end):
                history.append(self.run_epoch(epoch))
        if self.scalars is not None:
            self.scalars.close()
        return self.summary(history)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train ``epoch`` (from the resumed step, if any), evaluate, checkpoint, log."""
        cfg = self.cfg
        start = self.start_batch if epoch == self.start_epoch else 0
        stats = self.train_epoch(epoch, start=start)
        last = epoch + 1 == cfg.optim.epochs
        if last or (epoch + 1) % cfg.eval.every == 0:
            stats.update(self.evaluate())
            if self.ema is not None:
                ema = self.evaluate(self.ema.module)
                stats.update({f"{k}_ema": v for k, v in ema.items() if k != "val_images"})
        is_best = stats.get("val_top1", -1.0) > self.best_top1
        self.best_top1 = max(self.best_top1, stats.get("val_top1", -1.0))
        self.save(epoch, is_best)
        self.log(epoch_line(stats, cfg.optim.epochs))
        if self.dist.main:
            self.epoch_log.append(stats)
            write_csv(self.epoch_log.path, self.run_dir / "metrics.csv")
            self.scalars.log("epoch", stats, self.global_step)
        return stats

    def maybe_resume(self) -> None:
        if self.dist.main and self.checkpoints.folder.is_dir():
            for stale in self.checkpoints.remove_temporaries():
                self.log(f"removed {stale} (an interrupted checkpoint write)")
        found = self.checkpoints.select(self.cfg.run.resume, self.log)
        if found is None:
            return
        path, state = found
        old, new = result_fields(state["config"]), result_fields(self.cfg.to_dict())
        old["world_size"], new["world_size"] = state["world_size"], self.dist.world_size
        # amp "auto" means fp16 on CUDA and none on the CPU: compare what it meant.
        old["optim.amp"], new["optim.amp"] = state["amp"], amp_name(self.amp_dtype)
        changes = check_resumable(old, new, set(resume_overrides(self.cfg)), path)
        for key, (was, now) in changes.items():
            self.log(f"resume override: {key} was {was!r}, now {now!r}")
        if changes and self.dist.main:
            record_overrides(self.run_dir, path, state["epoch"], changes)
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if state["scaler"]:  # empty from a run without fp16 (an amp override)
            self.scaler.load_state_dict(state["scaler"])
        rank_state = state["ranks"][self.dist.rank]
        set_rng_state(rank_state["rng"], self.mix_gen)
        batch = state["batch"]  # None: the checkpoint ends its epoch
        self.start_epoch, self.global_step = state["epoch"] + (batch is None), state["step"]
        if batch is not None:
            self.start_batch, self.resumed_progress = batch, rank_state["progress"]
        self.best_top1 = state["best_top1"]
        barrier()  # every rank has read the checkpoints before rank 0 renames any
        if self.dist.main:
            for moved in self.checkpoints.abandon_after(state["epoch"], batch):
                self.log(f"set aside {moved}: written after epoch {state['epoch']} by a "
                         "trajectory this run no longer follows")
            if self.epoch_log.rewind(state["epoch"] - (batch is not None)):
                self.log("log.jsonl: the lines of the retrained epochs moved to log.superseded.jsonl")
        self.log(f"resumed from {path}: epoch {self.start_epoch}, step {self.start_batch}")

    def save(self, epoch: int, is_best: bool, batch: int | None = None,
             progress: dict[str, Any] | None = None) -> Path | None:
        """Checkpoint at the end of ``epoch`` or after ``batch`` of its batches (``progress``:
        this rank's counters of the epoch so far); every rank's RNG states go in too."""
        ranks = all_gather({"rng": rng_state(self.mix_gen), "progress": progress},
                           self.dist.world_size)
        path = None
        if self.dist.main:
            state = {"format": FORMAT, "config": self.cfg.to_dict(),
                     "world_size": self.dist.world_size, "amp": amp_name(self.amp_dtype),
                     "epoch": epoch, "batch": batch, "step": self.global_step,
                     "model": unwrap(self.model).state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "ranks": ranks, "best_top1": self.best_top1,
                     "ema": self.ema.state_dict() if self.ema is not None else None}
            path = self.checkpoints.save(state, epoch, is_best, batch)
        barrier()
        return path

    # -- train -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, timer: StageTimer | None = None,
                    max_steps: int | None = None, start: int = 0) -> dict[str, Any]:
        """Train ``epoch`` from its batch ``start`` (a mid-epoch resume) to its end."""
        cfg, loader, meter = self.cfg, self.data.train, self.meter
        try:
            loader.set_epoch(epoch, start_batch=start)
        except ValueError as e:  # a reader that resumes at epoch boundaries only
            raise ConfigError(f"cannot resume at step {start} of epoch {epoch}: {e}") from None
        if start and not loader.resumes_exactly:
            self.log(f"note: the {cfg.data.loader} loader resumes epoch {epoch} at step {start} "
                     "with other crops than an uninterrupted run")
        self.model.train()
        steps = len(loader) if max_steps is None else min(max_steps, len(loader))
        mixing = self.mixer is not None and mixes_in(cfg, epoch)
        meter.start_epoch()
        if start and self.resumed_progress is not None:
            meter.load_state_dict(self.resumed_progress)
        begin = time.perf_counter()
        stage = timer or no_stage
        bar = progress_bar(steps, f"epoch {epoch + 1}/{cfg.optim.epochs}") if (
            cfg.run.progress and self.dist.main) else None
        batches = iter(loader)
        for i in range(start, steps):
            with stage("data"):
                images, labels = next(batches)
            lr = self.lr.at(epoch, i, steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            mix = mixing and (cfg.mix.prob >= 1 or  # drawn only when needed: runs stay as they were
                              bool(torch.rand((), generator=self.mix_gen) < cfg.mix.prob))
            before = images.clone() if mix and self.preview_pending else None
            try:
                out = self.accumulate(images, labels, mix, timer)
            except NonFiniteSaliency:  # the clean pass diverged: a non-finite loss
                raise NonFiniteLoss(self.divergence_message("non-finite training loss", epoch, i),
                                    agreed=False) from None
            with stage("optimizer"):
                self.optimizer_step()
            if before is not None:
                self.preview(before, images, labels, out)
            meter.record(out.loss, labels.shape[0], mix)
            self.global_step += 1
            every = cfg.run.checkpoint_every_steps
            save_here = bool(every) and (i + 1) % every == 0 and i + 1 < steps
            if (i + 1) % 10 == 0 or i + 1 == steps or save_here:  # a sync every 10 steps
                diverged, stop = any_rank(torch.stack([
                    meter.diverged(), torch.tensor(self.stop.signal is not None, device=self.device)]))
                if diverged:  # every rank stops at the same step
                    raise NonFiniteLoss(self.divergence_message(meter.reason(), epoch, i))
                if stop or save_here:
                    path = self.save(epoch, False, batch=i + 1, progress=meter.state_dict())
                    if stop:
                        raise Preempted(
                            f"stopped by {self.stop.signal or 'a signal on another rank'} after "
                            f"step {i + 1} of {steps} of epoch {epoch}; wrote {path or 'a checkpoint'}"
                            f" (rank 0); continue with --resume auto")
                if self.scalars is not None:
                    self.scalars.log("train", step_scalars(out, lr, loader.resolution), self.global_step)
                if bar is not None:
                    rate = meter.seen * self.dist.world_size / (time.perf_counter() - begin)
                    bar.set_postfix(loss=f"{meter.mean_loss():.3f}", lr=f"{lr:.4f}",
                                    res=loader.resolution, img_s=f"{rate:.0f}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - begin
        total_loss, counted, total_seen = all_reduce_sum(meter.totals(), self.device)
        return {"epoch": epoch, "train_loss": total_loss / max(counted, 1), "lr": lr,
                "resolution": loader.resolution, "batch_size": loader.batch_size * self.dist.world_size,
                "mixing": cfg.mix.kind if mixing else "none", "mixed_fraction": meter.mixed / max(steps, 1),
                "resumed_at_step": start,
                "images_per_second": total_seen / elapsed, "epoch_seconds": elapsed}

    def optimizer_step(self) -> None:
        """Clip the gradients (if asked), step through the GradScaler, update the EMA."""
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(unwrap(self.model))

    def preview(self, before: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                out: StepOutput) -> None:
        """Write the mixing preview once (rank 0): the pairs of the last micro-batch."""
        self.preview_pending = False
        if self.dist.main:
            path, k = self.output_path(self.cfg.run.preview), self.cfg.optim.accum_steps
            write_preview(path, before.chunk(k)[-1], images.chunk(k)[-1], labels.chunk(k)[-1],
                          out, self.data.classes, pipelines.IMAGENET_MEAN, pipelines.IMAGENET_STD)
            self.log(f"wrote mixing preview {path}")

    def accumulate(self, images: torch.Tensor, labels: torch.Tensor, mix: bool,
                   timer: StageTimer | None) -> StepOutput:
        """The step over ``optim.accum_steps`` micro-batches of the batch (each mixed within
        itself), gradients averaged and all-reduced once, on the last micro-batch."""
        k = self.cfg.optim.accum_steps
        if k == 1:
            return self.step(images, labels, mix=mix, generator=self.mix_gen, stage=timer)
        outs = [self.step(x, y, mix=mix, generator=self.mix_gen, stage=timer, sync=j == k - 1,
                          loss_scale=1.0 / k)
                for j, (x, y) in enumerate(zip(images.chunk(k), labels.chunk(k)))]
        return dataclasses.replace(outs[-1], loss=torch.stack([o.loss for o in outs]).mean())

    def divergence_message(self, reason: str, epoch: int, step: int) -> str:
        kept = self.checkpoints.paths()
        return (f"{reason} at epoch {epoch}, step {step}: stopping. "
                + (f"The last good checkpoint is {kept[-1]}: resume it with --resume auto and, "
                   "to change what diverged, e.g. --optim.lr 0.01 --resume-override optim.lr "
                   "(or --optim.grad_clip 1 --resume-override optim.grad_clip)." if kept
                   else "No checkpoint was written yet."))

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Top-1/top-5 of ``model`` (default: the one trained) over the whole val set."""
        return evaluate(model or self.model, self.data.val, self.device, self.amp_dtype,
                        self.cfg.eval.flip_tta)

    # -- profile -----------------------------------------------------------------------------
    def profile(self, steps: int) -> dict[str, Any]:
        """Time each stage over ``steps`` steps of the first epoch (after 2 warm-up steps)."""
        epoch = max(self.start_epoch, self.cfg.mix.warmup_epochs if self.mixer else 0)
        epoch = min(epoch, self.cfg.optim.epochs - 1)
        available = len(self.data.train)
        if steps > available:
            self.log(f"--profile {steps}: an epoch has {available} steps here; profiling {available}")
            steps = available
        self.train_epoch(epoch, max_steps=2)
        timer = StageTimer(self.device)
        trace = self.cfg.run.profile_trace
        with (torch.profiler.profile(record_shapes=False) if trace else contextlib.nullcontext()) as prof:
            stats = self.train_epoch(epoch, timer=timer, max_steps=steps)
        if trace and self.dist.main:
            path = self.output_path(trace)
            prof.export_chrome_trace(str(path))
            self.log(f"wrote torch.profiler trace {path}")
        result = {}
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            images = stats["batch_size"] // self.dist.world_size * steps
            result = report_profile(timer, steps, images, self.dist.world_size, self.run_dir,
                                    self.log)
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


KNOWN_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, pipelines.MissingBackendError,
                pipelines.BadImageError, NonFiniteLoss)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; a known error is one ``error:`` line (rank 0's for a configuration error, which
    every rank meets alike), and any failure on one rank stops every rank."""
    ok = False
    try:
        cfg = parse_config(argv)
        if cfg.run.dry_run:
            two_pass = cfg.mix.kind != "none" and MIXERS[cfg.mix.kind].saliency_kind != "none"
            return {"schedule": dry_run(cfg, two_pass)}
        summary = Trainer(cfg).fit()
        ok = True
        return summary
    except BaseException as e:
        if not getattr(e, "agreed", False):
            report_failure(f"{type(e).__name__}: {e}")
        if isinstance(e, Preempted) and __name__ == "__main__":
            if launched_main_rank():
                print(f"preempted: {e}", file=sys.stderr)
            raise SystemExit(EXIT_PREEMPTED) from None
        if isinstance(e, KNOWN_ERRORS) and __name__ == "__main__":
            if not isinstance(e, ConfigError) or launched_main_rank():
                print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    finally:
        shutdown(ok)


if __name__ == "__main__":
    main()
