"""GPU JPEG decoding for the folder loader (``FolderLoader(decode="gpu")``, ``data.decode``).

With GPU decoding the DataLoader workers only read each file's bytes and parse its header, and
draw the sample's crop exactly as the CPU path does: the same ``(seed, epoch, index)``
generator, the same :func:`~pipelines.folder.random_resized_crop_box` call on the header's
width and height, then the same flip draw, so a sample gets the same crop box and flip with
either decoder. The main process decodes the batch with nvJPEG
(``torchvision.io.decode_jpeg(list, device="cuda")``, batched, on the hardware decoder of
A100/H100-class GPUs) and resamples every crop to the output size in two batched matrix
products (:func:`resample`).

**Resampling.** Each output pixel is PIL's antialiased bilinear filter (the CPU path resizes
with PIL's ``BILINEAR``): for output index ``j`` of an axis of input length ``L`` resized to
``out``, ``scale = L / out``, centre ``scale * (j + 0.5)``, triangle of half-width
``max(scale, 1)``, clipped to the input and normalised to sum 1 (PIL's and torch's
``antialias=True`` coefficients). Separable, so a batch of crops of different sizes is
``Wy @ crop @ Wx^T`` with per-sample weight matrices, zero-padded to the batch's largest crop;
the flip reverses ``Wx``'s rows. Validation (shorter side to ``val_resize(res)``, centre crop
``res``) is the same filter: the centre crop is a slice of the resize's rows and columns.
Differences from the CPU path: float32 arithmetic instead of PIL's fixed-point uint8 (no
rounding to integers before normalisation), and nvJPEG's or libjpeg-turbo's IDCT and chroma
upsampling instead of Pillow's. ``tests/test_gpu_decode.py`` measures both.

**Files nvJPEG should not take** go through the CPU path unchanged (PIL decode, crop, resize,
flip), decided per file:

- in the worker, from the header: not a JPEG (e.g. PNG under a ``.JPEG`` name), a mode other
  than 3-channel RGB/YCbCr (grayscale, CMYK/YCCK, more than 8 bits), progressive JPEGs
  (torchvision decodes those one at a time with the Huffman stage on the host, in the main
  process: slower than a worker), and files without an end-of-image marker (truncated: PIL
  raises naming the file, as the CPU path does). The worker then returns the finished crop;
- in the main process, what nvJPEG refuses anyway (the batch is retried file by file) or
  decodes to a size other than the header's: decoded there with PIL.

A file neither decoder reads fails with the CPU path's error naming it, as with ``decode="cpu"``.

Cost in the main process: the nvJPEG call (which waits for its own stream), about a dozen
batched kernels and one view per image; transient device memory about 4 bytes x 3 x the
batch's largest crop per image (some 0.6 GB for 256 ImageNet-sized images).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import IMAGENET_MEAN_255, IMAGENET_STD_255, OutputSpec, val_resize

if TYPE_CHECKING:
    from .folder import SampleKey

DECODE_CHOICES = ("auto", "cpu", "gpu")

#: How far from the end of a file its end-of-image marker may be (trailing bytes some
#: cameras and editors leave after it).
EOI_WINDOW = 4096

#: Columns of a sample's plan: per axis (y, then x) the input span ``start, length``, the size
#: ``out`` it is resized to and the ``offset`` of the kept window in it; then the flip.
PLAN_COLUMNS = ("y_start", "y_len", "y_out", "y_off", "x_start", "x_len", "x_out", "x_off", "flip")


def nvjpeg_available() -> bool:
    """Whether torchvision was built with nvJPEG and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.ops.image.decode_jpegs_cuda is not None
    except (AttributeError, RuntimeError):
        return False


def resolve_decode(decode: str, device: torch.device) -> str:
    """``decode`` ('auto', 'cpu' or 'gpu') for batches delivered on ``device`` -> 'cpu' or 'gpu'.

    'auto' is 'gpu' when the output device is CUDA and nvJPEG is there; 'gpu' without them is
    a ValueError saying why."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    device = torch.device(device)
    if decode == "cpu":
        return "cpu"
    usable = device.type == "cuda" and nvjpeg_available()
    if decode == "auto":
        return "gpu" if usable else "cpu"
    if not torch.cuda.is_available():
        raise ValueError("decode='gpu' needs CUDA, and torch sees no CUDA device here; "
                         "use decode='cpu' (or 'auto')")
    if device.type != "cuda":
        raise ValueError(f"decode='gpu' decodes on the output device, which is {device}; "
                         f"deliver batches on CUDA (OutputSpec(device='cuda')) or use decode='cpu'")
    if not usable:
        raise ValueError("decode='gpu' needs torchvision built with nvJPEG "
                         "(torch.ops.image.decode_jpegs_cuda is missing); use decode='cpu'")
    return "gpu"


def header_ok(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a baseline 8-bit, 3-channel JPEG with an end-of-image marker, the
    files given to nvJPEG; None for anything else (the CPU path takes those)."""
    if data[:2] != b"\xff\xd8" or data.rfind(b"\xff\xd9", max(0, len(data) - EOI_WINDOW)) < 0:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if (img.format != "JPEG" or img.mode != "RGB" or img.info.get("progressive")
                    or img.info.get("progression")):
                return None
            return img.size
    except Exception:
        return None


