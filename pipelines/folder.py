"""The torchvision reference loader: PIL decoding in DataLoader workers.

The fallback where DALI or FFCV are missing and the baseline of the loader benchmarks, so it
stays a plain DataLoader: workers decode with PIL (``convert("RGB")`` handles CMYK, grayscale
and PNG data) and return uint8 ``H x W x 3`` tensors; the batch is normalised once, on the
device, by :meth:`OutputSpec.normalize_uint8`.

Each ``iter(loader)`` builds a DataLoader over a dataset frozen at that epoch's resolution,
so ``set_epoch`` can never change an epoch that is already running. Random crops and flips
are drawn from a generator seeded with ``(seed, epoch, sample index)``: the same seed gives
the same crops whatever the number of workers.
"""
from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms.v2 import functional as F

from .base import RRC_RATIO, RRC_SCALE, Loader, OutputSpec, Shard, val_resize
from .imagefolder import scan_image_folder
from .resolution import ResolutionSchedule

Batch = tuple[torch.Tensor, torch.Tensor]


def default_num_workers() -> int:
    """The CPUs this process may use, shared among the ranks on this node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` to an RGB image; any failure is a RuntimeError naming the file.

    Images of more than 8 bits per channel are refused: PIL's RGB conversion would clip them.
    """
    try:
        with Image.open(path) as img:
            if img.mode == "F" or img.mode.startswith("I"):
                raise ValueError(f"mode {img.mode} has more than 8 bits per channel; convert it to 8-bit")
            return img.convert("RGB")
    except Exception as e:
        raise RuntimeError(f"cannot decode {path}: {e}") from e


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO,
                            tries: int = 10) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` drawn from ``rng``: ``(top, left, h, w)``.

    The first of ``tries`` random (area, aspect ratio) draws that fits in the image, else a
    central crop with the aspect ratio clamped into ``ratio``.
    """
    area = width * height * rng.uniform(*scale, tries)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), tries))
    ws = np.rint(np.sqrt(area * aspect)).astype(int)
    hs = np.rint(np.sqrt(area / aspect)).astype(int)
    fits = np.flatnonzero((ws > 0) & (ws <= width) & (hs > 0) & (hs <= height))
    if fits.size:
        w, h = int(ws[fits[0]]), int(hs[fits[0]])
        return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(height * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w


class EpochImages(Dataset):
    """One epoch's view of the samples: ``index -> (H x W x 3 uint8 tensor, label)``."""

    def __init__(self, samples: tuple[tuple[str, int], ...], res: int, train: bool,
                 seed: int, epoch: int) -> None:
        self.samples, self.res, self.train = samples, res, train
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = load_rgb(path)
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            top, left, h, w = random_resized_crop_box(img.width, img.height, rng)
            img = F.resized_crop(img, top, left, h, w, [self.res, self.res])
            if rng.random() < 0.5:
                img = F.horizontal_flip(img)
        else:
            img = F.center_crop(F.resize(img, val_resize(self.res)), self.res)
        return torch.from_numpy(np.array(img)), label


class FolderLoader(Loader):
    """ImageFolder split -> normalised ``(images, labels)`` batches on ``output.device``.

    Train: ``DistributedSampler`` shuffling (reproducible from ``seed`` and the epoch), padded
    by at most ``world_size - 1`` repeated samples so that every rank has ``ceil(N / world)``
    samples and the same number of batches. Validation: rank ``r`` reads the contiguous block
    ``[N*r // world, N*(r+1) // world)`` once, in order, without padding.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        train: bool,
        batch_size: int,
        resolution: int | ResolutionSchedule | dict,
        output: OutputSpec | None = None,
        shard: Shard | None = None,
        seed: int = 0,
        num_workers: int | None = None,
        drop_last: bool | None = None,
    ) -> None:
        super().__init__(train=train, batch_size=batch_size, resolution=resolution,
                         output=output, shard=shard, seed=seed)
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(f"num_workers must be a non-negative int or None, got {num_workers!r}")
        self.index = scan_image_folder(source)
        self.num_classes = len(self.index.classes)
        self.num_samples = len(self.index)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.drop_last = train if drop_last is None else bool(drop_last)
        self._check_batches()

    def _val_block(self) -> range:
        n, rank, world = self.num_samples, self.shard.rank, self.shard.world_size
        return range(n * rank // world, n * (rank + 1) // world)

    def _shard_samples(self) -> int:
        if self.train:
            return math.ceil(self.num_samples / self.shard.world_size)
        return len(self._val_block())

    def __len__(self) -> int:
        n, bs = self._shard_samples(), self.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)

    def _check_batches(self) -> None:
        if self.train and len(self) == 0:
            raise ValueError(
                f"batch size {self.batch_size} with drop_last leaves no batch: rank "
                f"{self.shard.rank} has {self._shard_samples()} of the {self.num_samples} samples "
                f"in {self.index.root}")

    def _sampler(self) -> DistributedSampler | range:
        if not self.train:
            return self._val_block()
        sampler = DistributedSampler(range(self.num_samples), num_replicas=self.shard.world_size,
                                     rank=self.shard.rank, shuffle=True, seed=self.seed)
        sampler.set_epoch(self.epoch)
        return sampler

    def __iter__(self) -> Iterator[Batch]:
        """Batches of the current epoch; its resolution and batch size are fixed here."""
        self._check_batches()
        images = EpochImages(self.index.samples, self.resolution, self.train, self.seed, self.epoch)
        batches = DataLoader(images, batch_size=self.batch_size, sampler=self._sampler(),
                             num_workers=self.num_workers, drop_last=self.drop_last,
                             pin_memory=self.output.device.type == "cuda")
        return map(self._deliver, batches)

    def _deliver(self, batch: Batch) -> Batch:
        images, labels = batch
        return self.output.normalize_uint8(images, "NHWC"), self.output.labels(labels)
