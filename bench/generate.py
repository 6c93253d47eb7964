"""Sampling throughput: images/s and ms per decode step of the cached sampler (static KV cache, pattern-aware decode
attention) against the naive sampler (one full forward pass per token), in one run, on random weights.

    python bench/generate.py                   # CPU: the small configuration at batch 1, 4 and 16, the large at 1
    python bench/generate.py --device cuda     # GPU: bf16, batch 1 to 256, eager and compiled decode steps
    python bench/generate.py --configs small --patterns full --batches 1 --positions 2   # smoke test

Configurations (``CONFIGS``): "small" is dim 256, depth 4, 8 heads x 32, caption 64 + 16x16 image tokens; "large" is
dim 1024, depth 24, 16 heads x 64, caption 256 + 32x32; "tiny" (caption 8 + 4x4) is a smoke test. Each runs with
full attention in every layer ("full") and with DALLE-pytorch's sparse mix (axial_row, axial_col, axial_row,
conv_like; "sparse").

The cached step ("cached") is the eager one: on a CPU one fused C++ call for all layers (``engine.model.fused_decode``);
``--unfused`` adds it layer by layer in PyTorch operations ("cached+unfused"), ``--compile`` under torch.compile
("cached+compiled"). Every cached step timed is first checked against the full forward pass (its logits). ms/step is the median
decode-step time at a few positions spread over the image (a cached step's cost barely depends on the position; a
naive step's grows with it, so the spread matters). Images/s is measured by sampling whole images where that takes
under ``--max_run_s`` (column "measured"), otherwise estimated as batch / (prefill + image tokens x ms/step)
("est."). ``--weights`` adds the same cached steps with the model's linear layers stored in bf16 or int8
(``engine.model.quantize``, weight-only). The table gives each cached step's floor and the fraction of it reached:
the larger of its bytes (every weight the step uses, as stored, plus the keys and values its layers' patterns read)
over the memory bandwidth and its FLOPs over the matrix-multiply rate. On a GPU the bandwidth is the device's (by
name); on a CPU both rates are measured in the same run (a sum over 1 GiB, and a 2048^3 float32 product), and the
floor is a lower bound: a small model's weights may stay in cache. With DALLE-pytorch 1.6.6 installed (``pip install
--no-deps dalle-pytorch==1.6.6 rotary-embedding-torch axial_positional_embedding``), each case also samples whole
images with its ``generate_images`` at the same configuration (its defaults: no cache; VAE decoding excluded on both
sides) where ours' naive estimate says that takes under ``--max_peer_s``, and gives each row's speed-up over it.
Prints a table last and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Rates, Timer, environment, import_dalle_pytorch, machine_rates, synchronize  # noqa: E402
from engine.model.config import DALLEConfig  # noqa: E402
from engine.model import fused_decode  # noqa: E402
from engine.model.dalle import DALLE  # noqa: E402
from engine.model.quantize import WEIGHTS, StoredLinear, quantize_weights, stored_bytes  # noqa: E402
from engine.sampling.decode import decoding  # noqa: E402
from kernels import masks  # noqa: E402

CONFIGS = {
    "tiny": dict(num_text_tokens=100, text_seq_len=8, num_image_tokens=32, image_fmap_size=4, dim=32, depth=2,
                 heads=2, dim_head=16),  # a smoke test
    "small": dict(num_text_tokens=10000, text_seq_len=64, num_image_tokens=512, image_fmap_size=16, dim=256, depth=4,
                  heads=8, dim_head=32),
    "large": dict(num_text_tokens=10000, text_seq_len=256, num_image_tokens=8192, image_fmap_size=32, dim=1024,
                  depth=24, heads=16, dim_head=64),
}
# "Way off" bounds on max|cached - full| / max|full| of the logits: a cache bug gives O(1).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
PATTERN_SETS = {"full": ("full",), "sparse": ("axial_row", "axial_col", "axial_row", "conv_like")}


@dataclass
class Row:
    config: str
    patterns: str
    batch: int
    method: str  # cached, cached+compiled, naive
    weights: str  # how the linear layers store their weights (fp32: the model's dtype)
    ms_per_step: float
    prefill_ms: float
    images_per_s: float
    images_per_s_kind: str  # measured or est.
    speedup_vs_naive: float | None = None
    max_rel_diff: float | None = None  # cached step logits vs the full forward pass
    floor_ms: float | None = None
    floor_fraction: float | None = None
    speedup_vs_dalle_pytorch: float | None = None


def build(name: str, patterns: str, device: torch.device, dtype: torch.dtype) -> DALLE:
    torch.manual_seed(0)
    config = DALLEConfig(**CONFIGS[name], attn_types=PATTERN_SETS[patterns])
    return DALLE(config).to(device=device, dtype=dtype).eval()


def prompt(model: DALLE, batch: int, device: torch.device) -> torch.Tensor:
    c = model.config
    return torch.randint(1, c.num_text_tokens, (batch, c.text_seq_len), device=device)


def sample_positions(model: DALLE, count: int) -> list[int]:
    """Image-token indices spread over the grid, from the first token to the last."""
    n = model.config.image_seq_len - 1
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


@torch.no_grad()
def time_cached(model: DALLE, text: torch.Tensor, positions: list[int], step, timer: Timer, iters: int
                ) -> tuple[float, float, float]:
    """(prefill ms, median decode-step ms, max relative logit difference to the full forward pass): the cache is
    prefilled up to each position, its step is checked against the full pass, then timed, in the sampler's decoding
    context (a compiled step is then the one sampling runs, not a recompiled one)."""
    with decoding(model):
        return _time_cached(model, text, positions, step, timer, iters)


def _time_cached(model: DALLE, text: torch.Tensor, positions: list[int], step, timer: Timer, iters: int
                 ) -> tuple[float, float, float]:
    c = model.config
    codes = torch.randint(0, c.num_image_tokens, (text.shape[0], c.image_seq_len), device=text.device)
    ids = model._text_with_pads(text)
    all_positions = torch.arange(c.total_seq_len, device=text.device)
    cache = getattr(step, "cache", model.new_cache)(text.shape[0], text.device)  # a compiled step's own cache
    prefill_ms = statistics.median(timer(lambda: model.prefill(ids, codes[:, :0], cache)) for _ in range(iters))
    times, worst = [], 0.0
    for i in positions:
        model.prefill(ids, codes[:, :i], cache)
        # A token with the sampler's strides (stride 1, even at batch 1): a compiled step specialises on strides.
        token, pos = codes[:, i].clone(memory_format=torch.contiguous_format), all_positions[c.text_len + i]
        got = step(token, pos, cache).float()  # also the warm-up (and, compiled, the capture)
        want = model.full_pass_logits(text, codes[:, : i + 1]).float()
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        times += [timer(lambda: step(token, pos, cache)) for _ in range(iters)]
    if not worst <= TOLERANCE[next(model.parameters()).dtype]:  # also catches NaN
        raise SystemExit(f"cached decoding is way off the full forward pass: max relative logit difference {worst:.3g}")
    return prefill_ms, statistics.median(times), worst


@torch.no_grad()
def time_naive(model: DALLE, text: torch.Tensor, positions: list[int], timer: Timer, iters: int) -> float:
    """Mean over positions of the median time of one full forward pass over the prefix (``full_pass_logits``)."""
    c = model.config
    codes = torch.randint(0, c.num_image_tokens, (text.shape[0], c.image_seq_len), device=text.device)
    per_position = []
    for i in positions:
        model.full_pass_logits(text, codes[:, : i + 1])  # warm-up
        per_position.append(statistics.median(timer(lambda: model.full_pass_logits(text, codes[:, : i + 1]))
                                              for _ in range(iters)))
    return statistics.fmean(per_position)


@torch.no_grad()
def measured_images_per_s(model: DALLE, text: torch.Tensor, device: torch.device, step=None, use_cache=True
                          ) -> float:
    synchronize(device)
    start = time.perf_counter()
    # unguided, as the timed steps and DALLE-pytorch's default: one model row per image
    model.sample_image_codes(text, filter_thres=0.9, cond_scale=1.0, seed=0, use_cache=use_cache, step_fn=step)
    synchronize(device)
    return text.shape[0] / (time.perf_counter() - start)


def step_cost(model: DALLE, batch: int, dtype: torch.dtype) -> tuple[float, float]:
    """(bytes, FLOPs) of a cached image step, averaged over the image: the weights a step reads as stored (all but
    the text half of the output projection and the embedding tables, of which it reads a row) once, plus each
    layer's pattern keys and values for every sequence; two FLOPs per weight element and row of a product, and four
    per key and head dimension of attention."""
    c = model.config
    size = torch.tensor([], dtype=dtype).element_size()

    linears = [m for m in model.transformer.modules() if isinstance(m, nn.Linear | StoredLinear)]
    others = [p for m in model.transformer.modules() if m not in linears for p in m.parameters(recurse=False)]
    weight_bytes = sum(stored_bytes(m) for m in linears) + sum(p.numel() * p.element_size() for p in others)
    weight_bytes += stored_bytes(model.to_logits[1], slice(c.num_text_tokens_internal, None))
    product_flops = 2 * batch * (sum(m.weight.numel() for m in linears) + c.dim * c.num_image_tokens)
    geometry = dict(fmap_size=c.image_fmap_size, kernel_size=c.conv_kernel_size, dilation=c.conv_dilation)
    keys = 0
    for attn_type in c.layer_attn_types:
        pattern = "conv_like_centered" if attn_type == "conv_like" and c.conv_centered else attn_type
        for t in range(c.image_seq_len - 1):
            row_lo, row_hi, row_step, col_lo, col_hi, col_step = masks.image_key_window(pattern, t, **geometry)
            cells = sum(1 for r in range(row_lo, row_hi + 1, row_step) for col in range(col_lo, col_hi + 1, col_step)
                        if r * c.image_fmap_size + col <= t)
            keys += c.text_len + cells
    keys_per_step = keys / (c.image_seq_len - 1)
    kv_bytes = 2 * keys_per_step * c.heads * c.dim_head * size * batch
    attention_flops = 4 * keys_per_step * c.heads * c.dim_head * batch
    return weight_bytes + kv_bytes, product_flops + attention_flops


def step_floor_ms(rates: Rates, model: DALLE, batch: int, dtype: torch.dtype) -> float | None:
    """The cached step's floor: the larger of its bytes over the bandwidth and its FLOPs over the product rate."""
    return rates.floor_ms(*step_cost(model, batch, dtype))


