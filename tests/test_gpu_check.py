"""``bench/gpu_check.py``, the one GPU command, kept from rotting between GPU sightings: its ``--dry-run`` end to end
on the CPU (tiny sizes, Triton's interpreter), and the GPU modes' arguments and test shards checked without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression  # what -k compiles its expression with

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["correctness", "attention", "sampling", "training", "invariance", "static"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_check_test_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_end_to_end(tmp_path: Path) -> None:
    results_before = (ROOT / "bench" / "RESULTS.md").read_text()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DALLE_ENGINE_ATTENTION")}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((tmp_path / "gpu-check.json").read_text())
    for key in ("command", "mode", "device_name", "torch", "triton", "commit", "date", "total_s", "exit_status"):
        assert key in result
    assert result["mode"] == "dry-run" and result["exit_status"] == 0
    assert [p["name"] for p in result["parts"]] == PARTS
    for part in result["parts"]:
        assert part["status"] == "ok" and part["rc"] == 0, part
        assert part["seconds"] > 0 and part["budget_s"] > 0 and part["commands"] and part["figures"], part
    figures = {p["name"]: p["figures"] for p in result["parts"]}
    assert figures["correctness"]["tests"]["passed"] >= 11 and "failed" not in figures["correctness"]["tests"]
    assert set(figures["correctness"]["worst_of_budget"]) == {"attention", "decode"}
    assert figures["attention"]["axial_row"]["ours"]["fwd_bwd_ms"] > 0
    assert all(r["floor_ms"] > 0 for r in figures["sampling"]["rows"] if r["method"] != "naive")
    assert figures["training"]["precision"] == "bf16" and figures["training"]["rows"][0]["ours_tokens_per_s"] > 0
    assert [(r["precision"], r["same_images"]) for r in figures["invariance"]["rows"]][0] == ("fp32", 2)
    assert figures["static"]["variants"] > 0
    assert all((tmp_path / "gpu-check-logs" / f"{part}-0.log").exists() for part in PARTS)

    section = (tmp_path / "RESULTS.md").read_text()
    assert section.lstrip().startswith("## GPU check (dry run on the CPU)")
    assert "| part | status |" in section and "| axial_row |" in section and "| tiny | sparse | 1 | cached |" in section
    assert "| fp32 | 2 of 2 | 100.0 % | none |" in section
    assert (ROOT / "bench" / "RESULTS.md").read_text() == results_before

    table = proc.stdout.rstrip().splitlines()[-(len(PARTS) + 2):]  # the summary table comes last
    assert table[0].startswith("| part | status |")
    assert [line.split("|")[1].strip() for line in table[2:]] == PARTS
    assert all(line.split("|")[2].strip() == "ok" for line in table[2:])


def test_dry_run_never_writes_bench_results() -> None:
    with pytest.raises(SystemExit):
        load("gpu_check").parse_args(["--dry-run", "--results", str(ROOT / "bench" / "RESULTS.md")])


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_gpu_modes_arguments_parse(mode: str, tmp_path: Path) -> None:
    """The GPU modes' benchmark flags, which the dry run replaces with tiny ones, are still accepted."""
    gpu_check = load("gpu_check")
    parsers = {f"bench/{name}.py": load(name).parse_args for name in ("attn", "generate", "train", "invariance", "gpu_static")}
    parts = gpu_check.parts_for(mode, tmp_path)
    assert [p.name for p in parts] == (PARTS if mode == "full" else PARTS[:-2])
    for part in parts:
        for cmd in part.commands:
            if cmd[1] in parsers:
                parsers[cmd[1]](cmd[2:])
            else:
                assert cmd[1:3] == ["-m", "pytest"], cmd


def test_shards_run_every_gpu_test_once() -> None:
    """gpu_check's -k shards of tests/test_triton_gpu.py: every test in exactly one (quick: all but fp32 / tf32 and the
    tile candidates)."""
    gpu_check = load("gpu_check")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--noconftest", "-p",
                           "no:cacheprovider", "tests/test_triton_gpu.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) > 40, proc.stdout[-2000:]

    def selects(shard: str, test: str) -> bool:  # pytest's own -k matching: each word a substring of the id
        return Expression.compile(shard).evaluate(lambda word, **_: word.lower() in test.lower())

    for test in ids:
        assert sum(selects(shard, test) for shard in gpu_check.SHARDS) == 1, test
        quick = sum(selects(shard, test) for shard in gpu_check.QUICK_SHARDS)
        skipped = re.search(r"test_attention\[.*-(fp32|tf32)\]|test_tile_candidates", test)
        assert quick == (0 if skipped else 1), test


def test_the_autotuners_choices_are_reported(tmp_path: Path, monkeypatch) -> None:
    """What the attention and training parts' autotuning chose, read from the run's tile cache as the tuner wrote it."""
    pytest.importorskip("triton")
    import torch

    from kernels.triton import tuning

    class H100Tensor:
        is_cuda, shape, dtype, device = True, (8, 8, 1280, 64), torch.bfloat16, torch.device("cuda", 0)

    gpu_check = load("gpu_check")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    key = (90, "16-bit", False)
    default, fast = tuning.candidates("fwd", key)[:2]
    name = tuning._entry_name("fwd", key, H100Tensor(), "axial_row|seq1280|text257|fmap32|k5|dil1")
    tuning._TileCache(tmp_path / gpu_check.TILE_CACHE).put(name, fast, {str(default): 0.3, str(fast): 0.2}, default)

    choices, table = gpu_check.tile_choices(tmp_path)
    assert choices == [{"kernel": "fwd", "dtype": "bfloat16", "products": "16-bit", "head_dim": 64, "batch_x_heads": 64,
                        "shape": "axial_row|seq1280|text257|fmap32|k5|dil1", "chosen": str(fast),
                        "default": str(default), "ms": {str(default): 0.3, str(fast): 0.2}}]
    assert f"| fwd | bfloat16 | 16-bit | 64 | 64 | axial_row seq1280 | {fast} | 0.200 | {default} | 0.300 |" in table
    assert gpu_check.tile_choices(tmp_path / "none") == ([], "")  # a run that tuned nothing (no GPU)
