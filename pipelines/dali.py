"""NVIDIA DALI loaders: :class:`DaliLoader` over an ImageFolder tree (or a DALI file list),
:class:`DaliAdaptor` over a DALI pipeline or iterator you already have.

**Which reader.** Use ``reader="feed"`` (the default: exact, resumable epochs) unless you want
DALI's own ``fn.readers.file`` (``reader="file"``: NVIDIA's ResNet-50 recipe, DALI picks and
reads the files, but its order is not a function of ``(seed, epoch)``, so a resumed run sees
another order).
Both modes share the decode, crop, resize and normalise graph, the output handling, the shard
sizes (so ``len`` is the same) and the bad-file reporting.

**Feed mode: how DaliLoader feeds DALI.** Each batch's file paths, labels and output size come
from Python through ``fn.external_source`` and are read by ``fn.io.file.read`` with plain reads
(mapping each file costs more CPU: about 115 against 75 us per 72 kB JPEG, measured here; DALI's
own reader spends about 85); decoding
(``mixed`` on a GPU, ``cpu`` otherwise), random-resized-crop, resize, flip and normalisation run in
DALI. We chose this over ``fn.readers.file`` (sharded, ``random_shuffle``, ``pad_last_batch``) and
over one built pipeline per (resolution, batch size) because, measured with DALI 2.4:

- ``readers.file`` shards a fixed order: ``random_shuffle`` pre-shuffles the list once with a
  hard-coded seed (so class-sorted lists do give mixed batches) and then only permutes inside a
  1024-sample buffer, whatever the pipeline seed; shards rotate between epochs. Epoch ``e``'s
  order is not a function of ``(seed, e)``, so ``set_epoch`` could not apply it.
- With shards that differ by one sample, ``DROP`` + ``pad_last_batch`` yields a whole batch of
  one repeated image on one rank, ``DROP`` without padding lets epochs drift across the reader's
  epoch boundary, and ``PARTIAL`` + ``pad_last_batch`` yields an empty batch on the smaller
  shard.
- The pipeline prefetches ahead, so a reader-driven pipeline decodes the next epoch's first
  batches before ``set_epoch`` is called: at the old size, or wasted when the epoch's pipeline
  is replaced.

Feeding the order instead makes every epoch exact: the permutation is
``default_rng((seed, epoch))`` (global, so class-sorted folders give mixed batches), each rank
takes ``N // world_size`` samples of it (train: the same number of full batches on every rank,
no sample twice) or its contiguous ``[r*N//W, (r+1)*N//W)`` slice of the ImageFolder order
(validation: exact shards, a partial last batch, no padding). Sizes and batch size are fed per
batch too, so the batch after ``set_epoch(e)`` has epoch ``e``'s size and the last batch before it
the old one; one pipeline serves every resolution and is rebuilt only when the batch size
grows. The feed runs on across epochs: after epoch ``e``'s batches it feeds ``e + 1``'s, at
``e + 1``'s size, so DALI's prefetching crosses the epoch boundary (no empty pipeline when the
next epoch starts). When the next ``iter()`` is not for what was fed (``set_epoch`` jumped, a
loop stopped early), the (at most ``prefetch``) batches in flight are drained and the feed
restarts at the epoch asked for; a validation loader at one size keeps its feed. Crops and
flips come from DALI's per-pipeline generator seeded with ``(seed, rank)``: the same for the
same seed and the same sequence of epochs.

**File mode: how the reader is held to the contract.** ``fn.readers.file(files=, labels=)``
reads the same listing (so labels agree with every backend), with ``shard_id``/``num_shards``,
``random_shuffle`` (train), ``pad_last_batch=True``, ``stick_to_shard`` (validation only) and
an explicit seed, iterated by ``DALIGenericIterator(reader_name="Reader",
last_batch_policy=FILL)``.

- With ``pad_last_batch`` every rank's reader epoch is ``ceil(ceil(N/W) / bs)`` full batches:
  the shard, then copies of its last sample up to the largest shard's size and a whole batch
  (padding always comes last: the shuffle buffer draws an epoch's samples from its shard
  only). We keep the first
  ``N // W`` samples (train) or the whole shard (validation, contiguous ``[r*N//W,
  (r+1)*N//W)`` in folder order), batched exactly as in feed mode, and read and drop the rest
  before delivering the epoch's last batch, so the next epoch starts on the reader's epoch
  boundary. The iterator's own policies cannot do this: ``DROP`` leaves the padded batch to the
  next epoch when the smaller shards are a multiple of the batch size (the epochs drift), and
  ``PARTIAL`` then yields an empty batch.
- Sizes without lag: the ``fn.external_source`` that feeds sizes counts batches; batch ``k`` of
  the reader's stream belongs to epoch ``first + k // batches_per_epoch``, so the batches DALI
  prefetches across the epoch boundary already have the next epoch's size (unlike feed mode,
  prefetching runs on across epochs: no latency at an epoch's start). A new pipeline is
  built (the reader restarts) only when the batch size changes, after a loop that stopped
  mid-epoch or a failure, or when ``set_epoch`` jumps to an epoch whose size the prefetched
  batches do not have (a validation loader iterated again at a fixed size keeps its pipeline).

Weaker than feed mode: the order is DALI's. The listing is pre-shuffled once with a seed fixed
inside DALI and cut into contiguous shards; in training the shards rotate (rank ``r`` starts on
shard ``(r + e0) % W``, ``e0`` being the epoch the pipeline was built for, and moves to the next
shard every epoch) and each is read through a 1024-sample shuffle buffer seeded from
``(seed, rank, e0)``. So the same seed and start epoch repeat the order and the crops, but a
resumed run (a new loader at epoch ``e``) sees another order than the uninterrupted one, and
the samples a rank leaves out of an epoch (its shard beyond ``N // W``) are those its buffer
emits last, not a uniform draw. Every rank needs a sample (``N >= W``, also in validation), and
each batch-size change rebuilds the pipeline.

**Bad files.** DALI's message names the file when reading fails (empty, missing, unreadable)
but not when decoding does (truncated, corrupt, non-image: ``nvImageCodec failure: '#3'``). On a
pipeline error we take the files in flight (feed mode: the batches we fed; file mode: the
failed batch and those prefetched after it, found by replaying the reader's stream without
decoding, ``fn.get_property(key="source_info")``), re-decode them one by one with DALI and raise
an error naming the first that fails: nothing on the hot path, about 2.5 ms per file on the
error path (two seconds for three batches of 256 ImageNet-sized JPEGs), plus, in file mode,
re-reading (not decoding) the epoch's files up to the failure. CMYK, grayscale and
PNG-named-JPEG files decode to the right RGB colours.

**Output.** ``crop_mirror_normalize`` writes float16 or float32 directly (bfloat16: float32 and one
cast in torch); ``CHW`` for NCHW output, ``HWC`` plus a zero-copy permute for channels-last
(measured on CPU at 160 px: DALI spends the same time writing either layout, while making a CHW
batch channels-last in torch is a full extra copy). The PyTorch iterator hands DALI's buffers
over by DLPack (DALI's default executor), without a copy, on CPU and GPU, and they stay valid
while held.
"""
from __future__ import annotations

