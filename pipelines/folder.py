"""The torchvision reference loader: PIL decoding in DataLoader workers.

The fallback where DALI or FFCV are missing and the baseline of the loader benchmarks, so it
stays a plain DataLoader: workers decode with PIL (``convert("RGB")`` handles CMYK, grayscale
and PNG data) and return uint8 ``H x W x 3`` tensors; the batch is normalised once, on the
device, by :meth:`OutputSpec.normalize_uint8`.

One DataLoader iterator runs on across epochs, so its workers start decoding the next epoch's
first batches while the current epoch's last ones are used: no worker start-up and no empty
pipeline at an epoch boundary, with or without a resolution switch. Each sample the workers
receive is keyed ``(index, resolution, epoch, crop scale)``, so a batch prefetched before
``set_epoch`` is called already has the next epoch's size and crop scale, and ``set_epoch``
never changes an epoch that is running. The stream assumes the epochs follow each other; when
they do not (``set_epoch`` jumps, or a loop stopped mid-epoch), the next ``iter()`` starts a new
one. Random crops and flips are drawn from a generator seeded with ``(seed, epoch, sample
index)``: the same seed gives the same crops whatever the number of workers.
"""
from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from .base import (RRC_RATIO, RRC_SCALE, Loader, OutputSpec, Shard, chain_epochs,
                   resolve_workers, val_resize)
from .gpu_decode import GpuDecoder, RawSamples, collate_raw, resolve_decode
from .imagefolder import scan_image_folder
from .images import load_rgb
from .resolution import ResolutionSchedule

Batch = tuple[torch.Tensor, torch.Tensor]
#: What the workers are given per sample: (index, resolution, epoch, crop area scale range).
SampleKey = tuple[int, int, int, tuple[float, float]]


def load_pil_rgb(path: str) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image (:func:`pipelines.images.load_rgb`: EXIF
    orientation ignored, 16 bits scaled to 8); any failure is a :class:`BadImageError` naming
    the file and the reason."""
    return load_rgb(path)


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


class Samples(Dataset):
    """``(index, resolution, epoch, crop scale) -> (H x W x 3 uint8 tensor, label)``: each key
    carries its epoch's size, crop seed and crop area scale range, so one set of workers serves
    every epoch."""

    def __init__(self, samples: tuple[tuple[str, int], ...], train: bool, seed: int) -> None:
        self.samples, self.train, self.seed = samples, train, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        i, res, epoch, scale = key
        path, label = self.samples[i]
        img = load_pil_rgb(path)
        if self.train:
            rng = np.random.default_rng((self.seed, epoch, i))
            top, left, h, w = random_resized_crop_box(img.width, img.height, rng, scale)
            img = F.resized_crop(img, top, left, h, w, [res, res])
            if rng.random() < 0.5:
                img = F.horizontal_flip(img)
        else:
            img = F.center_crop(F.resize(img, val_resize(res)), res)
        return torch.from_numpy(np.array(img)), label


class _Stream:
    """A DataLoader iterator over consecutive epochs, and where its consumer stands in it."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches = batches
        self.owed = 0  # batches of the current epoch not taken yet
        self.next_epoch: tuple | None = None  # Loader._epoch_key of what comes next


class FolderLoader(Loader):
    """ImageFolder split -> normalised ``(images, labels)`` batches on ``output.device``.

    Shards and batch counts follow :meth:`pipelines.base.Shard.split`. ``num_workers``: the
    DataLoader's worker processes (0: decode in this process). ``decode``: ``"cpu"`` (PIL in
    the workers), ``"gpu"`` (the workers read bytes and draw the crops, the main process decodes
    the batch with nvJPEG: :mod:`pipelines.gpu_decode`; a ValueError without CUDA) or ``"auto"``
    (``"gpu"`` when batches go to a CUDA device); the resolved choice is ``self.decode``.
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
        decode: str = "auto",
    ) -> None:
        super().__init__(train=train, batch_size=batch_size, resolution=resolution,
                         output=output, shard=shard, seed=seed, drop_last=drop_last)
        self.num_workers = resolve_workers(num_workers, allow_zero=True)
        self.decode = resolve_decode(decode, self.output.device)  # before scanning a large tree
        self.index = scan_image_folder(source)
        self.source = self.index.root
        self.num_classes = len(self.index.classes)
        self.num_samples = len(self.index)
        len(self)  # a training split too small for one batch fails here, not in the trainer
        self._stream: _Stream | None = None
        self._gpu = None
        if self.decode == "gpu":
            self._gpu = GpuDecoder(Samples(self.index.samples, self.train, self.seed), self.output)

    def _epoch_batches(self, epoch: int) -> list[list[SampleKey]]:
        """``epoch``'s batches of sample keys, ``(index, resolution, epoch, crop scale)``."""
        res, scale = self.schedule.resolution(epoch), self.crop_scale_at(epoch)
        return [[(int(i), res, epoch, scale) for i in batch]
                for batch in self.split_at(epoch).batches(self.seed, epoch)]

    def _open(self, epoch: int, skip: int = 0) -> _Stream:
        """A DataLoader over the batches of ``epoch`` (from its batch ``skip`` on: the skipped
        ones are never read), ``epoch + 1``, ... and its workers."""
        samples, collate = Samples(self.index.samples, self.train, self.seed), None
        if self._gpu is not None:  # the workers read bytes and draw crops; _deliver decodes
            samples, collate = RawSamples(samples), collate_raw
        batches = DataLoader(samples, batch_sampler=chain_epochs(self._epoch_batches, epoch, skip),
                             num_workers=self.num_workers, collate_fn=collate,
                             pin_memory=self.output.device.type == "cuda" and collate is None)
        return _Stream(iter(batches))

    def __iter__(self) -> Iterator[Batch]:
        """Batches of the current epoch; its resolution and batch size are fixed here."""
        len(self)  # this epoch's batch size may leave no batch
        start, stream = self._take_start(), self._stream
        if (stream is None or stream.owed or start
                or stream.next_epoch != self._epoch_key(self.epoch)):
            self._stream = None  # let the old workers go before new ones start
            self._stream = stream = self._open(self.epoch, start)
        stream.owed = len(self) - start
        stream.next_epoch = self._epoch_key(self.epoch + 1)
        return self._take(stream)

    def _take(self, stream: _Stream) -> Iterator[Batch]:
        while stream.owed:
            batch = next(stream.batches)
            stream.owed -= 1
            yield self._deliver(batch)

    def _deliver(self, batch: Batch) -> Batch:
        if self._gpu is not None:
            return self._gpu(batch)
        images, labels = batch
        return self.output.normalize_uint8(images, "NHWC"), self.output.labels(labels)
