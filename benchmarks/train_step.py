"""Training-step time of each mixer, side by side, as a ratio of the single-pass baseline.

    python benchmarks/train_step.py [--arch resnet18] [--batch 64] [--res 160] [--steps 6]

Runs the trainer's own step (``mixing.TwoPassStep`` + the SGD/GradScaler update of
``train_imagenet.py``) on one synthetic batch per mixer, rounds interleaved so that drift in
machine load hits every mixer alike, and reports the median step time, each mixer's ratio to
``none`` and where its time goes (clean pass, saliency, mixing, mixed pass, optimizer). Prints a
table and writes JSON (``--out``). Works on CUDA (synchronised timings) and on the CPU.
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

MIXES = ("none", "mixup", "cutmix", "grafting", "sage")


def build(mix: str, args: argparse.Namespace, device: torch.device, amp: torch.dtype | None):
    cfg = ti.Config()
    cfg.model.arch, cfg.mix.kind = args.arch, mix
    torch.manual_seed(0)
    model = ti.build_model(cfg, args.classes, device)
    optimizer = torch.optim.SGD(ti.param_groups(model, 5e-5), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step = TwoPassStep(model, ti.build_mixer(cfg, args.classes), eta=0.5, scaler=scaler,
                       amp_dtype=amp, label_smoothing=cfg.optim.label_smoothing)
    return step, optimizer, scaler


def one_step(step, optimizer, scaler, images, labels, gen, timer=None) -> None:
    optimizer.zero_grad(set_to_none=True)
    step(images, labels, generator=gen, stage=timer)
    with (timer or (lambda name: contextlib.nullcontext()))("optimizer"):
        scaler.step(optimizer)
        scaler.update()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--res", type=int, default=160)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mixer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None,
                        help="default: fp16 on CUDA, none on the CPU")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=MIXES)
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    amp_name = args.amp or ("fp16" if device.type == "cuda" else "none")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp_name]
    dtype = amp or torch.float32
    gen = torch.Generator(device).manual_seed(0)
    batch = torch.randn(args.batch, 3, args.res, args.res, device=device).to(
        dtype=dtype, memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    runs = {mix: build(mix, args, device, amp) for mix in args.mixes}
    for mix, (step, opt, scaler) in runs.items():  # warm-up: allocator, kernels, autotuning
        for _ in range(args.warmup):
            one_step(step, opt, scaler, batch.clone(), labels, gen)

    times = {mix: [] for mix in runs}
    timers = {mix: ti.StageTimer(device) for mix in runs}
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
    for mix, (step, opt, scaler) in runs.items():  # one more round, synchronised per stage
        one_step(step, opt, scaler, batch.clone(), labels, gen, timers[mix])

    base = statistics.median(times["none"]) if "none" in times else None
    result = {"arch": args.arch, "batch": args.batch, "res": args.res, "device": str(device),
              "amp": amp_name, "threads": torch.get_num_threads(), "steps": args.steps,
              "mixers": {}}
    print(f"{args.arch}, batch {args.batch} at {args.res} px on {device} (amp {amp_name}), "
          f"median of {args.steps} steps")
    print(f"{'mixer':<10} {'s/step':>8} {'x none':>7}   stage shares (one synchronised step)")
    for mix, ts in times.items():
        med = statistics.median(ts)
        stages = {k: v for k, v in timers[mix].totals.items() if v > 0}
        total = sum(stages.values())
        shares = {k: v / total for k, v in stages.items()}
        ratio = med / base if base else None
        result["mixers"][mix] = {"seconds_per_step": med, "all_seconds": ts,
                                 "ratio_to_none": ratio, "stage_shares": shares}
        share_text = " ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
        print(f"{mix:<10} {med:>8.3f} {ratio if ratio else float('nan'):>7.2f}   {share_text}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
