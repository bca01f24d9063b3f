"""FFCV datasets: write an ImageFolder split to a ``.beton``, and open one checked.

Writing (:func:`write_beton`, :func:`ensure_beton`) follows FFCV's ``write_imagenet.py``: an
``RGBImageField`` (``write_mode``, ``max_resolution``, ``compress_probability``,
``jpeg_quality``) and an ``IntField`` label, from the one shared ImageFolder listing, so labels
agree with the other backends. Images are decoded as the folder loader decodes them
(:func:`pipelines.images.load_rgb`: EXIF orientation ignored, 16 bits scaled to 8) and
downscaled here, as FFCV would, to a longer side of ``max_resolution``, but never to a side of
0 px (FFCV's own resize fails on a 6000 x 20 image at 256, and its writer then hangs). The file
appears at its path only once complete (temp file + rename); partial files that a killed write
left are removed by the next write.

Reading (:func:`read_beton`) refuses a file that is missing, truncated or damaged, lacks the
``image`` / ``label`` fields, or holds no or negative labels, naming the file.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.writer import DatasetWriter

from .base import BadImageError, resolve_workers
from .imagefolder import ImageFolderIndex, scan_image_folder
from .images import load_rgb

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
_FAILED = (np.zeros((1, 1, 3), np.uint8), -1)  # written in place of an undecodable image


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
    FFCV's writer forks its worker processes: write before this process starts DALI or FFCV
    loaders (a fork beside their threads hung once in this project's tests), as the trainer
    does.
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
    failed = np.flatnonzero(beton_labels(reader) < 0)
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
    labels = beton_labels(reader)
    if labels.min() < 0:
        raise ValueError(f"{path} has negative labels (e.g. sample {int(np.argmin(labels))})")
    return reader


def beton_labels(reader: Reader) -> np.ndarray:
    """The labels of every sample of an open ``.beton``, from its metadata (no decoding)."""
    return reader.metadata[f"f{list(reader.handlers).index('label')}"]
