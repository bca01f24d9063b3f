"""The loader interface every backend implements, and the pieces they share.

A loader yields ``(images, labels)`` already on the training device:

- ``images``: ``N x 3 x H x W``, normalised with the ImageNet mean and std, in the requested
  float dtype, in channels-last or contiguous NCHW memory;
- ``labels``: ``int64`` of shape ``N``.

``len(loader)`` is the number of batches per epoch on this rank, and ``set_epoch(e)`` applies
epoch ``e``'s resolution, batch size, crop scale and shuffling seed before the next iteration;
``set_epoch(e, start_batch=k)`` makes the next iteration resume epoch ``e`` at its batch ``k``
(a step-level resume: the ``k`` batches before are skipped without being read or decoded, and
``len()`` stays the whole epoch's count). ``loader.resumes_exactly`` says whether the batches
so yielded are bitwise those an uninterrupted epoch yields from batch ``k`` on (same images,
crops and flips), or only the same images in the same order.

A file a backend cannot decode raises :class:`BadImageError` (a ValueError) naming the path
and the reason in words, whichever the backend.

Train mode: random-resized-crop (area scale ``schedule.min_scale(e)``-1, 0.08-1 unless the
schedule says otherwise; ratio 3/4-4/3) and horizontal flip. Validation mode: resize the
shorter side to ``res / 0.875`` and centre-crop ``res``.

**Sharding** (:meth:`Shard.split`, the one rule every backend follows). ``N`` samples over ``W``
ranks, rank ``r``, batch size ``bs``:

- train: epoch ``e``'s order is one global permutation, ``default_rng((seed, e))``, the same on
  every rank (so class-sorted folders give mixed batches); rank ``r`` takes its positions
  ``[r * (N // W), (r + 1) * (N // W))``. Every rank has the same ``N // W`` samples, no sample
  is read twice in an epoch (no padding) and the ``N % W`` left over differ from epoch to epoch.
- validation: rank ``r`` takes the contiguous block ``[r * N // W, (r + 1) * N // W)`` of the
  ImageFolder order, in order: every sample exactly once over the ranks, so metrics summed over
  ranks count every image once (a rank may have one sample more than another, or none).
- batches: ``n // bs`` with ``drop_last`` (the default in training: every rank yields the same
  number of full batches), else ``ceil(n / bs)`` with a partial last batch (the default in
  validation), ``n`` being the rank's sample count. A training split that leaves a rank no
  batch is an error.
"""
from __future__ import annotations

import abc
import math
import os
import weakref
from dataclasses import dataclass, field
from itertools import count
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from .resolution import DEFAULT_MIN_SCALE, ResolutionSchedule, schedule_from_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN_255 = tuple(255 * m for m in IMAGENET_MEAN)
IMAGENET_STD_255 = tuple(255 * s for s in IMAGENET_STD)

#: Validation images are resized so that a ``res`` centre crop keeps 87.5% of the short side.
VAL_CROP_RATIO = 0.875
#: The random-resized crop's default area scale range; an epoch's is :meth:`Loader.crop_scale_at`.
RRC_SCALE = (DEFAULT_MIN_SCALE, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)

#: Names :func:`as_float_dtype` accepts for each output dtype.
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class BadImageError(ValueError):
    """An image file a loader cannot decode; the message names the path and the reason in words.

    ``BadImageError(path, reason)`` says ``cannot decode <path>: <reason>`` and keeps ``path``
    and ``reason``; ``BadImageError(message)`` keeps a message as given, except that one
    re-raised by a DataLoader worker (``Caught BadImageError in DataLoader worker process 0.
    Original Traceback ...``) is cut back to the original message, the traceback's last line.
    """

    def __init__(self, path_or_message: object, reason: str | None = None) -> None:
        self.path: str | None = None
        self.reason = reason
        if reason is None:
            message = str(path_or_message)
            if "Original Traceback" in message:  # torch's ExceptionWrapper.reraise
                last = message.rstrip().splitlines()[-1]
                message = last.split(": ", 1)[1] if ": " in last else last
        else:
            self.path = os.fspath(path_or_message)
            message = f"cannot decode {self.path}: {reason}"
        super().__init__(message)


def val_resize(res: int) -> int:
    """Shorter-side size before the validation centre crop of ``res``."""
    return int(round(res / VAL_CROP_RATIO))