import math
import os
from collections import deque
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .base import (IMAGENET_MEAN_255, IMAGENET_STD_255, RRC_RATIO, RRC_SCALE, Loader,
                   OutputSpec, Shard, chain_epochs, val_resize)
from .imagefolder import scan_image_folder
from .resolution import ResolutionSchedule

#: nvJPEG buffer padding of NVIDIA's ResNet-50 example (used by the ``mixed`` decoder only).
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
#: ``DaliLoader(reader=...)``: Python feeds each batch's files, or ``fn.readers.file`` picks them.
READERS = ("feed", "file")

Batch = tuple[torch.Tensor, torch.Tensor]


def default_num_threads() -> int:
    """The CPUs this process may use, shared among the ranks of this node."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


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


def _decode_and_crop(encoded, size, shorter=None, *, decoder: str):
    """Decoded images and ``crop_mirror_normalize``'s geometry arguments.

    Training (no ``shorter``): random-resized-crop to ``size`` x ``size`` and a random flip.
    Validation: the shorter side resized to ``shorter``, then a centre crop of ``size``.
    """
    decode = dict(device=decoder, output_type=types.RGB,
                  device_memory_padding=DEVICE_MEMORY_PADDING,
                  host_memory_padding=HOST_MEMORY_PADDING)
    if shorter is None:
        images = fn.decoders.image_random_crop(encoded, random_area=RRC_SCALE,
                                               random_aspect_ratio=RRC_RATIO, **decode)
        return fn.resize(images, resize_x=size, resize_y=size), {"mirror": fn.random.coin_flip()}
    images = fn.decoders.image(encoded, **decode)
    return fn.resize(images, resize_shorter=shorter), {"crop_h": size, "crop_w": size}


@pipeline_def
def image_pipeline(feed, *, train: bool, decoder: str, dtype: types.DALIDataType, layout: str,
                   gpu: bool, reader: dict | None = None):
    """Decode, crop, resize and normalise one batch per run.

    Feed mode (``reader`` None): ``feed()`` returns ``(paths, labels, size)``, plus ``shorter``
    for validation: per sample, the encoded path, its label, the output side and the shorter
    side before the centre crop. File mode: ``fn.readers.file(**reader)`` reads the files and
    labels, and ``feed()`` returns only the sizes, ``(size,)`` or ``(size, shorter)``.
    """
    num_sizes = 1 if train else 2
    if reader is None:
        paths, labels, *sizes = fn.external_source(source=feed, num_outputs=2 + num_sizes,
                                                   batch=True)
        encoded = fn.io.file.read(paths, dont_use_mmap=True)
    else:
        encoded, labels = fn.readers.file(**reader)
        sizes = fn.external_source(source=feed, num_outputs=num_sizes, batch=True)
    images, geometry = _decode_and_crop(encoded, *sizes, decoder=decoder)
    images = fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout,
                                      mean=list(IMAGENET_MEAN_255), std=list(IMAGENET_STD_255),
                                      **geometry)
    return images, labels.gpu() if gpu else labels


@pipeline_def(batch_size=1, num_threads=1, prefetch_queue_depth=1)
def decode_check_pipeline(feed, *, decoder: str):
    """Read and decode one file per run: finds the file a failed batch choked on."""
    return fn.decoders.image(fn.io.file.read(fn.external_source(source=feed, batch=True)),
                             device=decoder, output_type=types.RGB)


@pipeline_def(num_threads=1, prefetch_queue_depth=1, device_id=None)
def source_info_pipeline(reader: dict):
    """The file names ``fn.readers.file(**reader)`` yields, read but not decoded: a replay of a
    file-mode stream that tells which files a failed batch held."""
    encoded, _ = fn.readers.file(**reader)
    return fn.get_property(encoded, key="source_info")


def _encode(path: str) -> np.ndarray:
    """A path as the 1-D byte array ``fn.io.file.read`` takes."""
    return np.frombuffer(os.fsencode(path), dtype=np.uint8)


def _seed(*parts: int) -> int:
    """A DALI seed (a non-negative int64) drawn from ``parts``."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] >> 1)


