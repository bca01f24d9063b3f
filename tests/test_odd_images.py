"""Odd images at the edges of a dataset, through every backend on real files written here.

Extreme sizes (6000 x 20, 4000 x 20, 1 x 1), a 16-bit PNG under a .JPEG name and an
EXIF-rotated JPEG must decode to the same pixels in the folder loader, DALI (both readers) and
FFCV: 16 bits scaled to 8, EXIF orientation ignored (PIL's practice). FFCV runs in a child
process (its writer hung on a short side that rounds to 0 px, its validation decoder aborted
the process on a 1 px short side), once for the whole module. Then: the dataset check names
these files, every backend raises ``BadImageError`` with the reason in words, and DaliAdaptor
says what is wrong with an output it cannot take.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipelines import BadImageError, OutputSpec, make_loader
from pipelines.check import KINDS, check_file, check_tree
from pipelines.dali import DaliAdaptor
from pipelines.dali_graph import dali_reason
from pipelines.imagefolder import scan_image_folder
from tests.imagefiles import (MEAN_255, STD_255, add_bad_file, expected_rgb, write_16bit_png,
                              write_coded_tree, write_exif_rotated_jpeg,
                              write_random_after_header_jpeg, write_solid_jpeg)

REPO = Path(__file__).resolve().parents[1]
CPU = OutputSpec(device="cpu")
SIZES = {"wide": (6000, 20), "strip": (4000, 20), "pixel": (1, 1)}
COLOURS = {"wide": (40, 200, 40), "strip": (40, 200, 200), "pixel": (200, 200, 40)}


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, object]]:
    """A split of 4 plain coded JPEGs and the odd files; (root, {name: path}, {name: expected})."""
    root = tmp_path_factory.mktemp("odd") / "split"
    write_coded_tree(root, classes=2, per_class=2)
    paths, expected = {}, {}
    for name, size in SIZES.items():
        paths[name] = str(root / "c00" / f"{name}.JPEG")
        expected[name] = write_solid_jpeg(Path(paths[name]), size, COLOURS[name])
    paths["deep"] = str(root / "c01" / "deep.JPEG")
    expected["deep"] = write_16bit_png(Path(paths["deep"]))
    paths["exif"] = str(root / "c01" / "exif.JPEG")
    expected["exif"] = write_exif_rotated_jpeg(Path(paths["exif"]))
    return root, paths, expected


def pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised N x 3 x H x W -> N x H x W x 3 pixel values (0-255 floats)."""
    return images.float().permute(0, 2, 3, 1).numpy() * STD_255 + MEAN_255


def check_val_batch(images: torch.Tensor, order: list[str], paths, expected, backend) -> None:
    """Solid files have their colour, the 16-bit one its 8-bit grey, the EXIF one its stored
    left half red and right half blue (a rotation by its tag would put red on top)."""
    rgb = expected_rgb(images)
    for name in (*SIZES, "deep"):
        got = rgb[order.index(paths[name])]
        assert np.abs(got - expected[name]).max() < 8, (backend, name, got)
    exif = pixels(images[order.index(paths["exif"])][None])[0]
    left, right = exif[:, :4].mean(axis=(0, 1)), exif[:, -4:].mean(axis=(0, 1))
    assert np.abs(left - expected["exif"][0]).max() < 25, (backend, left)
    assert np.abs(right - expected["exif"][1]).max() < 25, (backend, right)


BACKENDS = [("folder", {"num_workers": 0}), ("dali", {"reader": "feed", "num_workers": 1}),
            ("dali", {"reader": "file", "num_workers": 1})]


