"""Plug a DALI pipeline or PyTorch iterator you already have into the salmix loader interface."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .base import OutputSpec


class _LayoutRecordingIterator(DALIGenericIterator):
    """A DALIGenericIterator that keeps DALI's layout string of each output (torch loses it)."""

    layouts: list[str]

    def _get_outputs(self):
        outputs = super()._get_outputs()
        self.layouts = [out.layout() for out in outputs[0]]
        return outputs


class DaliAdaptor:
    """Plug an existing DALI pipeline or PyTorch iterator into the salmix loader interface.

    ``images`` and ``labels`` name the outputs to use: keys of the iterator's ``output_map``, or
    of ``output_map`` naming a pipeline's outputs in order (default ``[images, labels]``).
    uint8 images are normalised here; float images must be normalised already
    (``crop_mirror_normalize`` with mean and std in 0-255 units); ``normalized`` states which
    you expect and is checked. Images leave as ``output`` asks (device, dtype, channels-last),
    labels as int64 ``(N,)``.

    For a pipeline, the adaptor builds the iterator (``reader_name`` defaults to its only
    reader; ``last_batch_policy`` to DROP for training and PARTIAL for validation), reads the
    layout from DALI's metadata and ``num_samples`` from the reader. For an iterator, the
    layout is inferred from where the 3 colour channels are and ``num_samples`` is None.
    ``set_epoch`` only records the epoch: the pipeline's own arguments fix its sizes, batch
    size, shuffling and sharding; it cannot skip into an epoch (``start_batch`` must be 0,
    :attr:`resumes_exactly` is False). DALI iterators cannot restart mid-epoch: a loop that stops
    early continues where it stopped. ``resolution`` is the width of the last batch delivered.
    """

    def __init__(
        self,
        source: Pipeline | DALIGenericIterator,
        *,
        images: str = "data",
        labels: str = "label",
        normalized: bool | None = None,
        output: OutputSpec | None = None,
        train: bool = True,
        output_map: Sequence[str] | None = None,
        reader_name: str | None = None,
        size: int = -1,
        last_batch_policy: LastBatchPolicy | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.output = output or OutputSpec()
        self.train = train
        self.normalized = normalized
        self.num_classes = num_classes
        self.num_samples: int | None = None
        self.epoch = 0
        if isinstance(source, Pipeline):
            self.iterator = self._wrap(source, output_map or [images, labels], reader_name, size,
                                       last_batch_policy)
        elif isinstance(source, DALIGenericIterator):
            if output_map is not None or reader_name is not None or size != -1:
                raise ValueError("output_map, reader_name and size apply to a pipeline; "
                                 "this iterator already has its own")
            self.iterator = source
        else:
            raise TypeError(f"DaliAdaptor wraps a DALI Pipeline or DALIGenericIterator, "
                            f"got {type(source).__name__}")
        names = list(self.iterator.output_map)
        for role, name in (("images", images), ("labels", labels)):
            if name not in names:
                raise KeyError(f"{role}={name!r} is not an output of this DALI source; "
                               f"its outputs are {names}")
        self.image_key, self.label_key = images, labels
        self.batch_size = self.iterator.batch_size
        self.resolution: int | None = None

    def _wrap(self, pipe: Pipeline, output_map: Sequence[str], reader_name: str | None,
              size: int, policy: LastBatchPolicy | None) -> DALIGenericIterator:
        if len(output_map) != pipe.num_outputs:
            raise ValueError(f"the pipeline has {pipe.num_outputs} outputs; pass output_map "
                             f"with one name for each (got {list(output_map)})")
        readers = pipe.reader_meta()
        if reader_name is None and size == -1 and len(readers) == 1:
            reader_name = next(iter(readers))
        if reader_name is not None:
            if reader_name not in readers:
                raise KeyError(f"reader_name={reader_name!r} is not a reader of this pipeline; "
                               f"its readers are {sorted(readers)}")
            self.num_samples = readers[reader_name]["epoch_size"]
        policy = policy or (LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)
        return _LayoutRecordingIterator(pipe, list(output_map), reader_name=reader_name,
                                        size=size, last_batch_policy=policy)

    #: A wrapped pipeline's order and augmentation are its own: no resumed epoch repeats them.
    resumes_exactly = False

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Record the epoch. The wrapped pipeline's sizes and shuffling are its own, and it
        cannot start mid-epoch: ``start_batch`` other than 0 is a ValueError."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if start_batch != 0:
            raise ValueError(f"DaliAdaptor cannot start epoch {epoch} at batch {start_batch!r}: "
                             f"a wrapped DALI pipeline reads in its own order; resume at an "
                             f"epoch's start, or use DaliLoader(reader='feed')")
        self.epoch = epoch

    def __len__(self) -> int:
        if self.iterator.size < 0:
            raise TypeError("this DALI source has no known length: give the pipeline a named "
                            "reader (reader_name=) or the shard's sample count (size=)")
        return len(self.iterator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, outputs in enumerate(self.iterator):
            if len(outputs) != 1:
                raise ValueError(f"the DALI iterator runs {len(outputs)} pipelines; the adaptor "
                                 f"takes one pipeline per process (one per rank)")
            batch = outputs[0]
            images = self._nchw(batch[self.image_key])
            self.resolution = images.shape[-1]
            yield (self._normalize(images, check=step == 0),
                   self._labels(batch[self.label_key], images.shape[0]))

    def _nchw(self, images: torch.Tensor) -> torch.Tensor:
        """The image output as an N x 3 x H x W view (DALI's layout, else the channel position)."""
        layouts = getattr(self.iterator, "layouts", [])
        layout = layouts[self.iterator.output_map.index(self.image_key)] if layouts else ""
        shape = tuple(images.shape)
        if images.dim() != 4 or layout not in ("", "HWC", "CHW"):
            raise ValueError(f"output {self.image_key!r} is not a batch of images: shape {shape}, "
                             f"layout {layout!r} (expected N x H x W x 3 or N x 3 x H x W)")
        if not layout:
            channels = [dim for dim in (1, 3) if shape[dim] == 3]
            few = [dim for dim in (1, 3) if shape[dim] in (1, 2, 4)]
            if not channels and len(few) == 1:  # grayscale (+ alpha) or RGBA, by elimination
                raise ValueError(f"output {self.image_key!r} of shape {shape} has "
                                 f"{shape[few[0]]} channel(s), expected 3 (RGB): decode with "
                                 f"output_type=types.RGB")
            if len(channels) != 1:
                raise ValueError(f"cannot tell the layout of output {self.image_key!r} of shape "
                                 f"{shape}: pass the pipeline rather than its iterator")
            layout = "CHW" if channels == [1] else "HWC"
        images = images.permute(0, 3, 1, 2) if layout == "HWC" else images
        if images.shape[1] != 3:
            raise ValueError(f"output {self.image_key!r} has {images.shape[1]} channels in layout "
                             f"{layout} (shape {shape}); expected 3 (RGB)")
        return images

    def _normalize(self, images: torch.Tensor, check: bool) -> torch.Tensor:
        """uint8 -> normalised; float -> as requested (``check``: is it really normalised?)."""
        if images.dtype == torch.uint8:
            if self.normalized:
                raise ValueError(f"output {self.image_key!r} is uint8, so it is not normalised "
                                 f"(normalized=True was given)")
            return self.output.normalize_uint8(images, layout="NCHW")
        if not images.is_floating_point() or self.normalized is False:
            raise ValueError(f"output {self.image_key!r} is {images.dtype}: expected uint8 pixels "
                             f"or a float batch normalised by the pipeline "
                             f"(normalized={self.normalized})")
        if check:  # the first batch only: one reduction, one sync
            self._check_normalized(images)
        return self.output.finish(images)

    def _check_normalized(self, images: torch.Tensor) -> None:
        """Normalised ImageNet pixels lie within about +-3 and a batch has negative ones (a
        pixel darker than the mean); 0-255 floats mean the pipeline forgot mean/std, floats
        in [0, 1] that it scaled the pixels without normalising them."""
        low, high = (v.item() for v in torch.aminmax(images.float()))
        fix = ("Normalise in the pipeline (crop_mirror_normalize with mean and std in 0-255 "
               "units: mean=[0.485 * 255, 0.456 * 255, 0.406 * 255], std=[0.229 * 255, "
               "0.224 * 255, 0.225 * 255]) or output uint8")
        if max(abs(low), abs(high)) > 10:
            raise ValueError(f"output {self.image_key!r} is {images.dtype} with values up to "
                             f"{max(abs(low), abs(high)):.0f}: not normalised. {fix}")
        if 0 <= low and high <= 1:
            raise ValueError(f"output {self.image_key!r} is {images.dtype} with every value in "
                             f"[0, 1] ({low:.2f} to {high:.2f}): pixels scaled to 1 but not "
                             f"normalised (a normalised batch has negative values). {fix}")

    def _labels(self, labels: torch.Tensor, n: int) -> torch.Tensor:
        if labels.numel() != n or labels.is_floating_point():
            raise ValueError(f"output {self.label_key!r} is not one class label per image: "
                             f"{labels.dtype} of shape {tuple(labels.shape)} for {n} images")
        return self.output.labels(labels)


__all__ = ["DaliAdaptor"]
