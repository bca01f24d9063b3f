"""GPU decoding for the folder loader (pipelines/gpu_decode.py), checked on the CPU as far as it goes.

The GPU path's code (worker: bytes, header, crop draw; main process: batched decode, crop
batch, separable resampling, normalisation) runs here on CPU tensors, with torchvision's
libjpeg-turbo decoder standing in for nvJPEG, against the CPU path (PIL in the workers) on
real JPEGs: the same crop boxes and flips bit for bit, pixels within a measured tolerance.
Tests named ``*cuda*`` need CUDA (nvJPEG) and are skipped without it.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pipelines import OutputSpec, Shard, make_loader
from pipelines.base import IMAGENET_MEAN_255, IMAGENET_STD_255, RRC_SCALE
from pipelines.folder import FolderLoader, Samples, random_resized_crop_box
from pipelines.gpu_decode import (GpuDecoder, RawSamples, axis_weights, header_ok,
                                  resolve_decode, train_plan, val_plan)
from tests.imagefiles import (BAD_FILE_WRITERS, DECODABLE, add_bad_file, decode_batch,
                              expected_rgb, write_coded_tree)

CPU = OutputSpec(device="cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
#: Photo-like sizes: ImageNet's typical 500 x 375 both ways, odd sizes, and images smaller
#: than the output (the crop is upsampled).
SIZES = [(500, 375), (375, 500), (333, 500), (500, 333), (640, 480), (250, 250), (80, 60),
         (61, 97), (17, 300)]
# Tolerances, in 0-255 levels, of the GPU path run on the CPU against the PIL path, beyond what
# the two libjpeg-turbo builds (Pillow's, torchvision's) differ by on the same file (measured
# by decoder_difference; bit-identical on the development machine). What is left is
# resampling: PIL rounds its result to uint8 (up to 0.5) after computing with 22-bit
# fixed-point coefficients (a little more); the GPU path keeps float32. Measured over SIZES,
# train and val, 32-288 px, 4 epochs: max 1.00, mean 0.27-0.30.
MAX_ABS, MEAN_ABS = 1.5, 0.4
# nvJPEG against Pillow: a different IDCT and chroma upsampling add to the above. Provisional
# bounds (not measured on a GPU yet): tests/test_gpu_decode.py prints the measured figures.
CUDA_MEAN_ABS, CUDA_P999_ABS = 2.0, 24.0


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A textured RGB image (gradients, waves, grain): every crop and resize shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xx * 0.7 + 30 * np.sin(yy / 9)) % 256, (yy * 0.5 + 40 * np.cos(xx / 13)) % 256,
                    (xx + yy + 40 * seed) % 256], axis=-1)
    return Image.fromarray(np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An ImageFolder tree of photo-like JPEGs (quality 90) of SIZES, 3 classes."""
    root = tmp_path_factory.mktemp("photos")
    for k, (w, h) in enumerate(SIZES):
        (root / f"c{k % 3}").mkdir(exist_ok=True)
        photo(w, h, k).save(root / f"c{k % 3}" / f"img{k}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    files = write_coded_tree(root, classes=4, per_class=10)
    return root, np.array([label for _, label, _ in files])


def gpu_path_on_cpu(loader: FolderLoader) -> FolderLoader:
    """``loader`` (built with decode='cpu') switched to the GPU path, decoding on the CPU."""
    loader._gpu = GpuDecoder(Samples(loader.index.samples, loader.train, loader.seed), loader.output)
    loader._stream = None
    return loader


def folder(root, **kw):
    kw = {"output": CPU, "num_workers": 0, "resolution": 32, "decode": "cpu", **kw}
    return make_loader("folder", root, **kw)


def to_255(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    return images.float().cpu() * std + mean


def batches_both_ways(root, train: bool, res: int, epoch: int, device_output=CPU, gpu_on_cpu=True):
    """One epoch of (reference CPU-path batches, GPU-path batches)."""
    kw = dict(train=train, batch_size=len(SIZES), resolution=res)
    ref = folder(root, **kw)
    ref.set_epoch(epoch)
    if gpu_on_cpu:
        got = gpu_path_on_cpu(folder(root, **kw))
    else:
        got = folder(root, output=device_output, decode="gpu", **kw)
    got.set_epoch(epoch)
    return list(ref), list(got)


# --- crop draws, plans and weights ------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_crop_boxes_and_flips_are_the_cpu_paths_bit_for_bit(photos, train):
    """The worker's plan is the CPU path's box and flip, from the same keyed generator, at the
    crop scale its key carries."""
    loader = folder(photos, train=train, batch_size=3)
    cpu = Samples(loader.index.samples, train, loader.seed)
    raw = RawSamples(cpu)
    flips = []
    for epoch in range(6):
        for i, (path, _) in enumerate(loader.index.samples):
            sample = raw[(i, 64, epoch, (0.3, 1.0))]
            with Image.open(path) as img:
                width, height = img.size
            assert sample.size == (height, width)
            if train:
                rng = np.random.default_rng((cpu.seed, epoch, i))
                box = random_resized_crop_box(width, height, rng, (0.3, 1.0))
                flip = rng.random() < 0.5
                assert sample.plan == train_plan(box, flip, 64)
                flips.append(flip)
            else:
                assert sample.plan == val_plan(width, height, 64)
    if train:
        assert 0.2 < np.mean(flips) < 0.8


@pytest.mark.parametrize("res", [32, 64, 160, 224, 288])
def test_val_plan_follows_torchvision_resize_and_centre_crop(res):
    """val_plan's resized size is torchvision's (shorter side to res/0.875, longer truncated)."""
    rng = np.random.default_rng(res)
    for width, height in [*SIZES, *rng.integers(16, 900, (40, 2)).tolist()]:
        plan = val_plan(width, height, res)
        resized = F.resize(torch.zeros(1, height, width), int(round(res / 0.875)), antialias=True)
        assert (plan[2], plan[6]) == tuple(resized.shape[1:])
        assert (plan[3], plan[7]) == (int(round((plan[2] - res) / 2.0)), int(round((plan[6] - res) / 2.0)))


def test_axis_weights_are_torchs_antialiased_bilinear_resize():
    """One axis of the weights, applied as a matrix, is torch's antialias=True bilinear resize
    (PIL's filter), down and up, with and without an offset window."""
    rng = np.random.default_rng(0)
    for length, out, offset, res in [(500, 224, 0, 224), (97, 224, 0, 224), (375, 292, 34, 224),
                                     (224, 224, 0, 224), (13, 5, 1, 3)]:
        row = torch.from_numpy(rng.uniform(0, 255, (1, 1, 1, length))).float()
        want = torch.nn.functional.interpolate(row, size=(1, out), mode="bilinear", antialias=True,
                                               align_corners=False)[0, 0, 0, offset:offset + res]
        w = axis_weights(torch.tensor([length]), torch.tensor([out]), torch.tensor([offset]), res,
                         length + 3)[0]
        assert torch.allclose(w.sum(1), torch.ones(res))
        assert (w[:, length:] == 0).all()
        torch.testing.assert_close(w @ torch.cat([row[0, 0, 0], torch.zeros(3)]), want,
                                   atol=1e-3, rtol=1e-5)


# --- pixels against the PIL path ----------------------------------------------------------------

def decoder_difference(root) -> tuple[float, float]:
    """(max, mean) |torchvision's CPU decode - Pillow's| over the JPEGs under ``root``, levels."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    worst, means = 0.0, []
    for path in sorted(root.rglob("*.JPEG")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29
            tv = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
        pil = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        diff = (tv.float() - pil.float()).abs()
        worst, means = max(worst, diff.max().item()), means + [diff.mean().item()]
    return worst, float(np.mean(means))


def test_pil_and_torchvision_decode_the_test_jpegs_alike(photos, capsys):
    """The premise of the CPU tolerance: both libjpeg-turbo decoders agree (to a level)."""
    worst, mean = decoder_difference(photos)
    with capsys.disabled():
        print(f"\n  torchvision vs Pillow decode: max {worst:.0f}, mean {mean:.3f} levels")
    assert worst <= 2 and mean <= 0.5


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("res", [32, 224, 288])
def test_gpu_path_on_the_cpu_matches_the_pil_path(photos, train, res, capsys):
    """Same samples, same order, same crops: pixels within MAX_ABS / MEAN_ABS levels."""
    worst, means = 0.0, []
    for epoch in range(2):
        ref, got = batches_both_ways(photos, train, res, epoch)
        assert len(ref) == len(got) == 1
        (ref_x, ref_y), (got_x, got_y) = ref[0], got[0]
        torch.testing.assert_close(got_y, ref_y, rtol=0, atol=0)
        assert got_x.shape == ref_x.shape and got_x.dtype == ref_x.dtype
        assert got_x.is_contiguous(memory_format=torch.channels_last)
        diff = (to_255(got_x) - to_255(ref_x)).abs()
        worst, means = max(worst, diff.max().item()), means + [diff.mean().item()]
    with capsys.disabled():
        print(f"\n  gpu path on cpu vs PIL, train={train} {res} px: max {worst:.3f}, "
              f"mean {max(means):.3f} levels")
    decode_max, decode_mean = decoder_difference(photos)
    assert worst <= MAX_ABS + decode_max and max(means) <= MEAN_ABS + decode_mean


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [True, False])
def test_gpu_path_writes_the_requested_dtype_and_layout(photos, dtype, channels_last):
    out = OutputSpec(device="cpu", dtype=dtype, channels_last=channels_last)
    loader = gpu_path_on_cpu(folder(photos, train=True, batch_size=4, output=out))
    images, labels = next(iter(loader))
    assert images.dtype == dtype and labels.dtype == torch.int64 and images.shape == (4, 3, 32, 32)
    assert images.is_contiguous(memory_format=out.memory_format)


# --- labels, shards, workers -----------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_labels_stay_aligned_through_the_gpu_path(coded, train, world, workers):
    """Coded images: every image arrives with its own label, on every rank, with workers."""
    root, label_of = coded
    for rank in range(world):
        loader = gpu_path_on_cpu(folder(root, train=train, batch_size=4, shard=Shard(rank, world),
                                        num_workers=workers))
        ref = folder(root, train=train, batch_size=4, shard=Shard(rank, world))
        for epoch in range(2):
            loader.set_epoch(epoch), ref.set_epoch(epoch)
            got = [(decode_batch(x), y) for x, y in loader]
            want = [(decode_batch(x), y) for x, y in ref]
            assert len(got) == len(want) > 0
            for ((labels, indices), y), ((_, ref_indices), _) in zip(got, want):
                np.testing.assert_array_equal(labels, y.numpy())
                np.testing.assert_array_equal(label_of[indices], y.numpy())
                np.testing.assert_array_equal(indices, ref_indices)


# --- files nvJPEG should not take ------------------------------------------------------------

def tree_with_odd_file(root, kind):
    """A small coded tree plus one file of ``kind`` (a DECODABLE bad file, or a progressive
    JPEG); returns (its path, the RGB colour it must decode to)."""
    write_coded_tree(root, classes=2, per_class=3)
    if kind != "progressive":
        return add_bad_file(root, kind)
    path, color = root / "c00" / "bad_progressive.JPEG", (30, 160, 90)
    Image.new("RGB", (64, 48), color).save(path, format="JPEG", quality=95, progressive=True)
    return path, color


@pytest.mark.parametrize("kind", sorted(DECODABLE | {"progressive"}))
@pytest.mark.parametrize("train", [True, False])
def test_odd_files_take_the_cpu_path_in_the_worker_and_decode_to_rgb(tmp_path, kind, train):
    path, color = tree_with_odd_file(tmp_path, kind)
    loader = gpu_path_on_cpu(folder(tmp_path, train=train, batch_size=7))
    index = [p for p, _ in loader.index.samples].index(str(path))
    sample = RawSamples(loader._gpu.cpu)[(index, 32, 0, RRC_SCALE)]
    assert sample.image is not None and sample.data is None  # decoded in the worker
    assert header_ok(path.read_bytes()) is None
    np.testing.assert_allclose(sample.image.float().mean((0, 1)).numpy(), color, atol=4)
    if not train:  # through the loader: in dataset order, next to GPU-path images
        images, labels = next(iter(loader))
        np.testing.assert_allclose(expected_rgb(images)[index], color, atol=4)
        assert labels[index] == 0 and labels[-1] == 1


@pytest.mark.parametrize("kind", sorted(set(BAD_FILE_WRITERS) - DECODABLE))
def test_broken_files_fail_naming_the_file_as_on_the_cpu_path(tmp_path, kind):
    write_coded_tree(tmp_path, classes=2, per_class=3)
    path, _ = add_bad_file(tmp_path, kind)
    loader = gpu_path_on_cpu(folder(tmp_path, train=True, batch_size=7))
    with pytest.raises((RuntimeError, ValueError), match=str(path.name)):  # the CPU path's error
        list(loader)


def test_files_the_batch_decoder_refuses_fall_back_in_the_main_process(coded, monkeypatch):
    """A file the batched decoder cannot take (here: made to fail) is decoded by the CPU path in
    the main process: same pixels as the CPU path, labels aligned."""
    root, label_of = coded
    loader = gpu_path_on_cpu(folder(root, train=False, batch_size=8))
    decode = GpuDecoder.decode

    def refuse_some(self, data):
        out = decode(self, data)
        return [None if k % 3 == 1 else img for k, img in enumerate(out)]

    monkeypatch.setattr(GpuDecoder, "decode", refuse_some)
    ref = folder(root, train=False, batch_size=8)
    for (x, y), (rx, ry) in zip(loader, ref):
        labels, indices = decode_batch(x)
        np.testing.assert_array_equal(labels, y.numpy())
        np.testing.assert_array_equal(indices, decode_batch(rx)[1])
    assert loader._gpu.fallbacks > 0


def test_headers_nvjpeg_takes(photos, tmp_path):
    path = sorted(photos.rglob("*.JPEG"))[0]
    data = path.read_bytes()
    assert header_ok(data) is not None
    assert header_ok(data + b"\0" * 100) is not None  # trailing bytes after the EOI marker
    assert header_ok(data[: len(data) // 2]) is None  # truncated
    assert header_ok(b"") is None


# --- the decode option -----------------------------------------------------------------------

def test_decode_option_is_checked(coded):
    root, _ = coded
    with pytest.raises(ValueError, match="decode must be one of auto, cpu, gpu"):
        folder(root, train=True, batch_size=4, decode="nvjpeg")
    assert resolve_decode("auto", torch.device("cpu")) == "cpu"
    assert folder(root, train=True, batch_size=4, decode="auto").decode == "cpu"
    with pytest.raises(ValueError, match="decode='gpu'"):
        resolve_decode("gpu", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_decode_gpu_without_cuda_is_a_clear_error(coded):
    root, _ = coded
    with pytest.raises(ValueError, match="decode='gpu' needs CUDA"):
        folder(root, train=True, batch_size=4, decode="gpu")


# --- on CUDA ---------------------------------------------------------------------------------

@CUDA
def test_cuda_auto_picks_gpu_decode(coded):
    root, _ = coded
    loader = folder(root, train=True, batch_size=4, output=OutputSpec(device="cuda"), decode="auto")
    assert loader.decode == "gpu"


@CUDA
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("res", [64, 224])
def test_cuda_nvjpeg_matches_the_pil_path(photos, train, res, capsys):
    """nvJPEG + GPU resampling against PIL in the workers: same crops, labels; pixels close."""
    out = OutputSpec(device="cuda", dtype=torch.float32)
    ref, got = batches_both_ways(photos, train, res, 0, device_output=out, gpu_on_cpu=False)
    (ref_x, ref_y), (got_x, got_y) = ref[0], got[0]
    assert got_x.device.type == "cuda"
    torch.testing.assert_close(got_y.cpu(), ref_y, rtol=0, atol=0)
    diff = (to_255(got_x) - to_255(ref_x)).abs()
    mean, p999, worst = diff.mean().item(), diff.flatten().quantile(0.999).item(), diff.max().item()
    with capsys.disabled():
        print(f"\n  nvJPEG vs PIL, train={train} {res} px: mean {mean:.3f}, p99.9 {p999:.2f}, "
              f"max {worst:.2f} levels")
    assert mean <= CUDA_MEAN_ABS and p999 <= CUDA_P999_ABS


@CUDA
@pytest.mark.parametrize("world", [1, 2])
def test_cuda_labels_stay_aligned(coded, world):
    root, label_of = coded
    out = OutputSpec(device="cuda", dtype=torch.float16, channels_last=True)
    for rank in range(world):
        loader = folder(root, train=True, batch_size=4, shard=Shard(rank, world), output=out,
                        decode="gpu", num_workers=2)
        for x, y in loader:
            assert x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
            labels, indices = decode_batch(x)
            np.testing.assert_array_equal(labels, y.cpu().numpy())
            np.testing.assert_array_equal(label_of[indices], y.cpu().numpy())


@CUDA
@pytest.mark.parametrize("kind", sorted(DECODABLE | {"progressive"}))
def test_cuda_odd_files_decode_to_rgb(tmp_path, kind):
    path, color = tree_with_odd_file(tmp_path, kind)
    loader = folder(tmp_path, train=False, batch_size=7, output=OutputSpec(device="cuda"), decode="gpu")
    images, _ = next(iter(loader))
    k = [p for p, _ in loader.index.samples].index(str(path))
    np.testing.assert_allclose(expected_rgb(images)[k], color, atol=4)
