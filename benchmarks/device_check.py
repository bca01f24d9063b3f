"""The GPU readiness check: CUDA tests, mixing and training-step benchmarks, GPU JPEG decoding.

    PYTHONPATH=. python benchmarks/device_check.py --out DIR [--device cuda|cpu] [--quick]
                                                   [--only env,train_eager,...] [--budget S]

Runs from the source tree (no install; ``import pipelines`` needs neither DALI nor FFCV, checked
in ``env``), each section in a child process with its own time limit inside one overall budget
(``--budget``, default 450 s: the whole check fits in 8 minutes on one H200), writing
``DIR/device_check.json`` after every section (a run cut short keeps what it measured) and the
children's logs and JSON next to it. Sections, in run order:

- ``env``: versions, the GPU, nvJPEG, and that ``import pipelines`` imports no DALI/FFCV/numba;
- ``train_eager``: ``benchmarks/train_step.py`` for ResNet-50, batch 256 at 224 px,
  channels-last, fp16 and bf16, none / grafting / sage / mixup / cutmix (peak memory per step);
- ``mixing``: ``benchmarks/mixing.py`` (each mixer against the memory-bound floor);
- ``loader``: the folder loader, GPU decoding against CPU decoding (16 workers, batch 256 at
  224 px, on ImageNet-like JPEGs of about 500 x 375 it writes itself);
- ``cuda_tests``: ``pytest -k "cuda or gpu_decode"`` (the tests that need CUDA, and all of
  ``tests/test_gpu_decode.py``; test modules whose DALI/FFCV imports are missing are left out);
- ``train_compile``: ``train_step.py --compile``, fp16 then bf16, with what is left of the budget
  (a compile that fails or runs out of time is reported, not fatal).

The table printed last gives each target as met / NOT met:

- ResNet-50 fp16 channels-last single-pass step >= 3,000 img/s (data already on the GPU);
- the two-pass step (Grafting, SAGE; eta < 1) <= 2.05x the single-pass step;
- each mixer <= 2 % of the step (its ``mix`` stage in the ResNet-50 fp16 step) and <= 4x the
  memory-bound floor at 224 px (``mixing.py``, batch 256);
- the GPU-decode folder loader >= 2x the CPU-decode one at 224 px with 16 workers.

``--device cpu --quick`` is a smoke run of the same code at small sizes (targets reported, not
judged); ``tests/test_device_check.py`` runs its cheap sections.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/mixing.py must not shadow the mixing package

SECTIONS = ("env", "train_eager", "mixing", "loader", "cuda_tests", "train_compile")
#: Each section's time limit in seconds on the full run (the overall budget cuts them shorter).
LIMITS = {"env": 45, "train_eager": 110, "mixing": 75, "loader": 90, "cuda_tests": 120,
          "train_compile": 300}
MIXES = ("none", "grafting", "sage", "mixup", "cutmix")
TARGETS = {"single_pass_img_per_s_min": 3000, "two_pass_x_single_max": 2.05,
           "mixer_share_of_step_max": 0.02, "mixer_x_floor_max": 4.0, "gpu_decode_x_cpu_min": 2.0}
#: Test modules importing these at module level are left out of the CUDA tests when missing.
OPTIONAL_IMPORTS = {"nvidia.dali": "nvidia.dali", "ffcv": "ffcv"}


# --- running children -------------------------------------------------------------------------

def run_child(cmd: list[str], timeout: float, log: Path) -> dict:
    """Run ``cmd`` (its own process group, killed whole at ``timeout``); the log goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    log.write_text(out or "")
    return {"rc": proc.returncode, "timed_out": timed_out, "seconds": time.perf_counter() - start,
            "tail": (out or "")[-1500:]}


def child_status(run: dict) -> str:
    return "timeout" if run["timed_out"] else "ok" if run["rc"] == 0 else "failed"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- sections (each returns its record) -------------------------------------------------------

