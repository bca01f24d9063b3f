"""NVIDIA DALI loaders: :class:`DaliLoader` over an ImageFolder tree (or a DALI file list),
:class:`DaliAdaptor` over a DALI pipeline or iterator you already have.

**How DaliLoader feeds DALI.** Each batch's file paths, labels and output size come from
Python through ``fn.external_source`` and are read by ``fn.io.file.read``; decoding (``mixed``
on a GPU, ``cpu`` otherwise), random-resized-crop, resize, flip and normalisation run in DALI.
We chose this over ``fn.readers.file`` (sharded, ``random_shuffle``, ``pad_last_batch``) and over
one built pipeline per (resolution, batch size) because, measured with DALI 2.4:

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
grows. DALI starts prefetching an epoch when its first batch is asked for (one batch of latency
per epoch, no decoding wasted); a loop that stops early drains the (at most ``prefetch``)
batches in flight. Crops and flips come from DALI's per-pipeline generator seeded with
``(seed, rank)``: the same for the same seed and the same sequence of epochs.

**Bad files.** DALI's message names the file when reading fails (empty, missing, unreadable)
but not when decoding does (truncated, corrupt, non-image: ``nvImageCodec failure: '#3'``). On a
pipeline error we re-decode the files in flight one by one with DALI and raise an error naming
the first that fails: nothing on the hot path, about 2.5 ms per file on the error path (two
seconds for three batches of 256 ImageNet-sized JPEGs). CMYK, grayscale and PNG-named-JPEG
files decode to the right RGB colours.

**Output.** ``crop_mirror_normalize`` writes float16 or float32 directly (bfloat16: float32 and one
cast in torch); ``CHW`` for NCHW output, ``HWC`` plus a zero-copy permute for channels-last
(measured on CPU at 160 px: DALI spends the same time writing either layout, while making a CHW
batch channels-last in torch is a full extra copy). The PyTorch iterator hands DALI's buffers
over by DLPack (DALI's default executor), without a copy, on CPU and GPU, and they stay valid
while held.
"""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .base import (IMAGENET_MEAN_255, IMAGENET_STD_255, RRC_RATIO, RRC_SCALE, Loader,
                   OutputSpec, Shard, val_resize)
from .imagefolder import scan_image_folder
from .resolution import ResolutionSchedule

#: nvJPEG buffer padding of NVIDIA's ResNet-50 example (used by the ``mixed`` decoder only).
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


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


@pipeline_def
def image_pipeline(feed, *, train: bool, decoder: str, dtype: types.DALIDataType, layout: str,
                   gpu: bool):
    """Decode, crop, resize and normalise the batches ``feed`` names.

    ``feed()`` returns ``(paths, labels, size)``, plus ``shorter`` for validation: per sample,
    the encoded path, its label, the output side and the shorter side before the centre crop.
    """
    decode = dict(device=decoder, output_type=types.RGB,
                  device_memory_padding=DEVICE_MEMORY_PADDING,
                  host_memory_padding=HOST_MEMORY_PADDING)
    if train:
        paths, labels, size = fn.external_source(source=feed, num_outputs=3, batch=True)
        images = fn.decoders.image_random_crop(fn.io.file.read(paths), random_area=RRC_SCALE,
                                               random_aspect_ratio=RRC_RATIO, **decode)
        images = fn.resize(images, resize_x=size, resize_y=size)
        geometry = {"mirror": fn.random.coin_flip()}
    else:
        paths, labels, size, shorter = fn.external_source(source=feed, num_outputs=4, batch=True)
        images = fn.decoders.image(fn.io.file.read(paths), **decode)
        images = fn.resize(images, resize_shorter=shorter)
        geometry = {"crop_h": size, "crop_w": size}
    images = fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout,
                                      mean=list(IMAGENET_MEAN_255), std=list(IMAGENET_STD_255),
                                      **geometry)
    return images, labels.gpu() if gpu else labels


@pipeline_def(batch_size=1, num_threads=1, prefetch_queue_depth=1)
def decode_check_pipeline(feed, *, decoder: str):
    """Read and decode one file per run: finds the file a failed batch choked on."""
    return fn.decoders.image(fn.io.file.read(fn.external_source(source=feed, batch=True)),
                             device=decoder, output_type=types.RGB)


def _encode(path: str) -> np.ndarray:
    """A path as the 1-D byte array ``fn.io.file.read`` takes."""
    return np.frombuffer(os.fsencode(path), dtype=np.uint8)


