"""Checkpoints and resume at the edges: a crafted file never runs code, an abandoned
trajectory is never picked up, interrupted writes are cleaned, the log is one trajectory,
and a diverged run can be continued with changed settings."""
from __future__ import annotations

import json
import os

import pytest
import torch

import train_imagenet as ti
from tests.trainrun import assert_same_state, run, small_demo
from training.checkpoint import CheckpointError, Checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("demo"))


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path, marker):
    torch.save({"format": 2, "config": {}, "payload": _RunsCode(marker)}, path)
    return path


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=r"evil\.pt is not a salmix checkpoint.*system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_from_a_crafted_file_is_one_error_and_runs_nothing(demo, tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="is not a salmix checkpoint"):
        run(demo, tmp_path, "--resume", str(path))
    assert not marker.exists()


def test_resume_auto_skips_a_crafted_file_and_says_why(demo, tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    crafted(folder / "ckpt_epoch0000.pt", marker)
    run(demo, tmp_path, "--resume", "auto", "--epochs", "1")
    assert not marker.exists()
    assert "skipping checkpoint" in capsys.readouterr().out
    assert load_checkpoint(folder / "ckpt_epoch0000.pt")["epoch"] == 0  # replaced by a real one


def test_checkpoints_of_the_old_pickled_format_are_refused(tmp_path):
    import numpy as np
    torch.save({"format": 1, "rng": {"numpy": np.random.get_state()}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="not a salmix checkpoint"):
        load_checkpoint(tmp_path / "old.pt")


def test_a_file_that_is_not_a_checkpoint_is_one_error_line(demo, tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pt cannot be read as a checkpoint"):
        run(demo, tmp_path, "--resume", str(tmp_path / "notes.pt"))


@pytest.fixture(scope="module")
def three_epochs(demo, tmp_path_factory):
    """A 3-epoch run keeping every checkpoint, and its log."""
    out = tmp_path_factory.mktemp("three")
    run(demo, out, "--epochs", "3", "--run.deterministic", "true")
    return out


def copy_run(src, dst):
    import shutil
    shutil.copytree(src / "run", dst / "run")


def test_resuming_an_older_checkpoint_abandons_the_later_ones(demo, three_epochs, tmp_path):
    """Resume from epoch 0 of a 3-epoch run, stop after 1 epoch: the new epoch-1 checkpoint is
    kept (not pruned by name), epoch 2 of the old trajectory is set aside, and the next
    --resume auto continues from the new epoch 1."""
    copy_run(three_epochs, tmp_path)
    folder = tmp_path / "run" / "checkpoints"
    old_epoch1 = load_checkpoint(folder / "ckpt_epoch0001.pt")
    run(demo, tmp_path, "--epochs", "3", "--run.deterministic", "true", "--run.keep_last", "1",
        "--resume", str(folder / "ckpt_epoch0000.pt"), "--run.stop_after", "1")
    assert [p.name for p in Checkpoints(folder, 1).paths()] == ["ckpt_epoch0001.pt"]
    assert (folder / "ckpt_epoch0002.pt.abandoned").is_file()
    new_epoch1 = load_checkpoint(folder / "ckpt_epoch0001.pt")
    assert_same_state(old_epoch1["model"], new_epoch1["model"])  # deterministic retrain
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1]  # one trajectory, no repeated epoch
    superseded = (tmp_path / "run" / "log.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in superseded] == [1, 2]


def test_interrupted_checkpoint_writes_are_removed_at_start(demo, three_epochs, tmp_path):
    copy_run(three_epochs, tmp_path)
    folder = tmp_path / "run" / "checkpoints"
    stale = [folder / ".ckpt_epoch0003.pt.tmp12345", folder / ".best.pt.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    run(demo, tmp_path, "--epochs", "3", "--run.deterministic", "true", "--resume", "auto")
    assert not any(p.exists() for p in stale)


def test_a_changed_field_is_refused_with_the_way_to_override_it(demo, three_epochs):
    with pytest.raises(ti.ConfigError, match=r"optim\.lr was 0\.05 there but is 0\.01 now.*"
                                             r"--resume-override optim\.lr"):
        run(demo, three_epochs, "--epochs", "3", "--run.deterministic", "true",
            "--resume", "auto", "--optim.lr", "0.01")


def test_resume_override_continues_with_the_new_values_and_records_them(demo, three_epochs,
                                                                        tmp_path, capsys):
    copy_run(three_epochs, tmp_path)
    folder = tmp_path / "run" / "checkpoints"
    run(demo, tmp_path, "--epochs", "3", "--run.deterministic", "true", "--optim.lr", "0.01",
        "--optim.grad_clip", "1", "--resume", str(folder / "ckpt_epoch0001.pt"),
        "--resume-override", "optim.lr,optim.grad_clip")
    out = capsys.readouterr().out
    assert "resume override: optim.lr was 0.05, now 0.01" in out
    assert "resume override: optim.grad_clip was 0.0, now 1.0" in out
    history = (tmp_path / "run" / "config_history.yaml").read_text()
    assert "optim.lr" in history and "optim.grad_clip" in history
    assert load_checkpoint(folder / "ckpt_epoch0002.pt")["config"]["optim"]["lr"] == 0.01


def test_mixed_precision_is_compared_as_resolved(demo, three_epochs, tmp_path):
    """amp "auto" means none on the CPU: resuming with "none" is the same run, with "bf16" not."""
    copy_run(three_epochs, tmp_path)
    with pytest.raises(ti.ConfigError, match=r"optim\.amp was 'none' there but is 'bf16' now"):
        run(demo, tmp_path, "--epochs", "3", "--run.deterministic", "true", "--resume", "auto",
            "--amp", "bf16")
    run(demo, tmp_path, "--epochs", "3", "--run.deterministic", "true", "--resume", "auto",
        "--amp", "none")


def test_non_finite_saliency_is_the_non_finite_loss_stop(demo, tmp_path):
    """Grafting and SAGE read the diverged clean pass's saliency first: same stop, same message."""
    knots = "[[0, 0.01], [1, 0.01], [1.01, 1.0e12], [2, 1.0e12]]"
    for mix in ("grafting", "sage"):
        with pytest.raises(ti.NonFiniteLoss, match="ckpt_epoch0000.pt"):
            run(demo, tmp_path / mix, "--mix", mix, "--optim.lr_schedule", "piecewise",
                "--optim.lr_knots", knots)
