"""Images per second of every salmix loader next to its raw library, and a JPEG decode ceiling.

One run measures, side by side and with the same number of workers, on one synthetic JPEG
ImageFolder set of ImageNet-like images (about 500 x 375, a quarter portrait, quality 90,
textured: smooth colour fields, shapes and grain; written once under ``--data-dir`` with its
FFCV ``.beton``, stored as JPEG by salmix's ``write_beton`` so that every backend decodes a
JPEG per image), at each resolution (default 128, 160, 192, 224 px, batch 256), train mode
(random-resized-crop + flip, normalised float32 on the CPU, each loader's default on CUDA):

* the salmix loaders: ``folder``, ``dali`` (``reader="feed"``), ``dali-file``
  (``reader="file"``) and ``ffcv``;
* the raw libraries, no salmix code: torchvision ``ImageFolder`` + ``DataLoader``
  (``RandomResizedCrop``, flip, ``ToTensor``, ``Normalize`` in the workers), a minimal DALI
  pipeline (``fn.readers.file``, ``image_random_crop``, ``resize``, ``crop_mirror_normalize``
  into the same HWC float layout salmix asks for), and a minimal FFCV ``Loader`` over the same
  ``.beton`` (``RandomResizedCropRGBImageDecoder``, ``RandomHorizontalFlip``,
  ``NormalizeImage``, ``ToTensor``, ``ToTorchImage``; ``OrderOption.RANDOM``);
* a decode-only ceiling: every JPEG of the set fully decoded from memory, single-threaded, by
  Pillow's libjpeg-turbo (images per CPU-second of that thread, i.e. per core; times the
  workers: the loaders' ceiling).

How epochs are timed: every loader lives for the whole run and follows one resolution
schedule (salmix: a ``Phases`` schedule; raw DALI: one pipeline per resolution). Per
resolution, each loader runs one warm-up epoch (FFCV's numba JIT, DALI's allocations), then
``--repeats`` epochs, interleaved (each salmix loader next to its raw library, the order
reversed every round) so that drift in machine load hits all alike; the figure is the median.
The salmix/raw ratio is the median over rounds of the ratio of the two neighbouring epochs of
a round: on a shared machine the speed available swings by up to 2x over seconds, and
neighbours see nearly the same machine. An epoch is timed from ``iter()`` until the
process and its worker processes are idle again after its last batch (their CPU time stops
growing): work a loader leaves running in the background (DALI's reader and the folder
loader's workers decode the next epoch's first batches) is charged to it, not to the loader
timed next, and the next epoch of the same loader starts with those batches ready, so in a
steady run each timed window holds one epoch's decoding. The default set is a whole number of batches
(2048 = 8 x 256), so no backend decodes a partial batch that ``drop_last`` then drops.
Also reported per epoch: images per CPU-second (process and its DataLoader workers) and the
cores kept busy. On a machine shared with other jobs the wall-clock figures drop with the
cores the run gets; the CPU-second figures barely move, so their salmix/raw ratio tells
whether a wrapper does extra work, the images/s ratio (the target) also whether it idles.

Progressive-resizing switch: after the throughput rounds each loader runs, alone and without
pauses, epochs at ``LO, LO, HI, HI`` (default 128, 128, 192, 192) with every batch timed from
the previous one (the first of an epoch: from the previous epoch's last batch, across
``set_epoch`` and ``iter()``). Reported, in batches at HI (the mean interval between batches
inside the HI epochs; a DataLoader delivers in bursts, so not the median): the first batch
after the switch; the stall: the time until the ``workers``-th batch after the switch minus
that many batch times (target <= 1; a DataLoader with W workers delivers W batches at once
every W batch times, so its single gaps reach about W batch times with no stall at all, and
one burst is the unit it delivers in); and, for scale, the same for the first batches of the
next epoch, which has no switch: a loader that pays a start-up at every epoch shows it there
too. One switch per loader: a single sample, noisy on a shared machine.

Head to head (the throughput target): each salmix loader and its raw library run at the same
time, each in its own process with the same number of workers, for ``--head-to-head-seconds``
(default 40) per size, after a warm-up epoch each; the ratio is of the images each delivers
between the first and the last of its batches inside the common window (its first eighth
left out, so batches prefetched before the start do not count). The two share the CPU the
machine gives at each moment, so its swings, which on a shared machine are larger than the 5 %
the target allows, hit both alike, where epochs run one after the other see different
moments. A loader that does more work per image gets proportionally fewer images through; one
that leaves the CPU idle (at an epoch boundary, say) also hands that time to its rival, so
idling shows about twice as large as it would alone. ``--control`` (default raw DALI) runs
against itself: its ratio's distance from 1 is the method's error.

Resize gain (what the fast protocol's pre-resizing buys): a copy of the set with every shorter
side brought down to 160 px, written by ``pipelines.resize``'s own ``resize_tree`` (its default
quality, 95) once under ``--data-dir``, with its own ``.beton``; then each of ``folder``,
``dali`` (feed) and ``ffcv`` at 128 px in train mode, on the original set and on the copy (two
loaders, the same workers), a warm-up epoch each and ``--repeats`` rounds of one epoch each,
original and copy interleaved (the order reversed every round). The gain is the median over
rounds of the ratio copy / original of the two epochs of a round; images per CPU-second too.
``--resize-gain RES SIDE`` sets the two sizes, ``--only-resize-gain`` runs this section alone.

Targets: each salmix loader >= 0.95x its raw library at every resolution, head to head; a stall
of at most one batch at the switch (the resize gain has none: it is measured, not judged).
Prints the figures and ratios, writes JSON (default ``benchmarks/results/loaders.json``, with
machine, versions and load averages; ``loaders_resize_gain.json`` with ``--only-resize-gain``)
and a PNG chart beside it (not for the resize gain). Report measured figures only.

    python benchmarks/loaders.py [--images 2048] [--batch 256] [--res 128 160 192 224]
        [--workers N] [--repeats 5] [--head-to-head-seconds 40] [--control raw-dali]
        [--switch 128 192] [--resize-gain 128 160] [--only-resize-gain] [--data-dir DIR]
        [--out PATH] [--quick]
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import queue
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/mixing.py must not shadow the mixing package

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, features  # noqa: E402

from pipelines import OutputSpec, Phase, Phases, make_loader  # noqa: E402
from pipelines.ffcv import WRITE_MODES, ensure_beton  # noqa: E402
from pipelines.resize import DEFAULT_QUALITY, resize_tree  # noqa: E402
from training.report import pyplot  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]
SALMIX = ("folder", "dali", "dali-file", "ffcv")
RAW_OF = {"folder": "raw-torchvision", "dali": "raw-dali", "dali-file": "raw-dali",
          "ffcv": "raw-ffcv"}
#: Run order: each salmix loader next to its raw library, so a pair sees the same machine load.
ORDER = ("folder", "raw-torchvision", "dali", "raw-dali", "dali-file", "ffcv", "raw-ffcv")
#: The backends whose resize gain is measured (dali-file reads as dali does).
RESIZE_GAIN_BACKENDS = ("folder", "dali", "ffcv")
TARGETS = {"salmix_x_raw_min": 0.95, "switch_stall_batches_max": 1.0}
#: Epochs a head-to-head contender may run per size (its schedule is built this long).
HEAD_TO_HEAD_MAX_EPOCHS = 100
# The raw loaders' own constants (no salmix code on the raw side).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN_255, STD_255 = [255 * m for m in MEAN], [255 * s for s in STD]
DATA_VERSION = 1  # bump when synthetic_jpeg changes: the cached set is then written anew


# --- the image set ----------------------------------------------------------------------------

def synthetic_jpeg(seed: int, index: int) -> bytes:
    """An ImageNet-like JPEG (about 500 x 375, a quarter portrait, quality 90).

    Textured, because JPEG decode time grows with the coded detail: a smooth colour field, a
    mid-frequency texture, a few flat shapes and per-pixel grain (about 70 kB per image).
    """
    rng = np.random.default_rng([seed, index])
    w, h = int(rng.integers(440, 561)), int(rng.integers(330, 421))
    if rng.random() < 0.25:
        w, h = h, w

    def noise_field(cell: int, amplitude: float) -> np.ndarray:
        small = rng.normal(0, amplitude, (max(2, h // cell), max(2, w // cell), 3)).astype(np.float32)
        return np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC))
                         for c in range(3)], axis=-1)

    pixels = 128 + noise_field(96, 60) + noise_field(12, 40)
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(canvas, np.float32) + rng.normal(0, 10, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _write_image(job: tuple[Path, int, int]) -> None:
    path, seed, index = job
    path.write_bytes(synthetic_jpeg(seed, index))


def image_stats(root: Path) -> dict:
    """Mean size (pixels, kB) and portrait share of the JPEGs under ``root``, from their headers."""
    paths = sorted(root.rglob("*.jpg"))
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append((image.width, image.height, path.stat().st_size))
    w, h, nbytes = np.array(sizes).T
    return {"mean_width": float(w.mean()), "mean_height": float(h.mean()),
            "mean_kpixels": float((w * h).mean() / 1e3), "portrait_share": float((h > w).mean()),
            "mean_kbytes": float(nbytes.mean() / 1e3)}


def ensure_images(data_dir: Path, n: int, classes: int, seed: int, workers: int) -> tuple[Path, dict]:
    """The ImageFolder set (written on first use) and its description."""
    home = data_dir / f"v{DATA_VERSION}-n{n}-c{classes}-seed{seed}"
    meta = home / "meta.json"  # written last: marks a complete set
    if not meta.exists():
        print(f"writing {n} JPEGs to {home}", file=sys.stderr, flush=True)
        jobs = []
        for i in range(n):
            folder = home / "train" / f"c{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"img{i:05d}.jpg", seed, i))
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_image, jobs, chunksize=16))
        meta.write_text(json.dumps({"images": n, "classes": classes, "seed": seed,
                                    "jpeg_quality": 90, **image_stats(home / "train")}))
    return home / "train", json.loads(meta.read_text())


def ensure_resized_copy(root: Path, short_side: int, workers: int) -> tuple[Path, dict]:
    """The set with every shorter side brought down to ``short_side``, written beside it by
    ``pipelines.resize.resize_tree`` at its default quality (on first use; a rerun finds every
    file done), and its description."""
    copy = root.parent / f"{root.name}-short{short_side}"
    result = resize_tree(root, copy, short_side, workers=workers)
    if result.errors:
        raise RuntimeError(f"resize of {root} failed for {len(result.errors)} images, e.g. "
                           f"{result.errors[0].path}")
    return copy, {"short_side": short_side, "jpeg_quality": DEFAULT_QUALITY, **image_stats(copy)}


# --- the raw libraries ------------------------------------------------------------------------

class RawTorchvision:
    """torchvision's classic recipe: ImageFolder + DataLoader, augmentation in the workers."""

    def __init__(self, root: Path, sizes: list[int], batch: int, workers: int,
                 device: torch.device) -> None:
        self.root, self.sizes, self.batch, self.workers, self.device = root, sizes, batch, workers, device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        from torchvision import datasets, transforms as T

        res = self.sizes[self.epoch]
        augment = T.Compose([T.RandomResizedCrop(res), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize(MEAN, STD)])
        batches = torch.utils.data.DataLoader(
            datasets.ImageFolder(str(self.root), augment), batch_size=self.batch, shuffle=True,
            num_workers=self.workers, drop_last=True, pin_memory=self.device.type == "cuda")
        for images, labels in batches:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


