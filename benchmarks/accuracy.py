"""Accuracy, occlusion robustness and localisation of each mixer on the demo dataset (evidence).

    python benchmarks/accuracy.py [--seeds 0 1 2] [--epochs 3] [--mixes none mixup ...] [--quick]

Trains ResNet-18 with none / mixup / cutmix / grafting / sage, three seeds each, with the same
budget (the same epochs, schedule and data; the saliency mixers' two-pass step costs about
twice the compute per epoch, as in the papers' comparisons), by calling the trainer itself
(``train_imagenet.main``: ``configs/demo.yaml`` with ``--mix``, ``--seed`` and the budget below,
``--run.deterministic true``), then measures on each final checkpoint:

* **val top-1** on the demo's 500 val images (the trainer's own evaluation, 64 px centre crop);
* **occluded top-1**: the same images with one random box of 25-50 % of the image area filled
  with ImageNet-mean grey (the Saliency Grafting paper's occlusion stress test), written once as
  a folder of JPEGs (quality 95, seeded: the same boxes for every model) and read by the folder
  loader (``pipelines.make_loader("folder", ..., train=False)``);
* **localisation**: the share of the model's feature saliency (``mixing.saliency.
  FeatureSaliency`` on ``layer3``, the demo preset's feature layer: ``sum_c |A_c|``, upsampled
  bilinearly to the 64 px input and normalised to sum 1) that falls inside the object's box
  (``boxes.json``, mapped through the same resize and centre crop as the image), averaged over
  the val images. A map spread evenly would score the mean box area share, reported beside it.

The mixers keep the demo preset's settings (Grafting: grids {4, 8}, its defaults otherwise;
SAGE, Mixup, CutMix: their defaults; eta 0.5; 1 warm-up epoch without mixing): nothing is tuned
for this benchmark, and the table reports whatever comes out. Prints a table and writes
``benchmarks/results/accuracy.json`` and ``accuracy.png``; the runs, their logs and the
occluded val copy lie in ``benchmarks/results/accuracy/`` (``quick/`` for ``--quick``). Reruns
continue: each run is started with ``--resume auto``, so finished runs are only evaluated.

**Budget** (2 CPU cores, no GPU; the whole run must stay under 45 minutes): the demo preset's
data and model (3,000 train / 500 val images of 10 classes, ResNet-18, batch 64, triangular LR
peaking at 0.1 after epoch 1, label smoothing 0.1) at **48 px** instead of 64 and **3 epochs**
instead of 4 (1 warm-up epoch without mixing, then 2 mixed), evaluated once at the end, one
torch thread per run and as many runs at once as there are usable cores (``--threads``,
``--jobs``; the runs are deterministic, so neither changes a figure, only the time). One thread
per run because with 2 threads on 2 cores already shared, OpenMP's spinning threads made a step
3-5x slower here (1 thread: 6-8 s for a smoke run that took 20-36 s with 2). Run one after
another, the 15 runs took 47.8 min on this machine with other jobs beside them (load average
1.0-2.8); the time of the parallel run is in the JSON (``seconds``) and the README.
At 64 px the same plan would take ~1.8x longer (over the budget); the demo README's 4-epoch,
64 px Grafting run reaches 38.8 % top-1, so expect lower numbers here, far from converged:
this compares the mixers at one small budget, it does not rank them in general.
``--quick`` (a smoke run, ~1 minute): 1 seed, 1 epoch without warm-up (so every mixer mixes),
a 100-image train / 40-image val demo set at 32 px.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipelines  # noqa: E402
import train_imagenet as ti  # noqa: E402
from mixing.saliency import FeatureSaliency  # noqa: E402
from pipelines.base import IMAGENET_MEAN_255, RRC_SCALE, val_resize  # noqa: E402
from pipelines.demo import ensure_demo_dataset, load_boxes  # noqa: E402
from pipelines.folder import Samples  # noqa: E402
from pipelines.imagefolder import scan_image_folder  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.report import pyplot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIXES = ("none", "mixup", "cutmix", "grafting", "sage")
FEATURE_LAYER = "layer3"
OCCLUDED_AREA = (0.25, 0.50)
OCCLUSION_SEED = 0
GREY = tuple(int(round(v)) for v in IMAGENET_MEAN_255)

FULL = {"epochs": 3, "warmup": 1, "lr_peak": 1, "resolution": 48, "train_per_class": 300,
        "val_per_class": 50, "seeds": (0, 1, 2), "batch": 64, "threads": 1}
QUICK = {"epochs": 1, "warmup": 0, "lr_peak": 0, "resolution": 32, "train_per_class": 10,
         "val_per_class": 4, "seeds": (0,), "batch": 20, "threads": 1}


# --- the occluded val copy -----------------------------------------------------------------------
def occlusion_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A box ``[x0, y0, x1, y1)`` of 25-50 % of the image area, aspect ratio in [1/2, 2], inside
    the image, uniformly placed."""
    area = rng.uniform(*OCCLUDED_AREA) * width * height
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    h = min(height, max(1, round(area / w)))
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return x0, y0, x0 + w, y0 + h


