"""pipelines.resize on real JPEG trees written here: sizes, mirrored paths, resume, bad files."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.imagefolder import scan_image_folder
from pipelines.resize import RECORD, main, resize_tree, target_size, temp_name
from tests.imagefiles import (jpeg_bytes, write_cmyk_jpeg, write_corrupt_jpeg,
                              write_grayscale_jpeg, write_png_named_jpeg, write_truncated_jpeg)

REPO = Path(__file__).resolve().parents[1]
SHORT = 32
#: (width, height) of the images: larger and smaller than SHORT, landscape and portrait; the
#: 400 x 300 one is decoded at 1/4 scale (Image.draft) before LANCZOS.
SIZES = ((120, 80), (60, 100), (32, 48), (20, 30), (99, 64), (400, 300))


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random picture (survives JPEG and resizing recognisably)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def write_tree(root: Path) -> dict[str, tuple[int, int]]:
    """``root/{train,val}/<class>/*.JPEG``, one nested folder; returns ``{rel: (w, h)}``."""
    sizes = {}
    for split, n in (("train", 5), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(n):
                w, h = SIZES[(i + c) % len(SIZES)]
                rel = f"{split}/{name}/{'sub/' if i == 4 else ''}img{i}.JPEG"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(jpeg_bytes(photo(w, h, zlib.crc32(rel.encode())), quality=90))
                sizes[rel] = (w, h)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return sizes


def files(root: Path) -> dict[str, float]:
    """Relative path -> mtime of every file under ``root`` (the record excluded)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.name != RECORD}


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command line in its own process (about 5-10 s: importing torch and torchvision)."""
    return subprocess.run([sys.executable, "-m", "pipelines.resize", *args, "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """:func:`pipelines.resize.main` in this process: (exit status, stdout, stderr)."""
    code = main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    src = tmp_path_factory.mktemp("src")
    return src, write_tree(src)


def test_target_size():
    assert target_size(500, 375, 160) == (213, 160)
    assert target_size(375, 500, 160) == (160, 213)
    assert target_size(100, 100, 160) == (100, 100)
    assert target_size(1000, 161, 160) == (994, 160)


def test_sizes_aspect_and_mirrored_paths(tree, tmp_path):
    src, sizes = tree
    dst = tmp_path / "dst"
    result = resize_tree(src, dst, SHORT, workers=2)
    assert result.counts["failed"] == 0 and not result.errors
    for split in ("train", "val"):
        a, b = scan_image_folder(src / split), scan_image_folder(dst / split)
        assert a.classes == b.classes and a.labels == b.labels
        assert [os.path.relpath(p, src) for p in a.paths] == [os.path.relpath(p, dst) for p in b.paths]
    assert not (dst / "train" / "cat" / "notes.txt").exists()      # the loaders skip it too
    resized = copied = 0
    for rel, (w, h) in sizes.items():
        with Image.open(dst / rel) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            if min(w, h) <= SHORT:                                  # small: byte for byte
                assert (dst / rel).read_bytes() == (src / rel).read_bytes()
                copied += 1
            else:
                assert min(img.size) == SHORT
                assert img.size == target_size(w, h, SHORT)
                assert abs(img.width / img.height - w / h) < 0.03
                assert (img.width > img.height) == (w > h)
                original = Image.open(src / rel).convert("RGB").resize(img.size, Image.Resampling.LANCZOS)
                diff = np.abs(np.asarray(img, np.float64) - np.asarray(original, np.float64)).mean()
                assert diff < 4, rel
                resized += 1
    assert result.counts["resized"] == resized and result.counts["copied"] == copied
    record = json.loads((dst / RECORD).read_text())
    assert record["short_side"] == SHORT and record["quality"] == 95


def test_resumable(tree, tmp_path, capsys):
    src, sizes = tree
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--short-side", str(SHORT), "--workers", "1", "--no-progress"]) == 0
    before = files(dst)
    again = resize_tree(src, dst, SHORT, workers=1)                 # second run writes nothing
    assert again.counts["done"] == len(sizes) and again.counts.total() == len(sizes)
    assert files(dst) == before
    # an interrupted run: a stale temp file and a missing output
    victim = dst / "train" / "dog" / "img1.JPEG"
    stale = Path(temp_name(str(victim)))
    victim.unlink()
    stale.write_bytes(b"half a jpeg")
    third = resize_tree(src, dst, SHORT, workers=1)
    assert third.counts["done"] == len(sizes) - 1 and third.counts.total() == len(sizes)
    assert not stale.exists() and victim.is_file()
    assert Image.open(victim).size == target_size(*sizes["train/dog/img1.JPEG"], SHORT)
    assert files(dst).keys() == before.keys()
    # another short side into the same folder is refused
    code, _, err = run_main(capsys, str(src), str(dst), "--short-side", "48")
    assert code == 2 and err.startswith("error:") and "--short-side 32" in err


def test_bad_files_reported_and_converted(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    d = src / "a"
    d.mkdir(parents=True)
    (d / "good.JPEG").write_bytes(jpeg_bytes(photo(80, 60, 1)))
    write_corrupt_jpeg(d / "corrupt.JPEG")
    write_truncated_jpeg(d / "truncated.JPEG")
    cmyk = write_cmyk_jpeg(d / "cmyk.JPEG")
    gray = write_grayscale_jpeg(d / "gray.JPEG")
    png = write_png_named_jpeg(d / "png.JPEG")
    big_cmyk = Image.new("RGB", (100, 70), (30, 160, 90))
    big_cmyk.convert("CMYK").save(d / "big_cmyk.JPEG", quality=95)
    (src / "b").mkdir()              # an empty class: mirrored empty, so no label shifts
    code, out, err = run_main(capsys, str(src), str(dst), "--short-side", "48", "--workers", "2")
    assert code == 1, err
    for name in ("corrupt", "truncated"):
        assert str(d / f"{name}.JPEG") in out
        assert not (dst / "a" / f"{name}.JPEG").exists()
    assert out.count("ERROR") == 3 and f"empty_class   {src / 'b'}" in out
    assert (dst / "b").is_dir() and not any((dst / "b").iterdir())
    after = out.split("not written (2):\n", 1)[1].splitlines()
    listed = [ln.strip() for ln in itertools.takewhile(lambda ln: ln.startswith("  "), after)]
    assert sorted(listed) == sorted(str(d / f"{n}.JPEG") for n in ("corrupt", "truncated"))
    for name, color in (("cmyk", cmyk), ("gray", gray), ("png", png), ("big_cmyk", (30, 160, 90))):
        with Image.open(dst / "a" / f"{name}.JPEG") as img:
            assert img.format == "JPEG" and img.mode == "RGB", name
            assert min(img.size) <= 48
            mean = np.asarray(img, np.float64).reshape(-1, 3).mean(axis=0)
            assert np.abs(mean - color).max() < 6, (name, mean, color)
    assert Image.open(dst / "a" / "big_cmyk.JPEG").size == (69, 48)
    assert ": 2 resized, 0 copied as they were, 3 converted to RGB, 0 already done, 2 not written" in out
    # a rerun reports the bad files again and writes nothing else
    code, out, _ = run_main(capsys, str(src), str(dst), "--short-side", "48")
    assert code == 1 and ": 0 resized, 0 copied as they were, 0 converted to RGB, 5 already done" in out


WHY = {"inside": "lies inside SRC", "small": "--short-side must be >= 16",
       "quality": "--quality must lie in 1..100", "not_resize_dir": "is not empty",
       "no_classes": "has no class sub-folders"}


def test_bad_arguments_command_line(tmp_path):
    """One run of ``python -m pipelines.resize`` itself: exit status 2, one ``error:`` line."""
    proc = cli(str(tmp_path / "nope"), str(tmp_path / "dst"), "--short-side", "160")
    assert proc.returncode == 2
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: SRC {tmp_path / 'nope'} does not exist or is not a directory"], proc.stderr
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("case", ["inside", "small", "quality", "not_resize_dir", "no_classes"])
def test_bad_arguments(tree, tmp_path, capsys, case):
    src, _ = tree
    dst = tmp_path / "dst"
    extra = []
    if case == "inside":
        dst = src / "train" / "resized"
    elif case == "small":
        extra = ["--short-side", "8"]
    elif case == "quality":
        extra = ["--quality", "101"]
    elif case == "not_resize_dir":
        dst.mkdir()
        (dst / "mine.txt").write_text("keep")
    elif case == "no_classes":
        src = tmp_path / "empty"
        src.mkdir()
    code, out, err = run_main(capsys, str(src), str(dst), "--short-side", "160", *extra)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert WHY[case] in lines[0], err
    if case == "not_resize_dir":
        assert sorted(p.name for p in dst.iterdir()) == ["mine.txt"]
    else:
        assert not dst.exists()
