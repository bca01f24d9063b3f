"""FFCV backend: write an ImageFolder split to a ``.beton``, and load it with FFCV's JIT pipeline.

Writing (:func:`write_beton`, :func:`ensure_beton`) follows FFCV's ``write_imagenet.py``: an
``RGBImageField`` (``write_mode``, ``max_resolution``, ``compress_probability``,
``jpeg_quality``) and an ``IntField`` label, from the one shared ImageFolder listing, so labels
agree with the other backends. Images are decoded as the folder loader decodes them
(:func:`pipelines.images.load_rgb`: EXIF orientation ignored, 16 bits scaled to 8) and
downscaled here, as FFCV would, to a longer side of ``max_resolution``, but never to a side of
0 px (FFCV's own resize fails on a 6000 x 20 image at 256, and its writer then hangs). The file
appears at its path only once complete (temp file + rename); partial files that a killed write
left are removed by the next write.

Loading (:class:`FfcvLoader`) is FFCV's ImageNet pipeline. Train: random-resized-crop and flip,
then ``NormalizeImage`` and ``ToTorchImage``; validation: ``CenterCropRGBImageDecoder`` with
``VAL_CROP_RATIO`` (its crop at least 1 px: FFCV's crop of a 1 px short side is empty, and
OpenCV aborts the process on it). ``set_epoch(e, start_batch=k)`` hands FFCV only the batches
from ``k`` on, so the skipped ones are never read; crops are keyed by batch content, so the
resumed batches are bitwise those of an uninterrupted epoch. With CUDA the uint8 batch goes to the GPU (``ToDevice``) and is normalised
there, by ``NormalizeImage`` (whose GPU kernel needs cupy) or, without cupy, by torch. On a
CPU-only machine ``NormalizeImage`` runs in FFCV's JIT stage and no CUDA call is made (FFCV's own
``pin_memory`` attempts fail quietly). bfloat16 is one cast of the float32 output (``Convert``).
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

import contextlib
import gc
import glob
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import cv2
import numba
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (IMAGE_MODES, CenterCropRGBImageDecoder,
                                   RandomResizedCropRGBImageDecoder, get_random_crop)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader as _FfcvLoader
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.transforms import Convert, NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter

from .base import (IMAGENET_MEAN_255, IMAGENET_STD_255, RRC_RATIO, RRC_SCALE, VAL_CROP_RATIO,
                   BadImageError, Loader, OutputSpec, Shard, resolve_workers)
from .ffcv_order import ShardedOrder, ShardedQuasiRandom, ShardedRandom
from .imagefolder import ImageFolderIndex, scan_image_folder
from .images import load_rgb
from .resolution import ResolutionSchedule

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
_FAILED = (np.zeros((1, 1, 3), np.uint8), -1)  # written in place of an undecodable image


# --- writing ----------------------------------------------------------------------------------

class UndecodableImageError(BadImageError):
    """Images of an ImageFolder split could not be decoded; no ``.beton`` was written. The
    message names every such file (up to 20) with its reason."""


def load_rgb_array(path: str) -> np.ndarray:
    """Decode ``path`` to an ``H x W x 3`` uint8 array as every backend does
    (:func:`pipelines.images.load_rgb`); a :class:`BadImageError` naming the file otherwise."""
    return np.asarray(load_rgb(path))


def fit_resolution(image: np.ndarray, max_resolution: int) -> np.ndarray:
    """FFCV's writer resize (longer side to ``max_resolution``, ``INTER_AREA``, sides
    truncated), except that no side falls below 1 px."""
    height, width = image.shape[:2]
    ratio = max_resolution / max(height, width)
    if ratio >= 1:
        return image
    size = (max(1, int(ratio * width)), max(1, int(ratio * height)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class _DecodedImages:
    """The split as FFCV's writer reads it: ``(rgb, label)``, or ``_FAILED`` if undecodable.

    FFCV's writer hangs if a worker raises, so nothing raises here: failures are written as
    label -1 and reported (re-decoded for their message) by the parent once the writer is
    done, and images come already at most ``max_resolution`` a side (so FFCV's own resize,
    which can fail, does nothing).
    """

    def __init__(self, index: ImageFolderIndex, max_resolution: int) -> None:
        self.samples, self.max_resolution = index.samples, max_resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        try:
            return fit_resolution(load_rgb_array(path), self.max_resolution), label
        except Exception:
            return _FAILED


def write_beton(
    folder: str | os.PathLike,
    path: str | os.PathLike,
    *,
    max_resolution: int,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    write_mode: str = "proportion",
    smart_threshold: int | None = None,
    num_workers: int | None = None,
    chunk_size: int = 100,
    page_size: int = 4 << 21,
    progress: bool = True,
) -> Path:
    """Write the ImageFolder split ``folder`` to the FFCV dataset ``path``; return ``path``.

    Fields ``image`` (``RGBImageField``: longer side at most ``max_resolution``, stored per
    ``write_mode``: FFCV's ``raw``, ``jpg``, ``smart`` (JPEG above ``smart_threshold`` raw bytes)
    or ``proportion`` (JPEG with ``compress_probability``)) and ``label`` (``IntField``), in
    pages of ``page_size`` bytes (FFCV's: a power of 2, 2 MiB to 4 GiB; default 8 MiB).
    Raises :class:`UndecodableImageError` naming every file that does not decode; the file at
    ``path`` appears only when complete, so a failed or killed write never leaves one.
    """
    _check_write_args(max_resolution, jpeg_quality, compress_probability, write_mode,
                      smart_threshold, chunk_size)
    index = scan_image_folder(folder)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    _remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=page_size,
                               num_workers=resolve_workers(num_workers))
        if progress:
            print(f"writing {len(index)} images of {index.root} to {path}", file=sys.stderr)
        # FFCV's writer always draws a tqdm bar on stderr: progress=False sends it nowhere.
        with (contextlib.nullcontext() if progress else _stderr_to_devnull()):
            writer.from_indexed_dataset(_DecodedImages(index, max_resolution),
                                        chunksize=chunk_size)
        _raise_for_failures(Reader(str(tmp)), index)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove_stale_partials(path: Path) -> None:
    """Remove the partial files of writes of ``path`` whose process is gone (killed)."""
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        match = re.fullmatch(rf"\.{re.escape(path.name)}\.(\d+)\.partial", partial.name)
        if match and not _alive(int(match.group(1))):
            partial.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def ensure_beton(folder: str | os.PathLike, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``path`` if it exists, else :func:`write_beton` ``(folder, path, **kwargs)``.

    Under DDP call it on one rank and wait at a barrier: concurrent writers are safe but
    each does the whole work.
    """
    path = Path(path)
    return path if path.exists() else write_beton(folder, path, **kwargs)


def _check_write_args(max_resolution, jpeg_quality, compress_probability, write_mode,
                      smart_threshold, chunk_size) -> None:
    if not isinstance(max_resolution, int) or not 8 <= max_resolution <= 65535:
        raise ValueError(f"max_resolution must be an int in [8, 65535], got {max_resolution!r}")
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")
    if not 0 <= compress_probability <= 1:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability!r}")
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if (write_mode == "smart") != (smart_threshold is not None):
        raise ValueError("smart_threshold (bytes) is required by, and only by, write_mode='smart'")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