def ensure_occluded(val_dir: Path, out: Path) -> Path:
    """``out/val/<class>/<file>``: ``val_dir`` with one grey box per image (written once)."""
    manifest = {"source": str(val_dir.resolve()), "seed": OCCLUSION_SEED, "area": OCCLUDED_AREA,
                "grey": GREY, "quality": 95, "version": 1}
    record = out / "occlusion.json"
    if record.is_file() and json.loads(record.read_text())["manifest"] == manifest:
        return out / "val"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    index = scan_image_folder(val_dir)
    boxes = {}
    for i, (path, _) in enumerate(index.samples):
        rel = os.path.relpath(path, val_dir)
        with Image.open(path) as img:
            img = img.convert("RGB")
        box = occlusion_box(np.random.default_rng([OCCLUSION_SEED, i]), img.width, img.height)
        img.paste(GREY, box)
        (tmp / "val" / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp / "val" / rel, format="JPEG", quality=95)
        boxes[rel] = box
    (tmp / "occlusion.json").write_text(json.dumps({"manifest": manifest, "boxes": boxes}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / "val"


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def top1(model: torch.nn.Module, split_dir: Path, res: int, batch: int) -> float:
    loader = pipelines.make_loader("folder", split_dir, train=False, batch_size=batch, resolution=res,
                                   output=pipelines.OutputSpec(device=torch.device("cpu")),
                                   num_workers=1)
    loader.set_epoch(0)
    hits = n = 0
    for images, labels in loader:
        hits += (model(images).argmax(1) == labels).sum().item()
        n += labels.numel()
    return hits / n


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int], res: int) -> torch.Tensor:
    """The object's box through the val transform (resize + centre crop): (res, res) of 0/1."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    mask = TF.center_crop(TF.resize(mask, val_resize(res), interpolation=InterpolationMode.NEAREST), res)
    return torch.from_numpy(np.array(mask) > 127).float()


@torch.no_grad()
def localisation(model: torch.nn.Module, demo: Path, res: int, batch: int) -> tuple[float, float]:
    """(mean share of the saliency inside the object's box, mean share of the box in the crop)."""
    boxes = load_boxes(demo)
    index = scan_image_folder(demo / "val")
    samples = Samples(index.samples, train=False, seed=0)
    spec = pipelines.OutputSpec(device=torch.device("cpu"))
    shares, areas = [], []
    with FeatureSaliency(model, FEATURE_LAYER) as sal:
        for start in range(0, len(index), batch):
            ids = range(start, min(start + batch, len(index)))
            images = spec.normalize_uint8(torch.stack([samples[(i, res, 0, RRC_SCALE)][0] for i in ids]))
            with sal.capture():
                model(images)
            maps = F.interpolate(sal.pop()[:, None], size=(res, res), mode="bilinear",
                                 align_corners=False)[:, 0].clamp_min(0)
            maps = maps / maps.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
            for k, i in enumerate(ids):
                path = index.samples[i][0]
                with Image.open(path) as img:
                    size = img.size
                mask = box_mask(size, boxes[os.path.relpath(path, demo)], res)
                shares.append((maps[k] * mask).sum().item())
                areas.append(mask.mean().item())
    return statistics.fmean(shares), statistics.fmean(areas)


# --- runs ----------------------------------------------------------------------------------------
def run_argv(mix: str, seed: int, demo: Path, runs: Path, b: dict) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), "--data", str(demo), "--mix", mix,
            "--seed", str(seed), "--epochs", str(b["epochs"]), "--batch-size", str(b["batch"]),
            "--mix.warmup_epochs", str(b["warmup"]), "--optim.lr_peak_epoch", str(b["lr_peak"]),
            "--data.resolution", str(b["resolution"]), "--data.val_resolution", str(b["resolution"]),
            "--out", str(runs), "--name", f"{mix}_seed{seed}", "--run.progress", "false",
            "--run.deterministic", "true", "--run.preview", "null", "--resume", "auto",
            "--eval.every", str(b["epochs"])]  # the trainer evaluates the final epoch only


