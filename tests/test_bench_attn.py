"""``bench/attn.py`` end to end at a tiny geometry (text 16 + 4x4 grid, one head, one timed run)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpp

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "attn.py"
PATTERNS = ("full", "axial_row", "axial_col", "conv_like")
METHODS = ("ours", "sdpa_mask", "sdpa_causal", "flex")
TINY = ["--text_len", "16", "--fmap_size", "4", "--heads", "1", "--batch", "1", "--iters", "1", "--no_flex",
        "--patterns", ",".join(PATTERNS)]


def run_bench(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "attn.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # test_triton_attention.py sets it; the CUDA run must use the real kernels
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--json", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_result(result: dict, stdout: str, device: str) -> None:
    for key in ("device", "device_name", "torch", "triton", "commit", "date", "dtype", "timing", "correctness"):
        assert key in result
    assert result["device"] == device
    rows = result["rows"]
    assert [(r["pattern"], r["method"]) for r in rows] == [(p, m) for p in PATTERNS for m in METHODS]
    for row in rows:
        assert row["seq"] == 32 and row["heads"] == 1 and row["dim_head"] == 64
        assert 0 < row["nnz"] <= 32 * 33 // 2
        # the floor: the useful FLOPs over the matrix-multiply rate measured in the run
        useful = 4 * row["dim_head"] * row["nnz"] * row["batch"] * row["heads"]
        assert row["fwd_floor_ms"] == pytest.approx(useful / (result["floor"]["matmul_gflops"] * 1e9) * 1e3)
        assert row["fwd_bwd_floor_ms"] == pytest.approx(3.5 * row["fwd_floor_ms"])
        if row["method"] == "flex":
            assert row["fwd_ms"] is None and "no_flex" in row["note"]
            continue
        assert row["error"] is None
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert row["fwd_tflops"] > 0 and row["fwd_bwd_tflops"] > 0
        if row["method"] == "ours":
            assert row["max_abs_diff"] < 1e-2
        else:
            assert row["ours_speedup_fwd"] > 0 and row["ours_speedup_fwd_bwd"] > 0
    backends = {r["pattern"]: r["backend"] for r in rows if r["method"] == "ours"}
    assert backends["full"] == ("sdpa" if device == "cuda" else "cpp")
    assert all(backends[p] == ("triton" if device == "cuda" else "cpp") for p in PATTERNS[1:])
    assert [c["pattern"] for c in result["correctness"]] == list(PATTERNS)
    for check in result["correctness"]:
        assert set(check["max_abs_diff"]) == {"out", "dq", "dk", "dv"}

    table = stdout[stdout.index("| pattern |"):]
    assert "| floor ms (fwd / fwd+bwd) | of floor (fwd / fwd+bwd) |" in table
    for method in METHODS:
        assert f"| {method} |" in table
    assert "skipped (--no_flex)" in table


@pytest.mark.skipif(not cpp.available(), reason="the C++ kernels are not built")
def test_bench_attn_tiny_cpu(tmp_path: Path) -> None:
    result, stdout = run_bench(tmp_path, "--device", "cpu")
    check_result(result, stdout, "cpu")
    assert result["dtype"] == "fp32"
    assert all(r["peak_mib_fwd"] is None for r in result["rows"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_attn_tiny_cuda(tmp_path: Path) -> None:
    """The native Triton kernels (forward and backward) against SDPA, through the benchmark's own check."""
    pytest.importorskip("triton")
    result, stdout = run_bench(tmp_path, "--device", "cuda", "--warmup", "1")
    check_result(result, stdout, "cuda")
    assert result["dtype"] == "bf16"
    assert all(r["peak_mib_fwd"] > 0 for r in result["rows"] if r["method"] != "flex")


def test_table_shows_errors_and_forward_only_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_attn", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    common = dict(pattern="axial_row", text_len=16, fmap_size=4, seq=32, batch=1, heads=1, dim_head=64,
                  kernel_size=5, dtype="fp32", nnz=100, density=0.1)
    rows = [bench.Row(method="ours", backend="cpp", fwd_ms=1.0, fwd_bwd_ms=3.0, **common),
            bench.Row(method="flex", backend="flex", fwd_ms=2.0, ours_speedup_fwd=2.0, **common),
            bench.Row(method="flex", backend="flex", error="BackendCompilerFailed: no compiler", **common)]
    lines = bench.table(rows).splitlines()
    assert len(lines) == 5
    assert "| 2.00 | fwd only |" in lines[3] and "2.00x" in lines[3]
    assert "error: BackendCompilerFailed: no compiler" in lines[4]
