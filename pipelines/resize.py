"""A resized copy of an ImageFolder tree: every image's shorter side brought down to N pixels.

    python -m pipelines.resize SRC DST --short-side 160 [--quality 95] [--workers N]

The fast ImageNet protocol (PuzzleMix's ``imagenet_fast``, the Saliency Grafting paper's
setting) trains its first phase on a copy of ImageNet resized to a 160 px shorter side and the
later phases on a 352 px copy: decoding a small JPEG is several times cheaper than a full one.

**What is copied.** ``SRC`` is a dataset root holding ``train/`` and ``val/`` or one class-folder
tree; the images are exactly those the loaders and the dataset check read (the
:func:`pipelines.check.list_tree` listing, i.e. :func:`~pipelines.imagefolder.scan_image_folder`
per split), written to the same relative paths under ``DST``. Every class folder is created in
``DST``, even one whose files all fail, so a class index means the same class in both trees (an
empty folder makes the loaders stop, where a missing one would shift the labels). Files the
loaders never read are not copied (listed as ``skipped``).

**Each image.** Classified first by the dataset check (:func:`pipelines.check.check_file`, a
full strict decode), so the same files count as bad:

* an *error* (unreadable, empty, non-image, truncated, corrupt, corrupt scan data, more than 8
  bits per channel) is listed by path at the end and not written; the exit status is then 1;
* a file whose shorter side is already <= N and that the loaders read as it is (RGB or palette
  data under the name of its format; junk after a JPEG's end is tolerated) is copied byte for
  byte: re-encoding would only lose quality;
* everything else is decoded, converted to RGB (CMYK, grayscale, PNG data under a ``.JPEG``
  name), resized if larger, and encoded in the format its *name* says: JPEG at ``--quality``
  (default 95, 4:2:0 chroma) for ``.jpg``/``.jpeg``, lossless for PNG/BMP/TIFF/PPM, WebP at
  ``--quality``. Metadata (EXIF, ICC profiles) is not written.

**Resizing.** Aspect ratio kept: the shorter side becomes N, the longer side
``round(long * N / short)``. JPEGs are decoded with libjpeg's DCT scaling (``Image.draft``) to
the smallest scale of 1/1, 1/2, 1/4, 1/8 that is still at least twice the target, then
resampled with LANCZOS; that is ``Image.thumbnail``'s ``reducing_gap=2.0`` scheme. Measured
when this was written (a photo, one core, to 160 px): a 1000 x 750 JPEG takes 7.7 ms against
26.4 ms for LANCZOS on the full decode, at 51 dB PSNR from that; a 500 x 375 one (ImageNet's
typical size) is fully decoded (7.2 ms), since decoding it at 1/2 scale, twice as fast, blurs
it visibly (32 dB). Other formats are resampled with LANCZOS from the full image.

**EXIF orientation is ignored**, as the loaders ignore it (PIL's ``convert("RGB")`` in
:func:`pipelines.folder.load_pil_rgb`, DALI and FFCV decode the stored pixels): a resized
image has the stored pixel orientation of its source, and since no EXIF is written, every
reader sees the same picture as the loaders did from the source.

**Resumable and atomic.** Each file is written to a temporary name in its own folder
(``.NAME.resize-tmp``) and renamed into place, so a file under its final name is complete. A
rerun skips every file whose final name exists, without reading it, and first removes the
temporary files an interrupted run left. ``DST/.salmix-resize.json`` records ``--short-side``
and ``--quality``; a rerun with other values is refused (they would mix two sizes in one tree),
as is a non-empty ``DST`` without that record. One run writes a ``DST`` at a time (a lock on
the folder). The record is a hidden file at ``DST``'s top: in a ``train/``+``val/`` tree the
loaders never see it; at the top of a single class-folder tree the check lists it as
``skipped``.

Exit status: 0 when every image was written, 1 when some were not (listed), 2 for bad arguments
or a tree that cannot be listed (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .check import JPEG_FORMATS, Problem, check_file, list_tree, report, split_dirs

MIN_SHORT_SIDE = 16
DEFAULT_QUALITY = 95
RECORD = ".salmix-resize.json"
TMP_SUFFIX = ".resize-tmp"
VERSION = 1
#: Check findings that the copy fixes by re-encoding (the loaders convert these on the fly).
CONVERTED = {"wrong_format", "cmyk", "grayscale"}
#: ``Image.draft`` leaves at least this factor for the LANCZOS resampling (thumbnail's scheme).
REDUCING_GAP = 2.0


class ResizeError(ValueError):
    """Arguments or a destination that a resize cannot proceed with; the message says why."""


@dataclass
class ResizeResult:
    """What one run did: ``counts`` per action (resized, copied, reencoded, done, failed) and
    the problems found (the check's findings: errors were not written, warnings converted)."""

    counts: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    orphans: int = 0
    """Files in DST that match no source image (left as they are)."""

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.error]


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """``(width, height)`` with the shorter side ``short_side`` (never enlarged), aspect kept."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    scale = short_side / short
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


def output_format(path: str) -> str:
    """The PIL format a file's name says (``.JPEG`` -> JPEG, ``.png`` -> PNG, ...)."""
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"no image format for the extension {ext!r}")
    return fmt


