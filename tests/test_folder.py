"""The torchvision reference loader (FolderLoader) against the loader contract, on real JPEGs."""
import json
import math
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from pipelines import BadImageError, OutputSpec, Shard, make_loader
from pipelines.base import RRC_RATIO, RRC_SCALE
from pipelines.folder import FolderLoader, random_resized_crop_box
from pipelines.images import REASONS
from pipelines.resolution import Phase, Phases
from tests.imagefiles import (BAD_FILE_WRITERS, DECODABLE, MEAN_255, STD_255, add_bad_file,
                              add_empty_class, code_color, decode_batch, expected_rgb, jpeg_bytes,
                              make_unreadable, write_coded_tree)
from tests.unprivileged import public_dir, run_unprivileged

CLASSES, PER_CLASS = 4, 12
N = CLASSES * PER_CLASS
CPU = OutputSpec(device="cpu")


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """48 class-coded solid-colour JPEGs of varied sizes; returns (root, label of each index)."""
    root = tmp_path_factory.mktemp("coded")
    files = write_coded_tree(root, classes=CLASSES, per_class=PER_CLASS)
    return root, np.array([label for _, label, _ in files])


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """Gradient images (colour depends on position), so different crops give different pixels."""
    root = tmp_path_factory.mktemp("textured")
    yy, xx = np.mgrid[0:60, 0:90]
    for k in range(8):
        rgb = np.stack([xx * 2.8, yy * 4.2, (xx + yy + 20 * k) % 256], axis=-1).astype(np.uint8)
        (root / f"c{k % 2}").mkdir(exist_ok=True)
        (root / f"c{k % 2}" / f"img{k}.JPEG").write_bytes(jpeg_bytes(Image.fromarray(rgb)))
    return root


def folder(root, **kw):
    kw.setdefault("output", CPU)
    kw.setdefault("num_workers", 0)
    kw.setdefault("resolution", 32)
    return make_loader("folder", root, **kw)


def epoch_indices(loader):
    """The dataset indices of one epoch, in order, checking each batch's labels on the way."""
    out = []
    for images, labels in loader:
        decoded_labels, indices = decode_batch(images)
        np.testing.assert_array_equal(decoded_labels, labels.numpy())
        out.append(indices)
    return np.concatenate(out) if out else np.array([], int)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_labels_stay_aligned_with_their_images_in_every_shard(coded, train, world):
    """Every image comes with the label of the file it was decoded from, on every rank."""
    root, label_of = coded
    for rank in range(world):
        loader = folder(root, train=train, batch_size=5, shard=Shard(rank, world))
        indices = epoch_indices(loader)
        assert len(indices) > 0 and ((0 <= indices) & (indices < N)).all()
        assert loader.num_classes == CLASSES and loader.num_samples == N


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_val_shards_partition_the_dataset_exactly_in_order(coded, world):
    """Validation: the ranks' shards, concatenated, are every sample once, in dataset order."""
    root, _ = coded
    seen = []
    for rank in range(world):
        loader = folder(root, train=False, batch_size=4, shard=Shard(rank, world))
        batches = list(loader)
        assert len(batches) == len(loader)
        seen.append(epoch_indices(batches))
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(N))


@pytest.mark.parametrize("world", [1, 3, 5])
def test_train_shards_are_equal_and_disjoint_without_padding(coded, world):
    """Train without drop_last: every rank reads N // world samples (its last batch partial),
    no sample twice over the ranks; the N % world left out change with the epoch."""
    root, _ = coded
    per_rank = N // world
    left_out = []
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            loader = folder(root, train=True, batch_size=4, drop_last=False,
                            shard=Shard(rank, world), seed=3)
            loader.set_epoch(epoch)
            shards.append(epoch_indices(loader))
            assert len(loader) == math.ceil(per_rank / 4)
        assert [len(s) for s in shards] == [per_rank] * world
        seen = np.concatenate(shards)
        assert len(np.unique(seen)) == len(seen) == world * per_rank
        left_out.append(set(range(N)) - set(seen))
    assert N % world == 0 or left_out[0] != left_out[1]