class RawDali:
    """NVIDIA's minimal training pipeline, one per resolution (built when the size changes)."""

    def __init__(self, root: Path, sizes: list[int], batch: int, workers: int,
                 device: torch.device) -> None:
        self.root, self.sizes, self.batch, self.workers = root, sizes, batch, workers
        self.device_id = None
        if device.type == "cuda":
            self.device_id = torch.cuda.current_device() if device.index is None else device.index
        self.epoch, self.res, self.iterator = 0, None, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _build(self, res: int):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        @pipeline_def(batch_size=self.batch, num_threads=self.workers,
                      device_id=self.device_id, seed=0)
        def pipeline():
            gpu = self.device_id is not None
            jpegs, labels = fn.readers.file(file_root=str(self.root), random_shuffle=True,
                                            name="Reader")
            decode = (dict(device="mixed", device_memory_padding=211_025_920,
                           host_memory_padding=140_544_512) if gpu else dict(device="cpu"))
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB,
                                                   random_area=[0.08, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3], **decode)
            images = fn.resize(images, resize_x=res, resize_y=res)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                              mean=MEAN_255, std=STD_255,
                                              mirror=fn.random.coin_flip())
            return images, labels.gpu() if gpu else labels

        pipe = pipeline()
        pipe.build()
        return DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)

    def __iter__(self) -> Iterator[Batch]:
        res = self.sizes[self.epoch]
        if res != self.res:
            self.iterator = None  # free the old pipeline first
            self.iterator, self.res = self._build(res), res
        for (batch,) in self.iterator:
            yield batch["images"].permute(0, 3, 1, 2), batch["labels"].squeeze(-1).long()


