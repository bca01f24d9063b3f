"""Dataset check: every file a loader would choke on or mis-read, found before training.

    python -m pipelines.check DIR [--workers N] [--json] [--quick]

``DIR`` is an ImageFolder split (``DIR/<class>/<image>``) or a dataset root holding ``train/``
and ``val/``. The images checked are exactly those the loaders read (the
:func:`~pipelines.imagefolder.scan_image_folder` listing). Each one is read and fully decoded:
JPEG data by libjpeg-turbo with its warnings turned into findings, which is how corrupt scan
data that decoders silently turn into a damaged picture is caught; other formats by PIL.
``--quick`` reads headers only (formats, colour modes, empty and non-image files).

Each problem has a kind; :data:`KINDS` says whether it is an error (loaders fail on it or
mis-read it) or a warning (loaders handle it: decoded correctly to RGB, or never read, or
treated in a way worth knowing). Besides damaged files the check names the images every
loader takes but treats specially: 16-bit images (scaled to 8 bits), images whose short side
is under :data:`TINY_SIDE` px (every crop is upsampled from a few pixels), extreme aspect
ratios (over :data:`EXTREME_ASPECT`: crops see a small part, FFCV stores a thin strip) and EXIF
orientation tags (ignored: the stored pixels are used). A file gets its most serious finding.
Exit status: 1 when there are errors, 0 otherwise, 2 when the tree cannot be listed (the
message names why: a missing or unreadable folder, or the directory symlinks that loop back
into the tree, which no loader reads either).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import io
import json
import multiprocessing
import os
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .imagefolder import scan_image_folder


@dataclass(frozen=True)
class Kind:
    """A kind of problem: is it an error, and what do the loaders do with such a file."""

    error: bool
    loaders: str


KINDS = {
    "unreadable": Kind(True, "fail: the file cannot be opened"),
    "empty": Kind(True, "fail: the file is empty"),
    "non_image": Kind(True, "fail: not an image in any format PIL knows"),
    "truncated": Kind(True, "fail (PIL), or return the image with its missing part grey (libjpeg)"),
    "corrupt": Kind(True, "fail: the decoder rejects the data"),
    "corrupt_scan": Kind(True, "mis-read: decoders return a damaged picture without an error"),
    "unsupported_depth": Kind(True, "fail: 32-bit integer or float pixels have no agreed 8-bit "
                                    "scale (DALI may decode them)"),
    "empty_class": Kind(True, "fail: an empty class folder would shift or orphan labels"),
    "wrong_format": Kind(False, "handled: decoded by content, whatever the file name says"),
    "cmyk": Kind(False, "handled: converted to RGB"),
    "grayscale": Kind(False, "handled: converted to RGB"),
    "jpeg_warning": Kind(False, "handled: junk bytes after the image data are ignored"),
    "skipped": Kind(False, "skipped: loaders never read it"),
    "high_bit_depth": Kind(False, "handled: 16 bits scaled to 8 (v / 257) by every backend"),
    "tiny": Kind(False, "handled: upsampled; every crop comes from a few pixels"),
    "extreme_aspect": Kind(False, "handled: a crop (aspect 3/4 to 4/3) sees a small part of it; "
                                  "FFCV's writer stores it as a thin strip (1 px at least)"),
    "exif_orientation": Kind(False, "handled: the EXIF orientation is ignored, the stored pixels "
                                    "are used (PIL's and ImageNet's practice)"),
}

#: Short sides under this many pixels are ``tiny``: the random-resized crop's smallest scale
#: (8 % of the area) then keeps under 2 px a side, the validation crop under 7 px.
TINY_SIDE = 8
#: Long side / short side above this is ``extreme_aspect``: a training crop (aspect at most
#: 4/3) covers at most 1/6 of the long side, and FFCV's writer at ``max_resolution`` 256
#: stores the short side in under 26 px.
EXTREME_ASPECT = 10
EXIF_ORIENTATION = 0x0112

#: Formats PIL may report for the data behind each image extension.
FORMATS_BY_EXTENSION = {
    ".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".png": {"PNG"}, ".ppm": {"PPM"},
    ".pgm": {"PPM"}, ".bmp": {"BMP"}, ".tif": {"TIFF"}, ".tiff": {"TIFF"}, ".webp": {"WEBP"},
}
JPEG_FORMATS = {"JPEG", "MPO"}


@dataclass(frozen=True)
class Problem:
    """One finding: the file (or folder), its kind (a key of :data:`KINDS`) and details."""

    path: str
    kind: str
    detail: str

    @property
    def error(self) -> bool:
        return KINDS[self.kind].error

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "severity": "error" if self.error else "warning",
                "detail": self.detail, "loaders": KINDS[self.kind].loaders}


# --- libjpeg-turbo, through its TurboJPEG C API ------------------------------------------------
TJPF_GRAY, TJPF_CMYK = 6, 11
TJCS_CMYK, TJCS_YCCK = 3, 4
TJFLAG_STOPONWARNING = 8192
TJERR_FATAL = 1


@functools.cache
def turbojpeg() -> ctypes.CDLL | None:
    """The TurboJPEG library (``libturbojpeg``, also needed by FFCV), or None if absent."""
    name = ctypes.util.find_library("turbojpeg")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    handle, buf, size, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int
    lib.tjInitDecompress.restype = handle
    lib.tjDecompressHeader3.argtypes = [handle, buf, size] + [ctypes.POINTER(c_int)] * 4
    lib.tjDecompress2.argtypes = [handle, buf, size, ctypes.c_void_p] + [c_int] * 5
    lib.tjGetErrorStr2.argtypes = lib.tjGetErrorCode.argtypes = lib.tjDestroy.argtypes = [handle]
    lib.tjGetErrorStr2.restype = ctypes.c_char_p
    return lib


def strict_jpeg_decode(data: bytes) -> tuple[bool, str] | None:
    """Decode all of ``data``, stopping at libjpeg's first warning: None if clean, else
    ``(fatal, message)``.

    Decodes to 1/8 scale, luminance (or CMYK) only: every entropy-coded byte, where
    corruption shows, is still decoded; only the inverse DCT and colour conversion shrink.
    """
    lib = turbojpeg()
    handle = lib.tjInitDecompress()
    try:
        width, height, subsampling, colorspace = (ctypes.c_int() for _ in range(4))
        if lib.tjDecompressHeader3(handle, data, len(data), ctypes.byref(width), ctypes.byref(height),
                                   ctypes.byref(subsampling), ctypes.byref(colorspace)) == 0:
            cmyk = colorspace.value in (TJCS_CMYK, TJCS_YCCK)
            w, h = -(-width.value // 8), -(-height.value // 8)
            out = ctypes.create_string_buffer(w * h * (4 if cmyk else 1))
            if lib.tjDecompress2(handle, data, len(data), out, w, 0, h,
                                 TJPF_CMYK if cmyk else TJPF_GRAY, TJFLAG_STOPONWARNING) == 0:
                return None
        return lib.tjGetErrorCode(handle) == TJERR_FATAL, lib.tjGetErrorStr2(handle).decode(errors="replace")
    finally:
        lib.tjDestroy(handle)


#: Markers that may stand between a JPEG's SOI and its SOS: SOFn, DHT, DAC, DQT, DRI, DNL, APPn,
#: JPGn, COM (and TEM).
_HEADER_MARKERS = frozenset([0x01, *range(0xC0, 0xD0), *range(0xDB, 0xE0), *range(0xE0, 0xFF)])


def jpeg_structure(data: bytes) -> tuple[str, str] | None:
    """Walk a JPEG's marker segments from SOI to SOS: ``("truncated", detail)`` when the file
    ends inside them (a prefix of a well-formed header), ``("corrupt", detail)`` when a segment
    is not a valid marker (random bytes after the header), None when the header reaches its
    scan."""
    pos = 2
    while True:
        if pos + 4 > len(data):
            return "truncated", f"the file ends inside the JPEG header ({len(data)} bytes)"
        marker = data[pos + 1]
        if data[pos] == 0xFF and marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos] != 0xFF or marker not in _HEADER_MARKERS | {0xDA} or length < 2:
            return "corrupt", f"JPEG header damaged: no valid marker segment at byte {pos}"
        if pos + 2 + length > len(data):
            return "truncated", f"the file ends inside the JPEG header ({len(data)} bytes)"
        if marker == 0xDA:
            return None
        pos += 2 + length


def _jpeg_problem(path: str, data: bytes) -> Problem | None:
    found = strict_jpeg_decode(data)
    if found is None:
        return None
    fatal, message = found
    if fatal:
        return Problem(path, "corrupt", message)
    if "Premature end of JPEG file" in message:
        return Problem(path, "truncated", message)
    if "extraneous bytes before marker 0xd9" in message:
        return Problem(path, "jpeg_warning", message)
    return Problem(path, "corrupt_scan", message)


# --- one file ------------------------------------------------------------------------------------
def check_file(path: str | os.PathLike, *, decode: bool = True) -> Problem | None:
    """The most serious problem of one image file, or None if every loader reads it as is.

    ``decode=False`` reads the header only: corrupt or truncated data goes unnoticed.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Problem(path, "unreadable", e.strerror or str(e))
    if not data:
        return Problem(path, "empty", "0 bytes")
    strict_jpeg = decode and turbojpeg() is not None
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, size = img.format, img.mode, img.size
            rawmode = _rawmode(img)
            orientation = _orientation(img)
            if decode and not (strict_jpeg and fmt in JPEG_FORMATS):
                img.load()
    except UnidentifiedImageError:
        if data.startswith(b"\xff\xd8\xff"):  # a JPEG signature, then no readable header
            kind, detail = jpeg_structure(data) or ("corrupt", "JPEG header damaged")
            return Problem(path, kind, detail)
        return Problem(path, "non_image", "no image format recognised")
    except Exception as e:
        if data.startswith(b"\xff\xd8\xff") and (found := jpeg_structure(data)):
            return Problem(path, *found)  # PIL calls any overrun of the file "truncated"
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        return Problem(path, kind, f"{type(e).__name__}: {e}")
    if strict_jpeg and fmt in JPEG_FORMATS and (problem := _jpeg_problem(path, data)):
        return problem
    if mode in ("F", "I"):
        return Problem(path, "unsupported_depth", f"{fmt} in mode {mode}")
    if mode.startswith("I;16") or ";16" in rawmode:
        return Problem(path, "high_bit_depth", f"16-bit {fmt} ({rawmode or mode})")
    short, long = min(size), max(size)
    if short < TINY_SIDE:
        return Problem(path, "tiny", f"{size[0]} x {size[1]} px: short side under {TINY_SIDE}")
    if long > EXTREME_ASPECT * short:
        return Problem(path, "extreme_aspect", f"{size[0]} x {size[1]} px (aspect "
                                               f"{long / short:.0f}:1, above {EXTREME_ASPECT}:1)")
    if orientation not in (None, 1):
        return Problem(path, "exif_orientation", f"EXIF orientation {orientation} "
                                                 f"({ORIENTATIONS.get(orientation, 'invalid')})")
    extension = os.path.splitext(path)[1]
    if fmt not in FORMATS_BY_EXTENSION.get(extension.lower(), {fmt}):
        return Problem(path, "wrong_format", f"{fmt} data under a {extension} name")
    if mode == "CMYK":
        return Problem(path, "cmyk", f"CMYK {fmt}")
    if Image.getmodebase(mode) == "L":
        return Problem(path, "grayscale", f"{fmt} in mode {mode}")
    return None


