"""Training-step time of each mixer, side by side, as a ratio of the single-pass baseline.

    python benchmarks/train_step.py [--arch resnet18] [--sizes 64x160 32x224] [--steps 6] [--quick]
                                    [--device cuda] [--amp fp16|bf16|none] [--compile]
                                    [--variants] [--accum 1 2 4]

Runs the trainer's own step (``mixing.TwoPassStep`` + the SGD/GradScaler update of
``train_imagenet.py``) on one synthetic batch per mixer, rounds interleaved so that drift in
machine load hits every mixer alike, and reports for each size (default: batch 64 at 160 px,
then batch 32 at 224 px) the median step time, each mixer's ratio to ``none`` against its
target and where its time goes (clean pass, saliency, mixing, mixed pass, optimizer). Prints
a table and writes JSON (``--out``). Works on CUDA (synchronised timings) and on the CPU.
On CUDA it also records each mixer's peak memory in its synchronised step (``peak_bytes``,
and ``step_bytes``: the peak above what was allocated before the step), and ``--compile``
runs the model under ``torch.compile`` as the trainer's ``model.compile`` does (a mixer whose
compiled step fails is reported with its error and left out, the others go on).

``--variants`` adds, for ``none`` and ``grafting`` at the first size, gradient accumulation
(``--accum``: K micro-batches of batch / K per optimizer step, as ``optim.accum_steps``) and
``torch.compile`` against eager, all interleaved in one run: each variant's step time (per
image: the batch is the same) as a ratio of that mixer's eager K = 1 step.

Targets (ratio to the single-pass step): Mixup and CutMix <= 1.02, Saliency Grafting <= 2.05,
SAGE <= 2.10: a two-pass step costs two passes, and the mixing stage a few percent at most.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_imagenet as ti  # noqa: E402
from mixing.step import TwoPassStep  # noqa: E402
from training.numerics import AMP_DTYPES  # noqa: E402
from training.report import StageTimer  # noqa: E402

MIXES = ("none", "mixup", "cutmix", "grafting", "sage")
TARGETS = {"mixup": 1.02, "cutmix": 1.02, "grafting": 2.05, "sage": 2.10}
"""Upper bounds on each mixer's step time over the single-pass (``none``) step."""


def build(mix: str, args: argparse.Namespace, device: torch.device, amp: torch.dtype | None,
          compile: bool | None = None):
    cfg = ti.Config()
    cfg.model.arch, cfg.mix.kind = args.arch, mix
    torch.manual_seed(0)
    model = ti.build_model(cfg, args.classes, device)
    if args.compile if compile is None else compile:
        # Dynamo skips guards on module hooks by default: a graph traced without the feature
        # hook (another mixer's model of the same class) would be reused with it missing.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        model = torch.compile(model, dynamic=False)
    optimizer = torch.optim.SGD(ti.param_groups(model, 5e-5), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step = TwoPassStep(model, ti.build_mixer(cfg, args.classes), eta=0.5, scaler=scaler,
                       amp_dtype=amp, label_smoothing=cfg.optim.label_smoothing)
    return step, optimizer, scaler


def one_step(step, optimizer, scaler, images, labels, gen, timer=None, accum: int = 1) -> None:
    """One optimizer step; ``accum`` > 1: over that many micro-batches, as the trainer's
    ``optim.accum_steps``."""
    optimizer.zero_grad(set_to_none=True)
    for j, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum))):
        step(x, y, generator=gen, stage=timer, sync=j == accum - 1, loss_scale=1.0 / accum)
    with (timer or (lambda name: contextlib.nullcontext()))("optimizer"):
        scaler.step(optimizer)
        scaler.update()


def parse_size(text: str) -> tuple[int, int]:
    """``"64x160"`` -> (batch 64, 160 px)."""
    batch, _, res = text.partition("x")
    try:
        return int(batch), int(res)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is BATCHxRES, e.g. 64x160, got {text!r}") from None


