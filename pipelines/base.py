"""The loader interface every backend implements, and the pieces they share.

A loader yields ``(images, labels)`` already on the training device:

- ``images``: ``N x 3 x H x W``, normalised with the ImageNet mean and std, in the requested
  float dtype, in channels-last or contiguous NCHW memory;
- ``labels``: ``int64`` of shape ``N``.

``len(loader)`` is the number of batches per epoch on this rank, and ``set_epoch(e)`` applies
epoch ``e``'s resolution, batch size and shuffling seed before the next iteration.

Train mode: random-resized-crop (scale 0.08-1, ratio 3/4-4/3) and horizontal flip, sharded so
that every rank yields the same number of batches (``drop_last``). Validation mode: resize the
shorter side to ``res / 0.875`` and centre-crop ``res``; every rank yields each sample of its
shard exactly once, with no padding, so metrics summed over ranks count every image once.
"""
from __future__ import annotations

import abc
import os
import weakref
from dataclasses import dataclass, field
from itertools import count
from typing import Callable, Iterator

import torch

from .resolution import ResolutionSchedule, schedule_from_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN_255 = tuple(255 * m for m in IMAGENET_MEAN)
IMAGENET_STD_255 = tuple(255 * s for s in IMAGENET_STD)

#: Validation images are resized so that a ``res`` centre crop keeps 87.5% of the short side.
VAL_CROP_RATIO = 0.875
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)

FLOAT_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def val_resize(res: int) -> int:
    """Shorter-side size before the validation centre crop of ``res``."""
    return int(round(res / VAL_CROP_RATIO))


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def as_float_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Parse ``'float16'``/``'bf16'``/``torch.float32``...; reject anything else by name."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    elif dtype in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype]
    raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


@dataclass(frozen=True)
class Shard:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad shard: rank {self.rank} of world size {self.world_size}")

    @classmethod
    def current(cls) -> "Shard":
        """The rank and world size of the initialised process group, else a single shard."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


@dataclass(frozen=True)
class OutputSpec:
    """Where and how batches are delivered."""

    device: torch.device = field(default_factory=default_device)
    dtype: torch.dtype = torch.float32
    channels_last: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "dtype", as_float_dtype(self.dtype))

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def normalize_uint8(self, images: torch.Tensor, layout: str = "NHWC") -> torch.Tensor:
        """uint8 batch (any device, ``NHWC`` or ``NCHW``) -> normalised float batch on ``device``.

        One copy to the device, one conversion into the output buffer, one in-place
        normalisation; the result has the requested dtype and memory format.
        """
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected a 4-D uint8 batch, got {images.dtype} {tuple(images.shape)}")
        if layout == "NHWC":
            images = images.permute(0, 3, 1, 2)
        elif layout != "NCHW":
            raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
        if images.shape[1] != 3:
            raise ValueError(f"expected 3 colour channels, got shape {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)
        out = torch.empty(images.shape, dtype=self.dtype, device=self.device,
                          memory_format=self.memory_format)
        out.copy_(images)
        mean, std = _norm_constants(self.device, self.dtype)
        return out.sub_(mean).div_(std)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """A normalised float batch (any dtype, layout or device) -> the requested output."""
        return images.to(device=self.device, dtype=self.dtype, non_blocking=True,
                         memory_format=self.memory_format)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels as a flat int64 tensor on ``device``."""
        return labels.reshape(-1).to(device=self.device, dtype=torch.int64, non_blocking=True)


_NORM_CACHE: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, dtype)
    if key not in _NORM_CACHE:
        mean = torch.tensor(IMAGENET_MEAN_255, device=device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD_255, device=device, dtype=dtype).view(1, 3, 1, 1)
        _NORM_CACHE[key] = (mean, std)
    return _NORM_CACHE[key]


class Loader(abc.ABC):
    """Base class of the salmix loaders: epoch bookkeeping and the resolution schedule.

    Subclasses implement ``__iter__`` and ``__len__`` and read ``self.resolution`` and
    ``self.batch_size`` (both follow ``set_epoch``). Validation loaders are given a fixed
    resolution (an int).
    """

    def __init__(
        self,
        *,
        train: bool,
        batch_size: int,
        resolution: int | ResolutionSchedule | dict,
        output: OutputSpec | None = None,
        shard: Shard | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.train = train
        self.schedule = schedule_from_dict(resolution)
        self.output = output or OutputSpec()
        self.shard = shard or Shard.current()
        self.seed = seed
        self._default_batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Apply ``epoch``'s resolution, batch size and shuffling seed to the next iteration."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    @property
    def resolution(self) -> int:
        return self.schedule.resolution(self.epoch)

    @property
    def batch_size(self) -> int:
        return self.batch_size_at(self.epoch)

    def batch_size_at(self, epoch: int) -> int:
        """The batch size of ``epoch``: its phase's, else the loader's."""
        return self.schedule.batch_size(epoch) or self._default_batch_size

    def _epoch_key(self, epoch: int) -> tuple:
        """What ``epoch`` yields: in training its own order and crops, in validation only its
        size and batch size. Loaders that decode ahead into the next epoch compare keys to
        know whether the batches in flight are those of the epoch asked for."""
        key = (self.schedule.resolution(epoch), self.batch_size_at(epoch))
        return key + (epoch,) if self.train else key

    @abc.abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


def chain_epochs(epoch_batches: Callable[[int], list | None], first: int) -> Iterator:
    """The items of ``epoch_batches(first)``, then of ``first + 1``, ...: consecutive epochs as
    one stream, for loaders that decode ahead across epoch boundaries. ``None`` ends it.

    ``epoch_batches`` is a loader's method, held weakly: a stream the loader keeps does not keep
    the loader (and its workers or pipeline) alive through a reference cycle.
    """
    method = weakref.WeakMethod(epoch_batches)

    def epochs() -> Iterator:
        for epoch in count(first):
            batches = method()(epoch)  # alive: only its loader pulls the stream
            if batches is None:
                return
            yield from batches

    return epochs()