def val_plan(width: int, height: int, res: int) -> list[int]:
    """The plan of a validation sample: shorter side to ``val_resize(res)`` (torchvision's size
    rule: the longer side truncated), centre crop ``res`` (torchvision's anchor: rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = val_resize(res), int(val_resize(res) * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top, left = int(round((new_h - res) / 2.0)), int(round((new_w - res) / 2.0))
    return [0, height, new_h, top, 0, width, new_w, left, 0]


def train_plan(box: tuple[int, int, int, int], flip: bool, res: int) -> list[int]:
    """The plan of a training sample: crop ``box`` ``(top, left, h, w)`` resized to ``res``."""
    top, left, h, w = box
    return [top, h, res, 0, left, w, res, 0, int(flip)]


def axis_weights(length: torch.Tensor, out: torch.Tensor, offset: torch.Tensor, res: int,
                 span: int) -> torch.Tensor:
    """``(n, res, span)`` antialiased bilinear weights (PIL's): row ``j`` of sample ``i`` holds
    the weights over its ``length[i]`` input pixels of output pixel ``offset[i] + j`` of a resize
    to ``out[i]``; columns from ``length[i]`` on are zero."""
    length, out, offset = (t.to(torch.float32)[:, None, None] for t in (length, out, offset))
    device = length.device
    j = torch.arange(res, device=device, dtype=torch.float32)[None, :, None] + offset
    scale = length / out
    centre = scale * (j + 0.5)
    support = scale.clamp(min=1.0)
    x = torch.arange(span, device=device, dtype=torch.float32)[None, None, :]
    w = (1.0 - (x + 0.5 - centre).abs() / support).clamp_(min=0.0)
    w = w * (x < length)
    return w / w.sum(-1, keepdim=True)


def resample(crops: torch.Tensor, plan: torch.Tensor, res: int) -> torch.Tensor:
    """Crops ``(n, 3, hs, ws)`` (sample ``i`` in ``[:, :y_len, :x_len]``, any float dtype; the rest
    is ignored) -> ``(n, 3, res, res)`` float32 resampled as ``plan`` ``(n, 9)`` says (flips
    included), 0-255 like the input."""
    n, c, hs, ws = crops.shape
    plan = plan.to(crops.device)
    wy = axis_weights(plan[:, 1], plan[:, 2], plan[:, 3], res, hs)
    wx = axis_weights(plan[:, 5], plan[:, 6], plan[:, 7], res, ws)
    wx = torch.where(plan[:, 8, None, None].bool(), wx.flip(1), wx)
    rows = torch.bmm(crops.float().reshape(n, c * hs, ws), wx.transpose(1, 2))  # (n, c*hs, res)
    rows = rows.view(n, c, hs, res).transpose(1, 2).reshape(n, hs, c * res)
    return torch.bmm(wy, rows).view(n, res, c, res).permute(0, 2, 1, 3)


def crop_batch(images: Sequence[torch.Tensor], plan: torch.Tensor) -> torch.Tensor:
    """Decoded ``(3, H, W)`` uint8 images -> their plans' input spans, zero-padded into one
    ``(n, 3, max y_len, max x_len)`` uint8 batch."""
    rows = plan.tolist()
    hs, ws = max(r[1] for r in rows), max(r[5] for r in rows)
    batch = torch.zeros(len(rows), 3, hs, ws, dtype=torch.uint8, device=images[0].device)
    dst = [batch[i, :, :r[1], :r[5]] for i, r in enumerate(rows)]
    src = [img[:, r[0]:r[0] + r[1], r[4]:r[4] + r[5]] for img, r in zip(images, rows)]
    try:
        torch._foreach_copy_(dst, src)
    except (AttributeError, RuntimeError):  # older torch: one copy at a time
        for d, s in zip(dst, src):
            d.copy_(s)
    return batch


@dataclass
class RawSample:
    """What a worker returns: the bytes and plan of a file for nvJPEG, or the finished crop."""

    key: SampleKey
    label: int
    data: bytes | None = None             # the file's bytes, until collate_raw packs them
    plan: list[int] | None = None
    size: tuple[int, int] | None = None   # (height, width) from the header
    image: torch.Tensor | None = None     # res x res x 3 uint8: decoded by the CPU path


class RawSamples(Dataset):
    """``(index, resolution, epoch, crop scale) -> RawSample``: the worker side of GPU decoding.

    ``cpu`` is the loader's :class:`~pipelines.folder.Samples`, whose generator, crop draw and
    (for files nvJPEG should not take) whole CPU path this reuses."""

    def __init__(self, cpu: Dataset) -> None:
        self.cpu = cpu

    def __len__(self) -> int:
        return len(self.cpu)

    def __getitem__(self, key: SampleKey) -> RawSample:
        from .folder import random_resized_crop_box

        i, res, epoch, scale = key
        path, label = self.cpu.samples[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # the CPU path raises its error naming the file
        size = header_ok(data)
        if size is None:
            return RawSample(key, label, image=self.cpu[key][0])
        width, height = size
        if self.cpu.train:
            rng = np.random.default_rng((self.cpu.seed, epoch, i))
            box = random_resized_crop_box(width, height, rng, scale)
            plan = train_plan(box, rng.random() < 0.5, res)
        else:
            plan = val_plan(width, height, res)
        return RawSample(key, label, data, plan, (height, width))


@dataclass
class RawBatch:
    """A collated batch: the samples (without their bytes) and every nvJPEG file's bytes packed
    in one uint8 tensor (one shared-memory transfer from the worker), sample ``k``'s at
    ``data[offsets[k]:offsets[k + 1]]``."""

    samples: list[RawSample]
    data: torch.Tensor
    offsets: list[int]

    def file(self, k: int) -> torch.Tensor:
        return self.data[self.offsets[k]:self.offsets[k + 1]]


def collate_raw(samples: list[RawSample]) -> RawBatch:
    """The DataLoader's collate for :class:`RawSamples` (runs in the worker)."""
    sizes = [len(s.data) if s.data is not None else 0 for s in samples]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    packed = np.empty(offsets[-1], dtype=np.uint8)
    for s, start, stop in zip(samples, offsets, offsets[1:]):
        if s.data is not None:
            packed[start:stop] = np.frombuffer(s.data, dtype=np.uint8)
            s.data = None
    return RawBatch(samples, torch.from_numpy(packed), offsets)


class GpuDecoder:
    """A batch of :class:`RawSample` -> normalised ``(images, labels)`` as ``output`` asks.

    Decodes on ``output.device`` (nvJPEG on CUDA; on the CPU, torchvision's libjpeg-turbo
    decoder, which the tests use to check this path without a GPU). ``cpu`` is the loader's
    :class:`~pipelines.folder.Samples`, for the files nvJPEG refuses."""

    def __init__(self, cpu: Dataset, output: OutputSpec) -> None:
        self.cpu, self.output = cpu, output
        self.device = output.device
        self.fallbacks = 0  # files decoded by the CPU path in this process, for the record

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """nvJPEG (or libjpeg-turbo on the CPU) over the batch, then file by file if it fails;
        None for the files it cannot decode."""
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pass
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def __call__(self, raw: RawBatch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = raw.samples
        res = batch[0].key[1]
        todo = [k for k, s in enumerate(batch) if s.image is None]
        images: list[torch.Tensor] = []
        if todo:
            decoded = self.decode([raw.file(k) for k in todo])
            keep = []
            for k, img in zip(todo, decoded):
                if img is None or tuple(img.shape) != (3, *batch[k].size):
                    batch[k].image = self.cpu[batch[k].key][0]  # nvJPEG refused it: the CPU path
                    self.fallbacks += 1
                else:
                    keep.append(k)
                    images.append(img)
            todo = keep
        out = torch.empty(len(batch), 3, res, res, dtype=torch.float32, device=self.device)
        if todo:
            plan = torch.tensor([batch[k].plan for k in todo], dtype=torch.int64)
            resampled = resample(crop_batch(images, plan), plan.to(self.device), res)
            if len(todo) == len(batch):
                out.copy_(resampled)
            else:
                out[torch.tensor(todo, device=self.device)] = resampled
        cpu = [k for k, s in enumerate(batch) if s.image is not None]
        if cpu:
            stacked = torch.stack([batch[k].image for k in cpu]).to(self.device).permute(0, 3, 1, 2)
            out[torch.tensor(cpu, device=self.device)] = stacked.float()
        mean, std = _constants(self.device)
        images_out = self.output.finish(out.sub_(mean).div_(std))
        labels = self.output.labels(torch.tensor([s.label for s in batch]))
        return images_out, labels


_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _CONSTANTS:
        _CONSTANTS[device] = (torch.tensor(IMAGENET_MEAN_255, device=device).view(1, 3, 1, 1),
                              torch.tensor(IMAGENET_STD_255, device=device).view(1, 3, 1, 1))
    return _CONSTANTS[device]
