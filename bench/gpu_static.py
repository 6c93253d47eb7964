"""Static GPU report and gate for the Triton kernels: compiled ahead of time for sm_80 and sm_90 on any machine.

    python bench/gpu_static.py                         # every variant, both targets, table + JSON
    python bench/gpu_static.py --subset --gate         # what make test runs: fails on any finding
    python bench/gpu_static.py --targets 90 --dtypes bf16 --head_dims 64,128 --patterns axial_row
    python bench/gpu_static.py --search                # every tile setting of the attention kernels: which pass

Every variant comes from the kernels' own launch code (``kernels.triton.static``), run at DALL-E's geometry (caption
256 + a 32x32 grid) for each dtype, head dim, pattern and decode split count, fp32 both with and without TF32, and
the int8 weight-only linear layer of sampling (``w8_linear``) at each row tile it launches, fp16 and bf16. The
table gives registers, spill bytes, shared memory against the architecture's per-block limit, blocks per SM, how
each product was lowered (wgmma / mma.sync / fma, "(dup)" when its warps repeat each other's work) and the MMA
instructions in the PTX. ``--gate`` exits 1 when any variant fails to compile, spills, needs more shared memory than
a block may have, runs a 16-bit (or TF32) product without tensor cores, or duplicates MMA work across warps.
The attention kernels' launch code compiles every candidate its autotuner may choose (``kernels.triton.tuning``).

``--search`` puts a whole space of tile sizes, warps and stages in the autotuner's place for each table row of
``kernels.triton.tuning`` (at head dims 64 and 128, conv_like) and lists the settings that pass the gate, most
blocks per SM first: where the defaults and alternatives come from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import itertools
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from unittest import mock
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT_LEN, FMAP_SIZE = 257, 32  # bos + 256 caption tokens, a 32 x 32 image grid: DALL-E's geometry
SEQ = TEXT_LEN - 1 + FMAP_SIZE**2  # the model's input: every position but the last image token
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PATTERNS = ("full", "axial_row", "axial_col", "conv_like", "conv_like_centered")
SPLITS = (1, 4)  # decode: one program per (batch, head), and FlashDecoding splits with their combine kernel
W8_SHAPE, W8_ROWS = (4096, 1024), (1, 32, 128)  # the int8 linear layer: the large model's feed-forward, 16/32/64-row tiles


def compile_target(arch: int, dtypes: list[str], head_dims: list[int], patterns: list[str],
                   overrides: dict[str, int], tuned: list[tuple[str, str]]) -> list[dict]:
    """Compile every launch of the training and decode entry points for sm_``arch``; one dict per variant. The
    autotuner's alternatives are compiled for the (dtype, pattern) pairs in ``tuned`` (the defaults for all)."""
    from kernels.triton import attention, decode, linear, static, tuning

    defaults_only = {key: ((), (), ()) for key in tuning.DEFAULTS}
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
                        with mock.patch.dict(tuning.ALTERNATIVES, {} if (name, pattern) in tuned else defaults_only):
                            out, lse = attention._forward(q, q, q, *geometry, **overrides)
                            attention._backward(q, q, q, q, out, lse, *geometry, **overrides)
                        if tf32:
                            continue  # decoding computes in fp32 on CUDA cores whatever the matmul setting
                        for splits in SPLITS:
                            recorder.label = f"{pattern} splits={splits}"
                            decode._decode(q[:, :, 0], q, q, torch.zeros((), dtype=torch.int64), *geometry, splits)
            weight, scale = torch.zeros(W8_SHAPE, dtype=torch.int8), torch.zeros(W8_SHAPE[0])
            for rows in W8_ROWS if dtype != torch.float32 else ():  # each row tile the int8 linear layer launches
                recorder.label = f"rows={rows}"
                linear._launch(torch.zeros(rows, W8_SHAPE[1], dtype=dtype), weight, scale, torch.zeros(W8_SHAPE[0],
                                                                                                    dtype=dtype))
        torch.backends.cuda.matmul.allow_tf32 = False
    return [{**asdict(r), "blocks_per_sm": r.blocks_per_sm, "problems": r.problems()} for r in recorder.records]