class RawFfcv:
    """FFCV's ImageNet training pipeline over the ``.beton``, resized per epoch as FFCV does.

    On CUDA the uint8 batch goes to the GPU and torch normalises it (FFCV's GPU normaliser
    needs cupy)."""

    def __init__(self, beton: Path, sizes: list[int], batch: int, workers: int,
                 device: torch.device) -> None:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import (NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice,
                                     ToTensor, ToTorchImage)

        self.sizes, self.device, self.epoch = sizes, device, 0
        self.decoder = RandomResizedCropRGBImageDecoder((sizes[0], sizes[0]))
        image = [self.decoder, RandomHorizontalFlip()]
        label = [IntDecoder(), ToTensor(), Squeeze()]
        if device.type == "cuda":
            image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
            label += [ToDevice(device, non_blocking=True)]
            self.mean = torch.tensor(MEAN_255, device=device).view(1, 3, 1, 1)
            self.std = torch.tensor(STD_255, device=device).view(1, 3, 1, 1)
        else:
            image += [NormalizeImage(np.array(MEAN_255), np.array(STD_255), np.float32),
                      ToTensor(), ToTorchImage()]
        self.loader = Loader(str(beton), batch_size=batch, num_workers=workers,
                             order=OrderOption.RANDOM, drop_last=True, seed=0,
                             pipelines={"image": image, "label": label})

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        res = self.sizes[self.epoch]
        self.decoder.output_size = (res, res)
        for images, labels in self.loader:
            if self.device.type == "cuda":
                images = images.float().sub_(self.mean).div_(self.std)
            yield images, labels


# --- timing -----------------------------------------------------------------------------------

def idle_since(poll: float = 0.01, quiet: float = 0.05, busy: float = 0.25) -> float:
    """The ``perf_counter`` time since which this process (all its threads) and its worker
    processes have been idle.

    Polls CPU time: the process tree is busy in an interval where it used more than ``busy`` of
    a core; returns once it has been idle for ``quiet`` seconds. Loaders that keep decoding
    after an epoch's last batch (the next epoch's first batches) are thus timed until they
    stop, and the next loader's epoch starts on an idle machine."""
    since = last = time.perf_counter()
    cpu = _cpu_seconds()
    while True:
        time.sleep(poll)
        now, used = time.perf_counter(), _cpu_seconds()
        if used - cpu > busy * (now - last):
            since = now
        elif now - since >= quiet:
            return since
        last, cpu = now, used


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work, so that a batch is timed when it is ready."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timeline(loader, epochs: Iterable[int], sync: Callable[[], None]) -> list[list[float]]:
    """Per epoch, the seconds between consecutive batches; an epoch's first gap runs from the
    previous epoch's last batch (the first epoch's: from the call)."""
    gaps, last = [], time.perf_counter()
    for epoch in epochs:
        loader.set_epoch(epoch)
        row = []
        for _ in loader:
            sync()
            now = time.perf_counter()
            row.append(now - last)
            last = now
        gaps.append(row)
    return gaps


