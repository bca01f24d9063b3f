"""What mixing costs per batch, next to the memory-bound floor and a ResNet-18 training step.

For each setting (batch 256 at 224 px and 128 at 64 px; ``--quick``: tiny ones) it times, in
one run and on one device, the median time per batch of:

* the floor: one gather of the batch ``x[perm]`` plus one in-place blend (what any in-place
  pairwise mixer must at least do);
* each mixer (Mixup, CutMix, Saliency Grafting, SAGE, each with its defaults), fed the
  saliency a real ResNet-18 gives on that batch: layer4 feature maps for Grafting (7x7 at
  224 px, 2x2 at 64 px) and mean-|input gradient| maps for SAGE;
* one ResNet-18 training step (forward, backward, SGD step) at the same batch and size;
* saliency extraction, the reductions between the clean backward and the mix: the input
  gradient reduced over channels (``gradient_saliency``, mean_abs and l2) and the feature
  hook's map sum_c |A_c| of layer4 (``channel_norm``), each next to the plain formula
  (``g.abs().mean(1)``, ``g.square().sum(1).sqrt()``, ``a.abs().sum(1)`` in float32) and to
  ``torch.linalg.vector_norm(..., dtype=float32)``, whose CPU kernel they replace.

It prints ratios (mixer / floor, mixer / step, saliency / plain formula) and writes them as
JSON (default ``benchmarks/results/mixing.json``). Targets: Grafting <= 2x the floor, SAGE <=
4x the floor at 224 px, every mixer <= 3% of the step, each saliency reduction <= 1.5x its
plain formula. Batches are channels-last (the loaders'
default; ``--nchw`` for NCHW), float32 on the CPU and float16 on CUDA, where the step runs
under fp16 autocast as in training and timings synchronise the device.

    python benchmarks/mixing.py [--device cpu|cuda] [--nchw] [--out PATH] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # this script is named mixing.py: import the package, not itself

import torch  # noqa: E402
import torchvision  # noqa: E402

from mixing import SAGE, CutMix, Mixup, SaliencyGrafting  # noqa: E402
from mixing.base import Mixer, blend_  # noqa: E402
from mixing.saliency import FeatureSaliency, channel_norm, gradient_saliency  # noqa: E402

NUM_CLASSES = 1000
TARGETS = {"grafting_x_floor": 2.0, "sage_x_floor_224px": 4.0, "share_of_step": 0.03,
           "saliency_x_plain": 1.5}


def timings(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, minimum) wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs (device synced).

    The minimum is kept too: on a shared machine it is the least disturbed figure."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def make_batch(n: int, size: int, device: torch.device, dtype: torch.dtype,
               memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, size, size, device=device).to(dtype).contiguous(memory_format=memory_format)
    return x, torch.randint(NUM_CLASSES, (n,), device=device)


def resnet18_step(x: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None):
    """A ResNet-18 training step on ``x``, the saliency it yields and what it is reduced from:
    (step, feature maps, gradient maps, layer4 output, input gradient)."""
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).to(x.device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def forward_backward(images: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model(images), labels)
        loss.backward()

    layer4 = []
    hook = model.layer4.register_forward_hook(lambda _m, _i, out: layer4.append(out.detach()))
    with FeatureSaliency(model) as features:
        images = x.detach().clone().requires_grad_(True)
        with features.capture():
            forward_backward(images)
        feature_maps = features.pop()
    hook.remove()
    gradient_maps = gradient_saliency(images.grad)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(x)
        optimizer.step()
    return step, feature_maps, gradient_maps, layer4[-1], images.grad  # [0]: the layer probe


def bench_saliency(grad: torch.Tensor, features: torch.Tensor, device: torch.device, warmup: int,
                   repeats: int, step_s: float) -> dict:
    """Each saliency reduction, its plain formula and ``vector_norm``: ms and ratios."""
    cases = {
        "gradient mean_abs": (lambda: gradient_saliency(grad), lambda: grad.float().abs().mean(1),
                              lambda: torch.linalg.vector_norm(grad, 1, dim=1, dtype=torch.float32)),
        "gradient l2": (lambda: gradient_saliency(grad, "l2"), lambda: grad.float().square().sum(1).sqrt(),
                        lambda: torch.linalg.vector_norm(grad, 2, dim=1, dtype=torch.float32)),
        "feature map": (lambda: channel_norm(features, 1), lambda: features.float().abs().sum(1),
                        lambda: torch.linalg.vector_norm(features, 1, dim=1, dtype=torch.float32)),
    }
    rows = {}
    for name, (ours, plain, vector_norm) in cases.items():
        ours_s, ours_min = timings(ours, device, warmup, repeats)
        plain_s, _ = timings(plain, device, warmup, repeats)
        norm_s, _ = timings(vector_norm, device, warmup, repeats)
        rows[name] = {"ms": 1e3 * ours_s, "min_ms": 1e3 * ours_min, "plain_ms": 1e3 * plain_s,
                      "vector_norm_ms": 1e3 * norm_s, "x_plain": ours_s / plain_s,
                      "x_vector_norm": ours_s / norm_s, "share_of_step": ours_s / step_s}
    return rows


def bench_setting(n: int, size: int, device: torch.device, dtype: torch.dtype, amp: torch.dtype | None,
                  memory_format: torch.memory_format, warmup: int, repeats: int, step_repeats: int) -> dict:
    x, labels = make_batch(n, size, device, dtype, memory_format)
    step, feature_maps, gradient_maps, layer4, grad = resnet18_step(x, labels, amp)
    step_s, step_min = timings(step, device, warmup=1, repeats=step_repeats)
    del step
    saliency_rows = bench_saliency(grad, layer4, device, warmup, repeats, step_s)

    gen = torch.Generator().manual_seed(0)  # CPU generator: draws without a device sync
    perm = torch.randperm(n, device=device)
    share = torch.rand(n, 1, 1, 1, device=device)
    floor_s, floor_min = timings(lambda: blend_(x, x[perm], share), device, warmup, repeats)

    mixers: dict[str, tuple[Mixer, torch.Tensor | None]] = {
        "mixup": (Mixup(NUM_CLASSES), None),
        "cutmix": (CutMix(NUM_CLASSES), None),
        "grafting": (SaliencyGrafting(NUM_CLASSES), feature_maps),
        "sage": (SAGE(NUM_CLASSES), gradient_maps),  # defaults: search_size=32, its ImageNet choice
    }
    rows = {}
    for name, (mixer, saliency) in mixers.items():
        seconds, fastest = timings(lambda: mixer.mix(x, labels, saliency, generator=gen), device, warmup, repeats)
        rows[name] = {"ms": 1e3 * seconds, "min_ms": 1e3 * fastest, "x_floor": seconds / floor_s,
                      "share_of_step": seconds / step_s}
    return {"batch": n, "size": size, "dtype": str(dtype).removeprefix("torch."),
            "channels_last": memory_format == torch.channels_last,
            "feature_map": list(feature_maps.shape[1:]), "gradient_map": list(gradient_maps.shape[1:]),
            "floor_ms": 1e3 * floor_s, "floor_min_ms": 1e3 * floor_min, "resnet18_step_ms": 1e3 * step_s,
            "resnet18_step_min_ms": 1e3 * step_min, "mixers": rows,
            "gradient": [list(grad.shape), str(grad.dtype).removeprefix("torch.")],
            "layer4": [list(layer4.shape), str(layer4.dtype).removeprefix("torch.")],
            "saliency": saliency_rows}


def report(setting: dict) -> str:
    layout = "channels-last" if setting["channels_last"] else "NCHW"
    head = (f"batch {setting['batch']} x {setting['size']} px {setting['dtype']} {layout}: floor "
            f"{setting['floor_ms']:.1f} ms (min {setting['floor_min_ms']:.1f}), ResNet-18 step "
            f"{setting['resnet18_step_ms']:.0f} ms, feature map {setting['feature_map']} (medians)")
    lines = [head, f"  {'mixer':<10} {'ms/batch':>9} {'(min)':>8} {'x floor':>8} {'% of step':>10}"]
    for name, row in setting["mixers"].items():
        lines.append(f"  {name:<10} {row['ms']:>9.2f} {row['min_ms']:>8.2f} {row['x_floor']:>8.2f} "
                     f"{100 * row['share_of_step']:>9.2f}%")
    lines.append(f"  saliency (gradient {setting['gradient']}, layer4 {setting['layer4']}):")
    lines.append(f"  {'reduction':<18} {'ms':>7} {'plain ms':>9} {'x plain':>8} {'vector_norm ms':>15} "
                 f"{'% of step':>10}")
    for name, row in setting["saliency"].items():
        lines.append(f"  {name:<18} {row['ms']:>7.2f} {row['plain_ms']:>9.2f} {row['x_plain']:>8.2f} "
                     f"{row['vector_norm_ms']:>15.2f} {100 * row['share_of_step']:>9.2f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nchw", action="store_true", help="NCHW batches instead of channels-last")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixing.json"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype, amp = (torch.float16, torch.float16) if cuda else (torch.float32, None)
    settings = [(16, 64), (8, 128)] if args.quick else [(256, 224), (128, 64)]
    warmup, repeats, step_repeats = (1, 3, 1) if args.quick else (3, 15, 3)

    load_before = os.getloadavg()
    results = []
    for n, size in settings:
        memory_format = torch.contiguous_format if args.nchw else torch.channels_last
        results.append(bench_setting(n, size, device, dtype, amp, memory_format, warmup, repeats, step_repeats))
        print(report(results[-1]), flush=True)
    out = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "quick": args.quick, "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "targets": TARGETS, "settings": results}
    print(f"load average (1, 5, 15 min) before {load_before}, after {out['load_average_after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
