"""One image file to 8-bit RGB with PIL, as the folder loader and FFCV's writer both decode it,
and the reason in words why a file does not decode (for every backend's :class:`BadImageError`).

What every backend agrees on (DALI's graph is set to match, ``docs/design/loaders.md``):

- **EXIF orientation is ignored**: the stored pixels are used, as PIL (and so torchvision's
  ImageFolder, and the ImageNet references trained with it) decodes them;
- **16-bit images are scaled to 8 bits** (``round(v / 257)``, 65535 -> 255), as DALI's decoder
  does; PIL's RGB conversion would clip a 16-bit grayscale image to white. 16-bit RGB(A) PNGs
  PIL already reduces to their high byte. 32-bit integer and float images (modes ``I``, ``F``)
  have no agreed 8-bit scale and are refused;
- CMYK, grayscale, palette and PNG data under any name become RGB (``convert("RGB")``).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .base import BadImageError

#: The words a :class:`BadImageError` uses for each error kind of :mod:`pipelines.check`.
REASONS = {
    "unreadable": "unreadable", "empty": "empty file", "non_image": "not an image",
    "truncated": "truncated", "corrupt": "corrupt", "corrupt_scan": "corrupt",
    "unsupported_depth": "unsupported pixel depth",
}


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB (see the module docstring); a ValueError for 32-bit pixels."""
    if img.mode.startswith("I;16"):
        wide = np.asarray(img, dtype=np.uint32)  # any byte order, as numbers
        img = Image.fromarray(((wide * 2 + 257) // 514).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        raise ValueError(f"mode {img.mode} holds 32-bit {'integer' if img.mode == 'I' else 'float'} "
                         f"pixels, which have no agreed 8-bit scale; convert the file to 8 bits")
    return img.convert("RGB")  # loads the pixels (a copy) even when already RGB


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image; any failure is a :class:`BadImageError` naming
    the file and why (:func:`failure_reason`)."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except Exception as e:
        raise BadImageError(path, failure_reason(path, e)) from e


def failure_reason(path: str | os.PathLike, error: BaseException) -> str:
    """Why ``path`` does not decode, in words: :func:`check_reason`, else ``error``'s message."""
    return check_reason(path) or (f"{type(error).__name__}: {error}" if str(error)
                                  else type(error).__name__)


def check_reason(path: str | os.PathLike) -> str | None:
    """The dataset check's finding on ``path`` in words (its kind, then the decoder's message),
    or None if it finds no error. Runs on error paths only (it reads the whole file)."""
    from .check import check_file  # check imports the loaders' listing, not the loaders

    problem = check_file(path)
    if problem is not None and problem.error and problem.kind in REASONS:
        return f"{REASONS[problem.kind]} ({problem.detail})"
    return None


__all__ = ["REASONS", "check_reason", "failure_reason", "load_rgb", "to_rgb"]
