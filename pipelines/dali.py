"""NVIDIA DALI loaders: :class:`DaliLoader` over an ImageFolder tree (or a DALI file list),
:class:`~pipelines.dali_adaptor.DaliAdaptor` over a DALI pipeline or iterator you already have.

``DaliLoader`` is the common part (sources, output, shards, bad-file errors) and one of two
readers: ``reader="feed"`` (default, :mod:`pipelines.dali_feed`: Python feeds each batch, so
epochs are exact and resumable) or ``reader="file"`` (:mod:`pipelines.dali_file`: DALI's
``fn.readers.file``, NVIDIA's recipe, in DALI's order). Both run the graph of
:mod:`pipelines.dali_graph` and give the same shards, batch counts and sizes. The design, the
measurements behind it and DALI's reader behaviour: ``docs/design/dali.md``.
"""
from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from nvidia.dali import types
from nvidia.dali.pipeline import Pipeline

from .base import BadImageError, Loader, OutputSpec, Shard, resolve_workers
from .dali_adaptor import DaliAdaptor
from .dali_feed import FeedReader
from .dali_file import FileReader
from .dali_graph import dali_reason, first_undecodable
from .imagefolder import scan_image_folder
from .images import check_reason
from .resolution import ResolutionSchedule

#: ``DaliLoader(reader=...)``: Python feeds each batch's files, or ``fn.readers.file`` picks them.
READER_CLASSES = {"feed": FeedReader, "file": FileReader}
READERS = tuple(READER_CLASSES)

Batch = tuple[torch.Tensor, torch.Tensor]


def read_file_list(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Paths and labels of a DALI file list: ``name label`` lines, names relative to the list."""
    path = Path(path)
    files, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, label = (line.rsplit(maxsplit=1) + [""])[:2]
        if not label.isdigit():
            raise ValueError(f"{path}:{n}: expected '<file name> <label>', got {line!r}")
        files.append(str(path.parent / name.strip()))
        labels.append(int(label))
    if not files:
        raise ValueError(f"file list {path} lists no files")
    return files, labels


def list_source(source: str | os.PathLike) -> tuple[list[str], list[int], int]:
    """``(paths, labels, num_classes)`` of an ImageFolder directory or a DALI file list."""
    path = Path(source)
    if path.is_dir():
        index = scan_image_folder(path)
        return index.paths, index.labels, len(index.classes)
    if path.is_file():
        files, labels = read_file_list(path)
        return files, labels, max(labels) + 1
    raise FileNotFoundError(f"DALI source {path} is neither an ImageFolder directory "
                            f"nor a file list")


class DaliLoader(Loader):
    """ImageNet-style DALI loader over an ImageFolder directory or a DALI file list.

    ``reader``: ``"feed"`` (default; Python feeds each batch's files: the epoch order is a
    function of ``(seed, epoch)``, exact shards, resumable) or ``"file"`` (DALI's
    ``fn.readers.file`` with ``pad_last_batch``, as in NVIDIA's ResNet-50 example: the same
    batch counts, shards and sizes, but DALI's order, so a resumed run does not see the same
    order; needs ``N >= world_size``). Choose ``"feed"`` unless you need DALI's reader.
    ``num_workers`` is DALI's ``num_threads``, ``prefetch`` its ``prefetch_queue_depth``.
    Decoding is ``mixed`` (GPU) when the output device is CUDA, ``cpu`` otherwise.

    ``set_epoch(e, start_batch=k)`` (feed mode only; file mode resumes at epoch starts): the
    feed starts at batch ``k``, so the skipped batches are never read. The images and their
    order are those of the uninterrupted epoch; in training the crops and flips are not
    (:attr:`resumes_exactly` is False): DALI draws them from one generator per pipeline, whose
    state depends on how many batches it decoded before.
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
        prefetch: int = 2,
        reader: str = "feed",
    ) -> None:
        super().__init__(train=train, batch_size=batch_size, resolution=resolution,
                         output=output, shard=shard, seed=seed, drop_last=drop_last)
        self.num_threads = resolve_workers(num_workers)
        for name, value, least in (("prefetch", prefetch, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if reader not in READER_CLASSES:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        self.reader = reader
        self.source = Path(source)
        self.paths, self.labels, self.num_classes = list_source(source)
        self.num_samples = len(self.paths)
        self.prefetch = prefetch
        self.gpu = self.output.device.type == "cuda"
        self.device_id = None
        if self.gpu:
            index = self.output.device.index
            self.device_id = torch.cuda.current_device() if index is None else index
        # channels-last is NHWC in memory: DALI writes HWC, a permute views it as NCHW.
        self.layout = "HWC" if self.output.channels_last else "CHW"
        self._active: object | None = None  # the token of the iteration now running
        self._reader = READER_CLASSES[reader](self)
        len(self)  # a training split too small for one batch fails here, not in the trainer

    @property
    def resumes_exactly(self) -> bool:
        """True for feed-mode validation only: training crops and flips come from DALI's
        generator (which has drawn for fewer batches after a skip); file mode cannot skip."""
        return self.reader == "feed" and not self.train

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch and self.reader == "file":
            raise ValueError(
                f"DaliLoader(reader='file') resumes only at the start of an epoch, not at "
                f"batch {start_batch}: DALI's reader picks the order. To resume mid-epoch, "
                f"read with reader='feed' (the trainer's data.dali_reader feed)")
        super().set_epoch(epoch, start_batch)

    def build(self, graph: Callable[..., Pipeline], batch_size: int, area: tuple[float, float],
              seed: int, *args: object) -> Pipeline:
        """A built ``graph(*args)`` (a :mod:`pipelines.dali_graph` pipeline) with this loader's
        output, device and threads, training crops of area scale ``area``."""
        dtype = types.FLOAT16 if self.output.dtype == torch.float16 else types.FLOAT
        pipe = graph(*args, train=self.train, gpu=self.gpu,
                     decoder="mixed" if self.gpu else "cpu", dtype=dtype, layout=self.layout,
                     area=area, batch_size=batch_size, num_threads=self.num_threads,
                     device_id=self.device_id, seed=seed, prefetch_queue_depth=self.prefetch)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        self._active = token = object()
        with closing(self._reader.epoch(token)) as batches:
            for images, labels in batches:
                if self.layout == "HWC":
                    images = images.permute(0, 3, 1, 2)
                yield self.output.finish(images), self.output.labels(labels)

    def check_active(self, token: object) -> None:
        """Fail an iteration that a newer ``iter()`` over this loader superseded."""
        if self._active is not token:
            raise RuntimeError("this iteration was superseded by a newer iter() over the "
                               "same DaliLoader")

    def bad_file_error(self, error: Exception, suspects: Callable[[], Sequence[str]]
                       ) -> Exception:
        """A :class:`BadImageError` naming the file DALI failed on: the one its message names,
        else the first of ``suspects()`` that fails to decode alone (DALI's decode errors name
        no file), with the reason in words (the dataset check's, then DALI's)."""
        reason = dali_reason(error)
        named = [p for p in self.paths if p in reason]
        bad = max(named, key=len) if named else first_undecodable(suspects(), self.device_id)
        if bad is None:
            return RuntimeError(f"DALI failed on a batch, but none of the files in flight "
                                f"fails to decode alone: {reason or type(error).__name__}")
        reason = reason.replace(bad, "the file").strip(" :")
        words = [w for w in (check_reason(bad), reason and f"DALI: {reason}") if w]
        return BadImageError(bad, "; ".join(words) or "DALI cannot decode it, giving no reason")


__all__ = ["READERS", "DaliAdaptor", "DaliLoader", "list_source", "read_file_list"]
