"""One sharding rule for every backend (``pipelines.base.Shard.split``), and ``Shard`` itself.

The cross-backend test builds the folder, DALI (both readers) and FFCV loaders over the same
115 coded JPEGs (``tests/imagefiles.py``) and checks ``len()``, the batches actually yielded
and which images each rank gets, against the rule written out here by hand.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np
import pytest
import torch

from pipelines import OutputSpec, Shard, make_loader
from tests.imagefiles import decode_batch, write_coded_tree

CLASSES, PER_CLASS = 5, 23
N, WORLD = CLASSES * PER_CLASS, 2  # 115 images over 2 ranks: 57 per rank in training
CPU = OutputSpec(device="cpu")
BACKENDS = ("folder", "dali-feed", "dali-file", "ffcv")
LIBRARY = {"folder": "torchvision", "dali-feed": "nvidia.dali", "dali-file": "nvidia.dali",
           "ffcv": "ffcv"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """The split as a folder and, when FFCV is installed, as a .beton."""
    root = tmp_path_factory.mktemp("shards") / "split"
    write_coded_tree(root, classes=CLASSES, per_class=PER_CLASS, size=(24, 24), vary_size=False)
    out = {"folder": str(root)}
    if importlib.util.find_spec("ffcv") is not None:
        from pipelines.ffcv import write_beton
        out["ffcv"] = str(write_beton(root, root.parent / "split.beton", max_resolution=24,
                                      num_workers=1, progress=False))
    return out


def build(backend: str, sources: dict[str, str], rank: int, **kw):
    if importlib.util.find_spec(LIBRARY[backend].split(".")[0]) is None:
        pytest.skip(f"{LIBRARY[backend]} is not installed")
    kind, _, reader = backend.partition("-")
    extra = {"reader": reader} if reader else {}
    workers = 0 if kind == "folder" else 1
    return make_loader(kind, sources.get(kind, sources["folder"]), resolution=16, output=CPU,
                       shard=Shard(rank, WORLD), num_workers=workers, seed=5, **extra, **kw)


def expected_samples(train: bool, rank: int) -> int:
    """The rule: training N // W samples on every rank; validation rank r's exact block."""
    return N // WORLD if train else (rank + 1) * N // WORLD - rank * N // WORLD


