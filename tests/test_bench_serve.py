"""``bench/serve.py`` end to end on the tiny configuration: the server in its own process, two client counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_serve_cpu(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "bench" / "serve.py"), "--config", "tiny", "--clients", "1,3", "--requests", "2",
           "--num_images", "2", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu" and result["config"] == "tiny"
    assert [(r["clients"], r["requests"], r["images"]) for r in result["rows"]] == [(1, 2, 4), (3, 6, 12)]
    for row in result["rows"]:
        assert 0 < row["p50_s"] <= row["p95_s"] <= row["wall_s"]
        assert row["images_per_s"] > 0 and row["offline_images_per_s"] > 0 and row["single_request_s"] > 0
        assert row["ratio"] == row["images_per_s"] / row["offline_images_per_s"]
        assert row["client_cpu_s"] >= 0
        assert row["floor_images_per_s"] == result["floor_images_per_s"] > 0
        assert row["of_floor"] == row["images_per_s"] / row["floor_images_per_s"]
    assert "client CPU s" in proc.stdout and "floor img/s" in proc.stdout
