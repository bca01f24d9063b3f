"""The embedded demo dataset: ten classes of objects on textured backgrounds, as real JPEGs.

    python -m pipelines.demo [ROOT] [--seed S] [--train-per-class N] [--val-per-class M]

``ROOT/train/<class>/*.JPEG`` and ``ROOT/val/<class>/*.JPEG`` are plain ImageFolder trees that
a small CNN learns in minutes on a CPU. A class is an object: a shape (cross, disc, ring,
square, triangle) with a colour pattern (plain or striped). Colours, position, size and
rotation of the object, the image size and the background texture are all random and
independent of the class, so neither colour nor background gives the class away; the
background may carry stripes of its own. ``ROOT/boxes.json`` maps the relative path of every
image to the object's bounding box ``[x0, y0, x1, y1]`` in pixels (x1, y1 exclusive), to check
saliency maps and mixing against.

Every image is drawn from its own generator, seeded with (seed, split, class, index): the same
seed writes byte-identical files.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("cross", "disc", "ring", "square", "triangle")
PATTERNS = ("plain", "striped")
CLASSES = tuple(f"{shape}_{pattern}" for shape in SHAPES for pattern in PATTERNS)
#: (width, height) of the images: a few sizes and aspect ratios, 96 to 128 pixels.
SIZES = ((128, 96), (96, 128), (112, 112), (128, 112), (104, 120), (120, 104))
SPLITS = ("train", "val")
BOXES, MANIFEST = "boxes.json", "demo.json"
VERSION = 1
JPEG_QUALITY = 90


@functools.cache
def _pixel_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a ``width`` x ``height`` image, float32."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return yy, xx


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth, muted random colour blobs, and on half the images stripes: float32 H x W x 3."""
    grid = rng.integers(40, 216, (rng.integers(2, 6), rng.integers(2, 6), 3), dtype=np.uint8)
    bg = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR), np.float32)
    if rng.random() < 0.5:
        yy, xx = _pixel_grid(width, height)
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        bg += rng.uniform(10, 25) * np.sign(np.sin(2 * np.pi * phase))[..., None]
    return bg


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside ``shape`` given object coordinates (unit radius, centred)."""
    if shape == "disc":
        return u * u + v * v <= 1
    if shape == "ring":
        return (u * u + v * v <= 1) & (u * u + v * v >= 0.3)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.75
    if shape == "triangle":
        return (v <= 0.5) & (np.sqrt(3) * abs(u) - v <= 1)
    if shape == "cross":
        return ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95))
    raise ValueError(f"unknown shape {shape!r}")


def _distinct_color(rng: np.random.Generator, avoid: np.ndarray, min_distance: float = 120) -> np.ndarray:
    """A random colour at least ``min_distance`` (RGB) from ``avoid`` (the farthest of 16 if none is)."""
    candidates = rng.uniform(16, 240, (16, 3)).astype(np.float32)    # grain never clips
    distance = np.linalg.norm(candidates - avoid, axis=1)
    far = np.flatnonzero(distance >= min_distance)
    return candidates[far[0] if far.size else distance.argmax()]


def draw_image(rng: np.random.Generator, label: int) -> tuple[np.ndarray, list[int]]:
    """One image of class ``label``: (H x W x 3 uint8 array, object box [x0, y0, x1, y1])."""
    shape, pattern = CLASSES[label].split("_")
    width, height = SIZES[rng.integers(len(SIZES))]
    image = _background(rng, width, height)
    radius = rng.uniform(0.28, 0.45) * min(width, height)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    x0, y0 = int(cx - radius), int(cy - radius)
    window = (slice(y0, int(cy + radius) + 1), slice(x0, int(cx + radius) + 1))
    yy, xx = _pixel_grid(width, height)
    dx, dy = (xx[window] - cx) / radius, (yy[window] - cy) / radius
    turn = rng.uniform(0, 2 * np.pi)
    u, v = dx * np.cos(turn) + dy * np.sin(turn), dy * np.cos(turn) - dx * np.sin(turn)
    mask = _shape_mask(shape, u, v)
    region = image[window]
    color = _distinct_color(rng, region.mean(axis=(0, 1)))
    if pattern == "striped":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.35, 0.55)
        stripes = np.sin(2 * np.pi * (u * np.cos(angle) + v * np.sin(angle)) / period) > 0
        region[mask & stripes] = color
        region[mask & ~stripes] = _distinct_color(rng, color)
    else:
        region[mask] = color
    image += rng.integers(-12, 13, (height, width, 1), dtype=np.int8)
    ys, xs = np.nonzero(mask)
    box = [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]
    return image.clip(0, 255).astype(np.uint8), box


def demo_image(seed: int, split: str, label: int, index: int) -> tuple[np.ndarray, list[int]]:
    """Image ``index`` of class ``label`` in ``split`` (pixels, box), drawn from its own seed."""
    return draw_image(np.random.default_rng([seed, SPLITS.index(split), label, index]), label)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_demo_dataset(root: str | os.PathLike, *, seed: int = 0, train_per_class: int = 300,
                       val_per_class: int = 50) -> Path:
    """Write the dataset into ``root`` (which must not exist or be empty); return ``root``."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the demo dataset needs a new folder")
    counts = {"train": train_per_class, "val": val_per_class}
    for n in counts.values():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"images per class must be positive ints, got {counts}")
    boxes = {}
    for split in SPLITS:
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(counts[split]):
                pixels, box = demo_image(seed, split, label, i)
                rel = f"{split}/{name}/{i:05d}.JPEG"
                (root / rel).write_bytes(_jpeg(pixels))
                boxes[rel] = box
    (root / BOXES).write_text(json.dumps(boxes, sort_keys=True))
    (root / MANIFEST).write_text(json.dumps(_manifest(seed, train_per_class, val_per_class), sort_keys=True))
    return root