def search_target(arch: int, products: str, head_dim: int) -> list[dict]:
    """Compile every tile setting in the search space for one table row of ``kernels.triton.tuning``."""
    from kernels.triton import attention, static, tuning

    blocks, warps, stages = SEARCH_SPACE[products]
    space = tuple(tuning.Tiles(m, n, w, s) for m, n, w, s in itertools.product(blocks, blocks, warps, stages))
    key = tuning.table_key(arch, torch.float32 if products != "16-bit" else torch.bfloat16,
                           "tf32" if products == "tf32" else "ieee", head_dim)
    torch.backends.cuda.matmul.allow_tf32 = products == "tf32"
    q = torch.zeros(1, 1, SEQ, head_dim, dtype=torch.bfloat16 if products == "16-bit" else torch.float32)
    geometry = ("conv_like", TEXT_LEN, FMAP_SIZE, 5, 1, head_dim**-0.5)  # the most mask code
    with static.compiling_for(arch) as recorder, mock.patch.dict(tuning.ALTERNATIVES, {key: (space,) * 3}):
        recorder.label = products
        out, lse = attention._forward(q, q, q, *geometry)
        attention._backward(q, q, q, q, out, lse, *geometry)
    torch.backends.cuda.matmul.allow_tf32 = False
    return [{**asdict(r), "blocks_per_sm": r.blocks_per_sm, "problems": r.problems()} for r in recorder.records
            if r.kernel in ("fwd", "bwd_dkdv", "bwd_dq")]


# Tile sizes, warps and stages --search compiles: exact fp32 runs on CUDA cores, whose register file caps the tiles.
SEARCH_SPACE = {"16-bit": ((32, 64, 128), (4, 8), (1, 2, 3)), "tf32": ((32, 64, 128), (4, 8), (1, 2)),
                "fp32": ((16, 32, 64), (4, 8), (1, 2))}


def search_table(rows: list[dict]) -> str:
    lines = []
    for (arch, label, head_dim, kernel), group in itertools.groupby(
            rows, key=lambda r: (r["arch"], r["label"], r["head_dim"], r["kernel"])):
        group = list(group)
        passing = sorted((r for r in group if not r["problems"]),
                         key=lambda r: (-r["blocks_per_sm"] * r["num_warps"], r["blocks"]))
        lines.append(f"sm_{arch} {label:6} hd {head_dim:3} {kernel:8} {len(passing):2}/{len(group)} pass: " +
                     ", ".join(f"{r['blocks']}/w{r['num_warps']}/s{r['num_stages']} ({r['blocks_per_sm']}, "
                               f"{r['regs']}r, {r['smem'] // 1024}K)" for r in passing))
    return "\n".join(lines)


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