def test_train_ranks_yield_the_same_number_of_full_batches(coded):
    """Train default (drop_last): every rank yields len(loader) batches, all full."""
    root, _ = coded
    for rank in range(5):
        loader = folder(root, train=True, batch_size=4, shard=Shard(rank, 5))
        sizes = [len(labels) for _, labels in loader]
        assert sizes == [4] * len(loader) == [4] * ((N // 5) // 4)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batches_have_the_requested_shape_dtype_layout_and_normalisation(coded, dtype, channels_last, train):
    """N x 3 x res x res in the dtype and memory format asked for; each solid colour becomes
    exactly ((colour - mean) / std) at every pixel; labels are int64."""
    root, label_of = coded
    for res in (32, 40):
        loader = folder(root, train=train, batch_size=16, resolution=res,
                        output=OutputSpec(device="cpu", dtype=dtype, channels_last=channels_last))
        for images, labels in loader:
            assert images.shape == (16, 3, res, res) and images.dtype == dtype
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert images.is_contiguous(memory_format=fmt)
            assert labels.dtype == torch.int64 and labels.shape == (16,)
            _, indices = decode_batch(images)
            want = np.array([code_color(label_of[i], i) for i in indices], dtype=float)
            pixels = images.float().numpy() * STD_255[:, None, None] + MEAN_255[:, None, None]
            assert np.abs(pixels - want[:, :, None, None]).max() < 3


def test_resolution_and_batch_size_change_exactly_at_the_phase_boundary(coded):
    """A phase schedule switches resolution, batch size and len() at its start epoch, not before."""
    root, _ = coded
    schedule = Phases((Phase(0, 32, 8), Phase(2, 48, 6)))
    loader = folder(root, train=True, batch_size=99, resolution=schedule)
    for epoch, (res, bs) in enumerate([(32, 8), (32, 8), (48, 6), (48, 6)]):
        loader.set_epoch(epoch)
        assert (loader.resolution, loader.batch_size, len(loader)) == (res, bs, N // bs)
        shapes = {tuple(images.shape) for images, _ in loader}
        assert shapes == {(bs, 3, res, res)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_set_epoch_during_an_epoch_only_affects_the_next_iterator(coded, num_workers):
    """set_epoch while an epoch runs (workers already started) never changes its remaining batches."""
    root, _ = coded
    schedule = Phases((Phase(0, 32, 8), Phase(2, 48, 6)))
    loader = folder(root, train=True, batch_size=8, resolution=schedule, num_workers=num_workers)
    loader.set_epoch(1)
    running = iter(loader)
    first = next(running)[0]
    loader.set_epoch(2)
    rest = [images.shape for images, _ in running]
    assert first.shape == (8, 3, 32, 32) and set(rest) == {(8, 3, 32, 32)} and len(rest) == N // 8 - 1
    assert {images.shape for images, _ in loader} == {(6, 3, 48, 48)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epochs_read_back_to_back_equal_a_new_loader_per_epoch(textured, num_workers):
    """One loader read epoch after epoch (its workers run on across the boundaries, through a
    phase change of size and batch size) yields batch for batch what a new loader set to each
    epoch yields; so does every epoch after a jump back, a repeat or a loop stopped early."""
    schedule = Phases((Phase(0, 32, 4), Phase(2, 48, 3)))

    def fresh(epoch):
        loader = folder(textured, train=True, batch_size=4, resolution=schedule)
        loader.set_epoch(epoch)
        return [images for images, _ in loader]

    loader = folder(textured, train=True, batch_size=4, resolution=schedule, num_workers=num_workers)
    for epoch, stop_after in [(0, None), (1, None), (2, None), (3, 1), (3, None), (1, None), (1, None)]:
        loader.set_epoch(epoch)
        running = iter(loader)
        got = [images for images, _ in islice(running, stop_after)]
        del running  # stopped early: the rest of the epoch stays in the stream
        want = fresh(epoch)
        assert len(got) == (stop_after or len(want)) and len(want) == len(loader)
        assert all(torch.equal(a, b) for a, b in zip(got, want[:len(got)], strict=True)), epoch


def test_one_set_of_workers_serves_consecutive_epochs(coded):
    """Epochs read in order keep the same two worker processes (so they decode the next epoch's
    first batches while this one ends, at the next epoch's size); validation passes at one size
    share theirs; a jump back to an earlier epoch replaces the training workers."""
    root, _ = coded
    me = psutil.Process()
    before = {p.pid for p in me.children()}

    def workers():
        return {p.pid for p in me.children()} - before

    train = folder(root, train=True, batch_size=8, num_workers=2)
    seen = []
    for epoch in (0, 1, 2, 0):
        train.set_epoch(epoch)
        assert len(list(train)) == len(train)
        seen.append(workers())
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2]
    assert len(seen[3]) == 2 and not seen[3] & seen[0]
    del train
    val = folder(root, train=False, batch_size=8, num_workers=2)
    passes = []
    for epoch in (0, 1, 2):
        val.set_epoch(epoch)
        passes.append(epoch_indices(val))
        seen.append(workers())
    assert len(seen[4]) == 2 and seen[4] == seen[5] == seen[6]
    assert all(np.array_equal(p, np.arange(N)) for p in passes)


def test_same_seed_gives_same_order_and_crops_whatever_the_workers(textured, coded):
    """Two loaders with one seed yield identical batches (order, crops, flips), with 0 or 2 workers;
    another epoch or another seed gives another order."""
    def epoch(root, seed=0, epoch=0, num_workers=0):
        loader = folder(root, train=True, batch_size=4, seed=seed, num_workers=num_workers)
        loader.set_epoch(epoch)
        return [images for images, _ in loader]

    reference = epoch(textured)
    for again in (epoch(textured), epoch(textured, num_workers=2)):
        assert all(torch.equal(a, b) for a, b in zip(reference, again, strict=True))
    assert not torch.equal(torch.cat(reference), torch.cat(epoch(textured, epoch=1)))
    root, _ = coded
    order = epoch_indices(folder(root, train=True, batch_size=4))
    np.testing.assert_array_equal(order, epoch_indices(folder(root, train=True, batch_size=4)))
    for other in (dict(seed=1), dict(epoch=1)):
        loader = folder(root, train=True, batch_size=4, seed=other.get("seed", 0))
        loader.set_epoch(other.get("epoch", 0))
        assert not np.array_equal(order, epoch_indices(loader))


def test_crops_follow_random_resized_crop_ranges_and_flips_are_random(textured):
    """Crop boxes lie in the image, span the scale and ratio ranges; about half are flipped."""
    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_crop_box(400, 300, rng) for _ in range(2000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 400).all()
    scale, ratio = h * w / (400 * 300), w / h
    assert RRC_SCALE[0] - 0.01 < scale.min() < 0.1 and scale.max() > 0.95
    assert RRC_RATIO[0] - 0.02 < ratio.min() < 0.8 and 1.3 < ratio.max() < RRC_RATIO[1] + 0.02
    # Horizontal flips: the red channel grows left to right unless the crop was flipped.
    loader = folder(textured, train=True, batch_size=8, resolution=48)
    flips = []
    for epoch in range(8):
        loader.set_epoch(epoch)
        images = torch.cat([images for images, _ in loader])
        red = images[:, 0].float().mean(dim=1)
        flips.append((red[:, -4:].mean(1) < red[:, :4].mean(1)).numpy())
    assert 0.3 < np.concatenate(flips).mean() < 0.7


@pytest.mark.parametrize("width,height", [(10, 1000), (1000, 10), (50, 50)])
def test_crop_fallback_matches_torchvision(width, height):
    """When no random draw fits, the box is torchvision's central fallback crop."""
    rng = np.random.default_rng(0)
    ours = random_resized_crop_box(width, height, rng, scale=(2.0, 3.0))    # never fits
    theirs = RandomResizedCrop.get_params(Image.new("RGB", (width, height)), [2.0, 3.0], list(RRC_RATIO))
    assert ours == tuple(theirs)


@pytest.mark.parametrize("kind", sorted(BAD_FILE_WRITERS))
def test_bad_files_decode_to_the_right_colour_or_fail_naming_the_file(tmp_path, kind):
    """PNG-as-JPEG, CMYK and grayscale decode to their true RGB colour; every other bad file
    raises an error whose message contains its path."""
    write_coded_tree(tmp_path, classes=2, per_class=2)
    path, colour = add_bad_file(tmp_path, kind)
    loader = folder(tmp_path, train=False, batch_size=8)
    position = loader.index.paths.index(str(path))
    if kind in DECODABLE:
        images, _ = next(iter(loader))
        np.testing.assert_allclose(expected_rgb(images)[position], colour, atol=4)
    else:
        with pytest.raises(BadImageError, match=f"cannot decode {path}: {REASONS[kind]}"):
            next(iter(loader))


def test_32_bit_images_are_refused_naming_the_file(tmp_path):
    """A 32-bit integer TIFF (mode I: no agreed 8-bit scale) raises naming it; 16-bit images
    are scaled to 8 bits (tests/test_odd_images.py)."""
    write_coded_tree(tmp_path, classes=2, per_class=2)
    path = tmp_path / "c01" / "deep.tif"
    Image.new("I", (40, 30), 70000).save(path)
    with pytest.raises(BadImageError, match=f"cannot decode {path}: unsupported pixel depth"):
        list(folder(tmp_path, train=False, batch_size=8))


def test_decode_errors_in_a_worker_name_the_file(tmp_path):
    """An error in a DataLoader worker process reaches the caller as a BadImageError whose
    message is the worker's one line (path and reason), not the worker's traceback."""
    write_coded_tree(tmp_path, classes=2, per_class=3)
    path, _ = add_bad_file(tmp_path, "truncated", class_dir="c01")
    with pytest.raises(BadImageError, match=f"^cannot decode {path}: truncated") as err:
        list(folder(tmp_path, train=True, batch_size=2, num_workers=1))
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_unreadable_file_fails_naming_the_file():
    """A file without read permission (read as user nobody) raises an error naming it."""
    with public_dir() as root:
        write_coded_tree(root, classes=2, per_class=2)
        path, _ = add_bad_file(root, "grayscale", name="locked.JPEG")
        make_unreadable(path)
        code = ("from pipelines.base import BadImageError, OutputSpec\n"
                "from pipelines.folder import FolderLoader\n"
                f"loader = FolderLoader({str(root)!r}, train=False, batch_size=8, resolution=32,"
                " num_workers=0, output=OutputSpec(device='cpu'))\n"
                "try:\n    list(loader)\nexcept BadImageError as e:\n    print(json.dumps(str(e)))\n")
        result = run_unprivileged("import json\n" + code,
                                  modules=("json", "pipelines.folder", "pipelines.check"))
    assert result.returncode == 0, result.stderr
    message = json.loads(result.stdout)
    assert f"cannot decode {path}" in message and "Permission denied" in message


def test_bad_configuration_is_refused_with_a_clear_error(coded, tmp_path):
    """Missing folder, empty class, bad batch size / workers / dtype, or a batch larger than
    the rank's shard in train mode: each raises an error naming the problem."""
    root, _ = coded
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        folder(tmp_path / "missing", train=True, batch_size=4)
    write_coded_tree(tmp_path / "split", classes=2, per_class=2)
    empty = add_empty_class(tmp_path / "split")
    with pytest.raises(FileNotFoundError, match=f"class folder {empty} holds no image files"):
        folder(tmp_path / "split", train=True, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        folder(root, train=True, batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be a non-negative int"):
        folder(root, train=True, batch_size=4, num_workers=-1)
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        folder(root, train=True, batch_size=4, output=OutputSpec(device="cpu", dtype="int8"))
    with pytest.raises(ValueError, match="no batch of 40 on rank 1 of 2: each rank trains on 24 of "
                                         "the 48 samples"):
        folder(root, train=True, batch_size=40, shard=Shard(1, 2))
    assert isinstance(folder(root, train=False, batch_size=40, shard=Shard(1, 2)), FolderLoader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_set_epoch_start_batch_resumes_bitwise_without_reading_the_skipped_files(
        textured, tmp_path, num_workers):
    """set_epoch(e, start_batch=k) yields bitwise batches k.. of the uninterrupted epoch (crops
    keyed by (seed, epoch, index)) and never reads the files of the k skipped batches (made
    undecodable here); len() stays the whole epoch's; the iteration after it is the whole
    epoch again (which now meets the bad files)."""
    shutil.copytree(textured, tmp_path / "tree")
    loader = folder(tmp_path / "tree", train=True, batch_size=2, seed=3, num_workers=num_workers)
    assert loader.resumes_exactly
    loader.set_epoch(2)
    whole = [(x, y) for x, y in loader]
    k = 2
    for i in np.concatenate(loader.split_at(2).batches(3, 2)[:k]):
        Path(loader.index.paths[i]).write_bytes(b"not an image any more")
    loader.set_epoch(2, start_batch=k)
    assert len(loader) == len(whole) == 4
    resumed = list(loader)
    assert len(resumed) == len(whole) - k
    for (x, y), (wx, wy) in zip(resumed, whole[k:], strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    with pytest.raises(BadImageError, match="cannot decode"):
        list(loader)


def test_start_batch_is_checked_and_may_end_the_epoch(coded):
    """start_batch = len() gives an empty iteration; past it, or negative, is a ValueError."""
    root, _ = coded
    val = folder(root, train=False, batch_size=10)
    val.set_epoch(0, start_batch=len(val))
    assert list(val) == []
    for bad in (len(val) + 1, -1, 1.0):
        with pytest.raises(ValueError, match="start_batch"):
            val.set_epoch(0, start_batch=bad)
    val.set_epoch(0, start_batch=3)
    assert epoch_indices(val).tolist() == list(range(30, N))