def section_env(args, out: Path, timeout: float) -> dict:
    run = run_child([sys.executable, __file__, "--child", "env", "--out", str(out), "--device", args.device],
                    timeout, out / "env.log")
    return {"status": child_status(run), "seconds": run["seconds"], **(read_json(out / "env.json") or
                                                                          {"tail": run["tail"]})}


def child_env(args, out: Path) -> None:
    import platform

    import torch
    import torchvision

    probe = subprocess.run([sys.executable, "-c", (
        "import json, sys, pipelines, pipelines.folder, pipelines.gpu_decode\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'nvidia', 'ffcv', 'numba'})))")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    heavy = json.loads(probe.stdout) if probe.returncode == 0 else None
    from pipelines.gpu_decode import nvjpeg_available

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "nvjpeg": nvjpeg_available(),
            "installed": {m: _spec(m) for m in ("nvidia.dali", "ffcv", "timm", "pytest", "psutil")},
            "import_pipelines_ok": probe.returncode == 0,
            "import_pipelines_pulls_in": heavy,
            "import_pipelines_error": probe.stderr[-800:] if probe.returncode else None}
    (out / "env.json").write_text(json.dumps(info, indent=2))


def _spec(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def train_cmd(args, out: Path, amp: str, compile_: bool) -> tuple[list[str], Path]:
    name = f"train_{'compile' if compile_ else 'eager'}_{amp}.json"
    size, steps, warmup, arch, classes = (("2x32", 1, 1, "resnet18", 10) if args.quick else
                                          ("256x224", 3 if compile_ else 5, 2, "resnet50", 1000))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--arch", arch, "--sizes", size,
           "--steps", str(steps), "--warmup", str(warmup), "--classes", str(classes), "--amp", amp,
           "--device", args.device, "--mixes", *MIXES, "--out", str(out / name)]
    return cmd + (["--compile"] if compile_ else []), out / name


def amps(args) -> list[str]:
    return ["fp16", "bf16"] if args.device.startswith("cuda") else ["none"]


def section_train(args, out: Path, timeout: float, compile_: bool) -> dict:
    record = {"status": "ok", "seconds": 0.0, "runs": {}}
    deadline = time.perf_counter() + timeout
    todo = amps(args)
    for k, amp in enumerate(todo):
        left = deadline - time.perf_counter()
        share = left / (len(todo) - k)  # split what is left between the amps still to run
        if share < 10:
            record["runs"][amp] = {"status": "skipped (budget)"}
            continue
        cmd, path = train_cmd(args, out, amp, compile_)
        run = run_child(cmd, share, out / path.with_suffix(".log").name)
        log = (out / path.with_suffix(".log").name).read_text()
        warm = dict(re.findall(r"warm-up (\w+): ([\d.]+) s", log))
        record["runs"][amp] = {"status": child_status(run), "seconds": run["seconds"],
                               "warmup_seconds": {m: float(s) for m, s in warm.items()},
                               "result": read_json(path), **({} if run["rc"] == 0 else {"tail": run["tail"]})}
        record["seconds"] += run["seconds"]
    statuses = {r["status"] for r in record["runs"].values()}
    record["status"] = "ok" if statuses == {"ok"} else ",".join(sorted(statuses))
    return record


def section_mixing(args, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "mixing.py"), "--device", args.device,
           "--out", str(out / "mixing.json")] + (["--quick"] if args.quick else [])
    run = run_child(cmd, timeout, out / "mixing.log")
    return {"status": child_status(run), "seconds": run["seconds"], "result": read_json(out / "mixing.json"),
            **({} if run["rc"] == 0 else {"tail": run["tail"]})}


def section_loader(args, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "loader", "--out", str(out), "--device", args.device]
    run = run_child(cmd + (["--quick"] if args.quick else []), timeout, out / "loader.log")
    return {"status": child_status(run), "seconds": run["seconds"], "result": read_json(out / "loader.json"),
            **({} if run["rc"] == 0 else {"tail": run["tail"]})}


