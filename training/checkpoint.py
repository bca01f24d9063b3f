"""Checkpoints of one run: written atomically, loaded without running code, one trajectory.

A checkpoint holds only tensors and plain data (dicts, lists, numbers, strings): model,
optimizer and scaler state, the RNG states of every rank, the config. It is loaded with
``torch.load(weights_only=True)``, which unpickles nothing else, so a crafted file cannot run
code; a file that needs anything more is refused as "not a salmix checkpoint".

Resuming from epoch ``e`` abandons the checkpoints after ``e`` (a trajectory that was not
continued): they are renamed ``*.abandoned`` so that no later ``--resume auto`` picks them up,
and pruning (``keep_last``) keeps the newest written.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from .config import ConfigError

FORMAT = 3
"""Version 3: a mid-epoch checkpoint keeps each rank's epoch meter as one state. Version 2:
weights-only content. Version 1 pickled numpy and Python RNG states."""

_NAME = re.compile(r"ckpt_epoch(\d+)(?:_step(\d+))?\.pt")


def _position(path: Path) -> tuple[int, float]:
    """(epoch, batches done in it) of a checkpoint's name; an end-of-epoch one counts as all."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)), float(m.group(2)) if m.group(2) else float("inf")


class CheckpointError(ValueError):
    """A file is not a checkpoint this version of salmix can load; the message names it."""


# -- RNG states as plain data ---------------------------------------------------------------

def rng_state(mix_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "mix": mix_gen.get_state()}


def set_rng_state(state: dict[str, Any], mix_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))
    mix_gen.set_state(state["mix"])


# -- files ----------------------------------------------------------------------------------

def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded as weights only; :class:`CheckpointError` otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises many kinds on foreign bytes
        found = next((ln.split("GLOBAL", 1)[-1].strip() for ln in str(e).splitlines()
                      if "GLOBAL" in ln), None)
        if found is not None:
            raise CheckpointError(
                f"{path} is not a salmix checkpoint: it holds Python objects ({found}) that are "
                f"not loaded, since loading them could run code; salmix writes only tensors and "
                f"plain data (format {FORMAT}), and checkpoints of salmix before that format are "
                "not loaded either") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} cannot be read as a checkpoint (truncated or not a "
                              f"torch file: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a salmix checkpoint of format {FORMAT} "
                              f"(found {found!r})")
    return state


class Checkpoints:
    """``ckpt_epochNNNN.pt`` files of one run: the newest ``keep_last`` kept, plus ``best.pt``."""

    def __init__(self, folder: Path, keep_last: int) -> None:
        self.folder = folder
        self.keep_last = keep_last

    def paths(self) -> list[Path]:
        """The checkpoints of the current trajectory, oldest first: ``ckpt_epochNNNN.pt`` at an
        epoch's end, ``ckpt_epochNNNN_stepKKKKKK.pt`` after K of its batches."""
        found = [p for p in self.folder.glob("ckpt_epoch*.pt") if _NAME.fullmatch(p.name)]
        return sorted(found, key=_position)

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files of interrupted writes; return them."""
        stale = [p for p in self.folder.glob(".*.tmp*") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save(self, state: dict[str, Any], epoch: int, is_best: bool, batch: int | None = None) -> Path:
        """Write ``state`` as epoch ``epoch``'s checkpoint (after ``batch`` of its batches, or at
        its end), then keep the newest ``keep_last``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        step = f"_step{batch:06d}" if batch is not None else ""
        path = self.folder / f"ckpt_epoch{epoch:04d}{step}.pt"
        atomic_save(state, path)
        if is_best:
            tmp = self.folder / ".best.pt.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, self.folder / "best.pt")
        for old in self.paths()[:-self.keep_last]:
            old.unlink()
        return path

    def abandon_after(self, epoch: int, batch: int | None = None) -> list[Path]:
        """Rename the checkpoints written after epoch ``epoch`` (after ``batch`` of its batches,
        if given; ``best.pt`` too, if it is one of them) to ``*.abandoned``, so that no later
        resume picks them up; return the new paths."""
        here = (epoch, float("inf") if batch is None else float(batch))
        later = [p for p in self.paths() if _position(p) > here]
        best = self.folder / "best.pt"
        if best.is_file():
            try:
                if torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"] >= epoch + (batch is None):
                    later.append(best)
            except Exception:  # an unreadable best.pt is not of this trajectory either
                later.append(best)
        moved = []
        for p in later:
            target = p.with_name(p.name + ".abandoned")
            os.replace(p, target)
            moved.append(target)
        return moved

    def select(self, resume: str | None, log: Callable[[str], None]
               ) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint that ``run.resume`` names (None, ``auto`` or a path), loaded; None to
        start from scratch. Without ``resume`` a folder that holds checkpoints is refused."""
        if resume is None:
            if self.paths():
                raise ConfigError(
                    f"run.resume: {self.folder} already holds checkpoints; pass --resume auto "
                    f"to continue that run or --run.name NEW to start another")
            return None
        if resume == "auto":
            found = self.load_newest_valid(log)
            if found is None:
                log(f"--resume auto: no valid checkpoint in {self.folder}; starting from scratch")
            return found
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"run.resume: checkpoint {path} does not exist")
        return path, load_checkpoint(path)

    def load_newest_valid(self, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
        for path in reversed(self.paths()):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as e:  # truncated or foreign: fall back to the previous one
                log(f"skipping checkpoint {path}: {e}")
        return None


def check_resumable(old: dict[str, Any], new: dict[str, Any], allowed: set[str],
                    path: Path) -> dict[str, tuple[Any, Any]]:
    """The changes ``{field: (old, new)}`` between a checkpoint's result fields and this run's;
    a change to a field not in ``allowed`` (``run.resume_override``) is refused by name."""
    changes = {k: (old.get(k), new.get(k)) for k in [*old, *(k for k in new if k not in old)]
               if old.get(k) != new.get(k)}
    for key, (was, now) in changes.items():
        if key not in allowed:
            raise ConfigError(
                f"cannot resume from {path}: {key} was {was!r} there but is {now!r} now; "
                f"resume with the same value, continue with the new one by passing "
                f"--resume-override {key}, or start a new run (--run.name)")
    return changes


def record_overrides(run_dir: Path, path: Path, epoch: int,
                     changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the fields a resume changed to ``config_history.yaml`` in the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    entry = {"resumed_from": str(path), "after_epoch": epoch,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "changes": {k: {"was": w, "now": n} for k, (w, n) in changes.items()}}
    with open(run_dir / "config_history.yaml", "a") as f:
        f.write(yaml.safe_dump([entry], sort_keys=False))