#: What each EXIF orientation value asks a viewer to do.
ORIENTATIONS = {2: "mirror", 3: "rotate 180", 4: "flip vertically", 5: "transpose",
                6: "rotate 90 clockwise", 7: "transverse", 8: "rotate 90 counter-clockwise"}


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw mode of ``img``'s first tile (``"RGB;16B"`` for a 16-bit RGB PNG)."""
    args = img.tile[0].args if img.tile else ""
    return str(args[0] if isinstance(args, tuple) and args else args or "")


def _orientation(img: Image.Image) -> object:
    """The EXIF orientation tag, or None (also when the EXIF block does not parse: the loaders
    never read it)."""
    try:
        return img.getexif().get(EXIF_ORIENTATION)
    except Exception:
        return None


# --- a tree --------------------------------------------------------------------------------------
def split_dirs(root: str | os.PathLike) -> list[Path]:
    """``root/train`` and ``root/val`` (those present) for a dataset root, else ``[root]``."""
    root = Path(root)
    splits = [root / name for name in ("train", "val") if (root / name).is_dir()]
    return splits or [root]


def list_tree(root: str | os.PathLike) -> tuple[list[str], list[Problem]]:
    """The image paths the loaders read under ``root``, and the folder-level problems
    (empty classes, files the loaders skip). Raises, naming it, if a split cannot be listed."""
    paths: list[str] = []
    problems: list[Problem] = []
    for split in split_dirs(root):
        index = scan_image_folder(split, allow_empty_classes=True)
        counts = Counter(index.labels)
        problems += [Problem(str(split / name), "empty_class", "no image files")
                     for label, name in enumerate(index.classes) if not counts[label]]
        listed = set(index.paths)
        for dirpath, _, names in os.walk(split, followlinks=True):
            why = "not in a class folder" if dirpath == str(split) else "no image extension"
            problems += [Problem(p, "skipped", why) for p in (os.path.join(dirpath, n) for n in names)
                         if p not in listed]
        paths += index.paths
    return paths, problems