def _raise_for_failures(reader: Reader, index: ImageFolderIndex) -> None:
    """Raise naming the images the writer's workers could not decode (label -1)."""
    failed = np.flatnonzero(_labels(reader) < 0)
    if failed.size == 0:
        return
    reasons = []
    for i in failed[:20]:
        path = index.samples[i][0]
        try:
            load_rgb_array(path)
            reasons.append(f"cannot decode {path} in a writer process")
        except BadImageError as e:
            reasons.append(str(e))
    more = f"\n... and {failed.size - 20} more" if failed.size > 20 else ""
    raise UndecodableImageError(
        f"{failed.size} of {len(index)} images of {index.root} cannot be decoded; no .beton "
        f"was written. Fix or remove them:\n" + "\n".join(reasons) + more)


# --- reading ----------------------------------------------------------------------------------

def read_beton(path: str | os.PathLike) -> Reader:
    """Open an FFCV dataset as :func:`write_beton` writes it; raise naming ``path`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FFCV dataset {path} does not exist (write it with write_beton)")
    try:
        reader = Reader(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable FFCV .beton ({type(e).__name__}: {e})") from e
    fields = reader.handlers
    if not (isinstance(fields.get("image"), RGBImageField) and isinstance(fields.get("label"), IntField)):
        kinds = {name: type(field).__name__ for name, field in fields.items()}
        raise ValueError(f"{path} has fields {kinds}; FfcvLoader needs 'image' (RGBImageField) "
                         f"and 'label' (IntField), as write_beton writes them")
    if reader.num_samples == 0:
        raise ValueError(f"{path} holds no samples")
    table = reader.alloc_table  # at the end of the file: one entry per image
    if (len(reader.metadata) != reader.num_samples
            or path.stat().st_size != reader.header["alloc_table_ptr"] + table.nbytes
            or np.unique(table["sample_id"]).size != reader.num_samples):
        raise ValueError(f"{path} is a truncated or damaged FFCV .beton")
    labels = _labels(reader)
    if labels.min() < 0:
        raise ValueError(f"{path} has negative labels (e.g. sample {int(np.argmin(labels))})")
    return reader


def _labels(reader: Reader) -> np.ndarray:
    return reader.metadata[f"f{list(reader.handlers).index('label')}"]


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
        self.num_classes = int(_labels(reader).max()) + 1
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
