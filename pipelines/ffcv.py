"""FFCV backend: load a ``.beton`` with FFCV's JIT pipeline (and write one: :mod:`.ffcv_beton`).

Writing and reading ``.beton`` files: :mod:`pipelines.ffcv_beton` (its names are exported here
too).

Loading (:class:`FfcvLoader`) is FFCV's ImageNet pipeline. Train: random-resized-crop and flip,
then ``NormalizeImage`` and ``ToTorchImage``; validation: ``CenterCropRGBImageDecoder`` with
``VAL_CROP_RATIO`` (its crop at least 1 px: FFCV's crop of a 1 px short side is empty, and
OpenCV aborts the process on it). ``set_epoch(e, start_batch=k)`` hands FFCV only the batches
from ``k`` on, so the skipped ones are never read; crops are keyed by batch content, so the
resumed batches are bitwise those of an uninterrupted epoch. With CUDA the uint8 batch goes to
the GPU (``ToDevice``) and is normalised there, by ``NormalizeImage`` (whose GPU kernel needs
cupy) or, without cupy, by torch. On a CPU-only machine ``NormalizeImage`` runs in FFCV's JIT
stage and no CUDA call is made (FFCV's own ``pin_memory`` attempts fail quietly). bfloat16 is one cast of the float32 output (``Convert``).
Progressive resizing sets the decoder's ``output_size`` at the epoch boundary (FFCV's method);
a new FFCV ``Loader`` is built only when the batch size or the crop scale changes (the scale is
compiled into the decoder). Note that FFCV sets torch's intra-op thread count to
``num_workers``.

Two things FFCV does not give and this module adds:

- **Reproducible augmentation.** FFCV draws crops and flips from numba's per-thread generators,
  so they change from run to run whatever the seed. :class:`SeededRandomResizedCropFlip` seeds
  every sample from the loader seed and its batch (whose content follows from seed and epoch).
- **Sharding for an explicit rank, by the shared rule.** FFCV's ``distributed=True`` builds a
  padded ``DistributedSampler`` from the process group (some images twice per epoch). Instead
  the shards are :meth:`pipelines.base.Shard.split`'s (the orders of
  :mod:`pipelines.ffcv_order`): in training each rank takes its slice of the epoch's global
  order (``order="random"``: the permutation; ``"quasi_random"``: pages in a random order,
  shuffled a window of pages at a time), in validation its contiguous block in order; FFCV's
  ``drop_last`` counts batches the same way.

Batches live in FFCV's buffers, which are reused: a batch stays valid while the next
``batches_ahead + 1`` are drawn (clone it to keep it longer). numba may print an ignored
``KeyError`` from a finaliser when a dropped FFCV pipeline is garbage-collected during another
compilation; it is harmless, and the loader collects before it compiles to avoid it.
"""
from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path
from typing import Callable, Iterator, Literal

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (IMAGE_MODES, CenterCropRGBImageDecoder,
                                   RandomResizedCropRGBImageDecoder, get_random_crop)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader as _FfcvLoader
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.transforms import Convert, NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

from .base import (IMAGENET_MEAN_255, IMAGENET_STD_255, RRC_RATIO, RRC_SCALE, VAL_CROP_RATIO,
                   Loader, OutputSpec, Shard, resolve_workers)
from .ffcv_beton import (WRITE_MODES, UndecodableImageError, beton_labels, ensure_beton,
                         fit_resolution, load_rgb_array, read_beton, write_beton)
from .ffcv_order import ShardedOrder, ShardedQuasiRandom, ShardedRandom
from .resolution import ResolutionSchedule

# --- reproducible augmentation ----------------------------------------------------------------

_M1, _M2, _LOW32 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0xFFFFFFFF)


@numba.njit(nogil=True)
def _mix(x: np.uint64) -> np.uint64:
    """SplitMix64's finaliser: a well-spread 64-bit hash."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@numba.njit(nogil=True)
def _batch_key(seed: np.uint64, batch_indices: np.ndarray) -> np.uint64:
    """Hash of the seed and the batch's sample indices in order (different every epoch)."""
    key = _mix(seed)
    for ix in batch_indices:
        key = _mix(key ^ np.uint64(ix))
    return key