@torch.no_grad()
def peer_images_per_s(model: DALLE, text: torch.Tensor, dalle_pytorch) -> float:
    """DALLE-pytorch 1.6.6 sampling whole images at ``model``'s configuration (random weights, its defaults), its VAE
    decoding left out as ours is."""
    c = model.config
    torch.manual_seed(0)
    vae = dalle_pytorch.DiscreteVAE(image_size=8 * c.image_fmap_size, num_layers=3, num_tokens=c.num_image_tokens)
    peer = dalle_pytorch.DALLE(dim=c.dim, vae=vae, num_text_tokens=c.num_text_tokens, text_seq_len=c.text_seq_len,
                               depth=c.depth, heads=c.heads, dim_head=c.dim_head, attn_types=c.attn_types,
                               rotary_emb=c.rotary_emb, shift_tokens=c.shift_tokens
                               ).to(text.device, next(model.parameters()).dtype)
    vae.decode = lambda codes: codes
    synchronize(text.device)
    start = time.perf_counter()
    peer.generate_images(text, filter_thres=0.9)
    synchronize(text.device)
    return text.shape[0] / (time.perf_counter() - start)


def bench(name: str, patterns: str, batch: int, args, device: torch.device, dtype: torch.dtype, timer: Timer,
          rates: Rates, dalle_pytorch=None) -> list[Row]:
    model = build(name, patterns, device, dtype)
    c = model.config
    text = prompt(model, batch, device)
    positions = sample_positions(model, args.positions)
    rows = []
    naive_step = time_naive(model, text, positions, timer, args.iters)
    naive_est = batch / (c.image_seq_len * naive_step / 1e3)
    for weights in args.weights:
        stored = quantize_weights(build(name, patterns, device, dtype), weights) if weights != "fp32" else model
        steps = {"cached": stored.decode_step}
        if args.unfused:
            steps["cached+unfused"] = unfused_step(stored)
        if args.compile:
            steps["cached+compiled"] = stored.compiled_decode_step()
        for method, step in steps.items():
            prefill, step_ms, diff = time_cached(stored, text, positions, step, timer, args.iters)
            total_s = (prefill + c.image_seq_len * step_ms) / 1e3
            if total_s <= args.max_run_s:
                rate, kind = measured_images_per_s(stored, text, device, step), "measured"
            else:
                rate, kind = batch / total_s, "est."
            floor = step_floor_ms(rates, stored, batch, dtype)
            rows.append(Row(name, patterns, batch, method, weights, step_ms, prefill, rate, kind, rate / naive_est,
                            diff, floor, None if floor is None else floor / step_ms))
    naive_kind = "est."
    if c.image_seq_len * naive_step / 1e3 <= args.max_run_s:
        naive_est, naive_kind = measured_images_per_s(model, text, device, use_cache=False), "measured"
        for row in rows:
            row.speedup_vs_naive = row.images_per_s / naive_est
    rows.append(Row(name, patterns, batch, "naive", "fp32", naive_step, 0.0, naive_est, naive_kind))
    if dalle_pytorch is not None and c.image_seq_len * naive_step / 1e3 <= args.max_peer_s:
        peer_rate = peer_images_per_s(model, text, dalle_pytorch)
        for row in rows:
            row.speedup_vs_dalle_pytorch = row.images_per_s / peer_rate
        rows.append(Row(name, patterns, batch, "DALLE-pytorch", "fp32", 1e3 * batch / peer_rate / c.image_seq_len,
                        0.0, peer_rate, "measured"))
    return rows


