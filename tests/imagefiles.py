"""Real image files for the loader tests: class-coded JPEG trees and every kind of bad file.

A *coded* image is one solid colour that encodes its class and its index in the dataset:
``R`` carries the class, ``G`` and ``B`` the index. Solid colours survive JPEG, any crop,
resize or flip, so a decoded batch tells which file every image came from, whatever the
backend did to it; that is how the tests check label alignment and shard coverage.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN_255 = np.array([0.485, 0.456, 0.406]) * 255
STD_255 = np.array([0.229, 0.224, 0.225]) * 255

R_STEP, GB_STEP = 24, 16          # tolerances: +-12 for the class, +-8 for the index digits
MAX_CLASSES, MAX_INDEX = 10, 256


def code_color(label: int, index: int) -> tuple[int, int, int]:
    """The RGB colour of image ``index`` of class ``label``."""
    assert 0 <= label < MAX_CLASSES and 0 <= index < MAX_INDEX
    return (12 + R_STEP * label, 8 + GB_STEP * (index // 16), 8 + GB_STEP * (index % 16))


def decode_batch(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Normalised batch (N, 3, H, W, any float dtype/layout) -> (labels, indices) it encodes.

    Reads the mean colour of the central quarter of each image (robust to the blur of
    resampling at the edges).
    """
    x = images.detach().float().cpu()
    h, w = x.shape[-2:]
    centre = x[:, :, h // 4: h - h // 4 or h, w // 4: w - w // 4 or w]
    rgb = centre.mean(dim=(2, 3)).numpy() * STD_255 + MEAN_255
    labels = np.rint((rgb[:, 0] - 12) / R_STEP).astype(int)
    indices = (np.rint((rgb[:, 1] - 8) / GB_STEP) * 16 + np.rint((rgb[:, 2] - 8) / GB_STEP)).astype(int)
    return labels, indices


def expected_rgb(images: torch.Tensor) -> np.ndarray:
    """Per-image mean RGB (0-255) of a normalised batch, for statistics checks."""
    x = images.detach().float().cpu()
    return x.mean(dim=(2, 3)).numpy() * STD_255 + MEAN_255


def jpeg_bytes(img: Image.Image, quality: int = 95, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def write_coded_tree(root: str | os.PathLike, classes: int = 4, per_class: int = 12,
                     size: tuple[int, int] = (80, 60), vary_size: bool = True) -> list[tuple[Path, int, int]]:
    """Write an ImageFolder tree ``root/cXX/imgYYY.JPEG`` of coded images.

    Returns ``[(path, label, index)]`` in ImageFolder order (sorted classes, sorted files);
    ``index`` is the position in that order. With ``vary_size`` image sizes differ (some
    portrait, some landscape) to exercise resizing.
    """
    root = Path(root)
    out = []
    index = 0
    for label in range(classes):
        d = root / f"c{label:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            w, h = size
            if vary_size and k % 3 == 1:
                w, h = h, w
            elif vary_size and k % 3 == 2:
                w, h = w + 16, h + 8
            path = d / f"img{k:03d}.JPEG"
            path.write_bytes(jpeg_bytes(Image.new("RGB", (w, h), code_color(label, index))))
            out.append((path, label, index))
            index += 1
    return out


# --- bad files -------------------------------------------------------------------------------
# Each writer puts one kind of odd file at ``path`` and returns the RGB colour a correct
# decoder must produce, or None when the file cannot be decoded and must be reported.

def write_truncated_jpeg(path: Path, color=(200, 40, 40)) -> None:
    data = jpeg_bytes(Image.new("RGB", (64, 48), color))
    path.write_bytes(data[: len(data) // 2])


def write_corrupt_jpeg(path: Path, color=(200, 40, 40)) -> None:
    """A JPEG with a garbled Huffman table: every decoder must fail on it."""
    data = bytearray(jpeg_bytes(Image.new("RGB", (64, 48), color)))
    dht = data.find(b"\xff\xc4")
    data[dht + 5: dht + 30] = bytes(range(200, 225))
    path.write_bytes(bytes(data))


def write_corrupt_scan_jpeg(path: Path, color=(200, 40, 40)) -> None:
    """Headers intact, entropy-coded data garbage: libjpeg decodes it with 'Corrupt JPEG data'
    warnings into a wrong picture. Decoders accept it; only the dataset check can flag it."""
    data = bytearray(jpeg_bytes(Image.new("RGB", (64, 48), color)))
    sos = data.find(b"\xff\xda")
    rng = np.random.default_rng(0)
    data[sos + 20: -2] = rng.integers(0, 255, len(data) - sos - 22, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def write_png_named_jpeg(path: Path, color=(40, 200, 40)) -> tuple[int, int, int]:
    Image.new("RGB", (64, 48), color).save(path, format="PNG")
    return color


def write_cmyk_jpeg(path: Path, color=(40, 40, 200)) -> tuple[int, int, int]:
    """A CMYK JPEG (ImageNet has 22); a correct loader returns ``color`` in RGB."""
    Image.new("RGB", (64, 48), color).convert("CMYK").save(path, format="JPEG", quality=95)
    return color


def write_grayscale_jpeg(path: Path, level: int = 150) -> tuple[int, int, int]:
    Image.new("L", (64, 48), level).save(path, format="JPEG", quality=95)
    return (level, level, level)


def write_empty_file(path: Path) -> None:
    path.write_bytes(b"")


def write_non_image(path: Path) -> None:
    path.write_text("this is not an image\n" * 10)


BAD_FILE_WRITERS = {
    "truncated": write_truncated_jpeg,
    "corrupt": write_corrupt_jpeg,
    "png_as_jpeg": write_png_named_jpeg,
    "cmyk": write_cmyk_jpeg,
    "grayscale": write_grayscale_jpeg,
    "empty": write_empty_file,
    "non_image": write_non_image,
}
#: Kinds only the dataset check can see (decoders return a picture without an error).
CHECK_ONLY_WRITERS = {"corrupt_scan": write_corrupt_scan_jpeg}
#: Kinds a loader must decode correctly (to the returned colour) rather than reject.
DECODABLE = {"png_as_jpeg", "cmyk", "grayscale"}


def add_bad_file(root: str | os.PathLike, kind: str, class_dir: str = "c00",
                 name: str | None = None) -> tuple[Path, tuple[int, int, int] | None]:
    """Add one bad file of ``kind`` to ``root/class_dir``; return (path, colour or None)."""
    path = Path(root) / class_dir / (name or f"bad_{kind}.JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, {**BAD_FILE_WRITERS, **CHECK_ONLY_WRITERS}[kind](path)


def add_empty_class(root: str | os.PathLike, name: str = "c99_empty") -> Path:
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def make_unreadable(path: Path) -> None:
    """chmod 000. Root still reads such a file: tests must drop privileges to see the error."""
    path.chmod(0)


# --- odd but valid files ---------------------------------------------------------------------
# Each returns what a correct decoder gives: the RGB colour of the whole image, or for the
# EXIF-rotated one the colours of its stored left and right halves.

def write_solid_jpeg(path: Path, size: tuple[int, int], color=(40, 200, 40)) -> tuple[int, int, int]:
    """A solid JPEG of any size (6000 x 20, 1 x 1: the extremes of a dataset)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(Image.new("RGB", size, color), quality=95))
    return color


def write_16bit_png(path: Path, value: int = 30000) -> tuple[int, int, int]:
    """A 16-bit grayscale PNG (under whatever name): ``value / 257`` in 8 bits, not white."""
    Image.new("I;16", (40, 30), value).save(path, format="PNG")
    level = round(value / 257)
    return (level, level, level)


def write_exif_rotated_jpeg(path: Path, orientation: int = 6) -> tuple[tuple, tuple]:
    """64 x 48, red left half and blue right half as stored, with an EXIF orientation tag
    (6: a viewer turns it 90 degrees clockwise, red on top). Returns (left, right) colours."""
    left, right = (200, 30, 30), (30, 30, 200)
    img = Image.new("RGB", (64, 48), left)
    img.paste(right, (32, 0, 64, 48))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return left, right


def write_random_after_header_jpeg(path: Path, seed: int = 0) -> None:
    """A JPEG's first segments, then random bytes where the next marker should be."""
    data = jpeg_bytes(Image.new("RGB", (64, 48), (200, 40, 40)))
    cut = data.find(b"\xff\xc4")  # before the Huffman tables
    rng = np.random.default_rng(seed)
    path.write_bytes(data[:cut] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