def default_device() -> torch.device:
    """``cuda:<local rank>`` (:meth:`Shard.from_env`) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", Shard.from_env().local_rank)
    return torch.device("cpu")


def cpu_share() -> int:
    """The CPUs this process may use, shared among the ranks of this node (``torchrun`` sets
    ``LOCAL_WORLD_SIZE``): every backend's default worker count."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def resolve_workers(num_workers: int | None, *, allow_zero: bool = False,
                    limit: int | None = None, limit_name: str = "the limit") -> int:
    """A backend's worker count: ``num_workers`` checked (positive, or also 0 with
    ``allow_zero``; at most ``limit``, called ``limit_name`` in the error), or by default
    :func:`cpu_share` capped at ``limit``."""
    if num_workers is None:
        share = cpu_share()
        return min(share, limit) if limit else share
    if (not isinstance(num_workers, int) or isinstance(num_workers, bool)
            or num_workers < (0 if allow_zero else 1)):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"num_workers must be {kind} int or None, got {num_workers!r}")
    if limit is not None and num_workers > limit:
        raise ValueError(f"num_workers={num_workers} exceeds {limit_name}={limit}")
    return num_workers


def as_float_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Parse ``'float16'``/``'bf16'``/``torch.float32``...; reject anything else by name."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    elif dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


#: Environment variables of a launcher: (rank, world size, local rank), first match wins.
LAUNCHER_ENV = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),                # torchrun
                ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))   # srun