def temp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}{TMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def resize_file(src: str, dst: str, short_side: int,
                quality: int = DEFAULT_QUALITY) -> tuple[str, Problem | None]:
    """Write ``src`` resized to ``dst`` (atomically); return ``(action, finding)``.

    ``action``: ``"resized"``, ``"copied"`` (byte for byte), ``"reencoded"`` (small enough but
    converted to RGB) or ``"failed"`` (nothing written); ``finding``: the check's
    :class:`~pipelines.check.Problem` for the source, or None for a clean file. A source that
    fails to decode is a finding; a failure to write ``dst`` (a full disk) raises.
    """
    problem = check_file(src)
    if problem is not None and problem.error:
        return "failed", problem
    fmt = output_format(dst)
    try:
        with Image.open(src) as img:
            size = target_size(*img.size, short_side)
            rgb = None
            if size != img.size or (problem is not None and problem.kind in CONVERTED):
                if size != img.size and img.format in JPEG_FORMATS:
                    img.draft(img.mode, (int(size[0] * REDUCING_GAP), int(size[1] * REDUCING_GAP)))
                rgb = img.convert("RGB")
                if rgb.size != size:
                    rgb = rgb.resize(size, Image.Resampling.LANCZOS)
                action = "resized" if size != img.size else "reencoded"
    except Exception as e:  # the check passed it, yet it does not decode
        return "failed", Problem(src, "corrupt", f"{type(e).__name__}: {e}")
    tmp = temp_name(dst)
    try:
        if rgb is None:
            shutil.copyfile(src, tmp)
            action = "copied"
        else:
            rgb.save(tmp, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
        os.replace(tmp, dst)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return action, problem


def _resize_task(task: tuple[str, str, int, int]) -> tuple[str, Problem | None]:
    return resize_file(*task)


# --- the tree ------------------------------------------------------------------------------------
def check_arguments(src: Path, dst: Path, short_side: int, quality: int, workers: int) -> None:
    """Raise :class:`ResizeError` for arguments no run can use."""
    if not src.is_dir():
        raise ResizeError(f"SRC {src} does not exist or is not a directory")
    if short_side < MIN_SHORT_SIDE:
        raise ResizeError(f"--short-side must be >= {MIN_SHORT_SIDE}, got {short_side}")
    if not 1 <= quality <= 100:
        raise ResizeError(f"--quality must lie in 1..100, got {quality}")
    if workers < 1:
        raise ResizeError(f"--workers must be >= 1, got {workers}")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents:
        raise ResizeError(f"DST {dst} lies inside SRC {src}: the copy would be read as part of "
                          f"the source; choose a folder outside it")
    if real_dst in real_src.parents:
        raise ResizeError(f"DST {dst} contains SRC {src}; choose a folder outside it")
    if dst.exists() and not dst.is_dir():
        raise ResizeError(f"DST {dst} exists and is not a directory")


def _claim_destination(dst: Path, short_side: int, quality: int) -> None:
    """Create ``dst`` with its record, or check that an existing one was written alike."""
    record = {"tool": "pipelines.resize", "version": VERSION, "short_side": short_side,
              "quality": quality}
    path = dst / RECORD
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ResizeError(f"{path} cannot be read ({e}); remove it only if every file in "
                              f"{dst} was written with --short-side {short_side}") from None
        for key in ("short_side", "quality"):
            if old.get(key) != record[key]:
                option = "--" + key.replace("_", "-")
                raise ResizeError(f"DST {dst} was written with {option} {old.get(key)}, not "
                                  f"{record[key]}; rerun with {option} {old.get(key)} to "
                                  f"complete it, or choose another DST")
        return
    if any(dst.iterdir()):
        raise ResizeError(f"DST {dst} is not empty and was not written by pipelines.resize "
                          f"(no {RECORD}); choose a new or empty folder")
    tmp = dst / (RECORD + TMP_SUFFIX)
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def _lock(dst: Path) -> int:
    """An exclusive lock on the folder ``dst`` (held until the descriptor is closed)."""
    fd = os.open(dst, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ResizeError(f"another pipelines.resize run is writing {dst}; wait for it") from None
    return fd


def _scan_destination(dst: Path) -> tuple[set[str], int]:
    """The files under ``dst`` (relative paths) and how many stale temporary files were removed."""
    existing, removed = set(), 0
    for dirpath, _, names in os.walk(dst):
        rel_dir = os.path.relpath(dirpath, dst)
        for name in names:
            if is_temp_name(name):
                os.unlink(os.path.join(dirpath, name))
                removed += 1
            else:
                existing.add(os.path.normpath(os.path.join(rel_dir, name)))
    return existing, removed


def _class_dirs(src: Path, paths: list[str], problems: list[Problem]) -> set[str]:
    """Every class folder of every split, relative to ``src`` (empty ones included)."""
    dirs = {os.path.relpath(p.path, src) for p in problems if p.kind == "empty_class"}
    for split in split_dirs(src):
        prefix = str(split) + os.sep
        dirs.update(os.path.relpath(os.path.join(split, p[len(prefix):].split(os.sep, 1)[0]), src)
                    for p in paths if p.startswith(prefix))
    return dirs


def resize_tree(src: str | os.PathLike, dst: str | os.PathLike, short_side: int, *,
                quality: int = DEFAULT_QUALITY, workers: int | None = None,
                progress: bool = False, log=None) -> ResizeResult:
    """Write the resized copy of ``src`` into ``dst`` (see the module docstring).

    Raises :class:`ResizeError` for bad arguments or destinations, and the listing's own
    errors (OSError, ValueError naming the folder) for a source that cannot be listed.
    """
    src, dst = Path(src), Path(dst)
    workers = workers or os.cpu_count() or 1
    check_arguments(src, dst, short_side, quality, workers)
    paths, problems = list_tree(src)
    dst.mkdir(parents=True, exist_ok=True)
    fd = _lock(dst)
    try:
        _claim_destination(dst, short_side, quality)
        existing, stale = _scan_destination(dst)
        if stale and log:
            log(f"removed {stale} temporary file(s) of an interrupted run")
        for rel in _class_dirs(src, paths, problems):
            (dst / rel).mkdir(parents=True, exist_ok=True)
        result = ResizeResult(problems=list(problems))
        wanted = {os.path.normpath(os.path.relpath(p, src)): p for p in paths}
        result.orphans = len(existing - set(wanted) - {RECORD})
        tasks = []
        for rel, path in wanted.items():
            if rel in existing:
                result.counts["done"] += 1
            else:
                out = dst / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                tasks.append((path, str(out), short_side, quality))
        chunk = max(1, min(64, len(tasks) // (4 * workers)))
        pool = multiprocessing.Pool(workers) if workers > 1 and len(tasks) > 1 else None
        with (pool or nullcontext()), tqdm(total=len(tasks), unit="img", disable=not progress,
                                           file=sys.stderr, desc="resize") as bar:
            done = pool.imap_unordered(_resize_task, tasks, chunk) if pool else map(_resize_task, tasks)
            for action, problem in done:
                result.counts[action] += 1
                if problem is not None:
                    result.problems.append(problem)
                bar.update()
    finally:
        os.close(fd)
    result.problems.sort(key=lambda p: (p.path, p.kind))
    return result


def summary(result: ResizeResult, dst: Path) -> str:
    c = result.counts
    lines = [f"{dst}: {c['resized']} resized, {c['copied']} copied as they were, "
             f"{c['reencoded']} converted to RGB, {c['done']} already done, {c['failed']} not written"]
    if result.orphans:
        lines.append(f"note: {result.orphans} file(s) in {dst} match no source image (left as they are)")
    failed = [p for p in result.problems if p.error and p.kind not in ("empty_class",)]
    if failed:
        lines.append(f"not written ({len(failed)}):")
        lines += [f"  {p.path}" for p in failed]
    empty = [p for p in result.problems if p.kind == "empty_class"]
    if empty:
        lines.append(f"empty class folders ({len(empty)}), mirrored empty: the loaders refuse them")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.resize", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="an ImageFolder root holding train/ and val/, or one class-folder tree")
    parser.add_argument("dst", help="where the resized copy goes (new, empty, or an earlier run's)")
    parser.add_argument("--short-side", type=int, required=True,
                        help="the shorter side of the copies in pixels (the fast protocol: 160, 352)")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help=f"JPEG/WebP quality (default {DEFAULT_QUALITY}; 90 or more keeps "
                             "artefacts below what training notices)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (default: all CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    dst = Path(args.dst)
    try:
        result = resize_tree(args.src, dst, args.short_side, quality=args.quality,
                             workers=args.workers, progress=not args.no_progress,
                             log=lambda msg: print(msg, file=sys.stderr))
    except (OSError, ValueError) as e:  # ResizeError, an unlistable tree, a root given as a split
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.problems:
        print(report(result.problems, result.counts.total() - result.counts["done"]))
    print(summary(result, dst))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