def section_cuda_tests(args, out: Path, timeout: float) -> dict:
    ignore = []
    for test in sorted((ROOT / "tests").glob("test_*.py")):
        text = test.read_text()
        for module in OPTIONAL_IMPORTS:
            if re.search(rf"^(from|import) {re.escape(module)}\b", text, re.M) and not _spec(module):
                ignore += ["--ignore", str(test.relative_to(ROOT))]
    xml = out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "tests", "-k", "cuda or gpu_decode", "-q", "-rs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *ignore]
    run = run_child(cmd, timeout, out / "cuda_tests.log")
    record = {"status": child_status(run), "seconds": run["seconds"], "ignored": ignore[1::2],
              "summary": (run["tail"].strip().splitlines() or [""])[-1],
              "measured": re.findall(r"nvJPEG vs PIL.*", (out / "cuda_tests.log").read_text())}
    record.update(junit_counts(xml))
    if record.get("tests", 0) == 0 or run["rc"] not in (0, 5):
        record["tail"] = run["tail"]
    if run["rc"] == 5:  # nothing selected/collected
        record["status"] = "ok (nothing ran)"
    return record


def junit_counts(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}: "
                          f"{(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


# --- the loader child -------------------------------------------------------------------------

def photo_jpeg(job: tuple[str, int]) -> None:
    """An ImageNet-like JPEG (about 500 x 375, a quarter portrait, textured, quality 90)."""
    import numpy as np
    from PIL import Image

    path, index = job
    rng = np.random.default_rng([7, index])
    w, h = int(rng.integers(440, 561)), int(rng.integers(330, 421))
    if rng.random() < 0.25:
        w, h = h, w
    small = rng.normal(128, 60, (h // 16 + 2, w // 16 + 2, 3)).clip(0, 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    pixels = base + rng.normal(0, 14, (h, w, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def write_photos(root: Path, n: int, classes: int, workers: int) -> Path:
    from concurrent.futures import ProcessPoolExecutor

    done = root / f"n{n}.done"
    if not done.exists():
        jobs = []
        for i in range(n):
            folder = root / "train" / f"c{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((str(folder / f"img{i:05d}.JPEG"), i))
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(photo_jpeg, jobs, chunksize=32))
        done.write_text("")
    return root / "train"


def child_loader(args, out: Path) -> None:
    """Folder loader images/s with CPU decoding and with GPU decoding (on a CPU device: the GPU
    path's code decoding on the CPU, for the smoke run), two timed epochs after a warm one."""
    import torch

    from pipelines import OutputSpec
    from pipelines.folder import FolderLoader, Samples
    from pipelines.gpu_decode import GpuDecoder

    cuda = args.device.startswith("cuda")
    n, batch, res, workers = (96, 16, 64, 2) if args.quick else (4096, 256, 224, 16)
    start = time.perf_counter()
    root = write_photos(out / "jpegs", n, classes=8, workers=min(workers, os.cpu_count() or 1))
    result = {"images": n, "batch": batch, "res": res, "workers": workers,
              "write_seconds": time.perf_counter() - start, "decoders": {}}
    output = OutputSpec(device=args.device, dtype=torch.float16 if cuda else torch.float32)
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    for decode in ("cpu", "gpu"):
        loader = FolderLoader(root, train=True, batch_size=batch, resolution=res, output=output,
                              num_workers=workers, decode=decode if cuda else "cpu")
        if decode == "gpu" and not cuda:  # smoke: the GPU path's code, decoding on the CPU
            loader._gpu = GpuDecoder(Samples(loader.index.samples, True, loader.seed), output)
        epochs = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            sync()
            t0, count = time.perf_counter(), 0
            for images, _ in loader:
                count += images.shape[0]
            sync()
            epochs.append({"seconds": time.perf_counter() - t0, "images": count})
        timed = epochs[1:]
        rate = sum(e["images"] for e in timed) / sum(e["seconds"] for e in timed)
        name = decode if cuda or decode == "cpu" else "gpu path on cpu"
        result["decoders"][name] = {"images_per_second": rate, "epochs": epochs,
                                    "fallbacks": loader._gpu.fallbacks if loader._gpu else None}
        print(f"{name}: {rate:.0f} img/s", flush=True)
        del loader
        (out / "loader.json").write_text(json.dumps(result, indent=2))
    rates = [d["images_per_second"] for d in result["decoders"].values()]
    result["gpu_x_cpu"] = rates[1] / rates[0]
    (out / "loader.json").write_text(json.dumps(result, indent=2))


# --- targets and the table --------------------------------------------------------------------

def targets(sections: dict, judged: bool) -> list[dict]:
    """Each target's measured value and whether it is met (None: not measured or not judged)."""
    rows = []

    def add(name: str, value, ok, text: str) -> None:
        rows.append({"target": name, "value": value, "met": (bool(ok) if judged else None)
                     if value is not None else None, "measured": text})

    eager = {amp: (run.get("result") or {}).get("sizes", [{}])[0].get("mixers", {})
             for amp, run in sections.get("train_eager", {}).get("runs", {}).items()}
    compiled = {amp: (run.get("result") or {}).get("sizes", [{}])[0].get("mixers", {})
                for amp, run in sections.get("train_compile", {}).get("runs", {}).items()}
    main = "fp16" if "fp16" in eager else next(iter(eager), None)
    arch = ((sections.get("train_eager", {}).get("runs", {}).get(main, {}).get("result") or {})
            .get("arch", "resnet50"))
    none = eager.get(main, {}).get("none")
    rate = none["images_per_second"] if none else None
    best = max([m["none"]["images_per_second"] for m in compiled.values() if "none" in m], default=None)
    add(f"{arch} {main or 'fp16'} single pass >= {TARGETS['single_pass_img_per_s_min']} img/s", rate,
        rate is not None and rate >= TARGETS["single_pass_img_per_s_min"],
        "-" if rate is None else f"eager {rate:.0f}" + (f", compiled {best:.0f}" if best else ""))
    ratios = {f"{mix} {amp}": mixers[mix]["ratio_to_none"] for amp, mixers in eager.items()
              for mix in ("grafting", "sage") if mix in mixers and mixers[mix].get("ratio_to_none")}
    worst = max(ratios.values(), default=None)
    add(f"two-pass step <= {TARGETS['two_pass_x_single_max']}x single pass", worst,
        worst is not None and worst <= TARGETS["two_pass_x_single_max"],
        ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) or "-")
    shares = {mix: row["stage_seconds"].get("mix", 0.0) / row["seconds_per_step"]
              for mix, row in eager.get(main, {}).items() if mix != "none" and row.get("stage_seconds")}
    worst = max(shares.values(), default=None)
    add(f"each mixer <= {100 * TARGETS['mixer_share_of_step_max']:.0f}% of the step", worst,
        worst is not None and worst <= TARGETS["mixer_share_of_step_max"],
        ", ".join(f"{k} {100 * v:.2f}%" for k, v in shares.items()) or "-")
    settings = (sections.get("mixing", {}).get("result") or {}).get("settings", [])
    big = max(settings, key=lambda s: s["size"], default=None)
    floors = {mix: row["x_floor"] for mix, row in (big or {}).get("mixers", {}).items()}
    worst = max(floors.values(), default=None)
    add(f"each mixer <= {TARGETS['mixer_x_floor_max']:.0f}x the floor at "
        f"{big['size'] if big else 224} px", worst, worst is not None and worst <= TARGETS["mixer_x_floor_max"],
        ", ".join(f"{k} {v:.2f}x" for k, v in floors.items()) or "-")
    loader = sections.get("loader", {}).get("result") or {}
    ratio = loader.get("gpu_x_cpu")
    add(f"GPU decode >= {TARGETS['gpu_decode_x_cpu_min']:.0f}x CPU decode ({loader.get('workers', 16)} workers)",
        ratio, ratio is not None and ratio >= TARGETS["gpu_decode_x_cpu_min"],
        "-" if ratio is None else ", ".join(f"{k} {v['images_per_second']:.0f} img/s"
                                            for k, v in loader["decoders"].items()) + f" ({ratio:.2f}x)")
    memory = {mix: row["step_bytes"] / eager[main]["none"]["step_bytes"]
              for mix, row in eager.get(main, {}).items()
              if "step_bytes" in row and eager[main].get("none", {}).get("step_bytes")}
    rows.append({"target": "peak step memory / unmixed step (no target)", "value": None, "met": None,
                 "measured": ", ".join(f"{k} {v:.2f}x" for k, v in memory.items() if k != "none") or "-"})
    tests = sections.get("cuda_tests", {})
    if "tests" in tests:
        rows.append({"target": "CUDA tests pass", "value": tests["failures"] + tests["errors"],
                     "met": tests["failures"] + tests["errors"] == 0 if judged else None,
                     "measured": f"{tests['passed']} passed, {tests['failures']} failed, "
                                 f"{tests['errors']} errors, {tests['skipped']} skipped"})
    return rows


