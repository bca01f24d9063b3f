"""The traversal orders of :class:`pipelines.ffcv.FfcvLoader`: :meth:`pipelines.base.Shard.split`
as FFCV ``TraversalOrder`` s, with no process group.

- :class:`ShardedOrder` (``order="random"``, and validation): in training ``shard``'s slice of
  each epoch's permutation of ``(seed, epoch)``, in validation its contiguous block in order.
- :class:`ShardedQuasiRandom` (``order="quasi_random"``): a global order of ``(seed, epoch)``
  that visits the beton's pages in a random page order, the samples of each window of
  ``window_pages`` consecutive pages of that order shuffled together; rank ``r`` takes its
  ``N // W`` contiguous positions of it, as for random. So a rank reads a contiguous run of
  the page order, and only the pages of about one window are needed at a time (FFCV's own
  ``QuasiRandom`` raises under distributed training and depends on the loader's batch size).

Both hand FFCV only the batches from ``skip`` on at the start of the next epoch it draws (a
resumed epoch; ``skip`` is reset once drawn), so the skipped ones are never read. FFCV binds an
order given as an instance by calling it with its loader.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder

from .base import Shard

if TYPE_CHECKING:
    from ffcv.loader import Loader as _FfcvLoader

#: Pages whose samples are shuffled together by :class:`ShardedQuasiRandom` (the default buffer
#: of FFCV's own quasi-random order).
WINDOW_PAGES = 6


class ShardedOrder(TraversalOrder):
    """``shard``'s part of each epoch (:meth:`pipelines.base.Shard.split`): in training its
    slice of the permutation of ``(seed, epoch)``, in validation its block in dataset order."""

    def __init__(self, shard: Shard, train: bool = True) -> None:
        self.shard, self.train, self.skip = shard, train, 0  # TraversalOrder's init: __call__

    def __call__(self, loader: "_FfcvLoader") -> "ShardedOrder":
        super().__init__(loader)
        self.split = self.shard.split(len(self.indices), loader.batch_size, train=self.train,
                                      drop_last=loader.drop_last)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        order, bs = self.indices[self.positions(epoch)], self.split.batch_size
        skip, self.skip = self.skip, 0  # FFCV cuts the order at len() of the whole epoch:
        return order[skip * bs:self.split.num_batches * bs] if skip else order  # no partial

    def positions(self, epoch: int) -> np.ndarray:
        """This rank's positions in the loader's ``indices``, in delivery order."""
        return self.split.indices(self.seed, epoch)


ShardedRandom = ShardedOrder  # the training order's former name


def sample_pages(reader: Reader) -> np.ndarray:
    """The page of the beton holding each sample (of its first allocation), from the reader's
    allocation table: the same whatever FFCV's memory manager (``os_cache``)."""
    table = reader.alloc_table
    pages = np.full(reader.num_samples, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(pages, table["sample_id"].astype(np.int64),
                  (table["ptr"] >> np.uint64(int(np.log2(reader.page_size)))).astype(np.int64))
    return pages


def quasi_random_order(pages: np.ndarray, seed: int, epoch: int,
                       window_pages: int = WINDOW_PAGES) -> np.ndarray:
    """The global quasi-random order of the samples whose pages are ``pages`` (a function of
    ``(seed, epoch)`` only): the pages in a random order, the samples of each window of
    ``window_pages`` consecutive pages of it in a random order, window after window."""
    rng = np.random.default_rng([seed, epoch, 1])  # not default_rng((seed, epoch)): random's
    present, page_ix = np.unique(pages, return_inverse=True)
    rank = np.empty(len(present), dtype=np.int64)
    rank[rng.permutation(len(present))] = np.arange(len(present))
    window = rank[page_ix] // window_pages
    return np.lexsort((rng.random(len(pages)), window))


class ShardedQuasiRandom(ShardedOrder):
    """``shard``'s positions ``[r * (N // W), (r + 1) * (N // W))`` of
    :func:`quasi_random_order` ``(seed, epoch)`` over the loader's beton (training only)."""

    def __init__(self, shard: Shard, window_pages: int = WINDOW_PAGES) -> None:
        if not isinstance(window_pages, int) or window_pages < 1:
            raise ValueError(f"window_pages must be a positive int, got {window_pages!r}")
        super().__init__(shard, train=True)
        self.window_pages = window_pages

    def __call__(self, loader: "_FfcvLoader") -> "ShardedQuasiRandom":
        super().__call__(loader)
        self.pages = sample_pages(loader.reader)[self.indices]
        return self

    def positions(self, epoch: int) -> np.ndarray:
        order = quasi_random_order(self.pages, self.seed, epoch, self.window_pages)
        return order[self.split.start:self.split.stop]


__all__ = ["ShardedOrder", "ShardedQuasiRandom", "ShardedRandom", "WINDOW_PAGES",
           "quasi_random_order", "sample_pages"]