def timed_epoch(loader, epoch: int, batch: int, sync: Callable[[], None]) -> dict:
    """One epoch: images delivered, seconds from ``iter()`` until the process and its workers are
    idle again, the tail (last batch to idle: work left running in the background, such as the
    next epoch's first batches, which the next timed epoch then finds ready: in a steady run
    each window holds one epoch's decoding) and the cores it kept busy (CPU time of the
    process and its workers over wall time: below ``workers`` when the loader idles or other
    processes take the CPUs)."""
    idle_since()
    start, cpu = time.perf_counter(), _cpu_seconds()
    (gaps,) = timeline(loader, [epoch], sync)
    last, end = start + sum(gaps), idle_since()
    cpu = _cpu_seconds() - cpu
    return {"images": batch * len(gaps), "seconds": end - start, "cpu_s": cpu,
            "tail_s": max(0.0, end - last), "cores_used": cpu / (end - start)}


def _cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children and its live ones (DataLoader workers)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:  # exited since the listing: reaped, counted above
            continue
        total += times.user + times.system
    return total


def throughput(loaders: dict, resolutions: list[int], repeats: int, batch: int,
               sync: Callable[[], None]) -> dict:
    """Per resolution and loader: median images/s over ``repeats`` interleaved epochs, after a
    warm-up epoch each (epoch numbers follow the schedule the loaders were built with)."""
    names, epoch, results = list(loaders), 0, {}
    for res in resolutions:
        runs = {name: [] for name in names}
        for rnd in range(1 + repeats):
            for name in names[::-1] if rnd % 2 else names:
                run = timed_epoch(loaders[name], epoch, batch, sync)
                if rnd:  # round 0 is the warm-up
                    runs[name].append(run)
            epoch += 1
        results[res] = {name: _summary(r) for name, r in runs.items()}
        print(f"{res} px: " + ", ".join(f"{n} {s['img_s']:.0f}" for n, s in results[res].items()),
              file=sys.stderr, flush=True)
    return results


def _summary(runs: list[dict]) -> dict:
    rates = [r["images"] / r["seconds"] for r in runs]
    return {"img_s": statistics.median(rates), "img_s_best": max(rates), "img_s_all": rates,
            "img_per_cpu_s": statistics.median(r["images"] / r["cpu_s"] for r in runs),
            "images_per_epoch": runs[0]["images"],
            "tail_s": statistics.median(r["tail_s"] for r in runs),
            "cores_used": statistics.median(r["cores_used"] for r in runs)}


def switch_stall(loader, first_epoch: int, lo: int, hi: int, workers: int,
                 sync: Callable[[], None]) -> dict:
    """Batch timeline across ``lo, lo | hi, hi`` epochs (``first_epoch`` on) of one loader."""
    idle_since()
    return score_switch(timeline(loader, range(first_epoch, first_epoch + 4), sync), lo, hi,
                        workers)


def score_switch(gaps: list[list[float]], lo: int, hi: int, workers: int) -> dict:
    """The switch figures of a ``lo, lo | hi, hi`` timeline, in batch times at ``hi``.

    The batch time at a size is the mean interval between batches inside its epochs (not the
    median: a DataLoader's workers deliver whole batches in bursts). The stall is the delay of
    the first ``workers`` batches after the switch beyond ``workers`` batch times."""

    def batch_time(epochs: list[list[float]]) -> float:
        inner = [g for row in epochs for g in row[1:]]
        return sum(inner) / len(inner)

    lo_batch, hi_batch = batch_time(gaps[:2]), batch_time(gaps[2:])
    stall, next_epoch = (sum(row[:workers]) / hi_batch - workers for row in gaps[2:])
    return {"from_res": lo, "to_res": hi, "batch_s": hi_batch, "burst_batches": workers,
            "first_batch_after_switch_s": gaps[2][0],
            "first_batch_after_switch_x": gaps[2][0] / hi_batch, "stall_batches": stall,
            "next_epoch_stall_batches": next_epoch,
            "switch_minus_next_epoch_batches": stall - next_epoch,
            "lo_epoch_first_batch_x": gaps[1][0] / lo_batch,
            "met": stall <= TARGETS["switch_stall_batches_max"], "gaps_s": gaps}


def decode_ceiling(paths: list[str], passes: int) -> dict:
    """Single-threaded full decode of every JPEG from memory by Pillow (libjpeg-turbo).

    Per core is images per CPU-second of the decoding thread (a loaded machine slows the wall
    clock, not that); the wall-clock rate is kept too."""
    blobs = [Path(p).read_bytes() for p in paths]
    per_cpu_s, wall = [], []
    for _ in range(passes):
        start, cpu = time.perf_counter(), time.thread_time()
        for blob in blobs:
            Image.open(io.BytesIO(blob)).load()
        per_cpu_s.append(len(blobs) / (time.thread_time() - cpu))
        wall.append(len(blobs) / (time.perf_counter() - start))
    return {"library": f"Pillow {version('pillow')}, libjpeg-turbo "
                       f"{features.version_feature('libjpeg_turbo')}",
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
            "img_s_per_core": statistics.median(per_cpu_s), "img_s_per_core_all": per_cpu_s,
            "img_s_wall_all": wall}