def train_and_measure(mix: str, seed: int, demo: Path, occluded: Path, runs: Path, b: dict) -> dict:
    argv = run_argv(mix, seed, demo, runs, b)
    runs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(runs / f"{mix}_seed{seed}.log", "a") as log, contextlib.redirect_stdout(log):
        summary = ti.main(argv)
    train_s = time.perf_counter() - start
    cfg = ti.parse_config(argv)
    ckpt = Path(summary["run_dir"]) / "checkpoints" / f"ckpt_epoch{b['epochs'] - 1:04d}.pt"
    state = load_checkpoint(ckpt)
    model = ti.build_model(cfg, 10, torch.device("cpu"))
    model.load_state_dict(state["model"])
    model.eval()
    res, batch = b["resolution"], 100
    clean = top1(model, demo / "val", res, batch)
    occ = top1(model, occluded, res, batch)
    share, area = localisation(model, demo, res, batch)
    return {"mix": mix, "seed": seed, "val_top1": summary["final"]["val_top1"],
            "val_top1_recomputed": clean, "occluded_top1": occ, "saliency_in_box": share,
            "box_area_share": area, "train_seconds": train_s,
            "eval_seconds": time.perf_counter() - start - train_s, "checkpoint": str(ckpt)}


def aggregate(rows: list[dict], mixes: list[str]) -> dict:
    out = {}
    for mix in mixes:
        mine = [r for r in rows if r["mix"] == mix]
        out[mix] = {}
        for key in ("val_top1", "occluded_top1", "saliency_in_box"):
            values = [r[key] for r in mine]
            out[mix][key] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                             "min": min(values), "max": max(values), "values": values}
        drops = [r["val_top1"] - r["occluded_top1"] for r in mine]
        out[mix]["occlusion_drop"] = {"mean": statistics.fmean(drops),
                                      "std": statistics.stdev(drops) if len(drops) > 1 else 0.0}
    return out


def table(agg: dict, box_share: float, seeds: int) -> str:
    def pm(s: dict, scale: float = 100) -> str:
        return f"{scale * s['mean']:5.1f} +- {scale * s['std']:4.1f}"
    lines = [f"mean +- std over {seeds} seed(s); localisation: share of the {FEATURE_LAYER} saliency "
             f"in the object's box (uniform map: {100 * box_share:.1f} %)",
             f"{'mixer':9} | {'val top-1 %':13} | {'occluded top-1 %':16} | {'drop (pts)':13} | "
             f"{'in box %':13}", "-" * 78]
    for mix, s in agg.items():
        lines.append(f"{mix:9} | {pm(s['val_top1'])} | {pm(s['occluded_top1']):16} | "
                     f"{pm(s['occlusion_drop'])} | {pm(s['saliency_in_box'])}")
    return "\n".join(lines)