class _Feed:
    """Feed mode's ``external_source`` callback: serves one epoch's batches, remembers those in
    flight.

    Paths are encoded once into an object array, so a batch is gathered by one fancy index
    (about 50 us for 256 paths, where encoding them per batch takes about 2 ms).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], train: bool) -> None:
        self.paths = np.empty(len(paths), dtype=object)
        self.paths[:] = [_encode(p) for p in paths]
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


class _ScheduleFeed:
    """File mode's ``external_source`` callback: the sizes of each batch the reader will read.

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
    """One built file-mode pipeline: its reader's arguments, size feed, iterator and position."""

    def __init__(self, pipe: Pipeline, feed: _ScheduleFeed, reader: dict) -> None:
        self.pipe, self.feed, self.reader = pipe, feed, reader
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


def _dali_reason(error: Exception) -> str:
    """The operator's own message out of DALI's multi-line pipeline error."""
    text = str(error).split("encountered:")[-1]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.startswith(("Current pipeline", "C++ context"))]
    return " ".join(lines) or type(error).__name__


class DaliLoader(Loader):
    """ImageNet-style DALI loader over an ImageFolder directory or a DALI file list.

    ``reader``: ``"feed"`` (default; Python feeds each batch's files: the epoch order is a
    function of ``(seed, epoch)``, exact shards, resumable) or ``"file"`` (DALI's
    ``fn.readers.file`` with ``pad_last_batch``, as in NVIDIA's ResNet-50 example: the same
    batch counts, shards and sizes, but DALI's order: pre-shuffled once with a seed fixed in
    DALI, rotating training shards, a 1024-sample shuffle buffer, so a resumed run does not see
    the same order; needs ``N >= world_size``). Choose ``"feed"`` unless you need DALI's reader.
    ``prefetch`` is DALI's ``prefetch_queue_depth``. See the module docstring for the design.
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
                         output=output, shard=shard, seed=seed)
        for name, value, least in (("num_workers", num_workers, 1), ("prefetch", prefetch, 1),
                                   ("seed", seed, 0)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        self.reader = reader
        self.paths, self.labels, self.num_classes = list_source(source)
        self.num_samples = len(self.paths)
        if reader == "file" and self.num_samples < self.shard.world_size:
            raise ValueError(f"reader='file' needs a sample for every rank: {self.num_samples} "
                             f"samples for {self.shard.world_size} ranks (use reader='feed')")
        self.drop_last = train if drop_last is None else drop_last
        self.num_threads = num_workers or default_num_threads()
        self.prefetch = prefetch
        self.gpu = self.output.device.type == "cuda"
        self.device_id = None
        if self.gpu:
            index = self.output.device.index
            self.device_id = torch.cuda.current_device() if index is None else index
        # channels-last is NHWC in memory: DALI writes HWC, a permute views it as NCHW.
        self.layout = "HWC" if self.output.channels_last else "CHW"
        len(self)  # a training split too small for one batch fails here, not in the trainer
        self._active: object | None = None  # the token of the iteration now running
        if reader == "feed":
            self._feed = _Feed(self.paths, self.labels, train)
            self._pipe = self._fed_pipeline()
            self._iterator: DALIGenericIterator | None = None
            self._owed = 0  # batches of the running epoch not yet delivered
            self._next_epoch: tuple | None = None  # _epoch_key of what the feed serves next
        else:
            self._stream: _ReaderStream | None = None  # built by the first iteration

    def _build(self, feed: Callable[[], tuple], batch_size: int, seed: int,
               reader: dict | None = None) -> Pipeline:
        dtype = types.FLOAT16 if self.output.dtype == torch.float16 else types.FLOAT
        pipe = image_pipeline(feed, reader=reader, train=self.train,
                              decoder="mixed" if self.gpu else "cpu", dtype=dtype,
                              layout=self.layout, gpu=self.gpu, batch_size=batch_size,
                              num_threads=self.num_threads, device_id=self.device_id, seed=seed,
                              prefetch_queue_depth=self.prefetch)
        pipe.build()
        return pipe

    def _bounds(self) -> tuple[int, int]:
        """This rank's slice of the epoch order (file mode: its count is what we keep)."""
        n, rank, world = self.num_samples, self.shard.rank, self.shard.world_size
        if self.train:
            return rank * (n // world), (rank + 1) * (n // world)
        return rank * n // world, (rank + 1) * n // world

    def __len__(self) -> int:
        return self._num_batches(self.epoch)

    def _num_batches(self, epoch: int) -> int:
        start, stop = self._bounds()
        n, bs = stop - start, self.batch_size_at(epoch)
        batches = n // bs if self.drop_last else -(-n // bs)
        if self.train and batches == 0:
            raise ValueError(f"{n} samples per rank ({self.num_samples} over "
                             f"{self.shard.world_size} ranks) make no batch of {bs} "
                             f"(drop_last={self.drop_last})")
        return batches

    def __iter__(self) -> Iterator[Batch]:
        self._active = token = object()
        epoch = self._fed_epoch if self.reader == "feed" else self._read_epoch
        with closing(epoch(token)) as batches:
            for images, labels in batches:
                if self.layout == "HWC":
                    images = images.permute(0, 3, 1, 2)
                yield self.output.finish(images), self.output.labels(labels)

    def _check_active(self, token: object) -> None:
        if self._active is not token:
            raise RuntimeError("this iteration was superseded by a newer iter() over the "
                               "same DaliLoader")

    def _bad_file_error(self, error: Exception, suspects: Callable[[], Sequence[str]]
                        ) -> RuntimeError:
        """An error naming the file DALI failed on: the one its message names, else the first
        of ``suspects()`` that fails to decode alone."""
        reason = _dali_reason(error)
        named = [p for p in self.paths if p in reason]
        bad = max(named, key=len) if named else _first_undecodable(suspects(), self.device_id)
        if bad is None:
            return RuntimeError(f"DALI failed on a batch, but none of the files in flight "
                                f"fails to decode alone: {reason}")
        return RuntimeError(f"DALI cannot load image file {bad}: {reason}")

    # --- feed mode ---------------------------------------------------------------------------

    def _batches(self, epoch: int) -> list[tuple[np.ndarray, int]] | None:
        """This rank's batches in ``epoch``: dataset indices and output size; None when they
        do not fit the built pipeline (the feed ends there)."""
        bs = self.batch_size_at(epoch)
        if bs > self._pipe.max_batch_size:
            return None
        start, stop = self._bounds()
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                 if self.train else np.arange(self.num_samples))[start:stop]
        res = self.schedule.resolution(epoch)
        return [(order[i * bs:(i + 1) * bs], res) for i in range(self._num_batches(epoch))]

    def _fed_pipeline(self) -> Pipeline:
        return self._build(self._feed, self.batch_size, _seed(self.seed, self.shard.rank))

    def _fed_epoch(self, token: object) -> Iterator[Batch]:
        iterator = self._fed_stream()
        for _ in range(self._owed):
            self._check_active(token)
            batch = self._next(iterator)
            self._owed -= 1
            yield batch

    def _fed_stream(self) -> DALIGenericIterator:
        """The running pipeline if its feed goes on with ``self.epoch``, else one restarted on
        it (the batches in flight drained, the pipeline rebuilt if the batch size grew)."""
        rebuild = self._pipe is None or self.batch_size > self._pipe.max_batch_size
        if rebuild or self._owed or self._next_epoch != self._epoch_key(self.epoch):
            self._drain()
            if rebuild:
                self._iterator = self._pipe = None
                self._pipe = self._fed_pipeline()
            self._feed.start(chain_epochs(self._batches, self.epoch))
            if self._iterator is None:
                self._iterator = DALIGenericIterator(self._pipe, ["images", "labels"],
                                                     prepare_first_batch=False)
            else:
                self._iterator.reset()
        self._owed, self._next_epoch = len(self), self._epoch_key(self.epoch + 1)
        return self._iterator

    def _next(self, iterator: DALIGenericIterator) -> Batch:
        try:
            batch = next(iterator)[0]
        except RuntimeError as e:
            # A failed DALI pipeline cannot run again: rebuild it on the next iter().
            in_flight = [self.paths[i] for b in self._feed.in_flight for i in b]
            self._feed.stop()
            self._feed.in_flight.clear()
            self._iterator = self._pipe = None
            raise self._bad_file_error(e, lambda: in_flight) from e
        self._feed.in_flight.popleft()
        return batch["images"], batch["labels"]

    def _drain(self) -> None:
        """Consume the batches still in flight, so that the feed can restart clean."""
        self._feed.stop()
        while self._feed.in_flight:
            self._next(self._iterator)

    # --- file mode ---------------------------------------------------------------------------

    def _read_epoch(self, token: object) -> Iterator[Batch]:
        """This rank's batches of the next reader epoch: the first ``stop - start`` samples of
        its (padded) shard, batched as in feed mode. The rest of the reader epoch is read and
        dropped before the last batch is delivered, so the next epoch starts on its boundary."""
        stream = self._reader_stream()
        start, stop = self._bounds()
        keep, wanted, bs = stop - start, len(self), self.batch_size
        last = None
        for k in range(stream.feed.per_epoch):
            self._check_active(token)
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

    def _reader_stream(self) -> _ReaderStream:
        """The running pipeline if it can serve ``self.epoch`` next, else a new one for it."""
        stream = self._stream
        if (stream is None or stream.batch_size != self.batch_size
                or stream.received % stream.feed.per_epoch
                or not stream.feed.retarget(stream.received, self.epoch)):
            self._stream = stream = None  # free the old pipeline before building anew
            self._stream = stream = self._open_reader(self.epoch)
        elif stream.received:
            stream.iterator.reset()
        return stream

    def _open_reader(self, epoch: int) -> _ReaderStream:
        """A pipeline whose reader starts at ``epoch``: on training shard ``(rank + epoch) % W``,
        with the shuffle buffer, crops and flips seeded from ``(seed, rank, epoch)``."""
        rank, world, bs = self.shard.rank, self.shard.world_size, self.batch_size
        seed = _seed(self.seed, rank, epoch)
        reader = dict(files=self.paths, labels=self.labels, num_shards=world,
                      shard_id=(rank + epoch) % world if self.train else rank,
                      random_shuffle=self.train, stick_to_shard=not self.train,
                      pad_last_batch=True, seed=seed, name="Reader")
        per_epoch = math.ceil(math.ceil(self.num_samples / world) / bs)
        feed = _ScheduleFeed(self.schedule, self.train, bs, per_epoch, epoch)
        return _ReaderStream(self._build(feed, bs, seed, reader), feed, reader)

    def _take(self, stream: _ReaderStream) -> dict[str, torch.Tensor]:
        try:
            return stream.next()
        except RuntimeError as e:
            self._stream = None  # a failed DALI pipeline cannot run again
            failed = stream.received  # DALI reports an error with the batch that hit it
            raise self._bad_file_error(
                e, lambda: stream.replay_files(failed, 1 + self.prefetch)) from e


