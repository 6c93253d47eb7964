"""Attention kernel benchmark: ``kernels.sparse_attention`` against SDPA with the dense boolean mask, SDPA dense
causal (the floor for any dense kernel, not mask-correct) and compiled FlexAttention, at DALL-E geometries, forward
and forward+backward (protocol: ``kernels.md`` §10).

    python bench/attn.py                  # CPU quick set: text 256 + 32x32 grid, 8 heads, batch 1, fp32 (~1 minute)
    python bench/attn.py --full           # CPU: the whole matrix
    python bench/attn.py --device cuda    # GPU: the whole matrix, batch 8, bf16, CUDA events, cold L2
    python bench/attn.py --device cuda --text_len 257 --fmap_size 32 --seq 1280   # the model's training geometry
    python bench/attn.py --text_len 16 --fmap_size 4 --heads 1 --iters 1 --no_flex   # smoke test

Useful TFLOP/s count only the allowed mask elements: ``4 * d * nnz * B * H`` for the forward and 3.5x that for
forward+backward (FlashAttention's convention: the backward is 2.5x the forward). The floor is those FLOPs over the
machine's matrix-multiply rate in the bench dtype, measured in the same run; "of floor" is floor / time. "ours x" is
the speed-up of this project's kernel over the row's method (its time / ours). Peak memory (CUDA only) is the method's persistent state
(dense mask, BlockMask) plus the peak allocation of one call above the inputs. Every geometry is checked first:
ours against SDPA with the dense mask (output and q, k, v gradients), FlexAttention's output likewise.
Prints a GitHub table last and writes JSON (``--json``) with the device, versions, commit and every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from bench.common import Timer, environment, matmul_rate, synchronize  # noqa: E402
from kernels import masks  # noqa: E402

SPARSE_PATTERNS = ("axial_row", "axial_col", "conv_like")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# "Way off" bounds on max|ours - sdpa_mask| / max|sdpa_mask|: a mask bug gives O(1); rounding gives ~1e-6 (fp32),
# ~1e-3 (TF32 tl.dot on GPU fp32, fp16), ~1e-2 (bf16).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2}
BWD_FLOP_FACTOR = 3.5  # forward + backward, the backward being 2.5x the forward


@dataclass(frozen=True)
class Geometry:
    text_len: int
    fmap_size: int
    batch: int
    heads: int
    dim_head: int
    kernel_size: int
    seq_len: int | None = None  # default: the whole grid; the model's input stops one image token short

    @property
    def seq(self) -> int:
        return self.seq_len or self.text_len + self.fmap_size ** 2

    @property
    def label(self) -> str:
        return f"{grid_label(self.text_len, self.fmap_size, self.seq)} b{self.batch} h{self.heads}"

    def mask_args(self) -> dict[str, int]:
        return dict(text_len=self.text_len, fmap_size=self.fmap_size, kernel_size=self.kernel_size)


def grid_label(text_len: int, fmap_size: int, seq: int) -> str:
    """e.g. "256+32x32", or "257+32x32 (1280)" for a sequence that stops short of the whole grid."""
    label = f"{text_len}+{fmap_size}x{fmap_size}"
    return label if seq == text_len + fmap_size ** 2 else f"{label} ({seq})"


@dataclass
class Method:
    """One competitor prepared for one (pattern, geometry): ``fn(q, k, v) -> out`` and what it cost to set up."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None
    backend: str = ""
    backward: bool = True  # whether forward+backward is timed
    setup_ms: float = 0.0  # dense mask / BlockMask construction
    state_bytes: int = 0  # what the method keeps alive between calls (mask, BlockMask)
    compile_s: dict[str, float] = field(default_factory=dict)  # first-call time per mode (compiled paths)
    max_abs_diff: float | None = None
    error: str | None = None
    note: str = ""