def check_files(paths: Iterable[str], *, workers: int = 1, decode: bool = True,
                progress: bool = False) -> list[Problem]:
    """:func:`check_file` over ``paths`` in ``workers`` processes; a progress bar on stderr."""
    paths = list(paths)
    check = functools.partial(check_file, decode=decode)
    chunk = max(1, min(256, len(paths) // (4 * workers)))
    problems = []
    with (multiprocessing.Pool(workers) if workers > 1 else nullcontext()) as pool, \
            tqdm(total=len(paths), unit="file", disable=not progress, file=sys.stderr) as bar:
        results = pool.imap_unordered(check, paths, chunk) if pool else map(check, paths)
        for problem in results:
            bar.update()
            if problem is not None:
                problems.append(problem)
    return problems


def check_tree(root: str | os.PathLike, *, workers: int = 1, decode: bool = True,
               progress: bool = False) -> list[Problem]:
    """Every problem under an ImageFolder split or dataset root, sorted by path."""
    paths, problems = list_tree(root)
    problems += check_files(paths, workers=workers, decode=decode, progress=progress)
    return sorted(problems, key=lambda p: (p.path, p.kind))


# --- command line --------------------------------------------------------------------------------
def report(problems: list[Problem], images: int) -> str:
    """Human-readable report: one line per problem, then a count per kind with its meaning."""
    lines = [f"{'ERROR' if p.error else 'warning':8} {p.kind:13} {p.path}: {p.detail}" for p in problems]
    errors = sum(p.error for p in problems)
    lines.append(f"checked {images} images: {errors} errors, {len(problems) - errors} warnings")
    for kind, n in sorted(Counter(p.kind for p in problems).items()):
        lines.append(f"  {n:6} {kind}: loaders {KINDS[kind].loaders}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.check", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="an ImageFolder split, or a dataset root holding train/ and val/")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="decoding processes (default: all CPUs)")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.add_argument("--quick", action="store_true", help="read headers only, no full decode")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not args.quick and turbojpeg() is None:
        print("warning: libturbojpeg not found (apt-get install libturbojpeg0): corrupt JPEG scan "
              "data cannot be detected", file=sys.stderr)
    try:
        paths, problems = list_tree(args.root)
    except (OSError, ValueError) as e:  # unlistable, a root given as a split, symlink loops
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems += check_files(paths, workers=args.workers, decode=not args.quick, progress=True)
    problems.sort(key=lambda p: (p.path, p.kind))
    errors = sum(p.error for p in problems)
    if args.json:
        print(json.dumps({"root": str(args.root), "images": len(paths), "errors": errors,
                          "warnings": len(problems) - errors,
                          "problems": [p.to_dict() for p in problems]}, indent=1))
    else:
        print(report(problems, len(paths)))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
