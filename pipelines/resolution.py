"""Progressive-resizing schedules: the image size (and optionally batch size) of each epoch.

One schedule object drives every backend. Schedules are data: build them from a dict
(for example a YAML block) with :func:`schedule_from_dict`.

- :class:`Fixed`: one resolution for the whole run.
- :class:`LinearRamp`: FFCV's ImageNet ramp, ``min_res`` until ``start_ramp``, ``max_res``
  from ``end_ramp``, linear in between, rounded to a multiple of 32.
- :class:`Phases`: the fast-training protocol's phases (e.g. 128 px / 224 px / 288 px), each
  from its start epoch on, each with its own batch size.

Epochs are counted from 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


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


@dataclass(frozen=True)
class Fixed:
    """The same resolution every epoch."""

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


@dataclass(frozen=True)
class LinearRamp:
    """FFCV's ImageNet schedule (``get_resolution`` in its ``train_imagenet.py``)."""

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


@dataclass(frozen=True)
class Phase:
    """From ``start_epoch`` on (until the next phase): this resolution and batch size."""

    start_epoch: int
    res: int
    bs: int | None = None

    def __post_init__(self) -> None:
        _check_epoch(self.start_epoch)
        _check_res("res", self.res)
        _check_bs(self.bs)


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


def schedule_from_dict(spec: int | Mapping[str, Any] | ResolutionSchedule) -> ResolutionSchedule:
    """Build a schedule from data.

    Accepts an int (fixed size), a schedule object, or a mapping with ``kind``:
    ``{"kind": "fixed", "res": 224}``,
    ``{"kind": "ramp", "min_res": 160, "max_res": 192, "start_ramp": 11, "end_ramp": 13}``,
    ``{"kind": "phases", "phases": [{"start_epoch": 0, "res": 128, "bs": 512}, ...]}``.
    """
    if isinstance(spec, bool):
        raise TypeError(f"resolution schedule must be an int or a mapping, got {spec!r}")
    if isinstance(spec, int):
        return Fixed(spec)
    if isinstance(spec, ResolutionSchedule):
        return spec
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