@pytest.mark.parametrize("backend, kw", BACKENDS, ids=["folder", "dali-feed", "dali-file"])
def test_folder_and_dali_decode_odd_images_alike(odd, backend, kw):
    """Items 13-15 for the folder loader and DALI: extreme sizes, 16 bits and EXIF give the
    expected pixels in validation, and a training epoch over them runs."""
    root, paths, expected = odd
    order = scan_image_folder(root).paths
    val = make_loader(backend, root, train=False, batch_size=len(order), resolution=32,
                      output=CPU, **kw)
    (images, _), = list(val)
    check_val_batch(images, order, paths, expected, f"{backend} {kw}")
    train = make_loader(backend, root, train=True, batch_size=3, resolution=24, output=CPU, **kw)
    assert [x.shape for x, _ in train] == [(3, 3, 24, 24)] * (len(order) // 3)


FFCV_CHILD = """
import json, sys, time
from ffcv.reader import Reader
from pipelines import OutputSpec
from pipelines.ffcv import FfcvLoader, write_beton
from pipelines.imagefolder import scan_image_folder
root, beton = sys.argv[1:3]
paths = scan_image_folder(root).paths
start = time.monotonic()
write_beton(root, beton, max_resolution=256, num_workers=2, progress=False)
meta = Reader(beton).metadata["f0"]
out = {"write_s": time.monotonic() - start,
       "stored": {p: [int(m["width"]), int(m["height"])] for p, m in zip(paths, meta)}}
print(json.dumps(out), flush=True)
for train in (False, True):
    loader = FfcvLoader(beton, train=train, batch_size=len(paths) if not train else 3,
                        resolution=32, output=OutputSpec(device="cpu"), num_workers=1)
    batches = [x.clone() for x, _ in loader]
    out["train" if train else "val"] = [x.tolist() for x in batches] if not train else len(batches)
    print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def ffcv_child(odd, tmp_path_factory):
    """The FFCV child's last JSON line (or None), its exit status ('timeout' if it hung) and
    stderr: write the odd split to a beton at max_resolution 256, read it in validation and
    training."""
    root, _, _ = odd
    beton = tmp_path_factory.mktemp("odd-beton") / "odd.beton"
    proc = subprocess.Popen([sys.executable, "-c", FFCV_CHILD, str(root), str(beton)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the writer's workers too
        out, err = proc.communicate()
        status = "timeout"
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), status, err, beton


def test_ffcv_writes_an_image_whose_short_side_rounds_to_0(odd, ffcv_child):
    """Item 12: 6000 x 20 at max_resolution 256 (20 * 256 / 6000 < 1 px) is stored 256 x 1,
    4000 x 20 as 256 x 1, 1 x 1 as is; the write finishes, leaving no partial file."""
    _, paths, _ = odd
    result, status, err, beton = ffcv_child
    assert result is not None, f"the write did not finish (status {status}): {err[-2000:]}"
    stored = result["stored"]
    assert stored[paths["wide"]] == [256, 1] and stored[paths["strip"]] == [256, 1]
    assert stored[paths["pixel"]] == [1, 1]
    assert not list(beton.parent.glob("*.partial"))


def test_ffcv_loader_survives_1px_short_sides(odd, ffcv_child):
    """Items 13-15 for FFCV: the validation decoder crops a 1 px short side without aborting
    the process, and every odd file has the same pixels as in the other backends."""
    root, paths, expected = odd
    result, status, err, _ = ffcv_child
    assert status == 0, f"the FFCV child ended with status {status}: {err[-3000:]}"
    (val,) = result["val"]
    check_val_batch(torch.tensor(val), scan_image_folder(root).paths, paths, expected, "ffcv")
    assert result["train"] == len(scan_image_folder(root).paths) // 3


def test_a_killed_writes_partial_file_is_removed_by_the_next_write(odd, tmp_path):
    """A partial file of a write whose process is gone is removed when the beton is written
    again; one of a live process is left alone."""
    from pipelines.ffcv import write_beton

    root, _, _ = odd
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".odd.beton.{dead}.partial"
    live = tmp_path / f".odd.beton.{os.getppid()}.partial"
    for path in (stale, live):
        path.write_bytes(b"\0" * 1024)
    write_beton(root, tmp_path / "odd.beton", max_resolution=32, num_workers=1, progress=False)
    assert not stale.exists() and live.exists()


# --- the dataset check ----------------------------------------------------------------------

def test_check_names_every_file_the_loaders_treat_specially(odd, tmp_path):
    """Item 16: tiny (short side under 8 px), extreme aspect (over 10:1), EXIF orientation and
    16-bit images (grey and RGB) are named, as warnings; 32-bit pixels are an error."""
    root, paths, _ = odd
    import cv2

    rgb16 = tmp_path / "rgb16.png"
    cv2.imwrite(str(rgb16), np.full((20, 30, 3), 30000, np.uint16))
    Image = pytest.importorskip("PIL.Image")
    int32 = tmp_path / "int32.tif"
    Image.new("I", (30, 20), 70000).save(int32)
    found = {p.path: p for p in check_tree(root)}
    assert {name: found[paths[name]].kind for name in paths} == {
        "wide": "extreme_aspect", "strip": "extreme_aspect", "pixel": "tiny", "deep": "high_bit_depth",
        "exif": "exif_orientation"}
    assert "EXIF orientation 6 (rotate 90 clockwise)" in found[paths["exif"]].detail
    assert not any(found[paths[name]].error for name in paths)
    assert check_file(rgb16).kind == "high_bit_depth" and not check_file(rgb16).error
    assert check_file(int32).kind == "unsupported_depth" and check_file(int32).error
    assert "ignored" in KINDS["exif_orientation"].loaders
    assert len(found) == len(paths)  # the plain coded images are not named


def test_random_bytes_after_a_jpeg_header_are_corrupt_not_truncated(tmp_path):
    """Item 20: the check, and the folder loader's message, call them corrupt; a JPEG cut
    short is still truncated."""
    write_coded_tree(tmp_path, classes=1, per_class=2)
    path = tmp_path / "c00" / "random.JPEG"
    write_random_after_header_jpeg(path)
    assert check_file(path).kind == "corrupt"
    with pytest.raises(BadImageError, match=f"cannot decode {path}: corrupt"):
        list(make_loader("folder", tmp_path, train=False, batch_size=4, resolution=16,
                         output=CPU, num_workers=0))
    cut, _ = add_bad_file(tmp_path, "truncated")
    assert check_file(cut).kind == "truncated"


# --- one error class, the reason in words ----------------------------------------------------

@pytest.mark.parametrize("kind", ["corrupt", "non_image", "truncated"])
@pytest.mark.parametrize("reader", ["feed", "file"])
def test_dali_errors_say_why_in_words(tmp_path, kind, reader):
    """Item 20: a BadImageError naming the file, with the check's reason and DALI's in words:
    no message ending with an empty reason, no bare nvImageCodec status number."""
    write_coded_tree(tmp_path, classes=2, per_class=2)
    path, _ = add_bad_file(tmp_path, kind)
    loader = make_loader("dali", tmp_path, train=False, batch_size=2, resolution=16,
                         output=CPU, num_workers=1, reader=reader)
    with pytest.raises(BadImageError) as err:
        list(loader)
    message = str(err.value)
    assert message.startswith(f"cannot decode {path}: ") and err.value.path == str(path)
    assert not message.rstrip().endswith(":") and "'#" not in message
    assert {"corrupt": "corrupt", "non_image": "not an image", "truncated": "truncated"}[kind] in message


def test_dali_reason_translates_nvimagecodec_status_and_drops_empty_reasons():
    error = RuntimeError("Critical error in pipeline:\nError in CPU operator `decoders__Image` "
                         "encountered:\n\nnvImageCodec failure: '#4'\nC++ context: [x]")
    assert dali_reason(error) == ("not an image format the decoder supports "
                                  "(nvImageCodec status 4)")
    empty = RuntimeError("Error in operator encountered:\n\nFailed to decode sample #1 :\n")
    assert dali_reason(empty) == ""


def test_every_backend_raises_bad_image_error_for_an_undecodable_file(tmp_path):
    """The folder loader, DALI and FFCV's writer raise BadImageError (a ValueError) naming the
    file (from a DataLoader worker too: tests/test_folder.py, in a process without DALI's
    threads, which a forked worker can deadlock on)."""
    write_coded_tree(tmp_path / "split", classes=2, per_class=2)
    path, _ = add_bad_file(tmp_path / "split", "corrupt")
    builds = [("folder", {"num_workers": 0}), ("dali", {"num_workers": 1})]
    for backend, kw in builds:
        with pytest.raises(BadImageError, match=f"cannot decode {path}: corrupt"):
            list(make_loader(backend, tmp_path / "split", train=False, batch_size=2,
                             resolution=16, output=CPU, **kw))
    from pipelines.ffcv import UndecodableImageError, write_beton

    assert issubclass(UndecodableImageError, BadImageError)
    assert issubclass(BadImageError, ValueError)
    with pytest.raises(BadImageError, match=f"cannot decode {path}: corrupt"):
        write_beton(tmp_path / "split", tmp_path / "x.beton", max_resolution=32, num_workers=1,
                    progress=False)


# --- DaliAdaptor ---------------------------------------------------------------------------

@pipeline_def(batch_size=4, num_threads=1, device_id=None)
def adaptor_pipeline(root, output_type=types.RGB, scale=1.0):
    jpegs, labels = fn.readers.file(file_root=str(root), name="Reader")
    images = fn.resize(fn.decoders.image(jpegs, output_type=output_type), size=(16, 16))
    if scale != 1.0:
        images = fn.cast(images, dtype=types.FLOAT) * scale
    return images, labels


def test_adaptor_refuses_floats_in_0_1_saying_what_to_pass(tmp_path):
    """Item 19: pixels / 255 are not normalised (no negative value); the error says which
    mean and std to give crop_mirror_normalize."""
    write_coded_tree(tmp_path, classes=2, per_class=2)
    adaptor = DaliAdaptor(adaptor_pipeline(tmp_path, scale=1 / 255), output=CPU,
                          output_map=["data", "label"])
    with pytest.raises(ValueError, match=r"every value in \[0, 1\].*mean=\[0.485 \* 255"):
        list(adaptor)


def test_adaptor_names_a_grayscale_iterator_output_by_its_channel_count(tmp_path):
    """Item 19: an iterator's N x H x W x 1 output is '1 channel(s), expected 3', not 'cannot
    tell the layout'."""
    write_coded_tree(tmp_path, classes=2, per_class=2)
    iterator = DALIGenericIterator(adaptor_pipeline(tmp_path, output_type=types.GRAY),
                                   ["data", "label"], reader_name="Reader")
    with pytest.raises(ValueError, match=r"has 1 channel\(s\), expected 3 \(RGB\)"):
        list(DaliAdaptor(iterator, output=CPU))
