"""``bench/generate.py`` end to end on the small configuration at batch 1, with estimates only (no whole images)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_generate_cpu(tmp_path: Path) -> None:
    out = tmp_path / "generate.json"
    cmd = [sys.executable, str(ROOT / "bench" / "generate.py"), "--configs", "small", "--patterns", "full,sparse",
           "--batches", "1", "--positions", "2", "--iters", "1", "--max_run_s", "0", "--weights", "fp32,int8",
           "--unfused", "--no-peer", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("device", "device_name", "torch", "commit", "date", "dtype", "configs", "rows"):
        assert key in result
    assert result["device"] == "cpu" and result["dtype"] == "fp32"
    rows = result["rows"]
    assert [(r["patterns"], r["method"], r["weights"]) for r in rows] == [
        (p, m, w) for p in ("full", "sparse") for m, w in (
            ("cached", "fp32"), ("cached+unfused", "fp32"), ("cached", "int8"), ("cached+unfused", "int8"),
            ("naive", "fp32"))]
    assert result["floor"]["measured"] and result["floor"]["bandwidth_gbs"] > 0 and result["floor"]["matmul_gflops"] > 0
    for row in rows:
        assert row["config"] == "small" and row["batch"] == 1
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0 and row["images_per_s_kind"] == "est."
        if row["method"].startswith("cached"):
            assert row["max_rel_diff"] < 1e-3 and row["speedup_vs_naive"] > 0
            assert row["floor_ms"] > 0 and row["floor_fraction"] == row["floor_ms"] / row["ms_per_step"]
        else:
            assert row["floor_ms"] is None
    # int8 weights read fewer bytes: a lower floor (the bandwidth floor dominates at batch 1)
    fp32, int8 = rows[0], rows[2]
    assert int8["floor_ms"] < fp32["floor_ms"] / 2
    assert "| small | sparse | 1 | cached | int8 |" in proc.stdout[proc.stdout.index("| config |"):]


@pytest.mark.skipif(importlib.util.find_spec("dalle_pytorch") is None, reason="DALLE-pytorch is not installed")
def test_bench_generate_beside_dalle_pytorch(tmp_path: Path) -> None:
    out = tmp_path / "generate.json"
    cmd = [sys.executable, str(ROOT / "bench" / "generate.py"), "--configs", "tiny", "--patterns", "sparse",
           "--batches", "2", "--positions", "2", "--iters", "1", "--max_run_s", "0", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["cached", "naive", "DALLE-pytorch"]
    peer = rows[-1]
    assert peer["images_per_s"] > 0 and peer["images_per_s_kind"] == "measured"
    for row in rows[:-1]:
        assert row["speedup_vs_dalle_pytorch"] == row["images_per_s"] / peer["images_per_s"]