@dataclass(frozen=True)
class Shard:
    """This process's place among the data-parallel ranks: its global ``rank`` of
    ``world_size``, and its ``local_rank`` on this node (the GPU it uses)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        fields = (self.rank, self.world_size, self.local_rank)
        if (not all(isinstance(v, int) and not isinstance(v, bool) for v in fields)
                or self.world_size < 1 or not 0 <= self.rank < self.world_size
                or not 0 <= self.local_rank < self.world_size):
            raise ValueError(f"bad shard: rank {self.rank!r} (local rank {self.local_rank!r}) "
                             f"of world size {self.world_size!r}")

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes files and prints."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Shard":
        """The shard a launcher describes: torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
        else SLURM's ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, else a single
        process. A launcher's variables that are missing or not integers are an error naming
        them."""
        environ = os.environ if environ is None else environ
        for names in LAUNCHER_ENV:
            if not any(name in environ for name in names[:2]):
                continue
            values = []
            for name, default in zip(names, (None, None, "0")):
                text = environ.get(name, default)
                if text is None or not text.strip().isdigit():
                    raise ValueError(f"environment variable {name}={text!r}: expected a "
                                     f"non-negative integer (set with {', '.join(names)})")
                values.append(int(text))
            return cls(*values)
        return cls()

    @classmethod
    def current(cls) -> "Shard":
        """The rank and world size of the initialised process group (the local rank from
        :meth:`from_env`), else a single shard."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world, local = dist.get_world_size(), cls.from_env().local_rank
            return cls(dist.get_rank(), world, local if local < world else 0)
        return cls()

    def split(self, num_samples: int, batch_size: int, *, train: bool,
              drop_last: bool | None = None) -> "ShardSplit":
        """This rank's part of ``num_samples`` samples and its batch count: the one sharding
        rule of every backend (see the module docstring). ``drop_last`` defaults to ``train``.
        Raises if a training split leaves this rank no batch."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n, r, w = num_samples, self.rank, self.world_size
        drop_last = train if drop_last is None else bool(drop_last)
        start, stop = (r * (n // w), (r + 1) * (n // w)) if train else (r * n // w, (r + 1) * n // w)
        count = stop - start
        batches = count // batch_size if drop_last else math.ceil(count / batch_size)
        if train and batches == 0:
            raise ValueError(f"no batch of {batch_size} on rank {r} of {w}: each rank trains on "
                             f"{count} of the {n} samples (drop_last={drop_last})")
        return ShardSplit(n, start, stop, batch_size, batches, train)


@dataclass(frozen=True)
class ShardSplit:
    """One rank's part of an epoch (:meth:`Shard.split`): positions ``[start, stop)`` of the
    epoch's order of all ``total`` samples (training: a permutation of ``(seed, epoch)``;
    validation: the dataset order), cut into ``num_batches`` batches of ``batch_size``.
    ``len()`` is the rank's sample count."""

    total: int
    start: int
    stop: int
    batch_size: int
    num_batches: int
    train: bool

    def __len__(self) -> int:
        return self.stop - self.start

    def indices(self, seed: int, epoch: int) -> np.ndarray:
        """This rank's dataset indices in ``epoch``, in delivery order (all its positions,
        also those a dropped last batch leaves out)."""
        if self.train:
            order = np.random.default_rng([seed, epoch]).permutation(self.total)
            return order[self.start:self.stop]
        return np.arange(self.start, self.stop)

    def batches(self, seed: int, epoch: int) -> list[np.ndarray]:
        """``indices(seed, epoch)`` cut into the ``num_batches`` batches."""
        order, bs = self.indices(seed, epoch), self.batch_size
        return [order[b * bs:(b + 1) * bs] for b in range(self.num_batches)]


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
    """Base class of the salmix loaders: epoch bookkeeping, the resolution schedule, the shard.

    Subclasses set ``source`` (what errors name) and ``num_samples`` (the whole split), then
    call ``len(self)`` to refuse a training split too small for one batch; they implement
    ``__iter__`` and read ``self.resolution``, ``self.batch_size`` (both follow ``set_epoch``),
    ``self.split_at(epoch)`` and, in training, ``self.crop_scale_at(epoch)``. Validation
    loaders are given a fixed resolution (an int). ``drop_last`` defaults to ``train``.
    """

    source: object
    num_samples: int
    #: Whether ``set_epoch(e, start_batch=k)`` then iterating yields bitwise the batches an
    #: uninterrupted iteration of epoch ``e`` yields from batch ``k`` on (crops and flips
    #: included). False where only the images and their order are the same.
    resumes_exactly: bool = True

    def __init__(
        self,
        *,
        train: bool,
        batch_size: int,
        resolution: int | ResolutionSchedule | dict,
        output: OutputSpec | None = None,
        shard: Shard | None = None,
        seed: int = 0,
        drop_last: bool | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.train = train
        self.schedule = schedule_from_dict(resolution)
        self.output = output or OutputSpec()
        self.shard = shard or Shard.current()
        self.seed = seed
        self.drop_last = train if drop_last is None else bool(drop_last)
        self._default_batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0  # where the next iteration starts in the epoch (set_epoch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Apply ``epoch``'s resolution, batch size, crop scale and shuffling seed to the next
        iteration, which starts at the epoch's batch ``start_batch`` (0 to ``len()``; ``len()``
        gives an empty iteration): the batches before it are skipped unread, the ones after are
        those an uninterrupted epoch yields there (see :attr:`resumes_exactly`).
        ``start_batch`` holds for one iteration: the one after it starts the epoch again at
        batch 0."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not isinstance(start_batch, int) or isinstance(start_batch, bool) or start_batch < 0:
            raise ValueError(f"start_batch must be a non-negative int, got {start_batch!r}")
        if start_batch and start_batch > (batches := self.split_at(epoch).num_batches):
            raise ValueError(f"{self.source}: start_batch={start_batch} is past the end of "
                             f"epoch {epoch}, which has {batches} batches on this rank")
        self.epoch, self.start_batch = epoch, start_batch

    def _take_start(self) -> int:
        """The batch the iteration now starting begins at (``set_epoch``'s ``start_batch``),
        reset to 0 for the iterations after it."""
        start, self.start_batch = self.start_batch, 0
        return start

    @property
    def resolution(self) -> int:
        return self.schedule.resolution(self.epoch)

    @property
    def batch_size(self) -> int:
        return self.batch_size_at(self.epoch)

    def batch_size_at(self, epoch: int) -> int:
        """The batch size of ``epoch``: its phase's, else the loader's."""
        return self.schedule.batch_size(epoch) or self._default_batch_size

    def crop_scale_at(self, epoch: int) -> tuple[float, float]:
        """The area scale range of ``epoch``'s training crops, ``(schedule.min_scale(epoch), 1)``
        (:data:`RRC_SCALE` unless the schedule says otherwise)."""
        return self.schedule.min_scale(epoch), RRC_SCALE[1]

    def split_at(self, epoch: int) -> ShardSplit:
        """This rank's samples and batches in ``epoch`` (:meth:`Shard.split`)."""
        try:
            return self.shard.split(self.num_samples, self.batch_size_at(epoch),
                                    train=self.train, drop_last=self.drop_last)
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None

    def __len__(self) -> int:
        return self.split_at(self.epoch).num_batches

    def _epoch_key(self, epoch: int) -> tuple:
        """What ``epoch`` yields: in training its own order and crops, in validation only its
        size and batch size. Loaders that decode ahead into the next epoch compare keys to
        know whether the batches in flight are those of the epoch asked for."""
        key = (self.schedule.resolution(epoch), self.batch_size_at(epoch))
        return key + (epoch,) if self.train else key

    @abc.abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def chain_epochs(epoch_batches: Callable[[int], list | None], first: int,
                 skip: int = 0) -> Iterator:
    """The items of ``epoch_batches(first)`` from its item ``skip`` on, then of ``first + 1``,
    ...: consecutive epochs as one stream, for loaders that decode ahead across epoch
    boundaries (``skip``: a resumed epoch's batches already consumed). ``None`` ends it.

    ``epoch_batches`` is a loader's method, held weakly: a stream the loader keeps does not keep
    the loader (and its workers or pipeline) alive through a reference cycle.
    """
    method = weakref.WeakMethod(epoch_batches)

    def epochs() -> Iterator:
        for epoch in count(first):
            batches = method()(epoch)  # alive: only its loader pulls the stream
            if batches is None:
                return
            yield from batches[skip:] if epoch == first else batches

    return epochs()