@dataclass
class Row:
    pattern: str
    text_len: int
    fmap_size: int
    seq: int
    batch: int
    heads: int
    dim_head: int
    kernel_size: int
    dtype: str
    method: str
    backend: str
    nnz: int
    density: float
    fwd_ms: float | None = None
    fwd_ms_p20: float | None = None
    fwd_ms_p80: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_bwd_ms_p20: float | None = None
    fwd_bwd_ms_p80: float | None = None
    fwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    fwd_dense_equiv_tflops: float | None = None
    fwd_bwd_dense_equiv_tflops: float | None = None
    fwd_floor_ms: float | None = None  # useful FLOPs over the machine's matrix-multiply rate
    fwd_bwd_floor_ms: float | None = None
    ours_speedup_fwd: float | None = None
    ours_speedup_fwd_bwd: float | None = None
    peak_mib_fwd: float | None = None
    peak_mib_fwd_bwd: float | None = None
    state_mib: float = 0.0
    setup_ms: float = 0.0
    compile_s: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float | None = None
    error: str | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Competitors


class _OpNames(TorchDispatchMode):
    """Records the ATen ops run under it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def sdpa_backend(fn: Callable[[], object]) -> str:
    """The SDPA kernel one call of ``fn`` dispatches to (e.g. ``sdpa:flash_attention``), read from its ATen ops."""
    try:
        with _OpNames() as ops, torch.no_grad():
            fn()
    except Exception:  # a nicety only: a failing call fails again, and is recorded, when it is warmed up
        return "sdpa"
    for name in ops.names:
        for prefix in ("aten::_scaled_dot_product_", "aten::_flash_attention", "aten::_efficient_attention",
                       "aten::_cudnn_attention"):
            if name.startswith(prefix):
                return "sdpa:" + name.removeprefix("aten::_scaled_dot_product_").removeprefix("aten::_")
    return "sdpa"


def prepare_ours(pattern: str, geom: Geometry, q: torch.Tensor, backend: str) -> Method:
    chosen = kernels.choose_backend(q, pattern, backend)

    def fn(q, k, v):
        return kernels.sparse_attention(q, k, v, pattern=pattern, backend=backend, **geom.mask_args())

    return Method("ours", fn, backend=chosen)


def prepare_sdpa_mask(pattern: str, geom: Geometry, device: torch.device) -> Method:
    start = time.perf_counter()
    mask = masks.dense_mask(pattern, geom.seq, device=device, **geom.mask_args())
    setup_ms = (time.perf_counter() - start) * 1e3

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return Method("sdpa_mask", fn, setup_ms=setup_ms, state_bytes=mask.numel() * mask.element_size())


def prepare_sdpa_causal() -> Method:
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return Method("sdpa_causal", fn, note="dense causal: not mask-correct")


def prepare_flex(pattern: str, geom: Geometry, device: torch.device, mode: str | None) -> Method:
    """FlexAttention compiled with torch.compile, its BlockMask built from ``kernels.masks.allowed``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return masks.allowed(pattern, q_idx, kv_idx, **geom.mask_args())

    start = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, geom.seq, geom.seq, device=device)
    setup_ms = (time.perf_counter() - start) * 1e3
    state_bytes = sum(t.numel() * t.element_size() for t in block_mask.as_tuple() if isinstance(t, torch.Tensor))
    compiled = torch.compile(flex_attention, dynamic=False, mode=mode)

    def fn(q, k, v):
        return compiled(q, k, v, block_mask=block_mask)

    cpu = device.type == "cpu"
    return Method("flex", fn, backend=f"flex (inductor{', ' + mode if mode else ''})", backward=not cpu,
                  setup_ms=setup_ms, state_bytes=state_bytes,
                  note="no CPU backward in this torch: forward only" if cpu else "")


def error_text(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


# ---------------------------------------------------------------------------------------------------------------
# Timing


def forward_run(fn, q, k, v) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn(q, k, v)

    return run


def forward_backward_run(fn, q, k, v, dout) -> Callable[[], object]:
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))

    def run():
        out = fn(q, k, v)
        return out, *torch.autograd.grad(out, (q, k, v), dout)

    return run


def time_interleaved(runs: dict[str, Callable[[], object]], timer: Timer, warmup: int, iters: int
                     ) -> dict[str, list[float]]:
    """Median, 20 % and 80 % quantiles (ms) per method, timing the methods in turn (A, B, C, A, B, C, ...)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            samples[name].append(timer(run))
    return {name: torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
            .tolist() for name, times in samples.items()}


def peak_mib(run: Callable[[], object], state_bytes: int, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base + state_bytes) / 2**20


# ---------------------------------------------------------------------------------------------------------------
# One (pattern, geometry)


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max|a - b| and that over max|b|."""
    diff = (a.double() - b.double()).abs().max().item()
    return diff, diff / max(b.double().abs().max().item(), 1e-12)


