"""The DALI graph of :class:`~pipelines.dali.DaliLoader`, shared by both readers: decode, crop,
resize and normalise; and the small graphs that find the file a failed batch choked on.

Training: random-resized-crop and a random flip; validation: the shorter side resized, then a
centre crop. The crop's area scale range is an argument of the graph (DALI fixes it when the
pipeline is built), so the readers build a new pipeline when the schedule changes it.
``crop_mirror_normalize`` writes the output dtype and layout directly. EXIF orientation is
ignored (``adjust_orientation=False``), as PIL ignores it in the other backends.
Design notes and measurements: ``docs/design/dali.md``.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from .base import IMAGENET_MEAN_255, IMAGENET_STD_255, RRC_RATIO

#: nvJPEG buffer padding of NVIDIA's ResNet-50 example (used by the ``mixed`` decoder only).
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


def augment(encoded, size, shorter=None, *, decoder: str, dtype: types.DALIDataType,
            layout: str, area: tuple[float, float]):
    """Encoded files -> normalised images of side ``size``.

    Training (no ``shorter``): random-resized-crop (area scale in ``area``) to ``size`` x
    ``size`` and a random flip. Validation: the shorter side resized to ``shorter``, then a
    centre crop of ``size``.
    """
    decode = dict(device=decoder, output_type=types.RGB, adjust_orientation=False,
                  device_memory_padding=DEVICE_MEMORY_PADDING,
                  host_memory_padding=HOST_MEMORY_PADDING)
    if shorter is None:
        images = fn.decoders.image_random_crop(encoded, random_area=area,
                                               random_aspect_ratio=RRC_RATIO, **decode)
        images = fn.resize(images, resize_x=size, resize_y=size)
        geometry = {"mirror": fn.random.coin_flip()}
    else:
        images = fn.resize(fn.decoders.image(encoded, **decode), resize_shorter=shorter)
        geometry = {"crop_h": size, "crop_w": size}
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout,
                                    mean=list(IMAGENET_MEAN_255), std=list(IMAGENET_STD_255),
                                    **geometry)


def num_sizes(train: bool) -> int:
    """Sizes fed per sample: the output side, and in validation the shorter side too."""
    return 1 if train else 2


@pipeline_def
def fed_pipeline(feed, *, train: bool, gpu: bool, decoder: str, dtype: types.DALIDataType,
                 layout: str, area: tuple[float, float]):
    """Feed mode: ``feed()`` gives each batch's encoded paths, labels and sizes."""
    paths, labels, *sizes = fn.external_source(source=feed, num_outputs=2 + num_sizes(train),
                                               batch=True)
    images = augment(fn.io.file.read(paths, dont_use_mmap=True), *sizes, decoder=decoder,
                     dtype=dtype, layout=layout, area=area)
    return images, labels.gpu() if gpu else labels


@pipeline_def
def file_reader_pipeline(feed, reader: dict, *, train: bool, gpu: bool, decoder: str,
                         dtype: types.DALIDataType, layout: str, area: tuple[float, float]):
    """File mode: ``fn.readers.file(**reader)`` reads files and labels, ``feed()`` gives sizes."""
    encoded, labels = fn.readers.file(**reader)
    sizes = fn.external_source(source=feed, num_outputs=num_sizes(train), batch=True)
    images = augment(encoded, *sizes, decoder=decoder, dtype=dtype, layout=layout, area=area)
    return images, labels.gpu() if gpu else labels


@pipeline_def(batch_size=1, num_threads=1, prefetch_queue_depth=1)
def decode_check_pipeline(feed, *, decoder: str):
    """Read and decode one file per run: finds the file a failed batch choked on."""
    return fn.decoders.image(fn.io.file.read(fn.external_source(source=feed, batch=True)),
                             device=decoder, output_type=types.RGB, adjust_orientation=False)


@pipeline_def(num_threads=1, prefetch_queue_depth=1, device_id=None)
def source_info_pipeline(reader: dict):
    """The file names ``fn.readers.file(**reader)`` yields, read but not decoded: a replay of a
    file-mode stream that tells which files a failed batch held."""
    encoded, _ = fn.readers.file(**reader)
    return fn.get_property(encoded, key="source_info")


def encode_path(path: str) -> np.ndarray:
    """A path as the 1-D byte array ``fn.io.file.read`` takes."""
    return np.frombuffer(os.fsencode(path), dtype=np.uint8)


def dali_seed(*parts: int) -> int:
    """A DALI seed (a non-negative int64) drawn from ``parts``."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] >> 1)


def first_undecodable(paths: Sequence[str], device_id: int | None) -> str | None:
    """The first of ``paths`` DALI cannot read and decode on its own, else None."""
    todo = iter(paths)
    pipe = decode_check_pipeline(lambda: [encode_path(next(todo))],
                                 decoder="cpu" if device_id is None else "mixed",
                                 device_id=device_id)
    pipe.build()
    for path in paths:
        try:
            pipe.run()
        except RuntimeError:
            return path
    return None


#: nvImageCodec's status codes (``nvimgcodecStatus_t`` in ``nvimgcodec.h``) in words.
NVIMGCODEC_STATUS = {
    1: "decoder not initialised", 2: "invalid parameter", 3: "bad or incomplete image data",
    4: "not an image format the decoder supports", 5: "memory allocation failed",
    6: "decoding failed", 7: "GPU architecture not supported", 8: "decoder internal error",
    9: "not supported by the decoder", 10: "missing decoder dependency",
    13: "bad or incomplete image data", 14: "not an image format the decoder supports",
    19: "incomplete image data",
}


def dali_reason(error: Exception) -> str:
    """The operator's own message out of DALI's multi-line pipeline error, with
    nvImageCodec's status codes (``nvImageCodec failure: '#3'``) in words; empty when DALI
    gives no reason (``Failed to decode sample #1 :``)."""
    text = str(error).split("encountered:")[-1]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.startswith(("Current pipeline", "C++ context"))]
    reason = re.sub(r"Failed to decode sample #\d+ :\s*", "", " ".join(lines)).strip()
    return re.sub(r"nvImageCodec failure: '#(\d+)'", lambda m: (
        f"{NVIMGCODEC_STATUS.get(int(m.group(1)), 'decoder failure')} (nvImageCodec status "
        f"{m.group(1)})"), reason)