def folded_table(rows: list[dict]) -> str:
    """Markdown: the variants folded over patterns and fp16 / bf16 (identical figures) per kernel, target, product
    type and head-dim half; the attention kernels' default settings apart from the autotuner's alternatives."""
    from kernels.triton import tuning

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        tf32 = r["label"].endswith("tf32")
        products = "fp16/bf16" if r["dtype"] in ("fp16", "bf16") else "fp32 tf32" if tf32 else "fp32"
        role = "-"
        if r["kernel"] in ("fwd", "bwd_dkdv", "bwd_dq"):
            key = (r["arch"], "16-bit" if products == "fp16/bf16" else "tf32" if tf32 else "fp32", r["head_dim"] > 64)
            products += " exact" if products == "fp32" else ""
            default = tuning.default(r["kernel"].removeprefix("bwd_"), key)
            role = "default" if (r["blocks"], r["num_warps"], r["num_stages"]) == (
                f"{default.block_m}x{default.block_n}", default.num_warps, default.num_stages) else "alternative"
        half = "16-64" if r["head_dim"] <= 64 else "80-128"
        groups.setdefault((r["arch"], products, half, r["kernel"], role), []).append(r)

    def span(values: list[int]) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}–{max(values)}"

    lines = ["| kernel | sm | products | head dims | settings | variants | warps/stages | tiles | registers | "
             "spill B | shared KiB (max) | blocks/SM | products lowered to | problems |",
             "|---|---|---|---|---|---:|---|---|---|---:|---:|---|---|---:|"]
    order = ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq", "decode", "combine", "w8_linear")
    for (arch, products, half, kernel, role), group in sorted(
            groups.items(), key=lambda g: (-g[0][0], g[0][1].split()[-1] == "tf32", g[0][1] != "fp16/bf16", g[0][2],
                                           order.index(g[0][3]), g[0][4])):
        settings = sorted({f"{r['num_warps']}/{r['num_stages']}" for r in group})
        tiles = sorted({r["blocks"] for r in group}, key=lambda b: [int(x) for x in b.split("x")])
        lowered = sorted({d["lowering"] + ("(dup)" if d["duplicated"] else "") for r in group for d in r["dots"]})
        lines.append(f"| {kernel} | {arch} | {products} | {half} | {role} | {len(group)} | {', '.join(settings)} | "
                     f"{', '.join(tiles)} | {span([r['regs'] for r in group])} | "
                     f"{max(r['spill_stores'] + r['spill_loads'] for r in group)} | "
                     f"{max(r['smem'] for r in group) / 1024:.1f} | {span([r['blocks_per_sm'] for r in group])} | "
                     f"{', '.join(lowered) or '-'} | {sum(bool(r['problems']) for r in group)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="90,80", help="compute capabilities, e.g. 90,80")
    p.add_argument("--dtypes", default="fp16,bf16,fp32")
    p.add_argument("--head_dims", default="16,32,64,80,96,128")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--subset", action="store_true",
                   help="make test's representative subset: head dims 64 and 128, bf16 and fp32 (fp16 compiles as "
                        "bf16 does), every pattern and kernel, the autotuner's alternatives for conv_like only")
    p.add_argument("--gate", action="store_true", help="exit 1 if any variant has a problem")
    p.add_argument("--override", default="",
                   help="force launch settings, e.g. block_m=128,block_n=128 (to check that the gate can fail)")
    p.add_argument("--search", action="store_true",
                   help="compile every tile setting of the attention kernels and list those that pass the gate")
    p.add_argument("--json", default=None, help="write every variant's figures here")
    p.add_argument("--markdown", default=None, help="write the folded table (bench/RESULTS.md's) here")
    args = p.parse_args(argv)
    if args.subset:
        args.head_dims, args.dtypes = "64,128", "bf16,fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("error: run without TRITON_INTERPRET=1: the interpreter replaces the compiler")
    args = parse_args(argv)
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.override.split(",") if kv)}
    targets = [int(t) for t in args.targets.split(",")]
    dtypes, patterns = args.dtypes.split(","), args.patterns.split(",")
    tuned = [(d, p) for d in dtypes for p in patterns]
    if args.subset:  # conv_like has the most mask code
        tuned = [(d, p) for d, p in tuned if p == "conv_like"]
    work = (dtypes, [int(h) for h in args.head_dims.split(",")], patterns, overrides, tuned)
    started = time.perf_counter()
    if args.search:
        jobs = [(t, products, head_dim) for t in targets for products in SEARCH_SPACE for head_dim in (64, 128)]
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            rows = [r for part in pool.map(search_target, *zip(*jobs)) for r in part]
        print(search_table(rows))
        print(f"\n{len(rows)} settings compiled in {time.perf_counter() - started:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"search": rows}, indent=1) + "\n")
        return 0
    with ProcessPoolExecutor(min(len(targets), os.cpu_count() or 1)) as pool:  # one target per process
        rows = [r for part in pool.map(compile_target, targets, *([w] * len(targets) for w in work)) for r in part]
    print(table(rows))
    bad = [r for r in rows if r["problems"]]
    print(f"\n{len(rows)} variants compiled for sm_{', sm_'.join(map(str, targets))} in "
          f"{time.perf_counter() - started:.0f} s; {len(bad)} with problems")
    if args.markdown:
        Path(args.markdown).write_text(folded_table(rows) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": __import__("triton").__version__, "torch": torch.__version__,
                                               "geometry": {"text_len": TEXT_LEN, "fmap_size": FMAP_SIZE},
                                               "variants": rows}, indent=1) + "\n")
    return 1 if args.gate and bad else 0


if __name__ == "__main__":
    sys.exit(main())
