"""Where a run's images come from: an ImageFolder root's splits, the embedded demo dataset
(written on first use), or FFCV betons (written once from an ImageFolder root)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines import Shard

from .distributed import main_rank_first


def _split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise FileNotFoundError(f"data.path: {root} has no {split}/ folder (expected an "
                                f"ImageFolder root with train/ and val/)")
    return path


def resolve_sources(data: Any, shard: Shard) -> tuple[Any, Any]:
    """(train source, val source) for the loader of ``data`` (the config's data section).

    Rank 0 writes the demo set or the betons if needed while the others wait outside any
    collective (:func:`main_rank_first`): writing ImageNet's betons takes hours.
    """
    if data.path is None:
        from pipelines.demo import ensure_demo_dataset
        root = Path(data.demo_root)
        main_rank_first(shard, lambda: ensure_demo_dataset(root), "write the demo dataset")
    else:
        root = Path(data.path)
        if not root.is_dir():
            raise FileNotFoundError(f"data.path: {root} does not exist or is not a directory")
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
