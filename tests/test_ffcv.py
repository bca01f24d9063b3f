"""write_beton / ensure_beton / FfcvLoader on real FFCV (CPU) over real JPEG trees written here.

Coded images (``tests/imagefiles.py``) tell which file every delivered image came from, so the
tests check label alignment, shard coverage, duplicates and order from the pixels themselves.
Every ``FfcvLoader`` costs seconds of numba JIT on its first batch: loaders are few and shared.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from ffcv.fields import IntField
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader as RawFfcvLoader
from ffcv.memory_managers.process_cache.schedule import compute_schedule
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from ffcv.writer import DatasetWriter
from PIL import Image

from pipelines import OutputSpec, Phase, Phases, Shard, make_loader
from pipelines.base import IMAGENET_MEAN_255, IMAGENET_STD_255, val_resize
from pipelines.ffcv import (FfcvLoader, SeededRandomResizedCropFlip, ShardedRandom,
                            UndecodableImageError, ensure_beton, load_rgb_array, write_beton)
from pipelines.ffcv_order import WINDOW_PAGES, quasi_random_order, sample_pages
from pipelines.imagefolder import scan_image_folder
from tests.imagefiles import (BAD_FILE_WRITERS, DECODABLE, add_bad_file, decode_batch,
                              expected_rgb, make_unreadable, write_coded_tree)
from tests.unprivileged import public_dir, run_unprivileged

REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS = 4, 12
N = CLASSES * PER_CLASS
CPU = OutputSpec(device="cpu")
TEXTURED = 15  # images in the textured split, one class each


def write(folder, path, **kw) -> Path:
    return write_beton(folder, path, **{"max_resolution": 64, "num_workers": 2, "progress": False, **kw})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coded") / "split"
    write_coded_tree(root, classes=CLASSES, per_class=PER_CLASS)
    return root


@pytest.fixture(scope="module")
def beton(tree) -> Path:
    """The coded split, some images stored as JPEG and some raw, the larger ones downscaled."""
    return write(tree, tree.parent / "coded.beton")


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> Path:
    """Smooth random colour fields (64 x 48), stored raw: crops and flips show in the pixels."""
    root = tmp_path_factory.mktemp("textured") / "split"
    rng = np.random.default_rng(0)
    for k in range(TEXTURED):
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        (root / f"t{k:02d}").mkdir(parents=True)
        Image.fromarray(field).resize((64, 48), Image.BICUBIC).save(root / f"t{k:02d}" / "a.png")
    return write(root, root.parent / "textured.beton", write_mode="raw")


@pytest.fixture(scope="module")
def label_of() -> np.ndarray:
    """Class of each dataset index, in ImageFolder order."""
    return np.repeat(np.arange(CLASSES), PER_CLASS)


def loader(path, *, train=False, batch_size=5, resolution=32, output=CPU, num_workers=1, **kw):
    return FfcvLoader(path, train=train, batch_size=batch_size, resolution=resolution,
                      output=output, num_workers=num_workers, **kw)


def run_epoch(loader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's batches, copied out of FFCV's reused buffers."""
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def decoded(batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels delivered, labels decoded from pixels, indices decoded from pixels), flattened."""
    pairs = [decode_batch(x) for x, _ in batches]
    return (np.concatenate([y.numpy() for _, y in batches]),
            np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))


def check_aligned(batches, label_of) -> np.ndarray:
    """Assert every delivered label is its image's class; return the dataset indices."""
    labels, pixel_labels, indices = decoded(batches)
    np.testing.assert_array_equal(labels, pixel_labels)
    np.testing.assert_array_equal(labels, label_of[indices])
    return indices


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised batch -> N x H x W x 3 pixel values (floats, 0-255)."""
    x = images.float().permute(0, 2, 3, 1).numpy()
    return x * np.array(IMAGENET_STD_255) + np.array(IMAGENET_MEAN_255)


# --- writing ----------------------------------------------------------------------------------

def test_beton_holds_the_shared_listing_with_labels_in_imagefolder_order(tree, beton):
    """Labels are scan_image_folder's, in its order; images are stored both raw and as JPEG
    (write_mode='proportion'), no side above max_resolution."""
    reader = Reader(str(beton))
    index = scan_image_folder(tree)
    assert reader.num_samples == len(index) == N
    np.testing.assert_array_equal(reader.metadata["f1"], index.labels)
    images = reader.metadata["f0"]
    assert set(images["mode"]) == {0, 1}  # jpg and raw
    assert max(images["width"].max(), images["height"].max()) == 64  # 96 x 68 was downscaled


def test_ensure_beton_writes_only_when_the_file_is_missing(tree, beton, tmp_path):
    """An existing file is returned untouched (its folder is not even read); a missing one is
    written."""
    before = beton.stat().st_mtime_ns
    assert ensure_beton(tmp_path / "no-such-folder", beton) == beton
    assert beton.stat().st_mtime_ns == before
    fresh = ensure_beton(tree, tmp_path / "sub" / "fresh.beton", max_resolution=32,
                         num_workers=1, progress=False)
    assert Reader(str(fresh)).num_samples == N


@pytest.mark.slow
def test_a_killed_write_leaves_no_file_at_the_target_path(tmp_path):
    """SIGKILL in the middle of a write (workers and all) leaves only a hidden partial file:
    the target path never holds an incomplete beton, and ensure_beton then writes it whole."""
    root = tmp_path / "big"
    rng = np.random.default_rng(0)
    (root / "c0").mkdir(parents=True)
    for k in range(400):  # noise compresses badly: slow enough to be killed mid-way
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            root / "c0" / f"{k:03d}.JPEG", quality=95)
    target = tmp_path / "big.beton"
    code = (f"from pipelines.ffcv import write_beton\n"
            f"write_beton({str(root)!r}, {str(target)!r}, max_resolution=256, write_mode='jpg',"
            f" num_workers=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".big.beton.*.partial")):
            assert proc.poll() is None and time.monotonic() < deadline, "the write never started"
            time.sleep(0.01)
        time.sleep(0.2)
        assert proc.poll() is None, "the write finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not target.exists()
    ensure_beton(root, target, max_resolution=32, num_workers=2, progress=False)
    assert Reader(str(target)).num_samples == 400


@pytest.mark.parametrize("kind", sorted(set(BAD_FILE_WRITERS) - DECODABLE))
def test_undecodable_file_fails_the_write_naming_it_and_writes_nothing(tmp_path, kind):
    """The error raised in the parent names the file FFCV's worker could not decode; neither the
    beton nor its temporary file is left behind."""
    write_coded_tree(tmp_path / "split", classes=2, per_class=2)
    bad, _ = add_bad_file(tmp_path / "split", kind, class_dir="c01")
    with pytest.raises(UndecodableImageError, match="1 of 5 images") as err:
        write(tmp_path / "split", tmp_path / "out.beton")
    assert str(bad) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def test_several_undecodable_files_are_all_named(tmp_path):
    """One write reports every bad file, not just the first."""
    write_coded_tree(tmp_path / "split", classes=2, per_class=2)
    bad = [add_bad_file(tmp_path / "split", kind)[0] for kind in ("truncated", "empty")]
    with pytest.raises(UndecodableImageError, match="2 of 6 images") as err:
        write(tmp_path / "split", tmp_path / "out.beton")
    assert all(str(path) in str(err.value) for path in bad)


@pytest.mark.slow
def test_unreadable_file_fails_the_write_naming_it():
    """As ``nobody``, a chmod-000 image makes write_beton fail with an error naming it."""
    with public_dir() as root:
        write_coded_tree(root / "split", classes=2, per_class=2)
        bad, _ = add_bad_file(root / "split", "grayscale")
        make_unreadable(bad)
        out = root / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        code = (f"from pipelines.ffcv import write_beton, UndecodableImageError\n"
                f"try:\n"
                f"    write_beton({str(root / 'split')!r}, {str(out / 'x.beton')!r},"
                f" max_resolution=64, num_workers=1, progress=False)\n"
                f"except UndecodableImageError as e:\n"
                f"    print('ERROR', e)\n")
        # nobody cannot read the interpreter's library: import what the write needs, and
        # start the resource tracker (a new interpreter) of FFCV's shared memory, as root
        result = run_unprivileged(code, modules=(
            "pipelines.ffcv", "multiprocessing.queues", "multiprocessing.synchronize",
            "multiprocessing.sharedctypes", "multiprocessing.popen_fork", "PIL.JpegImagePlugin",
            "multiprocessing.resource_tracker", "pipelines.check"),
            as_root="sys.modules['multiprocessing.resource_tracker'].ensure_running()")
        assert result.returncode == 0, result.stderr
        assert f"cannot decode {bad}: unreadable (Permission denied)" in result.stdout
        assert list(out.iterdir()) == []


def test_odd_but_valid_files_decode_to_the_right_colour(tmp_path):
    """PNG under a .JPEG name, CMYK and grayscale JPEGs are stored and delivered as correct RGB."""
    write_coded_tree(tmp_path / "split", classes=1, per_class=2)
    expected = dict(add_bad_file(tmp_path / "split", kind) for kind in sorted(DECODABLE))
    paths = scan_image_folder(tmp_path / "split").paths
    for path, colour in expected.items():
        np.testing.assert_allclose(load_rgb_array(str(path)).mean(axis=(0, 1)), colour, atol=3)
    val = loader(write(tmp_path / "split", tmp_path / "odd.beton"), batch_size=len(paths))
    (images, _), = run_epoch(val)
    rgb = expected_rgb(images)
    for path, colour in expected.items():
        np.testing.assert_allclose(rgb[paths.index(str(path))], colour, atol=4)


@pytest.mark.parametrize("kw, message", [
    ({"max_resolution": 4}, "max_resolution"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"compress_probability": 1.5}, "compress_probability"),
    ({"write_mode": "png"}, "write_mode"),
    ({"write_mode": "smart"}, "smart_threshold"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"num_workers": 0}, "num_workers"),
])
def test_bad_write_configuration_is_refused_naming_the_option(tree, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        write(tree, tmp_path / "x.beton", **kw)
    assert not list(tmp_path.iterdir())


def test_a_dataset_root_is_refused_as_a_split(tmp_path):
    """The shared listing refuses a folder whose classes would be 'train' and 'val'."""
    for split in ("train", "val"):
        write_coded_tree(tmp_path / "root" / split, classes=1, per_class=1)
    with pytest.raises(ValueError, match="looks like a dataset root, not a split"):
        write(tmp_path / "root", tmp_path / "x.beton")
    assert not (tmp_path / "x.beton").exists()


def test_missing_image_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        write(tmp_path / "nope", tmp_path / "x.beton")


# --- loading: contract ------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 5])
def test_val_shards_partition_the_dataset_exactly_in_order(beton, label_of, world):
    """Rank r yields its contiguous block [r * N // W, (r + 1) * N // W) once, in order, no
    padding, the last batch partial; the ranks together yield the dataset exactly once; labels
    match the pixels."""
    seen = []
    for rank in range(world):
        val = loader(beton, batch_size=4, shard=Shard(rank, world))
        batches = run_epoch(val)
        indices = check_aligned(batches, label_of)
        np.testing.assert_array_equal(indices, np.arange(rank * N // world, (rank + 1) * N // world))
        assert len(val) == len(batches) == -(-len(indices) // 4)
        seen.extend(indices)
    assert sorted(seen) == list(range(N))


def test_train_shards_align_labels_and_give_every_rank_equal_full_batches(beton, label_of):
    """5 ranks over 48 images: 48 // 5 = 9 samples each, no sample twice; every rank yields
    9 // 2 = 4 full batches of 2 with labels matching the pixels."""
    world, seen = 5, []
    for rank in range(world):
        train = loader(beton, train=True, batch_size=2, shard=Shard(rank, world), seed=3)
        batches = run_epoch(train, epoch=1)
        assert len(train) == len(batches) == 4
        assert all(len(y) == 2 for _, y in batches)
        seen.extend(check_aligned(batches, label_of))
    assert len(set(seen)) == len(seen) == world * 8


def test_train_drop_last_keeps_full_batches_only(beton):
    """len() counts full batches of the rank's 9 samples: 9 // 4 = 2 (without drop_last 3)."""
    train = loader(beton, train=True, batch_size=4, shard=Shard(1, 5))
    assert len(train) == 2
    assert len(loader(beton, train=True, batch_size=4, shard=Shard(1, 5), drop_last=False)) == 3


@pytest.fixture(scope="module")
def raw_beton(tree) -> Path:
    """The coded split stored raw: pixels are exactly PIL's decode of each file."""
    return write(tree, tree.parent / "coded-raw.beton", write_mode="raw")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 4e-3),
                                         (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_output_shape_dtype_layout_and_normalisation(tree, raw_beton, dtype, atol, channels_last):
    """Each solid-colour image comes out as exactly (colour - mean) / std at every pixel, in the
    requested dtype and memory layout, with int64 labels; CUDA is never touched."""
    val = loader(raw_beton, batch_size=16, resolution=24,
                 output=OutputSpec(device="cpu", dtype=dtype, channels_last=channels_last))
    images, labels = next(iter(val))
    assert images.shape == (16, 3, 24, 24) and images.dtype == dtype
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert images.is_contiguous(memory_format=fmt)
    colours = np.array([load_rgb_array(p)[0, 0] for p in scan_image_folder(tree).paths[:16]])
    expected = (colours - np.array(IMAGENET_MEAN_255)) / np.array(IMAGENET_STD_255)
    np.testing.assert_allclose(images.float().numpy(),
                               np.broadcast_to(expected[:, :, None, None], images.shape),
                               atol=atol, rtol=atol)
    assert not torch.cuda.is_initialized()


def test_resolution_and_batch_size_change_exactly_at_the_epoch_boundary(beton, label_of):
    """Phases 32 px / 8, then 48 px / 8 (the same FFCV loader, its decoder resized), then
    40 px / 12 (a new FFCV loader): every batch of an epoch has that epoch's size, every image
    is seen once per epoch, solid and with its label."""
    schedule = Phases((Phase(0, 32, 8), Phase(1, 48, 8), Phase(2, 40, 12)))
    train = loader(beton, train=True, batch_size=99, resolution=schedule, num_workers=2)
    ffcv_loaders = []
    for epoch, (res, bs) in enumerate([(32, 8), (48, 8), (40, 12)]):
        batches = run_epoch(train, epoch)
        assert (train.resolution, train.batch_size, len(train)) == (res, bs, N // bs)
        assert {tuple(x.shape) for x, _ in batches} == {(bs, 3, res, res)}
        assert max(float(x.std(dim=(2, 3)).max()) for x, _ in batches) < 0.05  # still solid
        assert sorted(check_aligned(batches, label_of)) == list(range(N))
        ffcv_loaders.append(train._loader)
    assert ffcv_loaders[0] is ffcv_loaders[1] is not ffcv_loaders[2]


def test_breaking_out_early_leaves_the_next_epoch_whole(beton, label_of):
    """An abandoned epoch stops FFCV's thread; the next iteration still yields every sample."""
    val = loader(beton, batch_size=8)
    for _ in val:
        break
    assert sorted(check_aligned(run_epoch(val), label_of)) == list(range(N))


def test_make_loader_builds_an_ffcv_loader_with_the_split_metadata(beton):
    ffcv = make_loader("ffcv", beton, train=False, batch_size=8, resolution=32, output=CPU)
    assert isinstance(ffcv, FfcvLoader)
    assert (ffcv.num_classes, ffcv.num_samples, len(ffcv)) == (CLASSES, N, 6)


# --- loading: augmentation --------------------------------------------------------------------

def test_same_seed_gives_same_order_and_crops_at_any_thread_count(textured):
    """FFCV's own decoders draw from numba's per-thread generators and never repeat; the seeded
    decoder gives bit-identical batches for the same seed and epoch with 1 or 2 threads, and
    another epoch or seed reorders the samples and crops each one differently."""
    one = loader(textured, train=True, batch_size=5, seed=0, num_workers=1)
    two = loader(textured, train=True, batch_size=5, seed=0, num_workers=2)
    other_seed = loader(textured, train=True, batch_size=5, seed=1, num_workers=1)
    by_sample = {}
    for epoch in (0, 1):
        a, b = run_epoch(one, epoch), run_epoch(two, epoch)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
        images, labels = torch.cat([x for x, _ in a]), torch.cat([y for _, y in a])
        by_sample[epoch] = dict(zip(labels.tolist(), images))
        if epoch == 0:
            order = labels
    assert not torch.equal(order, torch.cat([y for _, y in run_epoch(one, 1)]))
    assert not torch.equal(order, torch.cat([y for _, y in run_epoch(other_seed, 0)]))
    assert sum(torch.equal(by_sample[0][k], by_sample[1][k]) for k in range(TEXTURED)) == 0


def test_crops_are_full_image_or_mirror_and_flips_happen_half_the_time(textured):
    """With the crop forced to the whole image, each output is the stored image or its mirror,
    exactly, and about half are mirrored."""
    decoder = SeededRandomResizedCropFlip((48, 64), seed=0, scale=(1, 1), ratio=(4 / 3, 4 / 3))
    raw = RawFfcvLoader(str(textured), batch_size=TEXTURED, num_workers=1, order=ShardedRandom(Shard(0, 1)),
                        pipelines={"image": [decoder, ToTensor()],
                                   "label": [IntDecoder(), ToTensor()]})
    stored = [load_rgb_array(p) for p in scan_image_folder(textured.parent / "split").paths]
    flips = 0
    for epoch in range(4):
        raw.next_epoch = epoch
        for images, labels in raw:
            for image, label in zip(images.numpy(), labels[:, 0].tolist()):
                original = stored[label]
                assert np.array_equal(image, original) or np.array_equal(image, original[:, ::-1])
                flips += not np.array_equal(image, original)
    assert 15 <= flips <= 45  # of 60 (p = 1/2; fixed by the seed)


def test_validation_resizes_the_shorter_side_then_centre_crops(textured):
    """Each val image is torchvision's Resize(val_resize(res)) + CenterCrop(res) of the stored
    image up to resampling, far closer than with another resize or a corner crop."""
    val = loader(textured, batch_size=TEXTURED, resolution=32)
    (images, labels), = run_epoch(val)
    paths = scan_image_folder(textured.parent / "split").paths
    for image, label in zip(to_uint8(images), labels.tolist()):
        stored = Image.open(paths[label]).convert("RGB")
        def error(reference: Image.Image) -> float:
            return float(np.abs(image - np.asarray(reference, dtype=float)).mean())
        right = error(TF.center_crop(TF.resize(stored, val_resize(32)), 32))
        wrong = [error(TF.center_crop(TF.resize(stored, size), 32)) for size in (32, 43)]
        wrong.append(error(TF.crop(TF.resize(stored, val_resize(32)), 0, 0, 32, 32)))
        assert right < 12 and min(wrong) > 1.8 * right


def test_sharded_order_is_the_shared_split_of_each_epochs_permutation(textured):
    """ShardedRandom gives an FFCV loader Shard.split's training order, without a process
    group: 15 images over 2 ranks, 7 each, disjoint, another order every epoch."""
    kw = dict(batch_size=2, num_workers=1, seed=7, pipelines={"image": None})
    orders = []
    for rank in (0, 1):
        ffcv = RawFfcvLoader(str(textured), order=ShardedRandom(Shard(rank, 2)), **kw)
        split = Shard(rank, 2).split(TEXTURED, 2, train=True)
        orders.append([ffcv.traversal_order.sample_order(e).tolist() for e in range(3)])
        assert orders[-1] == [split.indices(7, e).tolist() for e in range(3)]
        assert len(ffcv) == split.num_batches == 3
    for epoch in range(3):
        assert len(set(orders[0][epoch] + orders[1][epoch])) == 14
    assert orders[0][0] != orders[0][1]


# --- loading: errors --------------------------------------------------------------------------

def test_missing_beton_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "x.beton")):
        loader(tmp_path / "x.beton")