def check_ours(ours: Method, reference: Method, q, k, v, dout, dtype: torch.dtype) -> dict[str, float]:
    """Output and gradients of ours against SDPA with the dense mask; exits if they are way off."""
    got = forward_backward_run(ours.fn, q, k, v, dout)()
    want = forward_backward_run(reference.fn, q, k, v, dout)()
    diffs = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        diffs[name], rel = relative_diff(a, b)
        if not rel <= TOLERANCE[dtype]:  # also catches NaN
            raise SystemExit(f"ours ({ours.backend}) is way off SDPA with the dense mask: {name} max abs diff "
                             f"{diffs[name]:.3g} ({rel:.3g} of max|ref|, tolerance {TOLERANCE[dtype]:.0e})")
    return diffs


def bench_case(pattern: str, geom: Geometry, args, device: torch.device, dtype: torch.dtype, timer: Timer,
               matmul_flops: float) -> tuple[list[Row], dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (geom.batch, geom.heads, geom.seq, geom.dim_head)
    q, k, v, dout = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))

    methods: list[Method] = [prepare_ours(pattern, geom, q, args.backend)]
    reference = prepare_sdpa_mask(pattern, geom, device)
    methods += [reference, prepare_sdpa_causal()]
    if args.no_flex:
        methods.append(Method("flex", None, backend="flex", note="skipped (--no_flex)"))
    else:
        try:
            methods.append(prepare_flex(pattern, geom, device, args.flex_mode))
        except Exception as error:
            methods.append(Method("flex", None, backend="flex", error=error_text(error)))
    for method in methods[1:3]:
        method.backend = sdpa_backend(lambda fn=method.fn: fn(q, k, v))

    diffs = check_ours(methods[0], reference, q, k, v, dout, dtype)
    methods[0].max_abs_diff = diffs["out"]
    want = forward_run(reference.fn, q, k, v)()

    # Warm each method up (compiling Flex) and check Flex's output; a failing peer becomes an error row.
    for method in methods:
        if method.fn is None:
            continue
        try:
            start = time.perf_counter()
            out = forward_run(method.fn, q, k, v)()
            synchronize(device)
            if method.name == "flex":
                method.compile_s["fwd"] = time.perf_counter() - start
                method.max_abs_diff, rel = relative_diff(out, want)
                if not rel <= TOLERANCE[dtype]:
                    raise RuntimeError(f"output differs from SDPA with the dense mask by {method.max_abs_diff:.3g}")
            if method.backward:
                start = time.perf_counter()
                forward_backward_run(method.fn, q, k, v, dout)()
                synchronize(device)
                if method.name == "flex":
                    method.compile_s["fwd_bwd"] = time.perf_counter() - start
        except Exception as error:
            method.error, method.fn = error_text(error), None

    live = [m for m in methods if m.fn is not None]
    fwd = time_interleaved({m.name: forward_run(m.fn, q, k, v) for m in live}, timer, args.warmup, args.iters)
    fwd_bwd = time_interleaved({m.name: forward_backward_run(m.fn, q, k, v, dout) for m in live if m.backward},
                               timer, args.warmup, args.iters)

    mask = masks.dense_mask(pattern, geom.seq, **geom.mask_args())
    nnz = int(mask.sum())
    flops = 4 * geom.dim_head * nnz * geom.batch * geom.heads
    dense_flops = 4 * geom.dim_head * geom.seq ** 2 / 2 * geom.batch * geom.heads  # FlashAttention's causal count
    rows = []
    for method in methods:
        row = Row(pattern=pattern, seq=geom.seq, dtype=args.dtype, method=method.name, backend=method.backend,
                  nnz=nnz, density=nnz / geom.seq ** 2, state_mib=method.state_bytes / 2**20,
                  setup_ms=method.setup_ms, compile_s=method.compile_s, max_abs_diff=method.max_abs_diff,
                  error=method.error, note=method.note, **{f: getattr(geom, f) for f in
                                                           ("text_len", "fmap_size", "batch", "heads", "dim_head",
                                                            "kernel_size")})
        row.fwd_floor_ms = flops / matmul_flops * 1e3
        row.fwd_bwd_floor_ms = BWD_FLOP_FACTOR * row.fwd_floor_ms
        if method.name in fwd:
            row.fwd_ms, row.fwd_ms_p20, row.fwd_ms_p80 = fwd[method.name]
            row.fwd_tflops = flops / row.fwd_ms / 1e9
            row.fwd_dense_equiv_tflops = dense_flops / row.fwd_ms / 1e9
            row.peak_mib_fwd = peak_mib(forward_run(method.fn, q, k, v), method.state_bytes, device)
        if method.name in fwd_bwd:
            row.fwd_bwd_ms, row.fwd_bwd_ms_p20, row.fwd_bwd_ms_p80 = fwd_bwd[method.name]
            row.fwd_bwd_tflops = BWD_FLOP_FACTOR * flops / row.fwd_bwd_ms / 1e9
            row.fwd_bwd_dense_equiv_tflops = BWD_FLOP_FACTOR * dense_flops / row.fwd_bwd_ms / 1e9
            row.peak_mib_fwd_bwd = peak_mib(forward_backward_run(method.fn, q, k, v, dout), method.state_bytes,
                                            device)
        rows.append(row)
    ours = rows[0]
    for row in rows[1:]:
        if row.fwd_ms and ours.fwd_ms:
            row.ours_speedup_fwd = row.fwd_ms / ours.fwd_ms
        if row.fwd_bwd_ms and ours.fwd_bwd_ms:
            row.ours_speedup_fwd_bwd = row.fwd_bwd_ms / ours.fwd_bwd_ms
    check = {"pattern": pattern, "geometry": geom.label, "ours_backend": methods[0].backend,
             "reference": f"{reference.backend} with the dense bool mask", "max_abs_diff": diffs}
    return rows, check


