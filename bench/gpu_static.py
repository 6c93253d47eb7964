"""Static GPU report and gate for the Triton kernels: compiled ahead of time for sm_80 and sm_90 on any machine.

    python bench/gpu_static.py                         # every variant, both targets, table + JSON
    python bench/gpu_static.py --subset --gate         # what make test runs: fails on any finding
    python bench/gpu_static.py --targets 90 --dtypes bf16 --head_dims 64,128 --patterns axial_row

Every variant comes from the kernels' own launch code (``kernels.triton.static``), run at DALL-E's geometry (caption
256 + a 32x32 grid) for each dtype, head dim, pattern and decode split count, fp32 both with and without TF32. The
table gives registers, spill bytes, shared memory against the architecture's per-block limit, blocks per SM, how
each product was lowered (wgmma / mma.sync / fma, "(dup)" when its warps repeat each other's work) and the MMA
instructions in the PTX. ``--gate`` exits 1 when any variant fails to compile, spills, needs more shared memory than
a block may have, runs a 16-bit (or TF32) product without tensor cores, or duplicates MMA work across warps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT_LEN, FMAP_SIZE = 257, 32  # bos + 256 caption tokens, a 32 x 32 image grid: DALL-E's geometry
SEQ = TEXT_LEN - 1 + FMAP_SIZE**2  # the model's input: every position but the last image token
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PATTERNS = ("full", "axial_row", "axial_col", "conv_like", "conv_like_centered")
SPLITS = (1, 4)  # decode: one program per (batch, head), and FlashDecoding splits with their combine kernel


def compile_target(arch: int, dtypes: list[str], head_dims: list[int], patterns: list[str],
                   overrides: dict[str, int]) -> list[dict]:
    """Compile every launch of the training and decode entry points for sm_``arch``; one dict per variant."""
    from kernels.triton import attention, decode, static

    with static.compiling_for(arch) as recorder:
        for name in dtypes:
            dtype = DTYPES[name]
            for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                for head_dim in head_dims:
                    q = torch.zeros(1, 1, SEQ, head_dim, dtype=dtype)
                    for pattern in patterns:
                        recorder.label = pattern + (" tf32" if tf32 else "")
                        scale = head_dim**-0.5
                        geometry = (pattern, TEXT_LEN, FMAP_SIZE, 5, 1, scale)
                        out, lse = attention._forward(q, q, q, *geometry, **overrides)
                        attention._backward(q, q, q, q, out, lse, *geometry, **overrides)
                        if tf32:
                            continue  # decoding computes in fp32 on CUDA cores whatever the matmul setting
                        for splits in SPLITS:
                            recorder.label = f"{pattern} splits={splits}"
                            decode._decode(q[:, :, 0], q, q, torch.zeros((), dtype=torch.int64), *geometry, splits)
        torch.backends.cuda.matmul.allow_tf32 = False
    return [{**asdict(r), "blocks_per_sm": r.blocks_per_sm, "problems": r.problems()} for r in recorder.records]


def table(rows: list[dict]) -> str:
    header = (f"{'kernel':9}{'sm':>3} {'dtype':5}{'hd':>4} {'variant':26}{'w/st':>5} {'tiles':9}{'regs':>5} "
              f"{'spill':>9} {'smem B':>7}{'CTA':>4}  {'dots':30}{'wgmma/mma':>10}  problems")
    lines = [header, "-" * len(header)]
    for r in rows:
        dots = " ".join(f"{d['lowering']}{'(dup)' if d['duplicated'] else ''}" for d in r["dots"]) or "-"
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{r['kernel']:9}{r['arch']:>3} {r['dtype']:5}{r['head_dim']:>4} {r['label'][:25]:26}"
                     f"{r['num_warps']:>2}/{r['num_stages']:<2} {r['blocks'][:8]:9}{r['regs']:>5} {spill:>9} "
                     f"{r['smem']:>7}{r['blocks_per_sm']:>4}  {dots[:29]:30}{r['ptx_wgmma']:>5}/{r['ptx_mma']:<4}  "
                     + "; ".join(r["problems"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="90,80", help="compute capabilities, e.g. 90,80")
    p.add_argument("--dtypes", default="fp16,bf16,fp32")
    p.add_argument("--head_dims", default="16,32,64,80,96,128")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--subset", action="store_true",
                   help="make test's representative subset: head dims 64 and 128, every pattern, kernel and dtype")
    p.add_argument("--gate", action="store_true", help="exit 1 if any variant has a problem")
    p.add_argument("--override", default="",
                   help="force launch settings, e.g. block_m=128,block_n=128 (to check that the gate can fail)")
    p.add_argument("--json", default=None, help="write every variant's figures here")
    args = p.parse_args(argv)
    if args.subset:
        args.head_dims = "64,128"
    return args


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("error: run without TRITON_INTERPRET=1: the interpreter replaces the compiler")
    args = parse_args(argv)
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.override.split(",") if kv)}
    targets = [int(t) for t in args.targets.split(",")]
    work = (args.dtypes.split(","), [int(h) for h in args.head_dims.split(",")], args.patterns.split(","), overrides)
    started = time.perf_counter()
    with ProcessPoolExecutor(min(len(targets), os.cpu_count() or 1)) as pool:  # one target per process
        rows = [r for part in pool.map(compile_target, targets, *([w] * len(targets) for w in work)) for r in part]
    print(table(rows))
    bad = [r for r in rows if r["problems"]]
    print(f"\n{len(rows)} variants compiled for sm_{', sm_'.join(map(str, targets))} in "
          f"{time.perf_counter() - started:.0f} s; {len(bad)} with problems")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": __import__("triton").__version__, "torch": torch.__version__,
                                               "geometry": {"text_len": TEXT_LEN, "fmap_size": FMAP_SIZE},
                                               "variants": rows}, indent=1) + "\n")
    return 1 if args.gate and bad else 0


if __name__ == "__main__":
    sys.exit(main())
