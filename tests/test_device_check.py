"""Smoke test of benchmarks/device_check.py: its cheap sections on the CPU at small sizes.

The full check (``--device cuda``) runs on a GPU machine; here the same code runs with
``--device cpu --quick --only env,loader,train_eager`` in a subprocess and its JSON is checked.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_smoke_run_writes_its_json(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu", "--quick",
         "--only", "env,loader,train_eager", "--budget", "150", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                                     **_env()})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "device_check.json").read_text())
    assert record["quick"] and record["device"] == "cpu"
    assert set(record["sections"]) == {"env", "loader", "train_eager"}
    assert all(s["status"] == "ok" for s in record["sections"].values()), record["sections"]
    env = record["sections"]["env"]
    assert env["import_pipelines_ok"] and env["import_pipelines_pulls_in"] == []  # no DALI/FFCV/numba
    loader = record["sections"]["loader"]["result"]
    assert set(loader["decoders"]) == {"cpu", "gpu path on cpu"} and loader["gpu_x_cpu"] > 0
    runs = record["sections"]["train_eager"]["runs"]
    mixers = runs["none"]["result"]["sizes"][0]["mixers"]
    assert set(mixers) == {"none", "grafting", "sage", "mixup", "cutmix"}
    rows = {row["target"]: row for row in record["targets"]}
    assert all(row["met"] is None for row in rows.values())  # a quick run judges nothing
    assert any("GPU decode" in name and row["value"] for name, row in rows.items())
    assert "device check on cpu" in proc.stdout and "wrote" in proc.stdout.splitlines()[-1]


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