# ---------------------------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def fraction(floor_ms: float | None, ms: float | None) -> str:
    return "n/a" if floor_ms is None or ms is None else f"{100 * floor_ms / ms:.0f} %"


def table(rows: list[Row]) -> str:
    head = ("pattern", "geometry", "method", "backend", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s",
            "ours x (fwd)", "ours x (fwd+bwd)", "floor ms (fwd / fwd+bwd)", "of floor (fwd / fwd+bwd)",
            "peak MiB (fwd / fwd+bwd)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---|" + "---:|" * 9]
    for r in rows:
        geometry = f"{grid_label(r.text_len, r.fmap_size, r.seq)}, b{r.batch} h{r.heads}"
        if r.error:
            cells = [f"error: {r.error}"] + [""] * 8
        else:
            cells = [fmt(r.fwd_ms, ".2f"), fmt(r.fwd_bwd_ms, ".2f"), fmt(r.fwd_tflops, ".3f"),
                     fmt(r.fwd_bwd_tflops, ".3f"),
                     "-" if r.method == "ours" else fmt(r.ours_speedup_fwd, ".2f", "x"),
                     "-" if r.method == "ours" else fmt(r.ours_speedup_fwd_bwd, ".2f", "x"),
                     f"{fmt(r.fwd_floor_ms, '.2f')} / {fmt(r.fwd_bwd_floor_ms, '.2f')}",
                     f"{fraction(r.fwd_floor_ms, r.fwd_ms)} / {fraction(r.fwd_bwd_floor_ms, r.fwd_bwd_ms)}",
                     "n/a" if r.peak_mib_fwd is None else
                     f"{r.peak_mib_fwd:.1f} / {fmt(r.peak_mib_fwd_bwd, '.1f')}"]
            if r.fwd_ms is None and r.note:  # skipped
                cells[0] = r.note
            elif r.fwd_bwd_ms is None:
                cells[1] = "fwd only"
        lines.append("| " + " | ".join([r.pattern, geometry, r.method, r.backend, *cells]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--full", action="store_true",
                   help="the whole matrix on the CPU too (the default on CUDA): full + the sparse patterns, "
                        "text 256 + 32x32 and text 64 + 16x16, 8 and 16 heads")
    p.add_argument("--patterns", help="comma-separated (default: axial_row,axial_col,conv_like; full too with --full)")
    p.add_argument("--heads", help="comma-separated head counts (default 8; 8,16 with --full)")
    p.add_argument("--text_len", type=int, help="one geometry instead of the defaults: caption length ...")
    p.add_argument("--fmap_size", type=int, help="... and image grid side")
    p.add_argument("--seq", type=int, help="sequence length with --text_len (default text_len + fmap_size^2; the "
                                           "model trains on text 257 + 1023 image tokens = 1280)")
    p.add_argument("--batch", type=int, help="default 1 on CPU, 8 on CUDA")
    p.add_argument("--dim_head", type=int, default=64)
    p.add_argument("--kernel_size", type=int, default=5, help="conv_like window")
    p.add_argument("--backend", default="auto", choices=kernels.BACKENDS, help="ours: kernels.sparse_attention's")
    p.add_argument("--iters", type=int, help="timed runs per method, median reported (default 3 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed runs per method (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--no_flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    p.add_argument("--flex_mode", help="torch.compile mode for Flex (default: torch.compile's default; kernels.md "
                                       "§10.2 uses max-autotune-no-cudagraphs, which autotunes every case for minutes)")
    p.add_argument("--json", default=str(ROOT / "bench" / "attn.json"))
    args = p.parse_args(argv)
    if (args.text_len is None) != (args.fmap_size is None):
        p.error("--text_len and --fmap_size go together")
    if args.seq is not None and args.text_len is None:
        p.error("--seq needs --text_len and --fmap_size")
    cuda = args.device.startswith("cuda")
    args.full = args.full or cuda
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (8 if cuda else 1)
    args.iters = args.iters or (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    patterns = args.patterns.split(",") if args.patterns else (("full",) if args.full else ()) + SPARSE_PATTERNS
    unknown = [pattern for pattern in patterns if pattern not in masks.PATTERNS]
    if unknown:
        p.error(f"unknown patterns {unknown}; valid: {', '.join(masks.PATTERNS)}")
    args.patterns = list(patterns)
    args.heads = [int(h) for h in args.heads.split(",")] if args.heads else ([8, 16] if args.full else [8])
    if args.text_len is not None:
        args.grids = [(args.text_len, args.fmap_size)]
    else:
        args.grids = [(256, 32), (64, 16)] if args.full else [(256, 32)]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    # Flex recompiles per pattern and shape; the default limit (8) would silently fall back to eager.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
    timer = Timer(device)
    matmul_flops = matmul_rate(device, dtype, timer)
    rows, checks = [], []
    for text_len, fmap_size in args.grids:
        for heads in args.heads:
            geom = Geometry(text_len, fmap_size, args.batch, heads, args.dim_head, args.kernel_size, args.seq)
            for pattern in args.patterns:
                print(f"{pattern:10s} {geom.label} ...", file=sys.stderr, flush=True)
                case_rows, check = bench_case(pattern, geom, args, device, dtype, timer, matmul_flops)
                rows += case_rows
                checks.append(check)
    result = {"benchmark": "sparse_attention", **environment(device), "dtype": args.dtype,
              "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median (p20, p80)",
                         "clock": "CUDA events, L2 flushed before each run" if device.type == "cuda" else
                         "perf_counter", "order": "methods interleaved run by run"},
              "flops": "useful: 4*d*nnz*B*H forward, 3.5x that forward+backward; dense-equivalent: nnz = N^2/2",
              "floor": {"matmul_gflops": matmul_flops / 1e9, "of": f"a square {args.dtype} product, best of 5"},
              "flex_mode": args.flex_mode, "correctness": checks, "rows": [asdict(r) for r in rows]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}\n")
    print(f"{result['device_name']}, torch {result['torch']}, triton {result['triton']}, {args.dtype}, "
          f"{result['threads']} threads, commit {(result['commit'] or '?')[:7]}, {result['date']}")
    print(f"floors: useful FLOPs over {matmul_flops / 1e9:.0f} GFLOP/s, this machine's {args.dtype} matrix-multiply "
          "rate measured in this run")
    print(table(rows))


if __name__ == "__main__":
    main()
