"""DaliLoader (both readers) and DaliAdaptor on real DALI (CPU) over real JPEG trees written here.

Coded images (``tests/imagefiles.py``) tell which file every delivered image came from, so the
tests check label alignment, shard coverage, duplicates and order from the pixels themselves.
Contract tests run over both ``reader="feed"`` and ``reader="file"`` (DALI's ``readers.file``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines import BadImageError, OutputSpec, Phase, Phases, Shard, make_loader
from pipelines.base import IMAGENET_MEAN_255, IMAGENET_STD_255
from pipelines.dali import READERS, DaliAdaptor, DaliLoader
from pipelines.images import REASONS
from tests.imagefiles import (BAD_FILE_WRITERS, DECODABLE, add_bad_file, add_empty_class,
                              code_color, decode_batch, expected_rgb, make_unreadable,
                              write_coded_tree)

REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS = 4, 12
N = CLASSES * PER_CLASS
CPU = OutputSpec(device="cpu")
each_reader = pytest.mark.parametrize("reader", READERS)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coded")
    write_coded_tree(root, classes=CLASSES, per_class=PER_CLASS)
    return root


@pytest.fixture(scope="module")
def label_of() -> np.ndarray:
    """Class of each dataset index, in ImageFolder order."""
    return np.repeat(np.arange(CLASSES), PER_CLASS)


def loader(root, *, train=False, batch_size=5, resolution=32, output=CPU, **kw) -> DaliLoader:
    return DaliLoader(root, train=train, batch_size=batch_size, resolution=resolution,
                      output=output, num_workers=1, **kw)


def run_epoch(loader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def decoded(batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels delivered, labels decoded from pixels, indices decoded from pixels), flattened."""
    none = [np.zeros(0, dtype=int)]
    pairs = [decode_batch(x) for x, _ in batches]
    return (np.concatenate([y.numpy() for _, y in batches] + none),
            np.concatenate([p[0] for p in pairs] + none),
            np.concatenate([p[1] for p in pairs] + none))


# --- labels, shards, order --------------------------------------------------------------------