@pytest.mark.parametrize("train, batch_size, drop_last", [
    (True, 29, None),    # 57 per rank: 1 full batch (padding to 58 would give 2)
    (True, 29, False),   # 29 + 28
    (False, 29, None),   # rank 0: 57 = 29 + 28, rank 1: 58 = 29 + 29
    (False, 58, None),   # one batch each, rank 0's partial
    (True, 10, None),    # 5 full batches, 7 samples left out on each rank
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_each_rank_the_same_samples_and_batch_count(sources, backend, train,
                                                                        batch_size, drop_last):
    """len() and the batches yielded follow the one rule on every backend: training ranks
    take N // W distinct samples each (full batches with drop_last, the default), validation
    ranks their contiguous blocks, every image once over the ranks, last batch partial."""
    seen = []
    for rank in range(WORLD):
        loader = build(backend, sources, rank, train=train, batch_size=batch_size,
                       drop_last=drop_last)
        loader.set_epoch(1)
        batches = [(x.clone(), y.clone()) for x, y in loader]
        n = expected_samples(train, rank)
        keep_partial = not train if drop_last is None else not drop_last
        want = math.ceil(n / batch_size) if keep_partial else n // batch_size
        assert len(loader) == len(batches) == want, (rank, [len(y) for _, y in batches])
        sizes = [len(y) for _, y in batches]
        assert sizes == [batch_size] * (want - 1) + [min(batch_size, n - (want - 1) * batch_size)]
        labels, indices = decode_batch(torch.cat([x for x, _ in batches]))
        assert (labels == torch.cat([y for _, y in batches]).numpy()).all()
        if not train:
            assert (indices == np.arange(rank * N // WORLD, (rank + 1) * N // WORLD)).all()
        seen.append(indices)
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)  # no image twice, no padding
    if not train:
        assert len(everything) == N


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_no_training_rank_can_fill_is_refused_by_every_backend(sources, backend):
    """115 images over 2 ranks leave 57 per rank: no full batch of 58, on any backend."""
    with pytest.raises(ValueError, match="no batch of 58 on rank 0 of 2: each rank trains on 57"):
        len(build(backend, sources, 0, train=True, batch_size=58))


# --- the rule itself --------------------------------------------------------------------------

@pytest.mark.parametrize("total", [1, 7, 48, 115])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("batch_size", [1, 4, 29])
def test_split_partitions_validation_and_gives_training_ranks_equal_disjoint_slices(
        total, world, batch_size):
    splits = [Shard(rank, world).split(total, batch_size, train=False) for rank in range(world)]
    order = np.concatenate([s.indices(0, 3) for s in splits])
    assert (order == np.arange(total)).all()
    assert all(s.num_batches == math.ceil(len(s) / batch_size) for s in splits)
    assert all(sum(map(len, s.batches(0, 3))) == len(s) for s in splits)
    if (total // world) // batch_size == 0:
        with pytest.raises(ValueError, match=f"no batch of {batch_size} on rank 0 of {world}"):
            Shard(0, world).split(total, batch_size, train=True)
        return
    train = [Shard(rank, world).split(total, batch_size, train=True) for rank in range(world)]
    for epoch in (0, 1):
        picked = np.concatenate([s.indices(9, epoch) for s in train])
        assert len(np.unique(picked)) == len(picked) == world * (total // world)
        batches = [b for s in train for b in s.batches(9, epoch)]
        assert {len(b) for b in batches} == {batch_size}
        assert len(batches) == world * ((total // world) // batch_size)


def test_split_order_depends_on_seed_and_epoch_only():
    split = Shard(1, 3).split(100, 8, train=True)
    assert (split.indices(0, 2) == Shard(1, 3).split(100, 5, train=True).indices(0, 2)).all()
    assert not (split.indices(0, 2) == split.indices(0, 3)).all()
    assert not (split.indices(0, 2) == split.indices(1, 2)).all()


# --- Shard ------------------------------------------------------------------------------------

def test_shard_is_a_frozen_validated_positional_dataclass():
    assert Shard(1, 4) == Shard(rank=1, world_size=4, local_rank=0)
    assert Shard(3, 4, 1).local_rank == 1
    assert Shard().main and Shard(0, 2).main and not Shard(1, 2).main
    with pytest.raises(dataclasses.FrozenInstanceError):
        Shard().rank = 1
    for bad in [(2, 2), (-1, 2), (0, 0), (0, 2, 2), (0, 2, -1), (0.0, 1), (True, 2)]:
        with pytest.raises(ValueError, match="bad shard"):
            Shard(*bad)


@pytest.mark.parametrize("environ, shard", [
    ({}, Shard()),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, Shard(3, 8, 1)),
    ({"RANK": "2", "WORLD_SIZE": "4"}, Shard(2, 4, 0)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}, Shard(5, 6, 2)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",       # torchrun inside a SLURM job
      "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, Shard(1, 2, 1)),
    ({"LOCAL_RANK": "0", "SLURM_LOCALID": "0"}, Shard()),        # neither launcher's rank
])
def test_shard_from_env_reads_torchrun_then_slurm(environ, shard):
    assert Shard.from_env(environ) == shard


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "1"}, "WORLD_SIZE=None"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "-1"}, "SLURM_NTASKS='-1'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "bad shard"),
])
def test_shard_from_env_names_a_bad_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        Shard.from_env(environ)


def test_shard_from_env_defaults_to_os_environ(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert Shard.from_env() == Shard(1, 2)