@numba.njit(nogil=True)
def _flip_width_(image: np.ndarray) -> None:
    """Mirror an ``H x W x C`` image in place."""
    width = image.shape[1]
    for j in range(width // 2):
        for i in range(image.shape[0]):
            for c in range(image.shape[2]):
                image[i, j, c], image[i, width - 1 - j, c] = image[i, width - 1 - j, c], image[i, j, c]


class SeededRandomResizedCropFlip(RandomResizedCropRGBImageDecoder):
    """FFCV's ``RandomResizedCropRGBImageDecoder`` followed by a horizontal flip (p = 1/2),
    with the randomness of each sample seeded from ``seed`` and its batch.

    The batch's content and order follow from the loader seed and the epoch, so the same seed
    gives the same crops and flips at any thread count, and another epoch gives others.
    """

    def __init__(self, output_size: tuple[int, int], seed: int,
                 scale: tuple[float, float] = RRC_SCALE, ratio: tuple[float, float] = RRC_RATIO) -> None:
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = seed

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        seed = np.uint64(self.seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            key = _batch_key(seed, batch_indices)
            for dst_ix in my_range(len(batch_indices)):
                sample_key = _mix(key + np.uint64(dst_ix))
                np.random.seed(np.uint32(sample_key & _LOW32))  # for FFCV's get_random_crop
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                out = destination[dst_ix]
                resize_crop_c(image, i, i + h, j, j + w, out)
                if sample_key >> np.uint64(63):  # the top bit: independent of the seed bits
                    _flip_width_(out)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def _center_crop(height, width, _, ratio):
    """FFCV's ``get_center_crop``, but at least 1 px: FFCV's crop of a 1 px short side is
    empty, and OpenCV's resize then aborts the whole process."""
    side = max(1, int(ratio * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


class CenterCropDecoder(CenterCropRGBImageDecoder):
    """FFCV's ``CenterCropRGBImageDecoder`` with a crop of at least 1 px a side."""

    @property
    def get_crop_generator(self) -> Callable:
        return _center_crop


# --- the loader -------------------------------------------------------------------------------

class FfcvLoader(Loader):
    """Batches of a ``.beton`` written by :func:`write_beton`, per :class:`pipelines.base.Loader`.

    ``num_classes`` is 1 + the largest label (the shared listing has no empty class).
    ``order`` (training; validation reads its block in order): ``"random"`` (the permutation)
    or ``"quasi_random"`` (for less RAM than the dataset: pages in a random order, a window of 6
    pages shuffled together, :class:`pipelines.ffcv_order.ShardedQuasiRandom`); both: exact
    epochs, same order for same ``(seed, epoch)``, bitwise resume; quasi_random's batches are
    less independent. ``os_cache``: read through the OS page cache, shared by all processes on
    the machine (default for random), or not (default for quasi_random: this process loads the
    pages it needs). ``batches_ahead``: batches FFCV prepares in advance (and buffers it keeps).
    """

    ORDERS = ("random", "quasi_random")

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
        order: Literal["random", "quasi_random"] = "random",
        os_cache: bool | None = None,
        batches_ahead: int = 3,
    ) -> None:
        super().__init__(train=train, batch_size=batch_size, resolution=resolution,
                         output=output, shard=shard, seed=seed, drop_last=drop_last)
        if order not in self.ORDERS:
            raise ValueError(f"order must be one of {self.ORDERS}, got {order!r}")
        if not isinstance(batches_ahead, int) or batches_ahead < 1:
            raise ValueError(f"batches_ahead must be a positive int, got {batches_ahead!r}")
        # FFCV's loader threads are numba threads: at most NUMBA_NUM_THREADS.
        self.num_workers = resolve_workers(num_workers, limit=numba.config.NUMBA_NUM_THREADS,
                                           limit_name="numba's thread limit NUMBA_NUM_THREADS")
        self.path = self.source = Path(source)
        reader = read_beton(self.path)
        self.num_samples = int(reader.num_samples)
        self.num_classes = int(beton_labels(reader).max()) + 1
        len(self)  # a training split too small for one batch fails here, not in the trainer
        self.order = order
        self.os_cache = order == "random" if os_cache is None else bool(os_cache)
        self.batches_ahead = batches_ahead
        self._gpu = self.output.device.type == "cuda"
        # Without cupy, FFCV's NormalizeImage cannot run on the GPU: torch normalises there.
        self._ffcv_normalizes = not self._gpu or importlib.util.find_spec("cupy") is not None
        self._loader: _FfcvLoader | None = None
        self._built_for: tuple[int, tuple[float, float]] | None = None  # batch size, crop scale
        self._decoder: Operation | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        len(self)  # this epoch's batch size may leave no batch
        start, loader = self._take_start(), self._current_loader()
        self._decoder.output_size = (self.resolution, self.resolution)
        loader.traversal_order.skip = start
        loader.next_epoch = self.epoch
        finish = (self.output.finish if self._ffcv_normalizes
                  else lambda x: self.output.normalize_uint8(x, "NCHW"))
        return _batches(iter(loader), finish)

    def _current_loader(self) -> _FfcvLoader:
        """The FFCV loader for this epoch's batch size and crop scale (built anew when either
        changes: the decoder's compiled code holds the scale)."""
        built_for = (self.batch_size, self.crop_scale_at(self.epoch))
        if self._loader is None or self._built_for != built_for:
            self._loader, self._built_for = self._build(*built_for), built_for
        return self._loader

    def _build(self, batch_size: int, scale: tuple[float, float]) -> _FfcvLoader:
        # Collect dropped FFCV pipelines now: numba's clean-up of their compiled functions
        # fails (a printed KeyError) if the collector runs during a compilation in FFCV's thread.
        gc.collect()
        res = (self.resolution, self.resolution)
        self._decoder = (SeededRandomResizedCropFlip(res, self.seed, scale) if self.train
                         else CenterCropDecoder(res, ratio=VAL_CROP_RATIO))
        return _FfcvLoader(
            str(self.path), batch_size=batch_size, num_workers=self.num_workers,
            os_cache=self.os_cache, order=self._traversal_order(), seed=self.seed,
            drop_last=self.drop_last, batches_ahead=self.batches_ahead,
            pipelines={"image": self._image_pipeline(), "label": self._label_pipeline()})

    def _traversal_order(self) -> ShardedOrder:
        if self.train and self.order == "quasi_random":
            return ShardedQuasiRandom(self.shard)
        return ShardedOrder(self.shard, self.train)

    def _image_pipeline(self) -> list[Operation]:
        dtype = np.float16 if self.output.dtype == torch.float16 else np.float32
        normalize = NormalizeImage(np.array(IMAGENET_MEAN_255), np.array(IMAGENET_STD_255), dtype)
        cast = [Convert(torch.bfloat16)] if self.output.dtype == torch.bfloat16 else []
        if not self._gpu:  # FFCV normalises uint8 HWC arrays on the CPU
            return [self._decoder, normalize, ToTensor(),
                    ToTorchImage(channels_last=self.output.channels_last), *cast]
        to_gpu = [self._decoder, ToTensor(), ToDevice(self.output.device, non_blocking=True),
                  ToTorchImage(channels_last=True)]  # NormalizeImage's GPU kernel needs NHWC
        return [*to_gpu, normalize, *cast] if self._ffcv_normalizes else to_gpu

    def _label_pipeline(self) -> list[Operation]:
        labels = [IntDecoder(), ToTensor(), Squeeze(1)]
        return [*labels, ToDevice(self.output.device, non_blocking=True)] if self._gpu else labels


def _batches(epoch: Iterator, finish: Callable[[torch.Tensor], torch.Tensor]
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    try:
        for images, labels in epoch:
            yield finish(images), labels
    finally:
        epoch.close()  # stops FFCV's thread if the epoch is abandoned


__all__ = ["CenterCropDecoder", "FfcvLoader", "SeededRandomResizedCropFlip", "ShardedOrder",
           "ShardedQuasiRandom", "ShardedRandom", "UndecodableImageError", "fit_resolution",
           "WRITE_MODES", "ensure_beton", "load_rgb_array", "read_beton", "write_beton"]