# --- head to head -----------------------------------------------------------------------------

def _contender(slot: int, name: str, build: dict, sizes: list[int], seconds: float,
               barrier, results) -> None:
    """Child process of ``head_to_head``: one loader; per size a warm-up epoch, then, from the
    moment both contenders pass ``barrier``, whole epochs until ``seconds`` have passed. Sends
    ``(slot, size, start, batch delivery times)`` (``perf_counter``: one clock for all
    processes)."""
    # A spawned process defaults to spawning its own children: DataLoader workers would then
    # take seconds to start each epoch. Start them as the parent process does.
    multiprocessing.set_start_method(build["start_method"], force=True)
    device = torch.device(build["device"])
    sync = device_sync(device)
    per_size = 1 + HEAD_TO_HEAD_MAX_EPOCHS
    loader = build_loader(name, build["root"], build["beton"],
                          [res for res in sizes for _ in range(per_size)], build["batch"],
                          build["workers"], device)
    for k, res in enumerate(sizes):
        epoch = k * per_size
        loader.set_epoch(epoch)
        for _ in loader:  # warm-up: FFCV's JIT, DALI's allocations, this size's buffers
            sync()
        barrier.wait()
        start = last = time.perf_counter()
        times = []
        while last < start + seconds:
            epoch += 1
            if epoch == (k + 1) * per_size:
                raise RuntimeError(f"{name} ran {HEAD_TO_HEAD_MAX_EPOCHS} epochs in "
                                   f"{seconds} s: raise HEAD_TO_HEAD_MAX_EPOCHS")
            loader.set_epoch(epoch)
            for _ in loader:
                sync()
                last = time.perf_counter()
                times.append(last)
        results.put((slot, res, start, times))


def _rate(times: list[float], start: float, end: float, batch: int) -> float:
    """Images per second between the first and the last batch delivered inside [start, end]."""
    inside = [t for t in times if start <= t <= end]
    if len(inside) < 3:
        raise RuntimeError(f"only {len(inside)} batches in a {end - start:.1f} s window: "
                           f"give --head-to-head-seconds more time")
    return batch * (len(inside) - 1) / (inside[-1] - inside[0])


