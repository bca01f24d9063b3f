"""The demo dataset: deterministic real JPEGs, ten classes, boxes around the objects, safe writing."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.check import check_tree
from pipelines.demo import (CLASSES, SIZES, SPLITS, demo_image, ensure_demo_dataset, load_boxes, main,
                            write_demo_dataset)
from pipelines.imagefolder import scan_image_folder
from tests.unprivileged import REPO

SMALL = dict(train_per_class=6, val_per_class=2)


def file_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0, **SMALL)


def test_same_seed_writes_byte_identical_files(demo, tmp_path):
    """Writing again with the same seed reproduces every file, boxes included, byte for byte."""
    again = write_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    assert file_bytes(again) == file_bytes(demo)


def test_another_seed_writes_other_images(demo, tmp_path):
    """Another seed gives the same layout but different images and boxes."""
    other = file_bytes(write_demo_dataset(tmp_path / "other", seed=1, **SMALL))
    ours = file_bytes(demo)
    assert other.keys() == ours.keys()
    assert all(other[name] != ours[name] for name in ours if name.endswith(".JPEG"))
    assert other["boxes.json"] != ours["boxes.json"]


def test_splits_are_imagefolder_trees_of_ten_classes(demo):
    """train/ and val/ each list the ten classes with the requested number of images per class."""
    for split, per_class in (("train", 6), ("val", 2)):
        index = scan_image_folder(demo / split)
        assert index.classes == tuple(sorted(CLASSES)) and len(CLASSES) == 10
        assert np.bincount(index.labels).tolist() == [per_class] * 10
    assert sorted(p.name for p in demo.iterdir()) == ["boxes.json", "demo.json", "train", "val"]


def test_every_file_decodes_cleanly_in_several_sizes(demo):
    """The dataset check finds no problem; images are RGB JPEGs of several sizes and aspect ratios."""
    assert check_tree(demo) == []
    sizes = set()
    for split in SPLITS:
        for path in scan_image_folder(demo / split).paths:
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size in SIZES
                sizes.add(img.size)
    assert len(sizes) >= 4 and {w > h for w, h in sizes} == {True, False}


def test_every_image_has_a_box_inside_it(demo):
    """boxes.json has one box per image, 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height."""
    boxes = load_boxes(demo)
    paths = [p for split in SPLITS for p in scan_image_folder(demo / split).paths]
    assert sorted(boxes) == sorted(os.path.relpath(p, demo) for p in paths)
    for rel, (x0, y0, x1, y1) in boxes.items():
        with Image.open(demo / rel) as img:
            width, height = img.size
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert min(x1 - x0, y1 - y0) >= 0.2 * min(width, height), rel


def block_means(pixels):
    """Mean colour of each 8 x 8 block: JPEG's error averages out, the picture does not."""
    h, w = pixels.shape[0] // 8, pixels.shape[1] // 8
    return pixels[:8 * h, :8 * w].reshape(h, 8, w, 8, 3).mean(axis=(1, 3))


def test_files_are_the_drawn_images_with_their_boxes(demo):
    """Each JPEG decodes to the image drawn for its (seed, split, class, index), within JPEG
    error, and boxes.json holds that drawing's box."""
    boxes = load_boxes(demo)
    for split in SPLITS:
        for path, label in scan_image_folder(demo / split).samples:
            pixels, box = demo_image(0, split, label, int(os.path.basename(path)[:-5]))
            decoded = np.asarray(Image.open(path).convert("RGB"))
            assert np.abs(block_means(decoded) - block_means(pixels)).mean() < 2
            assert list(boxes[os.path.relpath(path, demo)]) == box


@pytest.mark.parametrize("label", range(len(CLASSES)))
def test_drawn_object_fills_its_box_tightly(label):
    """Before JPEG, the object is one colour (two if striped) plus grey grain, so its pixels share
    exact channel differences (R-G, G-B): those pixels lie in the box and touch its four edges."""
    colours = 2 if CLASSES[label].endswith("striped") else 1
    for index in range(6):
        pixels, (x0, y0, x1, y1) = demo_image(0, "train", label, index)
        signed = pixels.astype(int)
        diffs = (signed[..., 0] - signed[..., 1]) * 1024 + signed[..., 1] - signed[..., 2]
        values, counts = np.unique(diffs[y0:y1, x0:x1], return_counts=True)
        ys, xs = np.nonzero(np.isin(diffs, values[np.argsort(counts)[-colours:]]))
        in_box = (x0 <= xs) & (xs < x1) & (y0 <= ys) & (ys < y1)
        assert in_box.mean() > 0.97
        assert (xs[in_box].min(), ys[in_box].min(), xs[in_box].max() + 1, ys[in_box].max() + 1) == (x0, y0, x1, y1)
        assert in_box.sum() > 0.25 * (x1 - x0) * (y1 - y0)


def test_ensure_is_idempotent_and_repairs_an_incomplete_dataset(tmp_path):
    """A second call leaves the files untouched; after losing an image or the boxes the dataset
    is rewritten whole; other parameters rewrite it; leftovers of an interrupted run are ignored."""
    root = tmp_path / "demo"
    (tmp_path / ".demo.tmp-99999").mkdir()                       # an interrupted run's leftover
    assert ensure_demo_dataset(root, **SMALL) == root
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    ensure_demo_dataset(root, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    reference = file_bytes(root)
    for lost in (root / "val" / CLASSES[3] / "00001.JPEG", root / "boxes.json"):
        lost.unlink()
        ensure_demo_dataset(root, **SMALL)
        assert file_bytes(root) == reference
    ensure_demo_dataset(root, seed=5, **SMALL)
    assert file_bytes(root).keys() == reference.keys() and file_bytes(root) != reference
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.tmp-99999", "demo"]


def test_ensure_refuses_a_folder_that_is_not_a_demo_dataset(tmp_path):
    """A non-empty folder without the demo manifest is never overwritten."""
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=f"{tmp_path} exists and is not a demo dataset"):
        ensure_demo_dataset(tmp_path, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    with pytest.raises(FileNotFoundError, match="is not a demo dataset"):
        load_boxes(tmp_path)
    with pytest.raises(ValueError, match="images per class must be positive"):
        write_demo_dataset(tmp_path / "new", train_per_class=0)


def test_killed_writer_leaves_no_dataset(tmp_path):
    """`python -m pipelines.demo` killed mid-way leaves no ROOT (only its temporary folder),
    and the next ensure_demo_dataset writes a complete one."""
    root = tmp_path / "demo"
    writer = subprocess.Popen([sys.executable, "-m", "pipelines.demo", str(root)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".demo.tmp-{writer.pid}"
    deadline = time.monotonic() + 120
    while not (tmp / "train" / CLASSES[1]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert tmp.exists() and not root.exists()
    ensure_demo_dataset(root, **SMALL)
    assert len(load_boxes(root)) == 10 * 8 and check_tree(root) == []


def test_command_line_writes_the_dataset(tmp_path, capsys):
    """`python -m pipelines.demo ROOT --seed --train-per-class --val-per-class` writes and prints ROOT."""
    main([str(tmp_path / "d"), "--seed", "3", "--train-per-class", "2", "--val-per-class", "1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "d")
    assert len(scan_image_folder(tmp_path / "d" / "train")) == 20
    assert len(scan_image_folder(tmp_path / "d" / "val")) == 10