def bench_size(runs: dict, batch_size: int, res: int, args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Interleaved rounds of every mixer's step at one batch size and resolution."""
    batch = torch.randn(batch_size, 3, res, res, device=device).to(dtype=dtype, memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (batch_size,), device=device)
    failed = {}
    for mix, (step, opt, scaler) in list(runs.items()):  # warm-up: allocator, kernels, autotuning
        start = time.perf_counter()
        try:
            for _ in range(args.warmup):
                one_step(step, opt, scaler, batch.clone(), labels, gen)
        except Exception as e:  # e.g. a torch.compile failure: report it, go on without it
            if not args.compile:
                raise
            failed[mix] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            del runs[mix]
        print(f"warm-up {mix}: {time.perf_counter() - start:.1f} s"
              + (f" FAILED {failed[mix]}" if mix in failed else ""), flush=True)

    times = {mix: [] for mix in runs}
    timers = {mix: StageTimer(device) for mix in runs}
    for _ in range(args.steps):  # interleaved rounds
        for mix, (step, opt, scaler) in runs.items():
            images = batch.clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            one_step(step, opt, scaler, images, labels, gen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[mix].append(time.perf_counter() - start)
    memory = {}
    for mix, (step, opt, scaler) in runs.items():  # one more round, synchronised per stage
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        one_step(step, opt, scaler, batch.clone(), labels, gen, timers[mix])
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            memory[mix] = {"peak_bytes": peak, "step_bytes": peak - before}

    base = statistics.median(times["none"]) if "none" in times else None
    result = {"batch": batch_size, "res": res, "mixers": {}, "failed": failed}
    for mix, ts in times.items():
        med = statistics.median(ts)
        stages = {k: v for k, v in timers[mix].totals.items() if v > 0}
        total = sum(stages.values())
        ratio = med / base if base else None
        target = TARGETS.get(mix)
        result["mixers"][mix] = {"seconds_per_step": med, "all_seconds": ts, "ratio_to_none": ratio,
                                 "target": target,
                                 "target_met": None if ratio is None or target is None else ratio <= target,
                                 "stage_shares": {k: v / total for k, v in stages.items()},
                                 "stage_seconds": stages, "images_per_second": batch_size / med,
                                 **memory.get(mix, {})}
    return result


def bench_variants(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None,
                   dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Accumulation K and compiled against eager, for none and grafting, interleaved."""
    batch_size, res = args.sizes[0]
    batch = torch.randn(batch_size, 3, res, res, device=device).to(dtype=dtype, memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (batch_size,), device=device)
    variants, failed = {}, {}
    for mix in ("none", "grafting"):
        for compiled in (False, True):
            runner = build(mix, args, device, amp, compile=compiled)
            for k in (args.accum if not compiled else [1]):
                if batch_size % k:
                    continue
                variants[(mix, k, compiled)] = (runner, k)
    for key, ((step, opt, scaler), k) in list(variants.items()):
        try:
            for _ in range(args.warmup):
                one_step(step, opt, scaler, batch.clone(), labels, gen, accum=k)
        except Exception as e:  # a compile failure is reported, the rest go on
            failed[str(key)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            del variants[key]
    times = {key: [] for key in variants}
    for _ in range(args.steps):
        for key, ((step, opt, scaler), k) in variants.items():
            images = batch.clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            one_step(step, opt, scaler, images, labels, gen, accum=k)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[key].append(time.perf_counter() - start)
    rows = []
    for (mix, k, compiled), ts in times.items():
        base = times.get((mix, 1, False))
        med = statistics.median(ts)
        rows.append({"mix": mix, "accum": k, "compiled": compiled, "seconds_per_step": med,
                     "ratio": med / statistics.median(base) if base else None})
    return {"batch": batch_size, "res": res, "rows": rows, "failed": failed}


def report_variants(result: dict) -> str:
    lines = [f"variants, batch {result['batch']} at {result['res']} px (ratio to the mixer's eager K = 1)",
             f"{'mixer':<10} {'K':>3} {'compiled':>9} {'s/step':>8} {'ratio':>6}"]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        lines.append(f"{r['mix']:<10} {r['accum']:>3} {str(r['compiled']):>9} "
                     f"{r['seconds_per_step']:>8.3f} {ratio:>6}")
    lines += [f"{key} failed: {error}" for key, error in result["failed"].items()]
    return "\n".join(lines)


def report(result: dict, args: argparse.Namespace, device: torch.device, amp_name: str) -> str:
    lines = [f"{args.arch}, batch {result['batch']} at {result['res']} px on {device} (amp {amp_name}), "
             f"median of {args.steps} steps",
             f"{'mixer':<10} {'s/step':>8} {'x none':>7} {'target':>8} {'met':>5}   stage shares "
             f"(one synchronised step)"]
    for mix, row in result["mixers"].items():
        ratio = row["ratio_to_none"]
        target = f"<= {row['target']:.2f}" if row["target"] else "-"
        met = {True: "yes", False: "NO", None: "-"}[row["target_met"]]
        shares = " ".join(f"{k} {100 * v:.0f}%" for k, v in row["stage_shares"].items())
        memory = f"   step memory {row['step_bytes'] / 2**20:.0f} MiB" if "step_bytes" in row else ""
        lines.append(f"{mix:<10} {row['seconds_per_step']:>8.3f} {ratio if ratio else float('nan'):>7.2f} "
                     f"{target:>8} {met:>5}   {shares}{memory}")
    for mix, error in result["failed"].items():
        lines.append(f"{mix:<10} failed: {error}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(64, 160), (32, 224)],
                        metavar="BATCHxRES", help="batch sizes and resolutions, run one after another")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mixer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None,
                        help="default: fp16 on CUDA, none on the CPU")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=MIXES)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    parser.add_argument("--variants", action="store_true",
                        help="also accumulation K (--accum) and compiled vs eager, for none and grafting")
    parser.add_argument("--accum", nargs="+", type=int, default=[1, 2, 4], metavar="K")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: batch 4 at 64 px, 1 step")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.steps, args.warmup, args.classes = [(4, 64)], 1, 1, 10

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the trainer runs (run.deterministic false)
    amp_name = args.amp or ("fp16" if device.type == "cuda" else "none")
    amp = AMP_DTYPES[amp_name]
    gen = torch.Generator().manual_seed(0)  # CPU generator: the mixers' draws need no device sync
    runs = {mix: build(mix, args, device, amp) for mix in args.mixes}
    result = {"arch": args.arch, "device": str(device), "amp": amp_name, "threads": torch.get_num_threads(),
              "compile": args.compile, "steps": args.steps, "quick": args.quick, "targets": TARGETS,
              "sizes": []}
    for batch_size, res in args.sizes:
        result["sizes"].append(bench_size(runs, batch_size, res, args, device, amp or torch.float32, gen))
        print(report(result["sizes"][-1], args, device, amp_name), flush=True)
    if args.variants:
        result["variants"] = bench_variants(args, device, amp, amp or torch.float32, gen)
        print(report_variants(result["variants"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