class _Feed:
    """The ``external_source`` callback: serves one epoch's batches, remembers those in flight.

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

    def start(self, batches: list[np.ndarray], resolution: int) -> None:
        self._batches = iter(batches)
        self._size = np.float32(resolution)
        self._shorter = np.float32(val_resize(resolution))
        self.in_flight.clear()

    def stop(self) -> None:
        """End the epoch here: DALI gets StopIteration on its next request."""
        self._batches = iter(())

    def __call__(self) -> tuple:
        batch = next(self._batches)
        self.in_flight.append(batch)
        n = len(batch)
        out = (list(self.paths[batch]), self.labels[batch], np.full(n, self._size))
        return out if self.train else out + (np.full(n, self._shorter),)


def _dali_reason(error: Exception) -> str:
    """The operator's own message out of DALI's multi-line pipeline error."""
    text = str(error).split("encountered:")[-1]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.startswith(("Current pipeline", "C++ context"))]
    return " ".join(lines) or type(error).__name__


class DaliLoader(Loader):
    """ImageNet-style DALI loader over an ImageFolder directory or a DALI file list.

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
    ) -> None:
        super().__init__(train=train, batch_size=batch_size, resolution=resolution,
                         output=output, shard=shard, seed=seed)
        for name, value, least in (("num_workers", num_workers, 1), ("prefetch", prefetch, 1),
                                   ("seed", seed, 0)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self.paths, labels, self.num_classes = list_source(source)
        self.num_samples = len(self.paths)
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
        self._feed = _Feed(self.paths, labels, train)
        self._pipe = self._build(self.batch_size)
        self._iterator: DALIGenericIterator | None = None
        self._active: object | None = None  # the generator currently iterating

    def _build(self, batch_size: int) -> Pipeline:
        dtype = types.FLOAT16 if self.output.dtype == torch.float16 else types.FLOAT
        seed = int(np.random.SeedSequence([self.seed, self.shard.rank]).generate_state(1)[0] >> 1)
        pipe = image_pipeline(self._feed, train=self.train, decoder="mixed" if self.gpu else "cpu",
                              dtype=dtype, layout=self.layout, gpu=self.gpu,
                              batch_size=batch_size, num_threads=self.num_threads,
                              device_id=self.device_id, seed=seed,
                              prefetch_queue_depth=self.prefetch)
        pipe.build()
        return pipe

    def _bounds(self) -> tuple[int, int]:
        """This rank's slice of the epoch order."""
        n, rank, world = self.num_samples, self.shard.rank, self.shard.world_size
        if self.train:
            return rank * (n // world), (rank + 1) * (n // world)
        return rank * n // world, (rank + 1) * n // world

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """Dataset indices of this rank's batches in ``epoch``."""
        start, stop = self._bounds()
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                 if self.train else np.arange(self.num_samples))[start:stop]
        bs = self.batch_size
        return [order[i * bs:(i + 1) * bs] for i in range(len(self))]

    def __len__(self) -> int:
        start, stop = self._bounds()
        n, bs = stop - start, self.batch_size
        batches = n // bs if self.drop_last else -(-n // bs)
        if self.train and batches == 0:
            raise ValueError(f"{n} samples per rank ({self.num_samples} over "
                             f"{self.shard.world_size} ranks) make no batch of {bs} "
                             f"(drop_last={self.drop_last})")
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches(self.epoch)
        iterator = self._start(batches)
        self._active = token = object()
        try:
            for _ in batches:
                if self._active is not token:
                    raise RuntimeError("this iteration was superseded by a newer iter() over the "
                                       "same DaliLoader")
                images, labels = self._next(iterator)
                if self.layout == "HWC":
                    images = images.permute(0, 3, 1, 2)
                yield self.output.finish(images), self.output.labels(labels)
        finally:
            if self._active is token:  # an older, abandoned iteration must not stop this one
                self._drain()

    def _start(self, batches: list[np.ndarray]) -> DALIGenericIterator:
        """Point the feed at this epoch and (re)start the pipeline on it."""
        self._drain()
        if self._pipe is None or self.batch_size > self._pipe.max_batch_size:
            self._iterator = self._pipe = None
            self._pipe = self._build(self.batch_size)
        self._feed.start(batches, self.resolution)
        if self._iterator is None:
            self._iterator = DALIGenericIterator(self._pipe, ["images", "labels"],
                                                 prepare_first_batch=False)
        else:
            self._iterator.reset()
        return self._iterator

    def _next(self, iterator: DALIGenericIterator) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(iterator)[0]
        except RuntimeError as e:
            # A failed DALI pipeline cannot run again: rebuild it on the next iter().
            suspects = np.concatenate(list(self._feed.in_flight) or [np.zeros(0, int)])
            self._feed.stop()
            self._feed.in_flight.clear()
            self._iterator = self._pipe = None
            raise self._locate_bad_file(e, suspects) from e
        self._feed.in_flight.popleft()
        return batch["images"], batch["labels"]

    def _drain(self) -> None:
        """Consume the batches still in flight, so that the next epoch starts clean."""
        self._feed.stop()
        while self._feed.in_flight:
            self._next(self._iterator)

    def _locate_bad_file(self, error: Exception, suspects: np.ndarray) -> RuntimeError:
        """An error naming the file among ``suspects`` (dataset indices) that DALI fails on."""
        reason = _dali_reason(error)
        paths = [self.paths[i] for i in suspects]
        named = [p for p in paths if p in reason]
        bad = named[0] if named else _first_undecodable(paths, self.device_id)
        if bad is None:
            return RuntimeError(f"DALI failed on a batch, but none of its {len(paths)} files "
                                f"fails to decode alone: {reason}")
        return RuntimeError(f"DALI cannot load image file {bad}: {reason}")


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


__all__ = ["DaliAdaptor", "DaliLoader", "default_num_threads", "image_pipeline", "list_source",
           "read_file_list"]