def unfused_step(model: DALLE):
    """The eager decode step layer by layer in PyTorch operations (the fused C++ layer off)."""
    def step(token: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        with fused_decode.unfused():
            return model.decode_step(token, pos, cache)
    return step


def table(rows: list[Row]) -> str:
    head = ("config", "patterns", "batch", "method", "weights", "ms/step", "prefill ms", "images/s", "", "x naive",
            "x DALLE-pytorch", "floor ms/step", "of floor")
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r.config, r.patterns, str(r.batch), r.method, r.weights, f"{r.ms_per_step:.2f}", f"{r.prefill_ms:.1f}",
                 f"{r.images_per_s:.3g}", r.images_per_s_kind,
                 "-" if r.speedup_vs_naive is None else f"{r.speedup_vs_naive:.1f}x",
                 "-" if r.speedup_vs_dalle_pytorch is None else f"{r.speedup_vs_dalle_pytorch:.1f}x",
                 "n/a" if r.floor_ms is None else f"{r.floor_ms:.3f}",
                 "n/a" if r.floor_fraction is None else f"{100 * r.floor_fraction:.0f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--configs", default="small,large", help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--patterns", default="full,sparse", help="comma-separated: " + ", ".join(PATTERN_SETS))
    p.add_argument("--batches", help="comma-separated batch sizes (default CPU: 1,4,16 small and 1 large; "
                                     "CUDA: 1,16,64,256)")
    p.add_argument("--positions", type=int, default=3, help="image positions at which steps are timed")
    p.add_argument("--iters", type=int, help="timed steps per position (default 5 on CPU, 20 on CUDA)")
    p.add_argument("--max_run_s", type=float, default=20.0,
                   help="sample whole images when the estimate is under this many seconds")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the decode step under torch.compile (with CUDA graphs on a GPU; default: on "
                        "CUDA)")
    p.add_argument("--unfused", action="store_true",
                   help="also time the eager step layer by layer, without the fused C++ decode layer (CPU)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also sample with DALLE-pytorch where it is installed (default: on)")
    p.add_argument("--max_peer_s", type=float, default=120.0,
                   help="run DALLE-pytorch where ours' naive sampling is estimated under this many seconds")
    p.add_argument("--weights", default="fp32", help="comma-separated, how the linear layers store their weights "
                                                      f"for the cached steps: {', '.join(WEIGHTS)}")
    p.add_argument("--bandwidth_gbs", type=float,
                   help="memory bandwidth for the floor (default: by GPU name; on a CPU measured, with the matrix "
                        "multiply rate)")
    p.add_argument("--json", default=str(ROOT / "bench" / "generate.json"))
    args = p.parse_args(argv)
    for name in args.configs.split(","):
        if name not in CONFIGS:
            p.error(f"unknown config {name!r}; valid: {', '.join(CONFIGS)}")
    for name in args.patterns.split(","):
        if name not in PATTERN_SETS:
            p.error(f"unknown pattern set {name!r}; valid: {', '.join(PATTERN_SETS)}")
    args.weights = args.weights.split(",")
    for name in args.weights:
        if name not in WEIGHTS:
            p.error(f"unknown weights {name!r}; valid: {', '.join(WEIGHTS)}")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.iters = args.iters or (20 if cuda else 5)
    args.compile = cuda if args.compile is None else args.compile
    return args


def batches_for(name: str, args) -> list[int]:
    if args.batches:
        return [int(b) for b in args.batches.split(",")]
    if args.device.startswith("cuda"):
        return [1, 16, 64, 256]
    return [1, 4, 16] if name == "small" else [1]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    timer = Timer(device)
    rates = machine_rates(device, args.bandwidth_gbs, timer)
    dalle_pytorch = None
    if args.peer:
        try:
            dalle_pytorch = import_dalle_pytorch()
        except ImportError:
            print("DALLE-pytorch is not installed: no side-by-side figures (see the docstring to add it)")
    rows: list[Row] = []
    for name in args.configs.split(","):
        for patterns in args.patterns.split(","):
            for batch in batches_for(name, args):
                case = bench(name, patterns, batch, args, device, dtype, timer, rates, dalle_pytorch)
                print("\n".join(table(case).splitlines()[2:]), flush=True)
                rows += case
    result = {"benchmark": "generate", **environment(device), "dtype": args.dtype,
              "configs": {name: CONFIGS[name] for name in args.configs.split(",")}, "pattern_sets": PATTERN_SETS,
              "timing": {"iters": args.iters, "positions": args.positions, "statistic": "median"},
              "floor": {"bandwidth_gbs": None if rates.bandwidth is None else rates.bandwidth / 1e9,
                        "matmul_gflops": None if rates.flops is None else rates.flops / 1e9,
                        "measured": rates.measured},
              "rows": [asdict(r) for r in rows]}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device_name']}, torch {result['torch']}, {args.dtype}, commit {result['commit']}")
    if rates.measured:
        print(f"floors from this machine: {rates.bandwidth / 1e9:.1f} GB/s read, {rates.flops / 1e9:.0f} GFLOP/s "
              "float32 matrix multiply")
    print()
    print(table(rows))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