def head_to_head(pairs: list[tuple[str, str]], build: dict, sizes: list[int], seconds: float,
                 settle: float) -> dict:
    """Per pair ``(a, b)`` and size: a's images/s over b's, the two loaders running at the same
    time, each in its own process with its own workers.

    Both share whatever CPU the machine gives at each moment, so its swings hit them alike; a
    loader that does more work per image, or idles (at an epoch boundary, say), gets fewer
    images through. Counted from ``settle`` seconds after the common start (batches prefetched
    before it do not count) to ``seconds`` after it."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for a, b in pairs:
        barrier, results = ctx.Barrier(2, timeout=900), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(slot, name, build, sizes, seconds,
                                                       barrier, results))
                 for slot, name in enumerate((a, b))]
        for proc in procs:
            proc.start()
        runs = {}
        try:
            while len(runs) < 2 * len(sizes):
                try:
                    slot, res, start, times = results.get(timeout=1)
                except queue.Empty:
                    failed = [f"{(a, b)[k]} (exit code {p.exitcode})"
                              for k, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if failed:
                        raise RuntimeError(f"head to head {a} vs {b}: {', '.join(failed)} failed")
                    continue
                runs[slot, res] = (start, times)
        except BaseException:
            for proc in procs:
                proc.terminate()
            raise
        finally:
            for proc in procs:
                proc.join()
        out[f"{a} vs {b}"] = row = {}
        for res in sizes:
            (start_a, times_a), (start_b, times_b) = runs[0, res], runs[1, res]
            start, end = max(start_a, start_b) + settle, min(start_a, start_b) + seconds
            rate_a, rate_b = (_rate(t, start, end, build["batch"]) for t in (times_a, times_b))
            row[res] = {"img_s": [rate_a, rate_b], "ratio": rate_a / rate_b,
                        "window_s": end - start, "start_skew_s": abs(start_a - start_b)}
        print(f"head to head {a} vs {b}: " + ", ".join(f"{res} px {c['ratio']:.3f}"
                                                       for res, c in row.items()),
              file=sys.stderr, flush=True)
    return out


# --- resize gain ------------------------------------------------------------------------------

def resize_gain(names: list[str], trees: dict, res: int, repeats: int, batch: int, workers: int,
                device: torch.device, sync: Callable[[], None]) -> dict:
    """Per backend of ``names``: :func:`throughput` at ``res`` of one loader on the original set
    and one on its resized copy (``trees``: ``{"original": (root, beton), "copy": ...}``),
    interleaved, and their :func:`paired_ratio` copy / original."""
    out = {}
    for name in names:
        loaders = {f"{name} {tree}": build_loader(name, root, beton, [res] * (1 + repeats), batch,
                                                  workers, device)
                   for tree, (root, beton) in trees.items()}
        row = throughput(loaders, [res], repeats, batch, sync)[res]
        del loaders  # their workers and pipelines go before the next backend's start
        original, copy = row[f"{name} original"], row[f"{name} copy"]
        out[name] = {"original": original, "copy": copy, **paired_ratio(copy, original)}
    return out


def resize_gain_table(gain: dict, res: int, copy: dict, original: dict) -> str:
    lines = [f"resize gain at {res} px (train): the original set (~{original['mean_kpixels']:.0f} "
             f"kpx) against its {copy['short_side']} px short-side copy "
             f"(~{copy['mean_kpixels']:.0f} kpx, quality {copy['jpeg_quality']})",
             f"{'loader':<10}{'original img/s':>16}{'copy img/s':>12}{'copy / original':>17}"
             f"{'per CPU-second':>16}   (median of the rounds' paired ratios)"]
    for name, row in gain.items():
        lines.append(f"{name:<10}{row['original']['img_s']:>16.0f}{row['copy']['img_s']:>12.0f}"
                     f"{row['ratio']:>17.2f}{row['cpu_efficiency_ratio']:>16.2f}")
    return "\n".join(lines)


# --- building the loaders ---------------------------------------------------------------------

def build_loader(name: str, root: Path, beton: Path, sizes: list[int], batch: int, workers: int,
                 device: torch.device):
    """The loader ``name`` (a salmix backend or a raw library) on the ``sizes`` schedule (one
    size per epoch)."""
    if name in RAW_OF.values():
        raw = {"raw-torchvision": RawTorchvision, "raw-dali": RawDali}.get(name)
        return (raw(root, sizes, batch, workers, device) if raw
                else RawFfcv(beton, sizes, batch, workers, device))
    schedule = Phases(tuple(Phase(epoch, res) for epoch, res in enumerate(sizes)))
    backend, options = {"folder": ("folder", {}), "dali": ("dali", {"reader": "feed"}),
                        "dali-file": ("dali", {"reader": "file"}), "ffcv": ("ffcv", {})}[name]
    return make_loader(backend, beton if backend == "ffcv" else root, train=True,
                       batch_size=batch, resolution=schedule, num_workers=workers,
                       output=OutputSpec(device=device), seed=0, **options)


def build_loaders(names: list[str], root: Path, beton: Path, sizes: list[int], batch: int,
                  workers: int, device: torch.device) -> dict:
    """The salmix loaders of ``names`` and their raw counterparts, all on the ``sizes`` schedule."""
    wanted = set(names) | {RAW_OF[n] for n in names}
    return {name: build_loader(name, root, beton, sizes, batch, workers, device)
            for name in ORDER if name in wanted}


# --- report -----------------------------------------------------------------------------------

def ratios(results: dict, names: list[str]) -> dict:
    """salmix / raw per size: the median over rounds of the ratio of the two epochs run next to
    each other in the same round (machine load drifts over seconds, so neighbours share it far
    more than epochs a minute apart do); also the ratio of the best epochs and of the images
    per CPU-second."""
    out = {}
    for res, row in results.items():
        out[res] = {}
        for name in names:
            ours, raw = row[name], row[RAW_OF[name]]
            out[res][name] = {"vs": RAW_OF[name], **paired_ratio(ours, raw),
                              "best_ratio": ours["img_s_best"] / raw["img_s_best"]}
    return out


def paired_ratio(ours: dict, theirs: dict) -> dict:
    """Two loaders' :func:`throughput` summaries compared: the median over rounds of the ratio of
    their images/s in the same round, the ratio of every round, and of the images per
    CPU-second."""
    paired = [a / b for a, b in zip(ours["img_s_all"], theirs["img_s_all"], strict=True)]
    return {"ratio": statistics.median(paired), "ratio_per_round": paired,
            "cpu_efficiency_ratio": ours["img_per_cpu_s"] / theirs["img_per_cpu_s"]}


def duel_ratios(duels: dict, names: list[str]) -> dict:
    """Per size and salmix loader: its head-to-head ratio against its raw library (the target)."""
    target = TARGETS["salmix_x_raw_min"]
    return {res: {name: {"vs": RAW_OF[name], "ratio": ratio, "met": ratio >= target}
                  for name in names
                  for ratio in [duels[f"{name} vs {RAW_OF[name]}"][res]["ratio"]]}
            for res in next(iter(duels.values()))}


def table(results: dict, ratio: dict, duels: dict, ceiling: dict, workers: int,
          switch: dict) -> str:
    resolutions = list(results)
    names = list(results[resolutions[0]])

    def block(title: str, key: str, fmt: str) -> list[str]:
        head = f"{title:<22}" + "".join(f"{f'{r} px':>16}" for r in resolutions)
        return [head] + [f"{name:<22}" + "".join(f"{results[r][name][key]:>16{fmt}}" for r in resolutions)
                         for name in names]

    lines = block("images/s (median)", "img_s", ".0f")
    ceiling_at = ceiling["img_s_per_core"] * workers
    lines.append(f"{'decode ceiling':<22}" + f"{ceiling_at:>16.0f}" * len(resolutions)
                 + f"   ({ceiling['img_s_per_core']:.0f}/core x {workers})")
    lines += block("images per CPU-second", "img_per_cpu_s", ".0f")
    lines += block("cores kept busy", "cores_used", ".2f")
    lines.append(f"{'salmix / raw':<22}" + "".join(f"{f'{r} px':>16}" for r in resolutions)
                 + "   (images/s, median of the rounds' paired ratios; per CPU-second)")
    for name in ratio[resolutions[0]]:
        cells = "".join(f"{c['ratio']:>10.2f} ({c['cpu_efficiency_ratio']:.2f})"
                        for c in (ratio[r][name] for r in resolutions))
        lines.append(f"{name + ' / ' + RAW_OF[name][4:]:<22}{cells}")
    lines.append(f"{'head to head':<22}" + "".join(f"{f'{r} px':>16}" for r in resolutions)
                 + f"   (images/s of a over b, running at once; target >= "
                 f"{TARGETS['salmix_x_raw_min']} for salmix / raw)")
    target = TARGETS["salmix_x_raw_min"]
    for pair, row in duels.items():
        a, b = pair.split(" vs ")
        mark = (lambda r: "  ok" if r >= target else "  --") if a in RAW_OF else (lambda r: "")
        lines.append(f"{pair:<26}" + "".join(f"{c['ratio']:>12.3f}{mark(c['ratio'])}"
                                             for c in row.values()))
    first = next(iter(switch.values()))
    lines.append(f"switch {first['from_res']} -> {first['to_res']} px, in batches at the new size: "
                 f"first batch after the switch; stall: delay of the first {first['burst_batches']} "
                 f"batches (target <= 1); the same at the next epoch (no switch); the difference")
    lines.append(f"{'loader':<22}{'batch ms':>9}{'switch':>8}{'stall':>7}{'next epoch':>12}"
                 f"{'difference':>12}")
    for name, sw in switch.items():
        lines.append(f"{name:<22}{1e3 * sw['batch_s']:>9.0f}{sw['first_batch_after_switch_x']:>8.2f}"
                     f"{sw['stall_batches']:>7.2f}{sw['next_epoch_stall_batches']:>12.2f}"
                     f"{sw['switch_minus_next_epoch_batches']:>12.2f}"
                     + ("" if name not in RAW_OF else "  ok" if sw["met"] else "  --"))
    return "\n".join(lines)


def chart(results: dict, ratio: dict, duel: dict, ceiling: dict, workers: int, title: str,
          path: Path) -> None:
    """Images/s per loader and resolution (raw libraries hatched), and the salmix/raw ratios
    (head to head: solid; sequential epochs: dotted)."""
    plt = pyplot()

    resolutions = list(results)
    names = list(results[resolutions[0]])
    colours = {"folder": "tab:blue", "raw-torchvision": "tab:blue", "dali": "tab:green",
               "dali-file": "tab:olive", "raw-dali": "tab:green", "ffcv": "tab:red",
               "raw-ffcv": "tab:red"}
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[2, 1])
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(resolutions))]
        bars.bar(xs, [results[r][name]["img_s"] for r in resolutions], width, label=name,
                 color=colours[name], alpha=0.5 if name.startswith("raw") else 0.9,
                 hatch="//" if name.startswith("raw") else None, edgecolor="black", linewidth=0.4)
    bars.axhline(ceiling["img_s_per_core"] * workers, color="black", linestyle="--", linewidth=1,
                 label=f"libjpeg-turbo decode x {workers} cores")
    bars.set_xticks(range(len(resolutions)), [f"{r} px" for r in resolutions])
    bars.set_ylabel("images / s")
    bars.legend(fontsize=8, ncol=2)
    for name in ratio[resolutions[0]]:
        lines.plot(resolutions, [duel[r][name]["ratio"] for r in resolutions], "o-",
                   color=colours[name], label=f"{name} / {RAW_OF[name]}")
        lines.plot(resolutions, [ratio[r][name]["ratio"] for r in resolutions], ":",
                   color=colours[name], alpha=0.6)
    lines.axhline(TARGETS["salmix_x_raw_min"], color="black", linestyle="--", linewidth=1,
                  label="target")
    lines.set_xticks(resolutions)
    lines.set_xlabel("resolution (px)")
    lines.set_ylabel("salmix / raw library")
    lines.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine(device: torch.device, workers: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "workers": workers, "python": platform.python_version(),
            "versions": {p: version(p) for p in ("torch", "torchvision", "nvidia-dali-cuda120",
                                                 "ffcv", "numba", "pillow")}}


def ffcv_beton(tree: Path, prefix: str, args: argparse.Namespace) -> Path:
    """The ``.beton`` of the image tree ``tree`` with the ``--ffcv-*`` settings, written beside
    it on first use."""
    name = f"{prefix}{args.ffcv_write_mode}-{args.ffcv_max_res}.beton"
    return ensure_beton(tree, tree.parent / name, max_resolution=args.ffcv_max_res,
                        write_mode=args.ffcv_write_mode, jpeg_quality=90,
                        num_workers=args.workers, progress=False)


def loader_sections(args: argparse.Namespace, root: Path, beton: Path | None, data: dict,
                    device: torch.device) -> dict:
    """Decode ceiling, throughput, switch and head to head (``args`` with its defaults
    resolved): printed, charted, and returned for the JSON."""
    batch, resolutions, repeats = args.batch, args.res, args.repeats
    seconds, sync = args.head_to_head_seconds, device_sync(device)
    load_before = os.getloadavg()
    ceiling = decode_ceiling(sorted(str(p) for p in root.rglob("*.jpg")), passes=3)
    lo, hi = args.switch
    throughput_sizes = [res for res in resolutions for _ in range(1 + repeats)]
    loaders = build_loaders(args.backends, root, beton, throughput_sizes + [lo, lo, hi, hi],
                            batch, args.workers, device)
    results = throughput(loaders, resolutions, repeats, batch, sync)
    switch = {name: switch_stall(loader, len(throughput_sizes), lo, hi, args.workers, sync)
              for name, loader in loaders.items()}
    ratio = ratios(results, args.backends)
    del loaders  # their workers and pipelines go before the contenders start
    build = {"root": root, "beton": beton, "batch": batch, "workers": args.workers,
             "device": str(device), "start_method": multiprocessing.get_start_method()}
    pairs = [(name, RAW_OF[name]) for name in args.backends] + [(args.control, args.control)]
    duels = head_to_head(pairs, build, resolutions, seconds, settle=seconds / 8)
    duel = duel_ratios(duels, args.backends)
    load_after = os.getloadavg()

    title = (f"{data['images']} JPEGs of ~{data['mean_kpixels']:.0f} kpx, batch {batch}, "
             f"{args.workers} workers, {machine(device, args.workers)['device']}; "
             f"median of {repeats} epochs; "
             f"load avg {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(title)
    print(table(results, ratio, duels, ceiling, args.workers, switch))
    met = {"throughput": all(c["met"] for row in duel.values() for c in row.values()),
           "switch": all(switch[name]["met"] for name in args.backends)}
    chart(results, ratio, duel, ceiling, args.workers, title, Path(args.out).with_suffix(".png"))
    at_workers = ceiling["img_s_per_core"] * args.workers
    return {"targets": TARGETS, "targets_met": met,
            "decode_ceiling": {**ceiling, "img_s_at_workers": at_workers},
            "throughput": results, "ratios": ratio, "head_to_head_s": seconds,
            "head_to_head": duels, "head_to_head_ratios": duel, "switch": switch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, help="images in the set (default 2048; quick 256)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, help="batch size (default 256; quick 64)")
    parser.add_argument("--res", type=int, nargs="+", help="default 128 160 192 224; quick 128 224")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="workers / threads of every loader (default: the usable CPUs)")
    parser.add_argument("--repeats", type=int, help="timed epochs per loader and size (default 5; quick 1)")
    parser.add_argument("--switch", type=int, nargs=2, default=[128, 192], metavar=("LO", "HI"))
    parser.add_argument("--resize-gain", type=int, nargs=2, default=[128, 160],
                        metavar=("RES", "SIDE"),
                        help="the resize gain's output size and its copy's shorter side")
    parser.add_argument("--only-resize-gain", action="store_true",
                        help="run the resize-gain section alone (the full run includes it)")
    parser.add_argument("--backends", nargs="+", default=list(SALMIX), choices=SALMIX)
    parser.add_argument("--head-to-head-seconds", type=float,
                        help="length of each head-to-head run (default 40; quick 10)")
    parser.add_argument("--control", default="raw-dali", choices=sorted(set(RAW_OF.values())),
                        help="the raw library run head to head against itself: the method's error")
    parser.add_argument("--ffcv-max-res", type=int, default=512, help="the .beton's max_resolution")
    parser.add_argument("--ffcv-write-mode", default="jpg", choices=WRITE_MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=str(ROOT / "benchmarks" / "data" / "loaders"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--out", help="the JSON (default benchmarks/results/loaders.json; "
                                      "loaders_resize_gain.json with --only-resize-gain)")
    parser.add_argument("--quick", action="store_true", help="small smoke run (about a minute)")
    args = parser.parse_args()
    args.images = args.images or (256 if args.quick else 2048)
    args.batch = args.batch or (64 if args.quick else 256)
    args.res = args.res or ([128, 224] if args.quick else [128, 160, 192, 224])
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.head_to_head_seconds = args.head_to_head_seconds or (10 if args.quick else 40)
    out = Path(args.out or ROOT / "benchmarks" / "results" / (
        "loaders_resize_gain.json" if args.only_resize_gain else "loaders.json"))
    args.out = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    started, load_before = time.perf_counter(), os.getloadavg()

    # All files first: the writers fork processes, which is unsafe once loader threads run.
    root, data = ensure_images(Path(args.data_dir), args.images, args.classes, args.seed,
                               args.workers)
    gain_res, short_side = args.resize_gain
    copy, copy_data = ensure_resized_copy(root, short_side, args.workers)
    ffcv = "ffcv" in args.backends
    beton = ffcv_beton(root, "", args) if ffcv else None
    trees = {"original": (root, beton),
             "copy": (copy, ffcv_beton(copy, f"short{short_side}-", args) if ffcv else None)}

    record = {} if args.only_resize_gain else loader_sections(args, root, beton, data, device)
    gain_names = [name for name in args.backends if name in RESIZE_GAIN_BACKENDS]
    gain = resize_gain(gain_names, trees, gain_res, args.repeats, args.batch, args.workers,
                       device, device_sync(device))
    print(resize_gain_table(gain, gain_res, copy_data, data))
    out.write_text(json.dumps({
        "machine": machine(device, args.workers), "quick": args.quick,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "data": {**data, "ffcv_beton": {"max_resolution": args.ffcv_max_res,
                                        "write_mode": args.ffcv_write_mode, "jpeg_quality": 90}},
        "batch": args.batch, "repeats": args.repeats, **record,
        "resize_gain": {"res": gain_res, "copy": copy_data, "backends": gain},
        "runtime_s": time.perf_counter() - started}, indent=2))
    met = f"targets met: {record['targets_met']}; " if record else ""
    chart_note = "" if args.only_resize_gain else f" and {out.with_suffix('.png')}"
    print(f"{met}runtime {time.perf_counter() - started:.0f} s; wrote {out}{chart_note}")


if __name__ == "__main__":
    main()
