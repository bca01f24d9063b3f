"""``DaliLoader(reader="feed")``: Python feeds each batch's files, labels and sizes to DALI.

The epoch order and shards are :meth:`pipelines.base.Shard.split`'s, so an epoch is a function
of ``(seed, epoch)``: exact shards, and a resumed run sees the same data. The feed runs on across
epochs (epoch ``e + 1``'s batches, at its size, follow epoch ``e``'s), so DALI's prefetching
crosses the epoch boundary; when the next ``iter()`` is not for what was fed, the batches in
flight are drained and the feed restarts. One pipeline serves every resolution; it is rebuilt
only when the batch size grows or the crop scale changes (DALI fixes the scale at the build, so
the feed stops before the first epoch of another scale). A resumed epoch (``set_epoch(e,
start_batch=k)``) restarts the feed at its batch ``k``: the batches before are never read. Why
this design: ``docs/design/dali.md``.
"""
from __future__ import annotations

import weakref
from collections import deque
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .base import chain_epochs, val_resize
from .dali_graph import dali_seed, encode_path, fed_pipeline

if TYPE_CHECKING:
    from .dali import Batch, DaliLoader


class _Feed:
    """The ``external_source`` callback: serves the batches it is given, remembers those in
    flight. Paths are encoded once, so a batch is gathered by one fancy index."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], train: bool) -> None:
        self.paths = np.empty(len(paths), dtype=object)
        self.paths[:] = [encode_path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.train = train
        self.in_flight: deque[np.ndarray] = deque()
        self.stop()

    def start(self, batches: Iterator[tuple[np.ndarray, int]]) -> None:
        """Feed ``(dataset indices, output size)`` batches from here on."""
        self._batches = batches
        self.in_flight.clear()

    def stop(self) -> None:
        """End the stream here: DALI gets StopIteration on its next request."""
        self._batches = iter(())

    def __call__(self) -> tuple:
        batch, res = next(self._batches)
        self.in_flight.append(batch)
        n = len(batch)
        out = (list(self.paths[batch]), self.labels[batch], np.full(n, res, np.float32))
        return out if self.train else out + (np.full(n, val_resize(res), np.float32),)


class FeedReader:
    """The feed-mode reader of one :class:`~pipelines.dali.DaliLoader`: its pipeline, feed and
    where the running epoch stands. Crops and flips come from DALI's generator seeded with
    ``(seed, rank)``."""

    def __init__(self, loader: DaliLoader) -> None:
        self.loader = weakref.proxy(loader)  # the loader holds its reader, not the reverse
        self.feed = _Feed(loader.paths, loader.labels, loader.train)
        self.pipe: Pipeline | None = self._pipeline()
        self.iterator: DALIGenericIterator | None = None
        self.owed = 0  # batches of the running epoch not yet delivered
        self.next_epoch: tuple | None = None  # _epoch_key of what the feed serves next

    def _pipeline(self) -> Pipeline:
        """A pipeline for the loader's epoch: its batch size and crop scale (``self.area``)."""
        loader = self.loader
        self.area = loader.crop_scale_at(loader.epoch)
        return loader.build(fed_pipeline, loader.batch_size, self.area,
                            dali_seed(loader.seed, loader.shard.rank), self.feed)

    def _fits(self, epoch: int) -> bool:
        """Whether the built pipeline decodes ``epoch``'s batches: they are no larger than its
        batch size and have its crop scale."""
        loader = self.loader
        return (loader.batch_size_at(epoch) <= self.pipe.max_batch_size
                and loader.crop_scale_at(epoch) == self.area)

    def batches(self, epoch: int) -> list[tuple[np.ndarray, int]] | None:
        """This rank's batches in ``epoch``: dataset indices and output size; None when they
        do not fit the built pipeline (the feed ends there)."""
        loader = self.loader
        if not self._fits(epoch):
            return None
        res = loader.schedule.resolution(epoch)
        return [(batch, res) for batch in loader.split_at(epoch).batches(loader.seed, epoch)]

    def epoch(self, token: object) -> Iterator[Batch]:
        """The current epoch's batches, as DALI delivers them."""
        iterator = self._stream()
        for _ in range(self.owed):
            self.loader.check_active(token)
            batch = self._next(iterator)
            self.owed -= 1
            yield batch

    def _stream(self) -> DALIGenericIterator:
        """The running pipeline if its feed goes on with the loader's epoch, else one restarted
        on it (the batches in flight drained, the pipeline rebuilt if it does not fit the epoch)."""
        loader = self.loader
        start = loader._take_start()
        rebuild = self.pipe is None or not self._fits(loader.epoch)
        if rebuild or self.owed or start or self.next_epoch != loader._epoch_key(loader.epoch):
            self._drain()
            if rebuild:
                self.iterator = self.pipe = None
                self.pipe = self._pipeline()
            self.feed.start(chain_epochs(self.batches, loader.epoch, start))
            if self.iterator is None:
                self.iterator = DALIGenericIterator(self.pipe, ["images", "labels"],
                                                    prepare_first_batch=False)
            else:
                self.iterator.reset()
        self.owed, self.next_epoch = len(loader) - start, loader._epoch_key(loader.epoch + 1)
        return self.iterator

    def _next(self, iterator: DALIGenericIterator) -> Batch:
        try:
            batch = next(iterator)[0]
        except RuntimeError as e:
            # A failed DALI pipeline cannot run again: rebuild it on the next iter().
            in_flight = [self.loader.paths[i] for b in self.feed.in_flight for i in b]
            self.feed.stop()
            self.feed.in_flight.clear()
            self.iterator = self.pipe = None
            raise self.loader.bad_file_error(e, lambda: in_flight) from e
        self.feed.in_flight.popleft()
        return batch["images"], batch["labels"]

    def _drain(self) -> None:
        """Consume the batches still in flight, so that the feed can restart clean."""
        self.feed.stop()
        while self.feed.in_flight:
            self._next(self.iterator)