def table(record: dict) -> str:
    lines = [f"device check on {record['device']} ({'quick smoke run: targets not judged' if record['quick'] else 'full run'}),"
             f" {record['seconds']:.0f} s"]
    for name, section in record["sections"].items():
        lines.append(f"  {name:<14} {section.get('seconds', 0):5.0f} s  {section['status']}")
    width = max(len(r["target"]) for r in record["targets"])
    for row in record["targets"]:
        met = {True: "met", False: "NOT met", None: "-"}[row["met"]]
        lines.append(f"  {row['target']:<{width}}  {met:<8} {row['measured']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and the logs")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU smoke run)")
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="overall seconds (default 450 full, 170 quick)")
    parser.add_argument("--child", choices=["env", "loader"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        {"env": child_env, "loader": child_loader}[args.child](args, out)
        return
    only = SECTIONS if args.only is None else tuple(args.only.split(","))
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    budget = args.budget or (170.0 if args.quick else 450.0)
    start = time.perf_counter()
    cuda = args.device.startswith("cuda")
    record = {"device": args.device, "quick": args.quick, "budget_seconds": budget, "sections": {},
              "targets": [], "seconds": 0.0, "target_values": TARGETS}
    runners = {"env": section_env, "mixing": section_mixing, "loader": section_loader,
               "cuda_tests": section_cuda_tests,
               "train_eager": lambda a, o, t: section_train(a, o, t, compile_=False),
               "train_compile": lambda a, o, t: section_train(a, o, t, compile_=True)}
    for name in SECTIONS:
        if name not in only:
            continue
        left = budget - (time.perf_counter() - start) - 5
        limit = min(LIMITS[name], left)
        if name == "train_compile" and not cuda and args.only is None:
            record["sections"][name] = {"status": "skipped (CPU: ask with --only)", "seconds": 0.0}
        elif limit < 10:
            record["sections"][name] = {"status": "skipped (budget)", "seconds": 0.0}
        else:
            print(f"[{time.perf_counter() - start:5.0f} s] {name} (limit {limit:.0f} s)", flush=True)
            try:
                record["sections"][name] = runners[name](args, out, limit)
            except Exception as e:  # a broken section must not cost the others
                record["sections"][name] = {"status": f"error: {type(e).__name__}: {e}"[:300], "seconds": 0.0}
        record["seconds"] = time.perf_counter() - start
        record["targets"] = targets(record["sections"], judged=cuda and not args.quick)
        (out / "device_check.json").write_text(json.dumps(record, indent=2))
    print(table(record))
    print(f"wrote {out / 'device_check.json'}")


if __name__ == "__main__":
    main()
