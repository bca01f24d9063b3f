"""Progressive-resizing schedules: the image size, optionally the batch size, and the training
crop's minimum area scale of each epoch.

One schedule object drives every backend. Schedules are data: build them from a dict
(for example a YAML block) with :func:`schedule_from_dict`. Every schedule answers
``min_scale(epoch)``, the smallest share of the image a training random-resized crop may cover
(its area scale is drawn from ``(min_scale, 1)``): :class:`Phases` set it per phase (the fast
protocol's 0.08 at 128 px, 0.087 at 224 px), the others crop at :data:`DEFAULT_MIN_SCALE`
(0.08; one phase gives a fixed size at another scale). DALI and FFCV compile the scale into
their pipelines and rebuild them when it changes, at a phase boundary.

- :class:`Fixed`: one resolution for the whole run.
- :class:`LinearRamp`: FFCV's ImageNet ramp, ``min_res`` until ``start_ramp``, ``max_res``
  from ``end_ramp``, linear in between, rounded to a multiple of 32.
- :class:`Phases`: the fast-training protocol's phases (e.g. 128 px / 224 px / 288 px), each
  from its start epoch on, each with its own batch size and crop scale.

A schedule object of user code needs ``resolution``, ``batch_size`` and ``max_resolution``;
one without ``min_scale`` crops at the default scale every epoch (:func:`schedule_from_dict`
gives it one, :class:`DefaultMinScale`).

Epochs are counted from 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

#: The random-resized crop's minimum area scale where a schedule does not set one (torchvision's).
DEFAULT_MIN_SCALE = 0.08
#: The methods a schedule object of user code must have (``min_scale`` has a default).
SIZE_METHODS = ("resolution", "batch_size", "max_resolution")


@runtime_checkable
class ResolutionSchedule(Protocol):
    """What a loader asks of a schedule."""

    def resolution(self, epoch: int) -> int:
        """Output side length (pixels) of the images of ``epoch``."""
        ...

    def batch_size(self, epoch: int) -> int | None:
        """Batch size of ``epoch``, or None to keep the loader's own."""
        ...

    def max_resolution(self) -> int:
        """The largest resolution any epoch uses."""
        ...

    def min_scale(self, epoch: int) -> float:
        """Smallest area share of the image a training crop of ``epoch`` may cover (the crop's
        area scale is drawn from ``(min_scale, 1)``); :data:`DEFAULT_MIN_SCALE` by default."""
        ...


def _check_epoch(epoch: int) -> None:
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")


def _check_res(name: str, res: int) -> None:
    if not isinstance(res, int) or res < 8:
        raise ValueError(f"{name} must be an int >= 8 pixels, got {res!r}")


def _check_bs(batch_size: int | None) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")


def _check_min_scale(min_scale: float | None) -> None:
    if min_scale is not None and (not isinstance(min_scale, (int, float))
                                  or isinstance(min_scale, bool) or not 0 < min_scale <= 1):
        raise ValueError(f"min_scale must be a number in (0, 1] or None, got {min_scale!r}")


@dataclass(frozen=True)
class Fixed:
    """The same resolution every epoch, cropped at the default scale."""

    res: int
    bs: int | None = None

    def __post_init__(self) -> None:
        _check_res("res", self.res)
        _check_bs(self.bs)

    def resolution(self, epoch: int) -> int:
        _check_epoch(epoch)
        return self.res

    def batch_size(self, epoch: int) -> int | None:
        _check_epoch(epoch)
        return self.bs

    def max_resolution(self) -> int:
        return self.res

    def min_scale(self, epoch: int) -> float:
        _check_epoch(epoch)
        return DEFAULT_MIN_SCALE


