"""Training throughput: tokens/s of whole optimizer steps (VAE tokenisation of the images, forward, backward, Adam),
this engine against DALLE-pytorch 1.6.6 at identical configurations, in one run.

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
from kernels import cpp, masks  # noqa: E402


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
    if cpp.available():
        ops = getattr(torch.ops, "dalle_engine_cpu")
        formulas[ops.sparse_attention_fwd] = sparse_attention_flops(1)
        formulas[ops.sparse_attention_bwd] = sparse_attention_flops(BWD_FLOP_FACTOR - 1)
    if hasattr(torch.ops, "dalle_engine") and hasattr(torch.ops.dalle_engine, "sparse_attention_fwd"):  # Triton
        formulas[torch.ops.dalle_engine.sparse_attention_fwd] = sparse_attention_flops(1)
        formulas[torch.ops.dalle_engine.sparse_attention_bwd] = sparse_attention_flops(BWD_FLOP_FACTOR - 1)
    for op, formula in formulas.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


def step_flops(model: torch.nn.Module, case: Case, device: torch.device, precision: str) -> int:
    """The matrix-multiply FLOPs of one training step's forward and backward (VAE tokenisation included)."""
    register_attention_flops()
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(1, case.num_text_tokens, (case.batch, case.text_seq_len), generator=gen).to(device)
    images = torch.rand(case.batch, 3, case.image_size, case.image_size, generator=gen).to(device)
    model.to(device).train()
    counter = flop_counter.FlopCounterMode(display=False)
    with counter, autocast(device.type, precision):
        model(text, images, return_loss=True).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def tokens_per_second(model: torch.nn.Module, case: Case, steps: int, device: torch.device, precision: str,
                      warmup: int = 2, optimizer=adam) -> tuple[float, float | None]:
    """Tokens/s of whole optimizer steps and, on CUDA, the peak memory (MiB) they allocate; ``optimizer(params, lr)``
    builds the optimizer."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(1, case.num_text_tokens, (case.batch, case.text_seq_len), generator=gen).to(device)
    images = torch.rand(case.batch, 3, case.image_size, case.image_size, generator=gen).to(device)
    model.to(device)
    opt = optimizer([p for p in model.parameters() if p.requires_grad], 1e-4)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        with autocast(device.type, precision):
            loss = model(text, images, return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(device)
    rate = steps * case.batch * case.tokens / (time.perf_counter() - start)
    return rate, torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per model")
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
        ours, peak = tokens_per_second(model, case, args.steps, device, precision, args.warmup)
        step_ms = 1e3 * case.batch * case.tokens / ours
        floor_ms = flops / matmul_flops * 1e3
        peer, peer_error = None, None
        if dalle_pytorch:
            try:  # an optional peer: its failure is recorded, not fatal
                peer, _ = tokens_per_second(build_peer(case, dalle_pytorch), case, args.steps, device, precision,
                                            args.warmup, lambda params, lr: torch.optim.Adam(params, lr=lr))
            except Exception as error:
                peer_error = f"{type(error).__name__}: {error}"[:200]
        rows.append({"case": case.name, "model": f"dim {case.dim}, depth {case.depth}, {case.heads} heads x "
                     f"{case.dim_head}", "tokens_per_step": case.batch * case.tokens, "ours_tokens_per_s": ours,
                     "ours_step_ms": step_ms, "step_gflop": flops / 1e9, "floor_ms": floor_ms,
                     "of_gemm_rate": floor_ms / step_ms, "ours_peak_mib": peak,
                     "dalle_pytorch_tokens_per_s": peer, "dalle_pytorch_error": peer_error,
                     "speedup": ours / peer if peer else None})

    print(f"\n{'configuration':42s} {'ours tok/s':>11s} {'ms/step':>8s} {'floor ms':>9s} {'of GEMM rate':>13s} "
          f"{'DALLE-pytorch':>14s} {'speedup':>8s}")
    for r in rows:
        peer = f"{r['dalle_pytorch_tokens_per_s']:14.0f}" if r["dalle_pytorch_tokens_per_s"] else f"{'-':>14s}"
        ratio = f"{r['speedup']:7.2f}x" if r["speedup"] else f"{'-':>8s}"
        print(f"{r['case']:42s} {r['ours_tokens_per_s']:11.0f} {r['ours_step_ms']:8.1f} {r['floor_ms']:9.1f} "
              f"{100 * r['of_gemm_rate']:12.0f}% {peer} {ratio}")
    print(f"\nfloor: the step's matrix-multiply FLOPs over {matmul_flops / 1e9:.0f} GFLOP/s, this machine's {precision} "
          "product rate measured in this run")
    result = {"benchmark": "train_throughput", "steps": args.steps, "precision": precision, **environment(device),
              "matmul_gflops": matmul_flops / 1e9, "results": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
