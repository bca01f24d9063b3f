"""A run's loaders and where their images come from: an ImageFolder root's splits, the
embedded demo dataset (written on first use), or FFCV betons (written once from a root)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import pipelines
from pipelines import Shard
from pipelines.resolution import Phases, ResolutionSchedule, schedule_from_dict

from .config import ConfigError
from .distributed import main_rank_first


def _split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise FileNotFoundError(f"data.path: {root} has no {split}/ folder (expected an "
                                f"ImageFolder root with train/ and val/)")
    return path


def data_root(data: Any, shard: Shard) -> Path:
    """The folder ``data.path`` names, or the demo dataset's (rank 0 writes it on first use)."""
    if data.path is None:
        from pipelines.demo import ensure_demo_dataset
        root = Path(data.demo_root)
        main_rank_first(shard, lambda: ensure_demo_dataset(root), "write the demo dataset")
        return root
    root = Path(data.path)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: {root} does not exist or is not a directory")
    return root


def resolve_sources(data: Any, shard: Shard) -> tuple[Any, Any]:
    """(train source, val source) for the loader of ``data`` (the config's data section).

    Rank 0 writes the demo set or the betons if needed while the others wait outside any
    collective (:func:`main_rank_first`): writing ImageNet's betons takes hours.
    """
    root = data_root(data, shard)
    if data.loader != "ffcv":
        return _split_dir(root, "train"), _split_dir(root, "val")
    if (root / "train.beton").is_file() and (root / "val.beton").is_file():
        return root / "train.beton", root / "val.beton"
    from pipelines.ffcv import ensure_beton
    out = Path(data.beton_dir) / root.resolve().name
    tag = (f"r{data.ffcv_max_resolution}_q{data.ffcv_jpeg_quality}"
           f"_p{data.ffcv_compress_probability}")
    betons = {split: out / f"{split}_{tag}.beton" for split in ("train", "val")}
    folders = {split: _split_dir(root, split) for split in betons}

    def write() -> None:
        for split, beton in betons.items():
            ensure_beton(folders[split], beton, max_resolution=data.ffcv_max_resolution,
                         jpeg_quality=data.ffcv_jpeg_quality,
                         compress_probability=data.ffcv_compress_probability)

    main_rank_first(shard, write, f"write the FFCV betons in {out}")
    return betons["train"], betons["val"]


@dataclass
class Data:
    train: pipelines.Loader
    val: pipelines.Loader
    num_classes: int
    classes: list[str] | None


def per_rank_schedule(spec: Any, world_size: int) -> ResolutionSchedule:
    """The resolution schedule with its global batch sizes divided over the ranks (every
    other field of a phase, such as its crop scale, kept)."""
    schedule = schedule_from_dict(spec)
    if isinstance(schedule, Phases):
        return Phases(tuple(dataclasses.replace(p, bs=p.bs and p.bs // world_size)
                            for p in schedule.phases))
    if getattr(schedule, "bs", None):
        return dataclasses.replace(schedule, bs=schedule.bs // world_size)
    return schedule


def build_data(cfg: Any, shard: Shard, device: torch.device, dtype: torch.dtype) -> Data:
    """The train and val loaders of config ``cfg``, this rank's shard of them."""
    train_src, val_src = resolve_sources(cfg.data, shard)
    ws = shard.world_size
    output = pipelines.OutputSpec(device=device, dtype=dtype, channels_last=cfg.model.channels_last)
    common = dict(output=output, shard=shard, seed=cfg.run.seed, num_workers=cfg.data.workers)
    if cfg.data.loader == "dali":
        common["reader"] = cfg.data.dali_reader
    if cfg.data.loader == "folder":
        common["decode"] = cfg.data.decode
    if cfg.data.loader == "ffcv":
        common["order"] = cfg.data.ffcv_order
    try:
        train = pipelines.make_loader(cfg.data.loader, train_src, train=True,
                                      batch_size=cfg.data.batch_size // ws,
                                      resolution=per_rank_schedule(cfg.data.resolution, ws), **common)
        val = pipelines.make_loader(cfg.data.loader, val_src, train=False,
                                    batch_size=(cfg.data.val_batch_size or cfg.data.batch_size) // ws,
                                    resolution=cfg.data.val_resolution, **common)
    except ValueError as e:  # the data and the configuration do not fit (sizes, classes, shards)
        raise ConfigError(f"data: {e}") from None
    if len(train) == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} leaves no full batch in the "
                          f"{train.num_samples} training images ({ws} rank(s))")
    if train.num_classes != val.num_classes:
        raise ValueError(f"train has {train.num_classes} classes but val has {val.num_classes}")
    classes = None
    if cfg.data.loader != "ffcv":
        from pipelines.imagefolder import scan_image_folder
        classes = list(scan_image_folder(train_src).classes)
    return Data(train, val, train.num_classes, classes)


def count_train_images(data: Any) -> int:
    """How many training images the data section names, from the listing (nothing decoded)."""
    root = data_root(data, Shard())
    if data.loader == "ffcv" and (root / "train.beton").is_file():
        from pipelines.ffcv import read_beton
        return read_beton(root / "train.beton").num_samples
    from pipelines.imagefolder import scan_image_folder
    return len(scan_image_folder(_split_dir(root, "train")))