@dataclass(frozen=True)
class LinearRamp:
    """FFCV's ImageNet schedule (``get_resolution`` in its ``train_imagenet.py``), cropped at the
    default scale."""

    min_res: int
    max_res: int
    start_ramp: int
    end_ramp: int
    multiple: int = 32
    bs: int | None = None

    def __post_init__(self) -> None:
        _check_res("min_res", self.min_res)
        _check_res("max_res", self.max_res)
        _check_bs(self.bs)
        if self.min_res > self.max_res:
            raise ValueError(f"min_res ({self.min_res}) > max_res ({self.max_res})")
        if not 0 <= self.start_ramp <= self.end_ramp:
            raise ValueError(
                f"need 0 <= start_ramp <= end_ramp, got {self.start_ramp}, {self.end_ramp}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")

    def resolution(self, epoch: int) -> int:
        _check_epoch(epoch)
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        frac = (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        res = self.min_res + frac * (self.max_res - self.min_res)
        return int(round(res / self.multiple)) * self.multiple

    def batch_size(self, epoch: int) -> int | None:
        _check_epoch(epoch)
        return self.bs

    def max_resolution(self) -> int:
        return self.max_res

    def min_scale(self, epoch: int) -> float:
        _check_epoch(epoch)
        return DEFAULT_MIN_SCALE


@dataclass(frozen=True)
class Phase:
    """From ``start_epoch`` on (until the next phase): this resolution, batch size and crop
    scale (``min_scale`` None: :data:`DEFAULT_MIN_SCALE`)."""

    start_epoch: int
    res: int
    bs: int | None = None
    min_scale: float | None = None

    def __post_init__(self) -> None:
        _check_epoch(self.start_epoch)
        _check_res("res", self.res)
        _check_bs(self.bs)
        _check_min_scale(self.min_scale)


@dataclass(frozen=True)
class Phases:
    """Piecewise-constant phases, as in the fast-training protocol."""

    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("Phases needs at least one phase")
        starts = [p.start_epoch for p in self.phases]
        if starts[0] != 0:
            raise ValueError(f"the first phase must start at epoch 0, got {starts[0]}")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"phase start epochs must increase strictly, got {starts}")

    def phase(self, epoch: int) -> Phase:
        _check_epoch(epoch)
        return [p for p in self.phases if p.start_epoch <= epoch][-1]

    def resolution(self, epoch: int) -> int:
        return self.phase(epoch).res

    def batch_size(self, epoch: int) -> int | None:
        return self.phase(epoch).bs

    def max_resolution(self) -> int:
        return max(p.res for p in self.phases)

    def min_scale(self, epoch: int) -> float:
        scale = self.phase(epoch).min_scale
        return DEFAULT_MIN_SCALE if scale is None else float(scale)


@dataclass(frozen=True)
class DefaultMinScale:
    """A schedule object of user code that has no ``min_scale``: its sizes, cropped at
    :data:`DEFAULT_MIN_SCALE` every epoch (what :func:`schedule_from_dict` makes of it)."""

    sizes: Any

    def resolution(self, epoch: int) -> int:
        return self.sizes.resolution(epoch)

    def batch_size(self, epoch: int) -> int | None:
        return self.sizes.batch_size(epoch)

    def max_resolution(self) -> int:
        return self.sizes.max_resolution()

    def min_scale(self, epoch: int) -> float:
        _check_epoch(epoch)
        return DEFAULT_MIN_SCALE


def schedule_from_dict(spec: int | Mapping[str, Any] | ResolutionSchedule) -> ResolutionSchedule:
    """Build a schedule from data.

    Accepts an int (fixed size), a schedule object (one without ``min_scale`` wrapped in
    :class:`DefaultMinScale`), or a mapping with ``kind``:
    ``{"kind": "fixed", "res": 224}``,
    ``{"kind": "ramp", "min_res": 160, "max_res": 192, "start_ramp": 11, "end_ramp": 13}``,
    ``{"kind": "phases", "phases": [{"start_epoch": 0, "res": 128, "bs": 512},
    {"start_epoch": 15, "res": 224, "bs": 224, "min_scale": 0.087}, ...]}`` (one phase: a fixed
    size at another crop scale).
    """
    if isinstance(spec, bool):
        raise TypeError(f"resolution schedule must be an int or a mapping, got {spec!r}")
    if isinstance(spec, int):
        return Fixed(spec)
    if isinstance(spec, ResolutionSchedule):
        return spec
    if all(callable(getattr(spec, name, None)) for name in SIZE_METHODS):
        return DefaultMinScale(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(f"resolution schedule must be an int or a mapping, got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.pop("kind", None)
    try:
        if kind == "fixed":
            return Fixed(**spec)
        if kind == "ramp":
            return LinearRamp(**spec)
        if kind == "phases":
            if "phases" not in spec:
                raise TypeError("missing the 'phases' list")
            raw: Sequence[Mapping[str, Any]] = spec.pop("phases")
            if spec:
                raise TypeError(f"unexpected keys {sorted(spec)}")
            return Phases(tuple(Phase(**dict(p)) for p in raw))
    except TypeError as e:
        raise ValueError(f"bad {kind!r} resolution schedule: {e}") from None
    raise ValueError(f"unknown resolution schedule kind {kind!r}; use 'fixed', 'ramp' or 'phases'")
