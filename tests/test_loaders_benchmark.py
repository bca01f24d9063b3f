"""Smoke test of benchmarks/loaders.py: its resize-gain section alone (``--only-resize-gain
--quick``), on 32 images with one worker, in a subprocess, and the JSON it writes.

The figures of so small a run mean nothing; what is checked is that every step runs: the set,
its 160 px copy written by ``pipelines.resize``, a .beton of each, and every backend timed on
both.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def short_side(path: Path) -> int:
    with Image.open(path) as image:
        return min(image.size)


@pytest.mark.slow
def test_resize_gain_smoke_run_writes_its_json(tmp_path):
    out, data = tmp_path / "gain.json", tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loaders.py"), "--quick", "--only-resize-gain",
         "--images", "32", "--batch", "8", "--workers", "1", "--data-dir", str(data),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    gain = record["resize_gain"]
    assert record["quick"] and gain["res"] == 128 and gain["copy"]["short_side"] == 160
    assert "throughput" not in record and not out.with_suffix(".png").exists()
    assert set(gain["backends"]) == {"folder", "dali", "ffcv"}
    for row in gain["backends"].values():
        assert row["original"]["images_per_epoch"] == row["copy"]["images_per_epoch"] == 32
        assert len(row["ratio_per_round"]) == 1 and row["ratio"] > 0
    (home,) = data.iterdir()
    copies = list((home / "train-short160").rglob("*.jpg"))
    assert len(copies) == 32 and {short_side(p) for p in copies} == {160}
    assert (home / "short160-jpg-512.beton").is_file()
    assert "resize gain at 128 px" in proc.stdout and "wrote" in proc.stdout.splitlines()[-1]
