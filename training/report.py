"""What a run shows and writes: the epoch line, ``log.jsonl``, the profile table and PNG, the
mixing preview PNG, and the stage timer behind the profile."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

STAGES = ("data", "clean", "saliency", "mix", "mixed", "optimizer")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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


def report_profile(timer: StageTimer, steps: int, images: int, world_size: int, out: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Print and save (``profile.json``, ``profile.png``) where rank 0's step time goes.

    ``images`` is rank 0's count; the global rate is ``world_size`` times rank 0's, since
    every rank takes the same number of equal batches and waits for the others at each step.
    """
    total = sum(timer.totals.values())
    rows = {k: {"seconds_per_step": v / steps, "share": v / total if total else 0.0}
            for k, v in timer.totals.items()}
    rate = images / total
    result = {"steps": steps, "images": images, "images_per_second": rate,
              "world_size": world_size, "global_images_per_second": rate * world_size,
              "seconds_per_step": total / steps, "stages": rows}
    lines = [f"{'stage':<10} {'ms/step':>10} {'share':>7}   (rank 0 of {world_size})"]
    lines += [f"{k:<10} {1e3 * r['seconds_per_step']:>10.1f} {100 * r['share']:>6.1f}%"
              for k, r in rows.items()]
    lines.append(f"{'total':<10} {1e3 * total / steps:>10.1f}   -> {rate:.1f} images/s per rank"
                 + (f", {rate * world_size:.1f} images/s in all" if world_size > 1 else ""))
    log("\n".join(lines))
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    left = 0.0
    for k, r in rows.items():
        ax.barh([0], [1e3 * r["seconds_per_step"]], left=left, label=f"{k} {100 * r['share']:.0f}%")
        left += 1e3 * r["seconds_per_step"]
    ax.set_yticks([])
    ax.set_xlabel("ms per step")
    ax.set_title(f"{rate:.1f} images/s per rank ({world_size} rank(s))")
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.savefig(out / "profile.png", bbox_inches="tight", dpi=120)
    plt.close(fig)
    return result


def write_preview(path: Path, before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor,
                  out, classes: list[str] | None, mean: tuple[float, ...], std: tuple[float, ...],
                  count: int = 4) -> None:
    """A PNG grid per pair: source, partner, their saliency, the mask, the mix, label weights."""
    plt = pyplot()
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def show(ax, img: torch.Tensor) -> None:
        ax.imshow((img.float().cpu() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy())

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


class EpochLog:
    """``log.jsonl``: one JSON line per epoch of the run's one trajectory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, stats: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(stats) + "\n")

    def rewind(self, epoch: int) -> int:
        """Drop the lines of epochs after ``epoch`` (a resumed run retrains them); they move to
        ``log.superseded.jsonl``. Returns how many moved."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        keep = [ln for ln in lines if _epoch_of(ln) <= epoch]
        dropped = [ln for ln in lines if _epoch_of(ln) > epoch]
        if dropped:
            with open(self.path.with_name("log.superseded.jsonl"), "a") as f:
                f.write("".join(ln + "\n" for ln in dropped))
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(self.path)
        return len(dropped)


def _epoch_of(line: str) -> float:
    """The epoch of a log line; a line cut short by a crash belongs to no kept epoch."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def progress_bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


CSV_COLUMNS = ("epoch", "train_loss", "lr", "resolution", "batch_size", "mixing",
               "mixed_fraction", "images_per_second", "epoch_seconds", "val_top1", "val_top5",
               "val_loss", "val_top1_ema", "val_top5_ema")


def write_csv(log: Path, out: Path) -> None:
    """``metrics.csv``: one row per epoch of ``log.jsonl`` (so it follows its one trajectory)."""
    import csv

    rows = [json.loads(line) for line in log.read_text().splitlines() if _epoch_of(line) != float("inf")]
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)


class Scalars:
    """TensorBoard scalars in ``run_dir/tensorboard`` and, when asked, Weights & Biases; used on
    rank 0 only. A resumed run drops the events after its step (TensorBoard's ``purge_step``)."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb_project: str | None,
                 config: dict[str, Any], step: int) -> None:
        self.tb = self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=run_dir.name, dir=str(run_dir),
                                    config=config, resume="allow")

    def log(self, prefix: str, values: dict[str, float], step: int) -> None:
        values = {f"{prefix}/{k}": float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def step_scalars(out, lr: float, resolution: int) -> dict[str, float]:
    """What TensorBoard shows per logged step: the loss, LR, size and the mixing weights."""
    values = {"loss": out.loss.item(), "lr": lr, "resolution": resolution}
    if out.mix is not None:
        weight = out.mix.weight.float()
        values.update(mix_weight_mean=weight.mean().item(), mix_weight_std=weight.std().item())
    return values


def schedule_table(rows: list[dict[str, Any]], images: int, world_size: int) -> str:
    """The dry run's table: one line per epoch."""
    head = (f"{images} training images, {world_size} rank(s)\n"
            f"{'epoch':>5} {'res':>5} {'scale':>6} {'batch':>6} {'/rank':>6} {'steps':>6} {'lr first':>10} "
            f"{'lr last':>10}  mixing (prob, loss weights)")
    lines = [head]
    for r in rows:
        mix = r["mixing"] if r["mixing"] == "none" else (
            f"{r['mixing']} (p {r['mix_prob']:g}, weights {', '.join(f'{w:g}' for w in r['loss_weights'])})")
        lines.append(f"{r['epoch']:>5} {r['resolution']:>5} {r['min_scale']:>6g} {r['batch']:>6} "
                     f"{r['batch_per_rank']:>6} "
                     f"{r['steps']:>6} {r['lr_first']:>10.5g} {r['lr_last']:>10.5g}  {mix}")
    return "\n".join(lines)


def write_schedule_png(rows: list[dict[str, Any]], lr: Callable, path: Path) -> Path:
    """LR and resolution against the iteration, a dashed line at every phase boundary."""
    plt = pyplot()
    xs, lrs, res, bounds, start = [], [], [], [], 0
    for prev, r in zip([None, *rows], rows):
        if prev and any(r[k] != prev[k] for k in ("phase", "resolution", "batch", "min_scale")):
            bounds.append(start)
        xs += range(start, start + r["steps"])
        lrs += [lr.at(r["epoch"], i, r["steps"]) for i in range(r["steps"])]
        res += [r["resolution"]] * r["steps"]
        start += r["steps"]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(xs, lrs, color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate", color="tab:blue")
    twin = ax.twinx()
    twin.step(xs, res, color="tab:orange", where="post")
    twin.set_ylabel("resolution (px)", color="tab:orange")
    for b in bounds:
        ax.axvline(b, color="grey", linestyle="--", linewidth=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return path