def _first_undecodable(paths: Sequence[str], device_id: int | None) -> str | None:
    """The first of ``paths`` DALI cannot read and decode on its own, else None."""
    todo = iter(paths)
    pipe = decode_check_pipeline(lambda: [_encode(next(todo))],
                                 decoder="cpu" if device_id is None else "mixed",
                                 device_id=device_id)
    pipe.build()
    for path in paths:
        try:
            pipe.run()
        except RuntimeError:
            return path
    return None


class _LayoutRecordingIterator(DALIGenericIterator):
    """A DALIGenericIterator that keeps DALI's layout string of each output (torch loses it)."""

    layouts: list[str]

    def _get_outputs(self):
        outputs = super()._get_outputs()
        self.layouts = [out.layout() for out in outputs[0]]
        return outputs


class DaliAdaptor:
    """Plug an existing DALI pipeline or PyTorch iterator into the salmix loader interface.

    ``images`` and ``labels`` name the outputs to use: keys of the iterator's ``output_map``, or
    of ``output_map`` naming a pipeline's outputs in order (default ``[images, labels]``).
    uint8 images are normalised here; float images must be normalised already
    (``crop_mirror_normalize`` with mean and std in 0-255 units); ``normalized`` states which
    you expect and is checked. Images leave as ``output`` asks (device, dtype, channels-last),
    labels as int64 ``(N,)``.

    For a pipeline, the adaptor builds the iterator (``reader_name`` defaults to its only
    reader; ``last_batch_policy`` to DROP for training and PARTIAL for validation), reads the
    layout from DALI's metadata and ``num_samples`` from the reader. For an iterator, the
    layout is inferred from where the 3 colour channels are and ``num_samples`` is None.
    ``set_epoch`` only records the epoch: the pipeline's own arguments fix its sizes, batch
    size, shuffling and sharding. DALI iterators cannot restart mid-epoch: a loop that stops
    early continues where it stopped. ``resolution`` is the width of the last batch delivered.
    """

    def __init__(
        self,
        source: Pipeline | DALIGenericIterator,
        *,
        images: str = "data",
        labels: str = "label",
        normalized: bool | None = None,
        output: OutputSpec | None = None,
        train: bool = True,
        output_map: Sequence[str] | None = None,
        reader_name: str | None = None,
        size: int = -1,
        last_batch_policy: LastBatchPolicy | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.output = output or OutputSpec()
        self.train = train
        self.normalized = normalized
        self.num_classes = num_classes
        self.num_samples: int | None = None
        self.epoch = 0
        if isinstance(source, Pipeline):
            self.iterator = self._wrap(source, output_map or [images, labels], reader_name, size,
                                       last_batch_policy)
        elif isinstance(source, DALIGenericIterator):
            if output_map is not None or reader_name is not None or size != -1:
                raise ValueError("output_map, reader_name and size apply to a pipeline; "
                                 "this iterator already has its own")
            self.iterator = source
        else:
            raise TypeError(f"DaliAdaptor wraps a DALI Pipeline or DALIGenericIterator, "
                            f"got {type(source).__name__}")
        names = list(self.iterator.output_map)
        for role, name in (("images", images), ("labels", labels)):
            if name not in names:
                raise KeyError(f"{role}={name!r} is not an output of this DALI source; "
                               f"its outputs are {names}")
        self.image_key, self.label_key = images, labels
        self.batch_size = self.iterator.batch_size
        self.resolution: int | None = None

    def _wrap(self, pipe: Pipeline, output_map: Sequence[str], reader_name: str | None,
              size: int, policy: LastBatchPolicy | None) -> DALIGenericIterator:
        if len(output_map) != pipe.num_outputs:
            raise ValueError(f"the pipeline has {pipe.num_outputs} outputs; pass output_map "
                             f"with one name for each (got {list(output_map)})")
        readers = pipe.reader_meta()
        if reader_name is None and size == -1 and len(readers) == 1:
            reader_name = next(iter(readers))
        if reader_name is not None:
            if reader_name not in readers:
                raise KeyError(f"reader_name={reader_name!r} is not a reader of this pipeline; "
                               f"its readers are {sorted(readers)}")
            self.num_samples = readers[reader_name]["epoch_size"]
        policy = policy or (LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)
        return _LayoutRecordingIterator(pipe, list(output_map), reader_name=reader_name,
                                        size=size, last_batch_policy=policy)

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch. The wrapped pipeline's sizes and shuffling are its own."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        if self.iterator.size < 0:
            raise TypeError("this DALI source has no known length: give the pipeline a named "
                            "reader (reader_name=) or the shard's sample count (size=)")
        return len(self.iterator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, outputs in enumerate(self.iterator):
            if len(outputs) != 1:
                raise ValueError(f"the DALI iterator runs {len(outputs)} pipelines; the adaptor "
                                 f"takes one pipeline per process (one per rank)")
            batch = outputs[0]
            images = self._nchw(batch[self.image_key])
            self.resolution = images.shape[-1]
            yield (self._normalize(images, check=step == 0),
                   self._labels(batch[self.label_key], images.shape[0]))

    def _nchw(self, images: torch.Tensor) -> torch.Tensor:
        """The image output as an N x 3 x H x W view (DALI's layout, else the channel position)."""
        layouts = getattr(self.iterator, "layouts", [])
        layout = layouts[self.iterator.output_map.index(self.image_key)] if layouts else ""
        shape = tuple(images.shape)
        if images.dim() != 4 or layout not in ("", "HWC", "CHW"):
            raise ValueError(f"output {self.image_key!r} is not a batch of images: shape {shape}, "
                             f"layout {layout!r} (expected N x H x W x 3 or N x 3 x H x W)")
        if not layout:
            channels = [dim for dim in (1, 3) if shape[dim] == 3]
            if len(channels) != 1:
                raise ValueError(f"cannot tell the layout of output {self.image_key!r} of shape "
                                 f"{shape}: pass the pipeline rather than its iterator")
            layout = "CHW" if channels == [1] else "HWC"
        images = images.permute(0, 3, 1, 2) if layout == "HWC" else images
        if images.shape[1] != 3:
            raise ValueError(f"output {self.image_key!r} has {images.shape[1]} channels in layout "
                             f"{layout} (shape {shape}); expected 3 (RGB)")
        return images

    def _normalize(self, images: torch.Tensor, check: bool) -> torch.Tensor:
        """uint8 -> normalised; float -> as requested (``check``: is it really normalised?)."""
        if images.dtype == torch.uint8:
            if self.normalized:
                raise ValueError(f"output {self.image_key!r} is uint8, so it is not normalised "
                                 f"(normalized=True was given)")
            return self.output.normalize_uint8(images, layout="NCHW")
        if not images.is_floating_point() or self.normalized is False:
            raise ValueError(f"output {self.image_key!r} is {images.dtype}: expected uint8 pixels "
                             f"or a float batch normalised by the pipeline "
                             f"(normalized={self.normalized})")
        # Normalised pixels lie within about +-3; 0-255 floats mean the pipeline forgot mean/std.
        peak = images.abs().amax().item() if check else 0.0
        if peak > 10:
            raise ValueError(f"output {self.image_key!r} is {images.dtype} with values up to "
                             f"{peak:.0f}: not normalised. Normalise in the pipeline "
                             f"(crop_mirror_normalize, mean/std in 0-255 units) or output uint8")
        return self.output.finish(images)

    def _labels(self, labels: torch.Tensor, n: int) -> torch.Tensor:
        if labels.numel() != n or labels.is_floating_point():
            raise ValueError(f"output {self.label_key!r} is not one class label per image: "
                             f"{labels.dtype} of shape {tuple(labels.shape)} for {n} images")
        return self.output.labels(labels)


__all__ = ["READERS", "DaliAdaptor", "DaliLoader", "default_num_threads", "image_pipeline",
           "list_source", "read_file_list"]
