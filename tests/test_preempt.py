"""Step-level checkpoints and preemption: a real SIGUSR1 / SIGTERM stops the run at a step
every rank agrees on, after a checkpoint there, with exit code 3; --resume auto continues at
that step, bitwise as an uninterrupted run on the CPU."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_imagenet as ti
from tests.trainrun import args, assert_same_state, checkpoint, free_port, run, small_demo
from training.checkpoint import Checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("demo"))


def signal_at_call(n: int, sig: int):
    """Wrap the trainer's step so that its ``n``-th call sends ``sig`` to this very process."""
    build, calls = ti.build_step, [0]

    def wrapped(*a, **k):
        step = build(*a, **k)

        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), sig)
            return step(*args, **kwargs)
        return call
    return wrapped


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_stops_at_a_step_checkpoint_and_resume_is_bitwise(demo, tmp_path, sig):
    common = ("--mix", "grafting", "--run.deterministic", "true", "--run.checkpoint_every_steps", "2")
    straight = tmp_path / "straight"
    run(demo, straight, *common)
    stopped = tmp_path / "stopped"
    build = ti.build_step
    ti.build_step = signal_at_call(5 + 3, sig)  # epoch 1's third step (5 steps an epoch)
    try:
        with pytest.raises(ti.Preempted, match=r"after step 4 of 5 of epoch 1"):
            run(demo, stopped, *common)
    finally:
        ti.build_step = build
    folder = stopped / "run" / "checkpoints"
    assert Checkpoints(folder, 3).paths()[-1].name == "ckpt_epoch0001_step000004.pt"
    state = load_checkpoint(folder / "ckpt_epoch0001_step000004.pt")
    assert (state["epoch"], state["batch"]) == (1, 4)
    run(demo, stopped, *common, "--resume", "auto")
    a, b = checkpoint(straight, "run", 1), checkpoint(stopped, "run", 1)
    assert_same_state(a["model"], b["model"])
    assert a["step"] == b["step"]
    import json
    log = [json.loads(x) for x in (stopped / "run" / "log.jsonl").read_text().splitlines()]
    straight_log = [json.loads(x) for x in (straight / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1]
    assert log[1]["train_loss"] == pytest.approx(straight_log[1]["train_loss"], rel=1e-12)


def test_step_checkpoints_are_kept_and_ordered_with_epoch_ones(demo, tmp_path):
    run(demo, tmp_path, "--run.checkpoint_every_steps", "2", "--run.keep_last", "10")
    names = [p.name for p in Checkpoints(tmp_path / "run" / "checkpoints", 10).paths()]
    assert names == ["ckpt_epoch0000_step000002.pt", "ckpt_epoch0000_step000004.pt",
                     "ckpt_epoch0000.pt", "ckpt_epoch0001_step000002.pt",
                     "ckpt_epoch0001_step000004.pt", "ckpt_epoch0001.pt"]


@pytest.mark.slow
def test_a_signal_to_one_rank_of_two_stops_both_with_a_checkpoint(demo, tmp_path):
    """Two gloo ranks started without torchrun; SIGUSR1 reaches rank 1 only, after epoch 0:
    both finish their step, rank 0 writes the checkpoint, both exit with code 3, and
    --resume auto finishes the run."""
    argv = [sys.executable, "train_imagenet.py",
            *args(demo, tmp_path, "--epochs", "4", "--run.checkpoint_every_steps", "1")]

    def launch(*extra):
        port, procs = free_port(), []
        for rank in range(2):
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([*argv, *extra], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        return procs

    procs = launch()
    deadline = time.monotonic() + 300
    seen = []
    for line in procs[0].stdout:  # rank 0 logs; rank 1 gets the signal
        seen.append(line)
        if line.startswith("epoch 1/4"):
            procs[1].send_signal(signal.SIGUSR1)
            break
        assert time.monotonic() < deadline, "".join(seen[-20:])
    outs = [p.communicate(timeout=300)[0] for p in procs]
    outs[0] = "".join(seen) + outs[0]
    assert [p.returncode for p in procs] == [3, 3], [o[-2000:] for o in outs]
    assert "preempted: stopped by a signal on another rank after step" in outs[0]
    folder = tmp_path / "run" / "checkpoints"
    newest = Checkpoints(folder, 3).paths()[-1]
    assert "_step" in newest.name and load_checkpoint(newest)["epoch"] == 1

    procs = launch("--resume", "auto")
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    assert "resumed from" in outs[0] and (folder / "ckpt_epoch0003.pt").is_file()
