"""The training crop's minimum area scale (``min_scale`` of the schedule) follows ``set_epoch``
in every backend: folder (DataLoader workers), DALI (both readers, CPU) and FFCV, on real JPEGs.

Each image is a square ramp, red growing with x and green with y, so the extent of red and
green in an output tells how much of the image its crop covered. With ``min_scale=1`` a crop
must cover the whole square image (its area is the image's, so only aspect ratio 1 fits; every
backend falls back to the whole image); at the default 0.08 many crops cover far less.
``SCHEDULE`` switches from the one to the other at epoch 1, within one loader.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import OutputSpec, Phase, Phases
from pipelines.dali import READERS, DaliLoader
from pipelines.ffcv import FfcvLoader, write_beton
from pipelines.folder import FolderLoader, random_resized_crop_box
from tests.imagefiles import MEAN_255, STD_255, jpeg_bytes

SIDE, RES, IMAGES, BATCH = 96, 32, 16, 4
SCHEDULE = Phases((Phase(0, RES), Phase(1, RES, min_scale=1.0)))
CPU = OutputSpec(device="cpu")
COMMON = dict(train=True, batch_size=BATCH, resolution=SCHEDULE, output=CPU, seed=3)


@pytest.fixture(scope="module")
def ramps(tmp_path_factory) -> tuple[Path, Path]:
    """16 square ramp JPEGs (96 x 96) in two classes, and their .beton (stored raw), written
    before any loader of this module starts threads (FFCV's writer forks processes)."""
    root = tmp_path_factory.mktemp("ramps") / "split"
    ramp = np.broadcast_to(np.linspace(0, 255, SIDE), (SIDE, SIDE))
    rgb = np.stack([ramp, ramp.T, np.full_like(ramp, 128)], axis=-1).astype(np.uint8)
    for k in range(IMAGES):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{k % 2}" / f"img{k:02d}.JPEG").write_bytes(jpeg_bytes(Image.fromarray(rgb)))
    beton = write_beton(root, root.parent / "ramps.beton", max_resolution=SIDE, write_mode="raw",
                        num_workers=1, progress=False)
    return root, beton


def crop_areas(images: torch.Tensor) -> np.ndarray:
    """Share of its image each output's crop covers: red's extent across the columns times
    green's across the rows, in units of the whole ramp."""
    pixels = images.float().numpy() * STD_255[:, None, None] + MEAN_255[:, None, None]
    red, green = pixels[:, 0].mean(axis=1), pixels[:, 1].mean(axis=2)
    extent = lambda v: (v.max(axis=1) - v.min(axis=1)) / 255
    return extent(red) * extent(green)


def run_epoch(loader, epoch: int, start_batch: int = 0) -> torch.Tensor:
    """The epoch's images from batch ``start_batch`` on, copied out of the loader's buffers."""
    loader.set_epoch(epoch, start_batch)
    return torch.cat([images.clone() for images, _ in loader])


def check_scale_follows_the_schedule(loader, built: Callable | None = None,
                                     resume: bool = True) -> None:
    """Epoch 0 (default scale): crops of 8 % of the image or more, several under half of it;
    epochs 1 and 2 (min_scale 1): every crop the whole image; epoch 1 resumed at its batch 2
    (``resume``): the whole image too, bitwise the uninterrupted batches where the loader
    resumes exactly. ``built(loader)``: the compiled pipeline, new at epoch 1 and kept for 2."""
    pipelines, images = [], {}
    for epoch in (0, 1, 2):
        images[epoch] = run_epoch(loader, epoch)
        pipelines.append(built and built(loader))
    small, whole = crop_areas(images[0]), crop_areas(torch.cat([images[1], images[2]]))
    assert small.min() > 0.06 and (small < 0.5).sum() >= 3, small
    assert whole.min() > 0.85, whole
    if built:
        assert pipelines[0] is not pipelines[1] and pipelines[1] is pipelines[2]
    if resume:
        resumed = run_epoch(loader, 1, start_batch=2)
        areas = crop_areas(resumed)
        assert len(resumed) == IMAGES - 2 * BATCH and areas.min() > 0.85, areas
        if loader.resumes_exactly:
            assert torch.equal(resumed, images[1][2 * BATCH:])


def test_square_ramp_premise_a_crop_at_scale_one_is_the_whole_image():
    """What the loader tests rest on: at area scale 1 no random draw fits a square image but
    aspect ratio 1, so every box is the fallback, the whole image."""
    rng = np.random.default_rng(0)
    assert {random_resized_crop_box(SIDE, SIDE, rng, (1.0, 1.0)) for _ in range(50)} == {
        (0, 0, SIDE, SIDE)}


def test_folder_workers_get_each_epochs_crop_scale(ramps):
    """FolderLoader with a worker, which decodes epoch 1's first batches (keyed with their
    scale) while epoch 0 is being used."""
    check_scale_follows_the_schedule(FolderLoader(ramps[0], num_workers=1, **COMMON))


@pytest.mark.parametrize("reader", READERS)
def test_dali_rebuilds_its_pipeline_at_a_crop_scale_change(ramps, reader):
    """DALI fixes the crop's area range at the build: both readers build a new pipeline at
    epoch 1 (no batch prefetched at epoch 0's scale leaks into it) and keep it at epoch 2."""
    loader = DaliLoader(ramps[0], num_workers=1, reader=reader, **COMMON)
    built = (lambda x: x._reader.pipe) if reader == "feed" else (lambda x: x._reader.stream.pipe)
    check_scale_follows_the_schedule(loader, built, resume=reader == "feed")


def test_ffcv_rebuilds_its_loader_at_a_crop_scale_change(ramps):
    """The seeded FFCV decoder compiles the scale in: a new FFCV loader at epoch 1, kept at
    epoch 2; the resumed batches are bitwise those of the uninterrupted epoch."""
    loader = FfcvLoader(ramps[1], num_workers=1, **COMMON)
    check_scale_follows_the_schedule(loader, lambda x: x._loader)
