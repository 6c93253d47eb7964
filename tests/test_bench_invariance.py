"""``bench/invariance.py`` end to end on the tiny configuration: on a CPU, fp32 images are the same alone and batched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_invariance_cpu(tmp_path: Path) -> None:
    out = tmp_path / "invariance.json"
    cmd = [sys.executable, str(ROOT / "bench" / "invariance.py"), "--config", "tiny", "--prompts", "3",
           "--precisions", "fp32,bf16", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu" and result["config"] == "tiny"
    fp32, bf16 = result["rows"]
    assert (fp32["precision"], fp32["images"], fp32["same_images"], fp32["same_codes"]) == ("fp32", 3, 3, 1.0)
    assert fp32["first_difference"] == [] and fp32["median_first_difference"] is None
    assert bf16["precision"] == "bf16" and 0 <= bf16["same_images"] <= 3 and 0 <= bf16["same_codes"] <= 1
    assert len(bf16["first_difference"]) == 3 - bf16["same_images"]
    assert all(0 <= k < bf16["codes_per_image"] for k in bf16["first_difference"])
    assert "| fp32 | 3 of 3 | 100.0 % | none |" in proc.stdout


def test_bench_invariance_rejects_an_unknown_precision(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "invariance.py"), "--precisions", "fp32,int4",
                           "--json", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown precision int4" in proc.stderr
