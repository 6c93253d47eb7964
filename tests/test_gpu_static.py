"""The static GPU gate: every Triton kernel variant compiled ahead of time for sm_80 and sm_90, no GPU needed.

It runs bench/gpu_static.py in its own process: the gate needs Triton's compiler, which the interpreter that the
other Triton tests switch on would replace. Nothing here imports Triton at collection: the first import fixes
whether Triton's own library functions are compiled or interpreted, and test_triton_attention.py needs the latter.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
ROOT = Path(__file__).resolve().parents[1]


def gate(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "static.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_static.py"), "--gate", "--json", str(out), *flags],
                         env=env, capture_output=True, text=True)
    return run, json.loads(out.read_text())["variants"] if out.exists() else []


def test_every_variant_of_the_subset_passes_the_gate(tmp_path):
    run, variants = gate(tmp_path, "--subset")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    covered = {(v["kernel"], v["arch"], v["dtype"], v["head_dim"]) for v in variants}
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq", "decode"):
        for arch in (80, 90):
            for dtype in ("bf16", "fp32"):  # the subset's: fp16 compiles as bf16 does
                for head_dim in (64, 128):
                    assert (kernel, arch, dtype, head_dim) in covered
    assert {"bwd_pre", "combine"} <= {v["kernel"] for v in variants}
    w8 = {(v["arch"], v["dtype"], v["label"]) for v in variants if v["kernel"] == "w8_linear"}
    assert w8 == {(arch, "bf16", f"rows={rows}") for arch in (80, 90) for rows in (1, 32, 128)}
    assert {v["label"].split()[0] for v in variants} >= {"full", "axial_row", "conv_like", "conv_like_centered"}
    sixteen_bit = [d for v in variants for d in v["dots"] if d["operand"] in ("f16", "bf16")]
    assert sixteen_bit and all(d["lowering"] in ("wgmma", "mma.sync") for d in sixteen_bit)
    tf32 = [d for v in variants if v["label"].endswith("tf32") for d in v["dots"]]
    assert tf32 and all(d["lowering"] != "fma" for d in tf32)
    assert all(v["spill_stores"] == v["spill_loads"] == 0 and not v["problems"] for v in variants)
    assert_every_tile_candidate_compiled(variants)


def assert_every_tile_candidate_compiled(variants: list[dict]) -> None:
    """The autotuner's candidates, each table row's default and alternatives, are among the gated variants."""
    from kernels.triton import tuning

    compiled = {(v["arch"], v["dtype"], v["head_dim"], v["label"], v["kernel"], v["blocks"], v["num_warps"],
                 v["num_stages"]) for v in variants}
    for arch in (80, 90):
        for dtype, products, label in (("bf16", "16-bit", "conv_like"), ("fp32", "tf32", "conv_like tf32"),
                                       ("fp32", "fp32", "conv_like")):
            for head_dim in (64, 128):
                for kernel in tuning.KERNELS:
                    for t in tuning.candidates(kernel, (arch, products, head_dim > 64)):
                        name = "fwd" if kernel == "fwd" else f"bwd_{kernel}"
                        assert (arch, dtype, head_dim, label, name, f"{t.block_m}x{t.block_n}", t.num_warps,
                                t.num_stages) in compiled, (arch, dtype, head_dim, label, kernel, str(t))


def test_the_gate_fails_on_a_bad_configuration(tmp_path):
    # The old one-size tiles: at head dim 128 (8 warps), 64-row backward tiles make sm_90's two warpgroups compute
    # the same dO.V^T product.
    run, variants = gate(tmp_path, "--override", "block_m=64,block_n=64", "--targets", "90", "--dtypes", "bf16",
                         "--head_dims", "128", "--patterns", "full")
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert any("duplicated across warps" in p for v in variants for p in v["problems"])


MMA = "#{name} = #ttg.nvidia_mma<{{versionMajor = {major}, versionMinor = 0, warpsPerCTA = [{wm}, {wn}], " \
      "instrShape = [16, {n}, 16]}}>"
DOT = "%x = ttng.warp_group_dot %a, %b, %c {{inputPrecision = 0 : i32}} : !ttg.memdesc<{m}x64xbf16, #s> * " \
      "!ttg.memdesc<64x{n}xbf16, #s> -> tensor<{m}x{n}xf32, #{layout}>"


@pytest.mark.parametrize("rows, warps, duplicated", [(64, (4, 2), False), (64, (8, 1), True), (128, (8, 1), False)])
def test_duplicated_mma_work_is_found(rows, warps, duplicated):
    from kernels.triton import static

    ttgir = "\n".join([MMA.format(name="mma", major=3, wm=warps[0], wn=warps[1], n=32),
                       DOT.format(m=rows, n=64, layout="mma")])
    (dot,) = static.parse_dots(ttgir)
    assert dot.lowering == "wgmma" and (dot.rows, dot.cols) == (rows, 64) and dot.duplicated == duplicated


def test_a_16_bit_product_on_fma_units_is_a_problem():
    from kernels.triton import static

    fma = static.Dot("fma", 64, 64, "bf16", "", False)
    record = static.Compiled("fwd", 90, "bf16", 64, "full", 4, 2, "64x64", regs=100, smem=1024, dots=[fma])
    assert record.problems() == ["bf16 64x64 product on FMA units, not tensor cores"]
    assert static.Compiled("fwd", 80, "bf16", 64, "full", 4, 2, "64x64", smem=200_000).problems()[0].startswith(
        "shared memory")
