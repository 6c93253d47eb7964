"""Training throughput: tokens/s of whole optimizer steps (VAE tokenisation of the images, forward, backward, Adam),
this engine against DALLE-pytorch 1.6.6 at identical configurations, in one run: after their warm-up steps, the two
models' timed steps alternate (ours, peer, ours, ...), so both meet the machine's drift alike; each figure is the
median step.

    pip install --no-deps dalle-pytorch==1.6.6 rotary-embedding-torch axial_positional_embedding   # the peer
    python bench/train.py [--steps 5] [--json bench/train.json]
    python bench/train.py --device cuda --bf16 --cases 0 --batch 16 --no_peer   # GPU: DALL-E geometry, bf16 autocast
    python bench/train.py --tiny --steps 1                                      # smoke test (text 8 + 4x4 grid)

The floor is the step's matrix-multiply FLOPs (``torch.utils.flop_counter`` over one of our steps: the linear layers,
the logits, the VAE's convolutions and the attention's allowed scores, ``4 * d * nnz`` a head forward, 3.5x that
forward and backward) over the machine's rate for a large square product in the same precision, measured in the same
run; "of GEMM rate" is floor / step time, the step's share of what the machine's GEMMs reach.

Both models use DALLE-pytorch's train_dalle.py defaults for what a configuration does not name (no rotary, no
token shift, 10,000 text tokens) and its DiscreteVAE defaults (512 codes) at 128 px. Each steps with the Adam its own
training script builds: this engine's ``engine.train.training.adam`` (fused on a CPU), train_dalle.py's torch default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils import flop_counter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Timer, environment, import_dalle_pytorch, matmul_rate, synchronize  # noqa: E402
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig  # noqa: E402
from engine.model.config import DALLEConfig  # noqa: E402
from engine.model.dalle import DALLE  # noqa: E402
from engine.model.precision import autocast  # noqa: E402
from engine.train.training import adam  # noqa: E402
from kernels import masks  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    text_seq_len: int
    vae_layers: int  # 128 px / 2**layers = the image grid side
    attn_types: tuple[str, ...]
    batch: int
    dim: int = 256
    depth: int = 4
    heads: int = 8
    dim_head: int = 32
    image_size: int = 128
    num_text_tokens: int = 10000

    @property
    def tokens(self) -> int:
        return self.text_seq_len + (self.image_size // 2**self.vae_layers) ** 2


CASES = (
    Case("text 256 + 32x32, axial/conv, batch 2", 256, 2, ("axial_row", "axial_col", "axial_row", "conv_like"), 2),
    Case("text 64 + 16x16, full, batch 8", 64, 3, ("full",), 8),
)
TINY = Case("text 8 + 4x4, axial/conv, batch 2", 8, 2, CASES[0].attn_types, 2, dim=32, depth=2, heads=2,
            dim_head=16, image_size=16, num_text_tokens=100)


def build_ours(case: Case):
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=case.image_size, num_layers=case.vae_layers))
    config = DALLEConfig(num_text_tokens=case.num_text_tokens, text_seq_len=case.text_seq_len,
                         num_image_tokens=vae.num_tokens, image_fmap_size=vae.fmap_size, dim=case.dim,
                         depth=case.depth, heads=case.heads, dim_head=case.dim_head, attn_types=case.attn_types,
                         rotary_emb=False, shift_tokens=False)
    return DALLE(config, vae)


def build_peer(case: Case, dalle_pytorch):
    vae = dalle_pytorch.DiscreteVAE(image_size=case.image_size, num_layers=case.vae_layers)
    return dalle_pytorch.DALLE(dim=case.dim, vae=vae, num_text_tokens=case.num_text_tokens,
                               text_seq_len=case.text_seq_len, depth=case.depth, heads=case.heads,
                               dim_head=case.dim_head, attn_types=case.attn_types, rotary_emb=False,
                               shift_tokens=False)


BWD_FLOP_FACTOR = 3.5  # an attention's forward + backward FLOPs over its forward's (the backward being 2.5x)


def allowed_scores(pattern: str, seq: int, text_len: int, fmap_size: int, kernel_size: int, dilation: int) -> int:
    return int(masks.dense_mask(pattern, seq, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                                dilation=dilation).sum())


def sparse_attention_flops(factor: float):
    """A flop formula for this project's attention ops: the geometry follows the first str argument (the pattern),
    the first tensor is (batch, heads, seq, dim_head) in the forward and the backward alike."""
    def formula(*args, out_shape=None, **kwargs) -> int:
        at = next(i for i, a in enumerate(args) if isinstance(a, str))
        batch, heads, seq, dim = args[0]
        return int(factor * 4 * dim * batch * heads * allowed_scores(args[at], seq, *args[at + 1:at + 5]))
    return formula


def causal_sdpa_flops(factor: float, query_at: int):
    """A flop formula for PyTorch's CPU flash attention (torch counts none): only the allowed scores when causal.
    Its forward and backward take (query, key, value, out and lse in the backward, dropout_p, is_causal) from
    ``query_at`` on."""
    causal_at = query_at + (6 if query_at else 4)

    def formula(*args, out_shape=None, **kwargs) -> int:
        batch, heads, rows, dim = args[query_at]
        keys = args[query_at + 1][2]
        causal = len(args) > causal_at and args[causal_at]
        scores = sum(min(i + 1, keys) for i in range(rows)) if causal else rows * keys
        return int(factor * 4 * dim * batch * heads * scores)
    return formula


def register_attention_flops() -> None:
    """Teach ``torch.utils.flop_counter`` the attention ops it cannot see (once)."""
    aten = torch.ops.aten
    formulas = {aten._scaled_dot_product_flash_attention_for_cpu: causal_sdpa_flops(1, 0),
                aten._scaled_dot_product_flash_attention_for_cpu_backward: causal_sdpa_flops(BWD_FLOP_FACTOR - 1, 1)}
    for namespace in ("dalle_engine_cpu", "dalle_engine"):  # the C++ kernels', the Triton kernels' (where loaded)
        ops = getattr(torch.ops, namespace)
        if hasattr(ops, "sparse_attention_fwd"):
            formulas[ops.sparse_attention_fwd] = sparse_attention_flops(1)
            formulas[ops.sparse_attention_bwd] = sparse_attention_flops(BWD_FLOP_FACTOR - 1)
    for op, formula in formulas.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


def fixed_batch(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (captions, images) every step of ``case`` trains on."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(1, case.num_text_tokens, (case.batch, case.text_seq_len), generator=gen).to(device)
    images = torch.rand(case.batch, 3, case.image_size, case.image_size, generator=gen).to(device)
    return text, images


def step_flops(model: torch.nn.Module, case: Case, device: torch.device, precision: str) -> int:
    """The matrix-multiply FLOPs of one training step's forward and backward (VAE tokenisation included)."""
    register_attention_flops()
    text, images = fixed_batch(case, device)
    model.to(device).train()
    counter = flop_counter.FlopCounterMode(display=False)
    with counter, autocast(device.type, precision):
        model(text, images, return_loss=True).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def trainer(model: torch.nn.Module, case: Case, device: torch.device, precision: str, optimizer=adam):
    """One whole optimizer step of ``model`` on a fixed batch, as a function; ``optimizer(params, lr)`` builds the
    optimizer."""
    text, images = fixed_batch(case, device)
    model.to(device)
    opt = optimizer([p for p in model.parameters() if p.requires_grad], 1e-4)
    model.train()

    def step() -> None:
        with autocast(device.type, precision):
            loss = model(text, images, return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def warm_up(step, steps: int, device: torch.device) -> float | None:
    """Runs ``steps`` untimed steps; on CUDA returns the peak memory (MiB) they allocated."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def step_times_ms(steps: dict[str, object], count: int, device: torch.device) -> dict[str, list[float]]:
    """``count`` timed runs of each step function, in turns (a, b, a, b, ...), so that every model meets the machine's
    drift alike."""
    times = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per model, the models in turns "
                                                        "(median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as train.py on a GPU (default: fp32)")
    p.add_argument("--cases", help="comma-separated indices into CASES (default: all)")
    p.add_argument("--batch", type=int, help="override every case's batch size")
    p.add_argument("--tiny", action="store_true", help="only a tiny case (text 8 + 4x4 grid): a smoke test")
    p.add_argument("--no_peer", action="store_true", help="measure this engine only, even with DALLE-pytorch")
    p.add_argument("--json", default=str(ROOT / "bench" / "train.json"))
    args = p.parse_args(argv)
    if args.cases and not all(i.isdigit() and int(i) < len(CASES) for i in args.cases.split(",")):
        p.error(f"--cases takes indices from 0 to {len(CASES) - 1}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, precision = torch.device(args.device), "bf16" if args.bf16 else "fp32"
    cases = [TINY] if args.tiny else [CASES[int(i)] for i in args.cases.split(",")] if args.cases else list(CASES)
    if args.batch:
        cases = [replace(c, batch=args.batch, name=c.name.rsplit(", batch", 1)[0] + f", batch {args.batch}")
                 for c in cases]
    dalle_pytorch = None
    if not args.no_peer:
        try:
            dalle_pytorch = import_dalle_pytorch()
        except ImportError:
            print("DALLE-pytorch is not installed: measuring this engine only (see the docstring to add it)")

    matmul_flops = matmul_rate(device, torch.bfloat16 if args.bf16 else torch.float32, Timer(device))
    rows = []
    for case in cases:
        torch.manual_seed(0)
        model = build_ours(case)
        flops = step_flops(model, case, device, precision)
        steps = {"ours": trainer(model, case, device, precision)}
        peak = warm_up(steps["ours"], args.warmup, device)
        peer_error = None
        if dalle_pytorch:
            try:  # an optional peer: its failure is recorded, not fatal
                steps["peer"] = trainer(build_peer(case, dalle_pytorch), case, device, precision,
                                        lambda params, lr: torch.optim.Adam(params, lr=lr))
                warm_up(steps["peer"], args.warmup, device)
            except Exception as error:
                steps.pop("peer", None)
                peer_error = f"{type(error).__name__}: {error}"[:200]
        times = step_times_ms(steps, args.steps, device)
        step_ms = statistics.median(times["ours"])
        peer_ms = statistics.median(times["peer"]) if "peer" in times else None
        tokens = case.batch * case.tokens
        floor_ms = flops / matmul_flops * 1e3
        rows.append({"case": case.name, "model": f"dim {case.dim}, depth {case.depth}, {case.heads} heads x "
                     f"{case.dim_head}", "tokens_per_step": tokens, "ours_tokens_per_s": tokens / step_ms * 1e3,
                     "ours_step_ms": step_ms, "ours_step_ms_runs": times["ours"], "step_gflop": flops / 1e9,
                     "floor_ms": floor_ms, "of_gemm_rate": floor_ms / step_ms, "ours_peak_mib": peak,
                     "dalle_pytorch_tokens_per_s": peer_ms and tokens / peer_ms * 1e3,
                     "dalle_pytorch_step_ms_runs": times.get("peer"), "dalle_pytorch_error": peer_error,
                     "speedup": peer_ms and peer_ms / step_ms})

    print(f"\n{'configuration':42s} {'ours tok/s':>11s} {'ms/step':>8s} {'floor ms':>9s} {'of GEMM rate':>13s} "
          f"{'DALLE-pytorch':>14s} {'speedup':>8s}")
    for r in rows:
        peer = f"{r['dalle_pytorch_tokens_per_s']:14.0f}" if r["dalle_pytorch_tokens_per_s"] else f"{'-':>14s}"
        ratio = f"{r['speedup']:7.2f}x" if r["speedup"] else f"{'-':>8s}"
        print(f"{r['case']:42s} {r['ours_tokens_per_s']:11.0f} {r['ours_step_ms']:8.1f} {r['floor_ms']:9.1f} "
              f"{100 * r['of_gemm_rate']:12.0f}% {peer} {ratio}")
    print(f"\nfloor: the step's matrix-multiply FLOPs over {matmul_flops / 1e9:.0f} GFLOP/s, this machine's {precision} "
          "product rate measured in this run")
    result = {"benchmark": "train_throughput", "steps": args.steps, "timing": "median step, the models in turns",
              "precision": precision, **environment(device),
              "matmul_gflops": matmul_flops / 1e9, "results": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
