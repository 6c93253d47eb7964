"""``bench/train.py``: the FLOPs behind its floor, and a tiny run end to end (the median of its timed steps)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import cpp, masks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.register_attention_flops()
    yield module
    del sys.modules[spec.name]


def counted(run) -> dict[str, int]:
    # Imported here, not at collection: torch.utils.flop_counter imports triton, which must come after
    # test_triton_*.py set TRITON_INTERPRET.
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_flash_attention_counts_allowed_scores(bench, causal: bool) -> None:
    b, h, s, d = 2, 3, 11, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    counts = counted(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward())
    forward = 4 * d * b * h * (s * (s + 1) // 2 if causal else s * s)
    assert counts == {"aten._scaled_dot_product_flash_attention_for_cpu": forward,
                      "aten._scaled_dot_product_flash_attention_for_cpu_backward": int(2.5 * forward)}


@pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}")
@pytest.mark.parametrize("pattern", ["axial_row", "axial_col", "conv_like"])
def test_sparse_attention_counts_allowed_scores(bench, pattern: str) -> None:
    b, h, d, text_len, fmap_size = 2, 2, 8, 5, 4
    seq = text_len + fmap_size**2 - 1
    q, k, v = (torch.randn(b, h, seq, d, requires_grad=True) for _ in range(3))
    geometry = dict(text_len=text_len, fmap_size=fmap_size, kernel_size=3, dilation=1)
    counts = counted(lambda: cpp.sparse_attention(q, k, v, pattern=pattern, **geometry).sum().backward())
    forward = 4 * d * b * h * int(masks.dense_mask(pattern, seq, **geometry).sum())
    assert counts == {"dalle_engine_cpu.sparse_attention_fwd": forward,
                      "dalle_engine_cpu.sparse_attention_bwd": int(2.5 * forward)}


def test_tiny_run_reports_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "3", "--warmup", "0", "--no_peer",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["matmul_gflops"] > 0
    [row] = report["results"]
    assert row["step_gflop"] > 0 and row["ours_step_ms"] == sorted(row["ours_step_ms_runs"])[1] > 0
    assert row["dalle_pytorch_step_ms_runs"] is None and row["speedup"] is None
    assert row["floor_ms"] == pytest.approx(row["step_gflop"] / report["matmul_gflops"] * 1e3)
    assert row["of_gemm_rate"] == pytest.approx(row["floor_ms"] / row["ours_step_ms"])
    assert "of GEMM rate" in proc.stdout and row["case"] in proc.stdout
