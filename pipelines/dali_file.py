"""``DaliLoader(reader="file")``: DALI's own ``fn.readers.file`` picks and reads the files
(NVIDIA's ResNet-50 recipe), held to the loader contract.

The reader reads the shared listing with ``shard_id``/``num_shards``, ``random_shuffle``
(training), ``pad_last_batch`` and ``stick_to_shard`` (validation). Each rank keeps the samples
:meth:`pipelines.base.Shard.split` gives it (the first ``len(split)`` of its padded shard), batched
as in feed mode, and reads and drops the rest before delivering the epoch's last batch, so the
next epoch starts on the reader's epoch boundary. Sizes are fed by batch count, so the batches
DALI prefetches across an epoch boundary already have the next epoch's size. The order is DALI's:
a resumed run sees another order. Why, and DALI 2.4's reader behaviour: ``docs/design/dali.md``.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .base import val_resize
from .dali_graph import dali_seed, file_reader_pipeline, source_info_pipeline
from .resolution import ResolutionSchedule

if TYPE_CHECKING:
    from .dali import Batch, DaliLoader


class _ScheduleFeed:
    """The ``external_source`` callback: the sizes of each batch the reader will read.

    Batch ``k`` of the reader's stream belongs to epoch ``first_epoch + k // per_epoch``, so its
    size is known from the schedule before DALI prefetches it, across epoch boundaries too.
    """

    def __init__(self, schedule: ResolutionSchedule, train: bool, batch_size: int,
                 per_epoch: int, first_epoch: int) -> None:
        self.schedule, self.train, self.batch_size = schedule, train, batch_size
        self.per_epoch, self.first_epoch = per_epoch, first_epoch
        self.fed = 0  # batches whose sizes DALI has taken

    def resolution(self, batch: int, first_epoch: int | None = None) -> int:
        first = self.first_epoch if first_epoch is None else first_epoch
        return self.schedule.resolution(first + batch // self.per_epoch)

    def retarget(self, batch: int, epoch: int) -> bool:
        """Make the reader epoch that starts at ``batch`` epoch ``epoch``, unless the batches
        already fed from there on would then have had another size (False)."""
        first = epoch - batch // self.per_epoch
        if any(self.resolution(k) != self.resolution(k, first) for k in range(batch, self.fed)):
            return False
        self.first_epoch = first
        return True

    def __call__(self) -> tuple[np.ndarray, ...]:
        res = self.resolution(self.fed)
        self.fed += 1
        size = np.full(self.batch_size, res, dtype=np.float32)
        return (size,) if self.train else (size, np.full_like(size, val_resize(res)))


class _ReaderStream:
    """One built file-mode pipeline: its reader's arguments, size feed, crop scale, iterator and
    position."""

    def __init__(self, pipe: Pipeline, feed: _ScheduleFeed, reader: dict,
                 area: tuple[float, float]) -> None:
        self.pipe, self.feed, self.reader, self.area = pipe, feed, reader, area
        self.batch_size = pipe.max_batch_size
        self.iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                            last_batch_policy=LastBatchPolicy.FILL,
                                            prepare_first_batch=False)
        if len(self.iterator) != feed.per_epoch:
            raise RuntimeError(f"DALI's reader epoch is {len(self.iterator)} batches, expected "
                               f"{feed.per_epoch} (padded shards): this DALI version pads "
                               f"differently; use reader='feed'")
        self.received = 0  # batches taken since the build

    def next(self) -> dict[str, torch.Tensor]:
        batch = next(self.iterator)[0]
        self.received += 1
        return batch

    def replay_files(self, first: int, count: int) -> list[str]:
        """Files of batches ``first .. first + count - 1`` of this stream, read again."""
        pipe = source_info_pipeline(self.reader, batch_size=self.batch_size)
        pipe.build()
        files = []
        for k in range(first + count):
            (info,) = pipe.run()
            if k >= first:
                files += [os.fsdecode(np.asarray(info[i]).tobytes()) for i in range(len(info))]
        return files


class FileReader:
    """The file-mode reader of one :class:`~pipelines.dali.DaliLoader`: its running stream.

    A new pipeline is built (the reader restarts) only when the batch size or the crop scale
    changes (the batches prefetched at the old scale are dropped), after a loop that stopped
    mid-epoch or a failure, or when ``set_epoch`` jumps to an epoch whose size the prefetched
    batches do not have. Needs a sample for every rank (``N >= world_size``).
    """

    def __init__(self, loader: DaliLoader) -> None:
        if loader.num_samples < loader.shard.world_size:
            raise ValueError(f"reader='file' needs a sample for every rank: {loader.num_samples} "
                             f"samples for {loader.shard.world_size} ranks (use reader='feed')")
        self.loader = weakref.proxy(loader)  # the loader holds its reader, not the reverse
        self.stream: _ReaderStream | None = None  # built by the first iteration

    def epoch(self, token: object) -> Iterator[Batch]:
        """This rank's batches of the next reader epoch: the first ``len(split)`` samples of
        its (padded) shard, batched as in feed mode. The rest of the reader epoch is read and
        dropped before the last batch is delivered, so the next epoch starts on its boundary."""
        loader = self.loader
        stream = self._stream()
        split = loader.split_at(loader.epoch)
        keep, wanted, bs = len(split), split.num_batches, split.batch_size
        last = None
        for k in range(stream.feed.per_epoch):
            loader.check_active(token)
            batch = self._take(stream)
            if k >= wanted:
                continue
            n = min(bs, keep - k * bs)
            batch = batch["images"][:n], batch["labels"][:n]
            if k == wanted - 1:
                last = batch  # delivered once the padding behind it is read
            else:
                yield batch
        if last is not None:
            yield last

    def _stream(self) -> _ReaderStream:
        """The running pipeline if it can serve the loader's epoch next, else a new one."""
        stream, epoch = self.stream, self.loader.epoch
        if (stream is None or stream.batch_size != self.loader.batch_size
                or stream.area != self.loader.crop_scale_at(epoch)
                or stream.received % stream.feed.per_epoch
                or not stream.feed.retarget(stream.received, epoch)):
            self.stream = stream = None  # free the old pipeline before building anew
            self.stream = stream = self._open(epoch)
        elif stream.received:
            stream.iterator.reset()
        return stream

    def _open(self, epoch: int) -> _ReaderStream:
        """A pipeline whose reader starts at ``epoch``: on training shard ``(rank + epoch) % W``,
        with the shuffle buffer, crops and flips seeded from ``(seed, rank, epoch)``."""
        loader = self.loader
        rank, world, bs = loader.shard.rank, loader.shard.world_size, loader.batch_size
        seed = dali_seed(loader.seed, rank, epoch)
        reader = dict(files=loader.paths, labels=loader.labels, num_shards=world,
                      shard_id=(rank + epoch) % world if loader.train else rank,
                      random_shuffle=loader.train, stick_to_shard=not loader.train,
                      pad_last_batch=True, seed=seed, name="Reader")
        per_epoch = math.ceil(math.ceil(loader.num_samples / world) / bs)
        feed = _ScheduleFeed(loader.schedule, loader.train, bs, per_epoch, epoch)
        area = loader.crop_scale_at(epoch)
        return _ReaderStream(loader.build(file_reader_pipeline, bs, area, seed, feed, reader),
                             feed, reader, area)

    def _take(self, stream: _ReaderStream) -> dict[str, torch.Tensor]:
        try:
            return stream.next()
        except RuntimeError as e:
            self.stream = None  # a failed DALI pipeline cannot run again
            failed = stream.received  # DALI reports an error with the batch that hit it
            raise self.loader.bad_file_error(
                e, lambda: stream.replay_files(failed, 1 + self.loader.prefetch)) from e