@each_reader
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_train_shards_align_labels_and_give_every_rank_equal_full_batches(tree, label_of, world,
                                                                          reader):
    """Per rank: labels match the pixels, batches are full, ``len`` is exact; over the ranks:
    N // world samples each, all distinct (no padding), the rest of the dataset left out."""
    seen, counts = [], set()
    for rank in range(world):
        train = loader(tree, train=True, shard=Shard(rank, world), reader=reader)
        batches = run_epoch(train, epoch=3)
        given, labels, indices = decoded(batches)
        assert (given == labels).all() and (label_of[indices] == labels).all()
        assert all(x.shape[0] == 5 for x, _ in batches)
        counts.add(len(batches))
        assert len(batches) == len(train)
        seen.append(indices)
    assert counts == {(N // world) // 5}
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything) == world * ((N // world) // 5) * 5


@pytest.mark.parametrize("world, batch_size", [(5, 3), (7, 3), (2, 5)])
def test_file_reader_epochs_stay_on_the_reader_boundary_with_uneven_shards(tree, label_of, world,
                                                                           batch_size):
    """readers.file, shards one sample apart (48 over 5 or 7 ranks: the smaller shards hold a
    whole number of batches of 3, so DALI pads a batch of one repeated image there). Over three
    consecutive epochs on the same loaders: every rank yields len() full batches of distinct,
    correctly labelled images, no image twice over the ranks (no padding leaks, no epoch
    drift), and the shards rotate as documented (rank r reads in epoch e + 1 the shard rank
    r + 1 read in epoch e, so both fit in one shard)."""
    loaders = [loader(tree, train=True, batch_size=batch_size, shard=Shard(rank, world),
                      reader="file") for rank in range(world)]
    per_rank = (N // world) // batch_size * batch_size
    epochs = []
    for epoch in range(3):
        seen = []
        for train in loaders:
            batches = run_epoch(train, epoch)
            given, labels, indices = decoded(batches)
            assert (given == labels).all() and (label_of[indices] == labels).all()
            assert len(batches) == len(train) and {x.shape[0] for x, _ in batches} == {batch_size}
            assert len(set(indices)) == len(indices) == per_rank
            seen.append(set(indices))
        assert len(set.union(*seen)) == world * per_rank
        epochs.append(seen)
    largest_shard = -(-N // world)
    for before, after in zip(epochs, epochs[1:]):
        for rank in range(world):
            assert len(after[rank] | before[(rank + 1) % world]) <= largest_shard


def val_cases():
    """(reader, world, batch_size): 7 ranks with batches of 3 make DALI pad a whole batch on the
    6-sample shard; 64 ranks leave some shards empty, which only feed mode allows."""
    cases = [(1, 5), (2, 5), (5, 5), (7, 3), (48, 5)]
    return [(r, w, b) for r in READERS for w, b in cases] + [("feed", 64, 5)]


@pytest.mark.parametrize("reader, world, batch_size", val_cases())
def test_val_shards_partition_the_dataset_exactly_in_folder_order(tree, label_of, reader, world,
                                                                  batch_size):
    """Validation: every image once over all ranks (some ranks empty when world > N),
    contiguous shards in ImageFolder order, a partial last batch, no padding and no empty
    batch, twice in a row on the same loader; labels match the pixels, decoded after the epoch
    (DALI's zero-copy buffers are not recycled under us)."""
    seen = []
    for rank in range(world):
        val = loader(tree, shard=Shard(rank, world), batch_size=batch_size, reader=reader)
        for _ in range(2):
            batches = run_epoch(val)
            given, labels, indices = decoded(batches)
            assert (given == labels).all() and (label_of[indices] == labels).all()
            assert len(batches) == len(val)
            assert all(x.shape[0] == batch_size for x, _ in batches[:-1])
            assert all(x.shape[0] > 0 for x, _ in batches)
            assert (np.diff(indices) == 1).all()
        seen.append(indices)
    assert (np.concatenate(seen) == np.arange(N)).all()


@each_reader
def test_same_seed_repeats_order_and_crops_other_epoch_or_seed_reshuffles(tree, reader):
    """A new loader with the same seed, set to the same epoch, repeats order, crops and flips
    (file mode: the reader is seeded from (seed, rank, first epoch)); another epoch or seed
    gives another order."""
    def epoch_images(seed, epoch):
        train = loader(tree, train=True, seed=seed, reader=reader)
        return torch.cat([x for x, _ in run_epoch(train, epoch)])

    first, again = epoch_images(7, 2), epoch_images(7, 2)
    assert torch.equal(first, again)
    order = decode_batch(first)[1]
    assert not (decode_batch(epoch_images(7, 3))[1] == order).all()
    assert not (decode_batch(epoch_images(8, 2))[1] == order).all()


@each_reader
def test_batches_from_a_class_sorted_folder_mix_classes(tree, reader):
    """The order mixes the whole folder (feed: a global shuffle; file: DALI's pre-shuffle
    before the buffer): with 4 balanced classes, batches of 8 hold several classes (in folder
    order they hold one or two)."""
    batches = run_epoch(loader(tree, train=True, batch_size=8, reader=reader), epoch=0)
    histograms = [np.bincount(decode_batch(x)[0], minlength=CLASSES) for x, _ in batches]
    assert np.mean([(h > 0).sum() for h in histograms]) >= 3
    assert max(h.max() for h in histograms) <= 5


@each_reader
def test_breaking_out_early_leaves_the_next_epoch_whole(tree, reader):
    """A loop that stops after one batch: the next epoch still yields exactly its own batches."""
    broken = loader(tree, train=True, reader=reader)
    for _ in broken:
        break
    reference = decoded(run_epoch(loader(tree, train=True, reader=reader), epoch=1))[2]
    assert (decoded(run_epoch(broken, epoch=1))[2] == reference).all()


@each_reader
def test_a_superseded_iteration_fails_instead_of_stealing_batches(tree, reader):
    """A second iter() restarts the epoch cleanly; the first iterator then fails loudly."""
    val = loader(tree, reader=reader)
    first = iter(val)
    next(first)
    assert len(list(val)) == len(val)
    with pytest.raises(RuntimeError, match="superseded"):
        next(first)


# --- output format ----------------------------------------------------------------------------

@each_reader
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_shape_dtype_layout_and_normalisation(tree, train, channels_last, dtype, reader):
    """N x 3 x res x res in the requested dtype and memory format, int64 labels, and solid
    colours normalised to exactly (colour - mean) / std (within JPEG error)."""
    out = OutputSpec(device="cpu", dtype=dtype, channels_last=channels_last)
    batches = run_epoch(loader(tree, train=train, resolution=40, output=out, reader=reader))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in batches:
        assert x.shape[1:] == (3, 40, 40) and x.dtype == dtype
        assert x.is_contiguous(memory_format=fmt)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    images = torch.cat([x for x, _ in batches])
    labels, indices = decode_batch(images)
    want = np.array([code_color(l, i) for l, i in zip(labels, indices)])
    assert np.abs(expected_rgb(images) - want).max() < 3
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    exact = (torch.tensor(want, dtype=torch.float32).view(-1, 3, 1, 1) - mean) / std
    assert (images.float() - exact).abs().max() < 0.1  # every pixel, not just the means


@each_reader
def test_resolution_and_batch_size_change_exactly_at_the_epoch_boundary(tree, reader):
    """The last batch of an epoch has its size, the first batch after set_epoch the next
    epoch's, whatever the batch size does (feed mode rebuilds when it grows, file mode when it
    changes)."""
    schedule = Phases((Phase(0, 32, 4), Phase(1, 48, 6), Phase(2, 40, 3)))
    train = DaliLoader(tree, train=True, batch_size=99, resolution=schedule, output=CPU,
                       num_workers=1, reader=reader)
    for epoch, (res, bs) in enumerate([(32, 4), (48, 6), (40, 3), (40, 3)]):
        train.set_epoch(epoch)
        assert (train.resolution, train.batch_size, len(train)) == (res, bs, N // bs)
        shapes = [tuple(x.shape) for x, _ in train]
        assert shapes == [(bs, 3, res, res)] * (N // bs)


def test_file_reader_sizes_follow_the_schedule_through_prefetched_batches(tree):
    """File mode, one batch size: the pipeline (and its reader) keeps running across epochs,
    so DALI decodes the next epoch's first batches before set_epoch; they already have the
    next epoch's size. A jump to an epoch of another size rebuilds; a validation loader
    iterated again at its fixed size keeps its pipeline."""
    schedule = Phases((Phase(0, 32), Phase(1, 48), Phase(3, 40)))
    train = loader(tree, train=True, batch_size=4, resolution=schedule, reader="file",
                   prefetch=3)
    pipes = set()
    for epoch, res in [(0, 32), (1, 48), (2, 48), (3, 40), (4, 40), (0, 32)]:
        train.set_epoch(epoch)
        assert [tuple(x.shape[-2:]) for x, _ in train] == [(res, res)] * 12
        pipes.add(id(train._reader.stream.pipe))
    assert len(pipes) == 2  # one pipeline for epochs 0-4, a new one for the jump back
    val = loader(tree, resolution=36, reader="file")
    for _ in range(3):
        assert {x.shape[-1] for x, _ in val} == {36}
        pipes.add(id(val._reader.stream.pipe))
    assert len(pipes) == 3


def test_feed_runs_on_across_epochs_at_the_next_epochs_size(tree):
    """Feed mode: when an epoch's last batch is delivered, DALI already holds the next epoch's
    first batches (fed in that epoch's order, at its size), and each epoch still has exactly
    its own order and sizes; a jump back drains them and restarts the feed on the same
    pipeline; a validation loader at one size keeps feeding pass after pass."""
    schedule = Phases((Phase(0, 32), Phase(1, 48), Phase(3, 40)))
    train = loader(tree, train=True, batch_size=4, resolution=schedule, reader="feed")
    pipe = train._reader.pipe
    for epoch, res in [(0, 32), (1, 48), (2, 48), (3, 40), (4, 40), (0, 32)]:
        batches = run_epoch(train, epoch)
        assert [tuple(x.shape[-2:]) for x, _ in batches] == [(res, res)] * 12
        alone = run_epoch(loader(tree, train=True, batch_size=4, resolution=schedule), epoch)
        assert (decoded(batches)[2] == decoded(alone)[2]).all()
        ahead, (first, size) = train._reader.feed.in_flight, train._reader.batches(epoch + 1)[0]
        assert len(ahead) >= 1 and (ahead[0] == first).all()
        assert size == schedule.resolution(epoch + 1)
    assert train._reader.pipe is pipe
    val = loader(tree, resolution=36, reader="feed")
    for epoch in range(3):
        assert (decoded(run_epoch(val, epoch))[2] == np.arange(N)).all()
        assert len(val._reader.feed.in_flight) >= 1


@each_reader
def test_validation_resizes_the_shorter_side_then_centre_crops(tmp_path, reader):
    """A 128 x 64 image, red left of x = 48, blue right of it. Resizing the shorter side to
    val_resize(28) = 32 makes it 64 x 32 (red left of 24); the centre crop starts at column 18,
    so columns 0-5 are red. Squashing to 28 x 28 would make columns 0-10 red."""
    from PIL import Image
    img = Image.new("RGB", (128, 64), (200, 30, 30))
    img.paste((30, 30, 200), (48, 0, 128, 64))
    (tmp_path / "c0").mkdir()
    img.save(tmp_path / "c0" / "a.JPEG", quality=95)
    (x, _), = run_epoch(loader(tmp_path, batch_size=1, resolution=28, reader=reader))
    red = (x[0, 0] * IMAGENET_STD_255[0] + IMAGENET_MEAN_255[0]).mean(dim=0)
    assert x.shape == (1, 3, 28, 28)
    assert red[:4].min() > 150 and red[9:].max() < 80


@each_reader
def test_training_crops_and_flips_vary_per_image(tmp_path, reader):
    """24 copies of one image, red left half and blue right half: training outputs show red on
    the left (kept) and on the right (flipped), in many proportions (random-resized crops)."""
    from PIL import Image
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    img.paste((30, 30, 200), (32, 0, 64, 64))
    (tmp_path / "c0").mkdir()
    for k in range(24):
        img.save(tmp_path / "c0" / f"{k:02d}.JPEG", quality=95)
    train = loader(tmp_path, train=True, batch_size=8, reader=reader)
    images = torch.cat([x for x, _ in run_epoch(train)])
    red = images[:, 0].mean(dim=1) * IMAGENET_STD_255[0] + IMAGENET_MEAN_255[0]  # N x W
    left, right = red[:, :4].mean(dim=1), red[:, -4:].mean(dim=1)
    assert (left > right + 100).any() and (right > left + 100).any()
    assert len(torch.unique((red > 115).float().mean(dim=1))) >= 5


# --- sources and configuration ----------------------------------------------------------------

@each_reader
def test_dali_file_list_source_gives_the_same_samples_as_the_folder(tree, tmp_path, reader):
    """A DALI ``name label`` list with paths relative to the list: same samples, same labels,
    in validation and (same seed) in training."""
    listing = tmp_path / "list.txt"
    rel = os.path.relpath(tree, tmp_path)
    lines = [f"{rel}/c{label:02d}/img{k:03d}.JPEG {label}"
             for label in range(CLASSES) for k in range(PER_CLASS)]
    listing.write_text("\n".join(lines) + "\n\n")
    for train in (False, True):
        from_list = loader(listing, train=train, reader=reader)
        from_folder = loader(tree, train=train, reader=reader)
        assert (from_list.num_samples, from_list.num_classes) == (N, CLASSES)
        assert all((a == b).all() for a, b in zip(decoded(run_epoch(from_list)),
                                                  decoded(run_epoch(from_folder))))


@each_reader
def test_file_list_entry_missing_on_disk_is_an_error_naming_it(tree, tmp_path, reader):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tree}/c00/img000.JPEG 0\ngone.JPEG 1\n")
    with pytest.raises(BadImageError, match=re.escape(f"cannot decode {tmp_path}/gone")):
        list(loader(listing, batch_size=2, reader=reader))


@each_reader
def test_make_loader_builds_a_dali_loader_with_the_split_metadata(tree, reader):
    made = make_loader("dali", tree, train=False, batch_size=8, resolution=32, output=CPU,
                       reader=reader)
    assert isinstance(made, DaliLoader) and made.reader == reader
    assert (made.num_samples, made.num_classes, len(made)) == (N, CLASSES, 6)


def source_of_kind(kind: str, tree: Path, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "nowhere"
    if kind == "bad list":
        (tmp_path / "list.txt").write_text("img.JPEG cat\n")
        return tmp_path / "list.txt"
    if kind == "dataset root":
        for split in ("train", "val"):
            write_coded_tree(tmp_path / split, classes=2, per_class=2)
        return tmp_path
    if kind == "empty class":
        shutil.copytree(tree, tmp_path / "copy")
        return add_empty_class(tmp_path / "copy").parent
    return tree


@pytest.mark.parametrize("source, kw, error, message", [
    ("missing", {}, FileNotFoundError, "neither an ImageFolder"),
    ("bad list", {}, ValueError, "list.txt:1"),
    ("empty class", {}, FileNotFoundError, "c99_empty"),
    ("dataset root", {}, ValueError, "looks like a dataset root, not a split"),
    ("tree", dict(batch_size=64), ValueError, "no batch of 64 on rank 0 of 1"),
    ("tree", dict(num_workers=0), ValueError, "num_workers"),
    ("tree", dict(seed=-1), ValueError, "seed"),
    ("tree", dict(reader="files"), ValueError, "reader must be one of"),
    ("tree", dict(reader="file", shard=Shard(0, N + 1)), ValueError, "a sample for every rank"),
])
def test_bad_configuration_is_an_error_naming_the_problem(tree, tmp_path, source, kw, error,
                                                          message):
    kw = dict(train=True, batch_size=4, resolution=32, output=CPU) | kw
    with pytest.raises(error, match=message):
        DaliLoader(source_of_kind(source, tree, tmp_path), **kw)


# --- bad files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_coded_tree(root, classes=2, per_class=6)
    return root


def with_bad_file(small_tree: Path, tmp_path: Path, kind: str):
    root = tmp_path / "tree"
    shutil.copytree(small_tree, root)
    return root, *add_bad_file(root, kind, class_dir="c01")


@each_reader
@pytest.mark.parametrize("kind", sorted(DECODABLE))
def test_odd_but_valid_files_decode_to_the_right_colour(small_tree, tmp_path, kind, reader):
    """CMYK, grayscale and PNG-under-.JPEG: the right RGB colour, the right label."""
    root, path, colour = with_bad_file(small_tree, tmp_path, kind)
    val = loader(root, batch_size=4, reader=reader)
    images = torch.cat([x for x, _ in val])
    labels = torch.cat([y for _, y in val])
    position = val.paths.index(str(path))  # first file of class 1 ("bad_" < "img")
    assert labels[position] == 1
    assert np.abs(expected_rgb(images[position:position + 1])[0] - colour).max() < 6


@each_reader
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", sorted(set(BAD_FILE_WRITERS) - DECODABLE))
def test_undecodable_file_raises_an_error_naming_it(small_tree, tmp_path, kind, train, reader):
    """Truncated, corrupt, empty and non-image files stop the epoch with a BadImageError that
    names the file and the reason in words, in folder order (4th batch) or shuffled; iterating
    again fails the same way (never skips). File mode finds undecodable files by replaying the
    reader's stream."""
    root, path, _ = with_bad_file(small_tree, tmp_path, kind)
    bad = loader(root, train=train, batch_size=2, drop_last=False, reader=reader)
    for _ in range(2):
        with pytest.raises(BadImageError, match=re.escape(f"cannot decode {path}: {REASONS[kind]}")):
            list(bad)


UNREADABLE_CHILD = """
import sys
from pipelines import OutputSpec
from pipelines import BadImageError
from pipelines.dali import READERS, DaliLoader
failed = 0
for reader in READERS:
    try:
        list(DaliLoader(sys.argv[1], train=False, batch_size=2, resolution=32,
                        output=OutputSpec(device="cpu"), num_workers=1, reader=reader))
    except BadImageError as e:
        print(reader, e)
        failed += 1
sys.exit(3 if failed == len(READERS) else 1)
"""


def test_unreadable_file_raises_an_error_naming_it(small_tree, tmp_path):
    """chmod 000 file, with either reader. Root reads it anyway, so as root the check runs in
    a child process without the capabilities that bypass file permissions (setpriv)."""
    root, path, _ = with_bad_file(small_tree, tmp_path, "truncated")
    path.write_bytes((small_tree / "c00" / "img000.JPEG").read_bytes())
    make_unreadable(path)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        drop = "-dac_override,-dac_read_search"
        prefix = ["setpriv", "--bounding-set", drop, "--inh-caps", drop]
    child = subprocess.run([*prefix, sys.executable, "-c", UNREADABLE_CHILD, str(root)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == 3, child.stdout[-2000:] + child.stderr[-2000:]
    for reader in READERS:
        assert f"{reader} cannot decode {path}: unreadable (Permission denied)" in child.stdout


# --- adaptor ----------------------------------------------------------------------------------

@pipeline_def(batch_size=5, num_threads=1, device_id=None)
def user_pipeline(root, shard_id=0, num_shards=1, normalize=False):
    """A typical user pipeline: DALI's own folder reader, uint8 HWC or normalised CHW output."""
    jpegs, labels = fn.readers.file(file_root=str(root), name="Reader", shard_id=shard_id,
                                    num_shards=num_shards)
    images = fn.resize(fn.decoders.image(jpegs, output_type=types.RGB), size=(24, 24))
    if normalize:
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=list(IMAGENET_MEAN_255), std=list(IMAGENET_STD_255))
    elif normalize is None:  # float but forgot mean/std
        images = fn.cast(images, dtype=types.FLOAT)
    return images, labels


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("channels_last", [True, False])
def test_adaptor_turns_a_user_pipeline_into_salmix_batches(tree, label_of, normalize,
                                                           channels_last):
    """uint8 HWC (normalised here) or float CHW (normalised by DALI): the same salmix batches,
    labels squeezed to int64 (N,), len and num_samples from the reader, per shard."""
    out = OutputSpec(device="cpu", dtype=torch.float16, channels_last=channels_last)
    seen = []
    for shard in range(2):
        adaptor = DaliAdaptor(user_pipeline(tree, shard, 2, normalize), images="data",
                              labels="label", output=out, train=False)
        batches = list(adaptor)
        assert len(batches) == len(adaptor) == 5 and adaptor.num_samples == N
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for x, y in batches:
            assert x.dtype == torch.float16 and x.shape[1:] == (3, 24, 24)
            assert x.is_contiguous(memory_format=fmt) and y.dtype == torch.int64 and y.dim() == 1
        given, labels, indices = decoded(batches)
        assert (given == labels).all() and (label_of[indices] == labels).all()
        images = torch.cat([x for x, _ in batches])
        want = np.array([code_color(l, i) for l, i in zip(labels, indices)])
        assert np.abs(expected_rgb(images) - want).max() < 3
        seen.append(indices)
    assert (np.sort(np.concatenate(seen)) == np.arange(N)).all()
    assert adaptor.resolution == 24


def test_adaptor_wraps_a_user_iterator_with_its_own_output_names(tree, label_of):
    """The layout comes from the channel position, the length from the user's iterator."""
    iterator = DALIGenericIterator(user_pipeline(tree), ["img", "cls"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.DROP)
    adaptor = DaliAdaptor(iterator, images="img", labels="cls", output=CPU)
    for epoch in range(2):
        adaptor.set_epoch(epoch)
        given, labels, indices = decoded(list(adaptor))
        assert (given == labels).all() and (label_of[indices] == labels).all()
        assert len(indices) == len(adaptor) * 5 == N - N % 5


@pytest.mark.parametrize("source, kw, error, message", [
    ("uint8", dict(images="image"), KeyError, r"its outputs are \['data', 'label'\]"),
    ("uint8", dict(images="label", labels="data"), ValueError, "'label' is not a batch of images"),
    ("uint8", dict(labels="data"), ValueError, "'data' is not one class label per image"),
    ("float", {}, ValueError, r"with values up to \d+: not normalised"),
    ("uint8", dict(normalized=True), ValueError, "uint8, so it is not normalised"),
    ("uint8", dict(output_map=["a", "b", "c"]), ValueError, "has 2 outputs"),
    ("uint8", dict(reader_name="Loader"), KeyError, "its readers are"),
    ("list", {}, TypeError, "wraps a DALI Pipeline"),
])
def test_adaptor_errors_name_the_problem(tree, source, kw, error, message):
    """Wrong output names, outputs of the wrong kind, a float output still in 0-255."""
    pipe = {"uint8": lambda: user_pipeline(tree), "list": lambda: [1, 2, 3],
            "float": lambda: user_pipeline(tree, normalize=None)}[source]()
    with pytest.raises(error, match=message):
        list(DaliAdaptor(pipe, output=CPU, **{"output_map": ["data", "label"], **kw}))


def test_adaptor_without_reader_or_size_has_no_length(tree):
    files = sorted(str(p) for p in tree.rglob("*.JPEG"))[:10]

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def from_python():
        data = fn.external_source(source=iter([[np.fromfile(f, np.uint8) for f in files[:5]],
                                               [np.fromfile(f, np.uint8) for f in files[5:]]]),
                                  batch=True)
        return fn.resize(fn.decoders.image(data), size=(16, 16)), fn.constant(idata=0, shape=[1])

    adaptor = DaliAdaptor(from_python(), output=CPU)
    assert sum(x.shape[0] for x, _ in adaptor) == 10
    with pytest.raises(TypeError, match="no known length"):
        len(adaptor)


# --- GPU ---------------------------------------------------------------------------------------

@each_reader
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (mixed decoder path)")
def test_gpu_batches_arrive_on_the_device_aligned(tree, label_of, reader):
    out = OutputSpec(device="cuda", dtype=torch.bfloat16, channels_last=True)
    batches = run_epoch(loader(tree, train=True, output=out, reader=reader))
    assert all(x.is_cuda and y.is_cuda and x.dtype == torch.bfloat16 for x, y in batches)
    given, labels, indices = decoded([(x.cpu(), y.cpu()) for x, y in batches])
    assert (given == labels).all() and (label_of[indices] == labels).all()


# --- step-level resume ------------------------------------------------------------------------

def test_feed_mode_resumes_mid_epoch_without_reading_the_skipped_files(tree, tmp_path, label_of):
    """set_epoch(e, start_batch=k), feed mode: validation batches k.. are bitwise those of the
    uninterrupted pass; training batches hold the same images in the same order with their
    labels, but other crops (resumes_exactly is False: DALI's generator has drawn for fewer
    batches). The skipped batches' files (made undecodable here) are never read; len() stays
    the whole epoch's."""
    for name in ("val", "train"):
        shutil.copytree(tree, tmp_path / name)
    val = loader(tmp_path / "val", batch_size=5)
    train = loader(tmp_path / "train", train=True, batch_size=5, seed=4)
    assert val.resumes_exactly and not train.resumes_exactly
    whole_val = [(x.clone(), y.clone()) for x, y in run_epoch(val)]
    train.set_epoch(3)
    whole_train = decoded([(x.clone(), y) for x, y in train])
    k = 4
    for paths, skipped in ((val.paths, range(k * 5)),
                           (train.paths, np.concatenate(train.split_at(3).batches(4, 3)[:k]))):
        for i in skipped:
            Path(paths[i]).write_bytes(b"not an image any more")
    val = loader(tmp_path / "val", batch_size=5)  # a resumed run's new loader: nothing in flight
    val.set_epoch(0, start_batch=k)
    resumed = list(val)
    assert len(val) == len(whole_val) and len(resumed) == len(whole_val) - k
    for (x, y), (wx, wy) in zip(resumed, whole_val[k:], strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    train = loader(tmp_path / "train", train=True, batch_size=5, seed=4)
    train.set_epoch(3, start_batch=k)
    given, labels, indices = decoded(list(train))
    assert (given == labels).all() and (label_of[indices] == labels).all()
    assert (indices == whole_train[2][k * 5:]).all()


def test_file_mode_and_the_adaptor_refuse_to_start_mid_epoch(tree):
    """File mode resumes at an epoch's start only: start_batch > 0 names the feed reader."""
    train = loader(tree, train=True, reader="file")
    assert not train.resumes_exactly
    with pytest.raises(ValueError, match="reader='feed' .*data.dali_reader feed"):
        train.set_epoch(1, start_batch=2)
    train.set_epoch(1, start_batch=0)
    adaptor = DaliAdaptor(user_pipeline(tree), output=CPU)
    with pytest.raises(ValueError, match="cannot start epoch 0 at batch 1"):
        adaptor.set_epoch(0, start_batch=1)