def _manifest(seed: int, train_per_class: int, val_per_class: int) -> dict:
    """What ``demo.json`` records: the parameters that determine every file."""
    return {"version": VERSION, "seed": seed, "train_per_class": train_per_class,
            "val_per_class": val_per_class}


def _is_complete(root: Path, manifest: dict) -> bool:
    """Whether ``root`` holds the dataset ``manifest`` describes, every image included."""
    try:
        if json.loads((root / MANIFEST).read_text()) != manifest:
            return False
        boxes = load_boxes(root)
    except (OSError, ValueError):
        return False
    expected = len(CLASSES) * (manifest["train_per_class"] + manifest["val_per_class"])
    images = sum(1 for split in SPLITS for _ in (root / split).glob("*/*.JPEG"))
    return images == len(boxes) == expected


def ensure_demo_dataset(root: str | os.PathLike, *, seed: int = 0, train_per_class: int = 300,
                        val_per_class: int = 50) -> Path:
    """``root`` holding the demo dataset: written only if missing or incomplete.

    Written into a temporary sibling folder and renamed into place, so a killed run never
    leaves half a dataset. A non-empty ``root`` that is not a demo dataset is never touched.
    """
    root = Path(root)
    manifest = _manifest(seed, train_per_class, val_per_class)
    if _is_complete(root, manifest):
        return root
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise FileExistsError(f"{root} exists and is not a demo dataset; remove it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_demo_dataset(tmp, seed=seed, train_per_class=train_per_class, val_per_class=val_per_class)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        root.rename(old)
    try:
        tmp.rename(root)
    except OSError:                           # another process put a dataset there first
        shutil.rmtree(tmp)
        if not _is_complete(root, manifest):
            raise
    shutil.rmtree(old, ignore_errors=True)
    return root


def load_boxes(root: str | os.PathLike) -> dict[str, tuple[int, int, int, int]]:
    """``{"train/<class>/<file>": (x0, y0, x1, y1)}`` for every image of the demo dataset."""
    path = Path(root) / BOXES
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a demo dataset")
    return {rel: tuple(box) for rel, box in json.loads(path.read_text()).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default="data/demo", help="where to write it (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=50)
    args = parser.parse_args(argv)
    print(ensure_demo_dataset(args.root, seed=args.seed, train_per_class=args.train_per_class,
                              val_per_class=args.val_per_class))


if __name__ == "__main__":
    main()