def test_file_that_is_not_a_beton_is_an_error_naming_it(beton, tmp_path):
    """Random bytes, and a real beton cut short at any point, are refused by name."""
    (tmp_path / "junk.beton").write_bytes(b"not an FFCV file\n" * 256)
    with pytest.raises(ValueError, match="junk.beton is not a readable FFCV .beton"):
        loader(tmp_path / "junk.beton")
    data = beton.read_bytes()
    for size in (2000, len(data) // 2, len(data) - 24, len(data) - 8):
        (tmp_path / "cut.beton").write_bytes(data[:size])
        with pytest.raises(ValueError, match="cut.beton"):
            loader(tmp_path / "cut.beton")


def test_beton_without_image_and_label_fields_is_refused_naming_them(tmp_path):
    """A beton with other fields (here only an int ``label``) cannot feed the loader."""
    path = tmp_path / "labels.beton"
    DatasetWriter(str(path), {"label": IntField()}, num_workers=1).from_indexed_dataset(
        [(i,) for i in range(4)])
    with pytest.raises(ValueError, match=r"labels.beton has fields \{'label': 'IntField'\}"):
        loader(path)


@pytest.mark.parametrize("kw, message", [
    ({"num_workers": 0}, "num_workers"),
    ({"num_workers": 10_000}, "NUMBA_NUM_THREADS"),
    ({"batches_ahead": 0}, "batches_ahead"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_loader_configuration_is_refused_naming_the_option(beton, kw, message):
    with pytest.raises(ValueError, match=message):
        loader(beton, **kw)


def test_a_batch_larger_than_the_rank_shard_is_an_error_in_train_mode(beton):
    """48 images over 8 ranks: 6 per rank, so no full batch of 7 exists."""
    with pytest.raises(ValueError, match="no batch of 7 on rank 0 of 8"):
        len(loader(beton, train=True, batch_size=7, shard=Shard(0, 8)))


# --- step-level resume ------------------------------------------------------------------------

def test_set_epoch_start_batch_resumes_bitwise_and_hands_ffcv_only_the_rest(textured, beton,
                                                                            label_of):
    """Training (seeded crops keyed by batch content) and validation: set_epoch(e,
    start_batch=k) yields bitwise batches k.. of the uninterrupted epoch; FFCV is given only
    the remaining samples (the skipped ones are never read); len() stays whole; the next
    iteration is the whole epoch again."""
    train = loader(textured, train=True, batch_size=2, seed=5)
    assert train.resumes_exactly
    whole = run_epoch(train, 2)
    k = 3
    train.set_epoch(2, start_batch=k)
    order = train._loader.traversal_order
    resumed = [(x.clone(), y.clone()) for x, y in train]
    assert len(train) == len(whole) == 7 and len(resumed) == 7 - k
    for (x, y), (wx, wy) in zip(resumed, whole[k:], strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    order.skip = k
    assert len(order.sample_order(2)) == (7 - k) * 2 and order.skip == 0
    assert len([y for _, y in train]) == 7  # start_batch held for one iteration
    val = loader(beton, batch_size=10)
    val.set_epoch(0, start_batch=2)
    rest = [(x.clone(), y.clone()) for x, y in val]
    np.testing.assert_array_equal(check_aligned(rest, label_of), np.arange(20, N))


# --- order="quasi_random" ---------------------------------------------------------------------

PAGED_CLASSES, PAGED_PER_CLASS = 5, 50
PAGED = PAGED_CLASSES * PAGED_PER_CLASS  # 250 raw 256 x 256 images: 10 to a 2 MiB page, 25 pages


@pytest.fixture(scope="module")
def paged(tmp_path_factory) -> Path:
    """A coded split big enough for many pages: raw 256 x 256 images in pages of 2 MiB."""
    root = tmp_path_factory.mktemp("paged") / "split"
    write_coded_tree(root, classes=PAGED_CLASSES, per_class=PAGED_PER_CLASS, size=(256, 256),
                     vary_size=False)
    return write(root, root.parent / "paged.beton", max_resolution=256, write_mode="raw",
                 page_size=1 << 21)


@pytest.fixture(scope="module")
def paged_pages(paged) -> np.ndarray:
    """The page of each sample, from the beton's allocation table."""
    pages = sample_pages(Reader(str(paged)))
    assert len(np.unique(pages)) == 25 and np.bincount(pages).max() == 10
    return pages


@pytest.fixture(scope="module")
def quasi(paged) -> dict[int, FfcvLoader]:
    """order='quasi_random' training loaders of ranks 0 and 1 of 2 (125 samples each, 12
    batches of 10): rank 0 with its default os_cache (False), rank 1 through the OS cache."""
    return {rank: loader(paged, train=True, batch_size=10, resolution=16, seed=4,
                         shard=Shard(rank, 2), order="quasi_random",
                         **({"os_cache": True} if rank else {})) for rank in (0, 1)}


def lru_page_loads(pages: np.ndarray, capacity: int = WINDOW_PAGES) -> int:
    """How many pages a reader holding ``capacity`` pages (least recently used one dropped)
    loads to read samples of these pages in this order."""
    held: list[int] = []
    loads = 0
    for page in pages.tolist():
        if page in held:
            held.remove(page)
        else:
            loads += 1
            if len(held) == capacity:
                held.pop(0)
        held.append(page)
    return loads


def test_quasi_random_yields_every_sample_of_the_shards_once_per_epoch(quasi, paged_pages):
    """Over 2 ranks, each epoch: rank r yields positions [125 r, 125 r + 120) of the global
    quasi-random order of (seed, epoch) (12 full batches of its N // W = 125), labels matching
    the pixels, no sample twice; the two shares of 125 are the whole split but for none (250 =
    2 x 125), and the order depends only on (seed, epoch)."""
    label_of = np.repeat(np.arange(PAGED_CLASSES), PAGED_PER_CLASS)
    assert (quasi[0].os_cache, quasi[1].os_cache) == (False, True)
    for epoch in (0, 1):
        order = quasi_random_order(paged_pages, 4, epoch)
        assert sorted(order.tolist()) == list(range(PAGED))
        seen = []
        for rank, train in quasi.items():
            batches = run_epoch(train, epoch)
            assert len(train) == len(batches) == 12 and {len(y) for _, y in batches} == {10}
            indices = check_aligned(batches, label_of)
            np.testing.assert_array_equal(indices, order[125 * rank:125 * rank + 120])
            seen.extend(indices)
        assert len(set(seen)) == len(seen) == 240


def test_quasi_random_order_is_a_function_of_seed_and_epoch(quasi, paged_pages):
    """The same (seed, epoch) gives the same batches, bitwise; another epoch or seed another
    order; and it is not random's permutation."""
    train = quasi[0]
    first, again = run_epoch(train, 3), run_epoch(train, 3)
    for (x, y), (ax, ay) in zip(first, again, strict=True):
        assert torch.equal(x, ax) and torch.equal(y, ay)
    order = np.concatenate([decode_batch(x)[1] for x, _ in first])
    np.testing.assert_array_equal(order, quasi_random_order(paged_pages, 4, 3)[:120])
    assert not np.array_equal(order, quasi_random_order(paged_pages, 4, 4)[:120])
    assert not np.array_equal(order, quasi_random_order(paged_pages, 5, 3)[:120])
    assert not np.array_equal(order, Shard(0, 2).split(PAGED, 10, train=True).indices(4, 3)[:120])


def test_quasi_random_reads_each_rank_s_pages_in_contiguous_runs(quasi, paged_pages):
    """Each rank's samples (as delivered) come a window of pages at a time: a reader holding 6
    pages loads each page it touches once, and FFCV's process cache holds few pages at once;
    random's order, over the same shard, loads pages again and again and holds them all."""
    for rank, train in quasi.items():
        delivered = np.concatenate([decode_batch(x)[1] for x, _ in run_epoch(train, 2)])
        pages = paged_pages[delivered]
        split = Shard(rank, 2).split(PAGED, 10, train=True)
        random_pages = paged_pages[split.indices(4, 2)[:120]]
        quasi_loads, random_loads = lru_page_loads(pages), lru_page_loads(random_pages)
        assert quasi_loads == len(np.unique(pages)) <= 3 * WINDOW_PAGES
        assert random_loads >= 4 * quasi_loads
        # a page's samples come within one window's 6 x 10 samples (random's: all 120)
        spans = [np.ptp(np.flatnonzero(pages == p)) for p in np.unique(pages)]
        assert max(spans) < WINDOW_PAGES * 10
        slots = [compute_schedule([set(paged_pages[b]) for b in seq.reshape(12, 10)]).num_slots
                 for seq in (delivered, split.indices(4, 2)[:120])]
        assert slots[0] <= 2 * WINDOW_PAGES < 20 <= slots[1]


def test_quasi_random_resumes_mid_epoch_bitwise(quasi):
    """set_epoch(e, start_batch=k) yields bitwise batches k.. of the uninterrupted epoch."""
    train = quasi[1]
    assert train.resumes_exactly
    whole = run_epoch(train, 5)
    train.set_epoch(5, start_batch=7)
    resumed = [(x.clone(), y.clone()) for x, y in train]
    assert len(resumed) == 12 - 7
    for (x, y), (wx, wy) in zip(resumed, whole[7:], strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def test_quasi_random_is_for_training_validation_stays_in_order(beton, label_of):
    """A validation loader given order='quasi_random' reads its block in dataset order."""
    val = loader(beton, batch_size=16, order="quasi_random", shard=Shard(1, 2))
    np.testing.assert_array_equal(check_aligned(run_epoch(val), label_of), np.arange(24, N))


@pytest.mark.parametrize("order", ["sequential", "QUASI_RANDOM", None])
def test_an_unknown_order_is_refused_naming_the_choices(beton, order):
    with pytest.raises(ValueError, match=r"order must be one of \('random', 'quasi_random'\)"):
        loader(beton, train=True, order=order)
