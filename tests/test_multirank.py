"""Two ranks started without torchrun (the environment set by the test, as ``srun`` or a
user's own launcher would): one rank's failure stops every rank within seconds with a message
saying why, and rank 0's long data preparation never sits inside a collective."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainrun import args, free_port, small_demo

REPO = Path(__file__).resolve().parents[1]
HANG = 300  # seconds: a rank still running by then is hung

pytestmark = pytest.mark.slow

INJECT = """
import sys
import train_imagenet as ti

build_step = ti.build_step


def faulty_step(*a, **k):
    step, calls = build_step(*a, **k), [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3 and ti.Shard.from_env().rank == 1:
            raise RuntimeError("injected fault on rank 1")
        return step(*args, **kwargs)
    return call


ti.build_step = faulty_step
ti.main(sys.argv[1:])
"""


def launch(cmd: list[str], world_size: int = 2) -> list[tuple[int, str, float]]:
    """Start ``world_size`` ranks; (exit code, stdout + stderr, exit time) of each."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline, ended = time.monotonic() + HANG, {}
    while len(ended) < world_size:
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = time.monotonic()
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"ranks {sorted(set(range(world_size)) - set(ended))} hung: "
                        + "\n".join(p.communicate()[0][-2000:] for p in procs))
        time.sleep(0.2)
    return [(p.returncode, p.communicate()[0], ended[r]) for r, p in enumerate(procs)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("demo"))


def test_an_exception_on_one_rank_stops_the_other_within_seconds(demo, tmp_path):
    driver = tmp_path / "inject.py"
    driver.write_text(INJECT)
    (code0, out0, t0), (code1, out1, t1) = launch(
        [sys.executable, str(driver), *args(demo, tmp_path, "--mix", "grafting")])
    assert code1 != 0 and "RuntimeError: injected fault on rank 1" in out1
    assert code0 == 2, out0[-3000:]
    assert "error: stopping rank 0: rank 1 failed: RuntimeError: injected fault on rank 1" in out0
    assert abs(t0 - t1) < 30


def test_a_bad_file_on_one_rank_stops_every_rank_naming_it(demo, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    bad = sorted((data / "train").rglob("*.JPEG"))[5]
    bad.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))  # a JPEG header, then noise
    results = launch([sys.executable, "train_imagenet.py",
                      *args(data, tmp_path, "--mix", "sage", "--epochs", "1")])
    assert all(code != 0 for code, _, _ in results)
    assert all(bad.name in out for _, out, _ in results), [out[-2000:] for _, out, _ in results]
    assert abs(results[0][2] - results[1][2]) < 30


def test_rank_0_writing_the_data_waits_outside_collectives(tmp_path):
    """Writing the demo dataset (seconds here; hours for ImageNet's betons) outlasts a 3 s
    collective timeout: the other rank waits on the store, not in a barrier."""
    argv = ["--data.demo_root", str(tmp_path / "demo"), "--arch", "resnet18",
            "--batch-size", "16", "--data.resolution", "32", "--data.val_resolution", "32",
            "--data.workers", "0", "--out", str(tmp_path), "--run.progress", "false",
            "--run.collective_timeout", "3", "--profile", "1"]
    (code0, out0, _), (code1, out1, _) = launch([sys.executable, "train_imagenet.py", *argv])
    assert code0 == 0, out0[-3000:]
    assert code1 == 0, out1[-3000:]
    waited = re.search(r"rank 1: rank 0 did write the demo dataset in ([\d.]+) s", out1)
    assert waited and float(waited.group(1)) > 3  # longer than the collective timeout
