"""High-throughput ImageNet loaders with one interface: DALI, FFCV and torchvision.

``import pipelines`` never needs DALI or FFCV; asking for a backend whose library is missing
raises :class:`MissingBackendError` saying what to install.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import (IMAGENET_MEAN, IMAGENET_STD, BadImageError, Loader, OutputSpec, Shard,
                   ShardSplit, default_device, val_resize)
from .resolution import Fixed, LinearRamp, Phase, Phases, ResolutionSchedule, schedule_from_dict

BACKENDS = {
    # backend: (module, loader class, library module, what to install)
    "folder": ("pipelines.folder", "FolderLoader", "torchvision", "pip install torchvision"),
    "dali": ("pipelines.dali", "DaliLoader", "nvidia.dali",
             "pip install nvidia-dali-cuda120 (or the wheel matching your CUDA, see "
             "https://docs.nvidia.com/deeplearning/dali/user-guide/docs/installation.html)"),
    "ffcv": ("pipelines.ffcv", "FfcvLoader", "ffcv",
             "apt-get install libturbojpeg0-dev libopencv-dev pkg-config && pip install ffcv"),
}


class MissingBackendError(ImportError):
    """A loader backend was asked for but its library is not installed."""


def require(backend: str) -> None:
    """Raise :class:`MissingBackendError` unless ``backend``'s library imports."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; choose from {sorted(BACKENDS)}")
    _, _, library, install = BACKENDS[backend]
    try:
        importlib.import_module(library)
    except ImportError as e:
        raise MissingBackendError(
            f"the {backend!r} loader needs {library!r}, which does not import ({e}). "
            f"Install it: {install}") from e


def loader_class(backend: str) -> type[Loader]:
    """The loader class of ``backend`` ('folder', 'dali' or 'ffcv')."""
    require(backend)
    module, cls, _, _ = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls)


def make_loader(backend: str, source: Any, **kwargs: Any) -> Loader:
    """Build the ``backend`` loader over ``source``; ``kwargs`` go to its constructor."""
    return loader_class(backend)(source, **kwargs)


__all__ = [
    "BACKENDS", "BadImageError", "IMAGENET_MEAN", "IMAGENET_STD", "Fixed", "LinearRamp", "Loader",
    "MissingBackendError", "OutputSpec", "Phase", "Phases", "ResolutionSchedule", "Shard",
    "ShardSplit",
    "default_device", "loader_class", "make_loader", "require", "schedule_from_dict",
    "val_resize",
]