def plot(agg: dict, box_share: float, path: Path) -> None:
    plt = pyplot()
    keys = (("val_top1", "val top-1 (%)"), ("occluded_top1", "occluded val top-1 (%)"),
            ("saliency_in_box", f"{FEATURE_LAYER} saliency in the box (%)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    mixes = list(agg)
    for ax, (key, title) in zip(axes, keys):
        means = [100 * agg[m][key]["mean"] for m in mixes]
        stds = [100 * agg[m][key]["std"] for m in mixes]
        ax.bar(mixes, means, yerr=stds, capsize=4, color="#8fb3d9")
        for x, m in enumerate(mixes):
            vals = [100 * v for v in agg[m][key]["values"]]
            ax.plot([x] * len(vals), vals, "k.", ms=5)
        if key != "saliency_in_box":
            ax.axhline(10, color="grey", ls=":", lw=1, label="chance")
        if key == "saliency_in_box":
            ax.axhline(100 * box_share, color="grey", ls="--", lw=1, label="uniform map")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, tiny data")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--epochs", type=int, help="default: 3 (--quick: 1)")
    parser.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES))
    parser.add_argument("--threads", type=int,
                        help="torch threads (default 1; on a shared machine more can be several "
                             "times slower, on a quiet one 2 is faster)")
    parser.add_argument("--jobs", type=int,
                        help="runs trained at once, each in its own process (default: the usable "
                             "cores over --threads; the runs are deterministic, so this changes "
                             "the time, not the figures)")
    parser.add_argument("--out", default="benchmarks/results/accuracy.json",
                        help="JSON path; the PNG goes beside it")
    args = parser.parse_args(argv)
    b = dict(QUICK if args.quick else FULL)
    if args.seeds:
        b["seeds"] = tuple(args.seeds)
    if args.threads:
        b["threads"] = args.threads
    torch.set_num_threads(b["threads"])
    jobs = args.jobs or max(1, len(os.sched_getaffinity(0)) // b["threads"])
    if args.epochs:
        b["epochs"] = args.epochs
        b["lr_peak"] = min(b["lr_peak"], args.epochs)
    work = REPO / "benchmarks" / "results" / "accuracy" / ("quick" if args.quick else "full")
    demo_root = work / "demo" if args.quick else REPO / "data" / "demo"
    start, load_start = time.time(), os.getloadavg()
    demo = ensure_demo_dataset(demo_root, train_per_class=b["train_per_class"],
                               val_per_class=b["val_per_class"])
    occluded = ensure_occluded(demo / "val", work / "occluded")
    # Seeds outside: runs start seed by seed, so a partial run covers every mixer.
    plan = [(mix, seed) for seed in b["seeds"] for mix in args.mixes]
    rows = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(b["threads"],)) as pool:
        futures = [pool.submit(train_and_measure, mix, seed, demo, occluded, work / "runs", b)
                   for mix, seed in plan]
        for future in as_completed(futures):
            row = future.result()
            rows.append(row)
            print(f"{row['mix']:9} seed {row['seed']}: val top-1 {100 * row['val_top1']:.1f} %, "
                  f"occluded {100 * row['occluded_top1']:.1f} %, saliency in box "
                  f"{100 * row['saliency_in_box']:.1f} % (train {row['train_seconds']:.0f} s, "
                  f"eval {row['eval_seconds']:.0f} s; {(time.time() - start) / 60:.1f} min so far)",
                  flush=True)
    rows.sort(key=lambda r: plan.index((r["mix"], r["seed"])))
    agg = aggregate(rows, args.mixes)
    box_share = statistics.fmean(r["box_area_share"] for r in rows)
    print(table(agg, box_share, len(b["seeds"])))
    out = Path(args.out)
    if args.quick and args.out == parser.get_default("out"):
        out = out.with_name("accuracy_quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"budget": b, "quick": args.quick, "feature_layer": FEATURE_LAYER,
              "occlusion": {"area": OCCLUDED_AREA, "grey": GREY, "seed": OCCLUSION_SEED},
              "demo": str(demo), "box_area_share": box_share, "summary": agg, "runs": rows,
              "seconds": time.time() - start, "load_average": {"start": load_start,
                                                                "end": os.getloadavg()},
              "torch_threads": torch.get_num_threads(), "jobs": jobs}
    out.write_text(json.dumps(result, indent=1))
    plot(agg, box_share, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds'] / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
