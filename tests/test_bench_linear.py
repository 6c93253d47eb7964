"""bench/linear.py runs and reports every shape, weight kind and instruction set it was asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import cpp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}")
def test_bench_linear_cpu(tmp_path: Path) -> None:
    out = tmp_path / "linear.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "linear.py"), "--rows", "1,4", "--threads", "1",
                           "--weights", "int8,fp32", "--iters", "5", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert len(results) == len(cpp.cpu_isas()) * 2 * 4 * 2
    assert {(r["isa"], r["weights"], r["rows"]) for r in results} == {
        (isa, kind, rows) for isa in cpp.cpu_isas() for kind in ("int8", "fp32") for rows in (1, 4)}
    for r in results:
        assert min(r["f_linear_us"], r["stored_us"], r["packed_us"], r["floor_us"]) > 0
    assert report["read_bandwidth"] > 0 and "| int8 | 2048 x 256 | 4 |" in proc.stdout
