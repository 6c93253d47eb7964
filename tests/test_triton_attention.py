"""Triton block-sparse attention (run by Triton's CPU interpreter) and its block plans (``kernels.blocks``).

Kernel results are checked against float64 dense masked attention with FlashAttention's error budget: the kernel's
max error may be at most twice the error of plain PyTorch attention computed in the same dtype (plus a few fp32
ulps, see ``check``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import PATTERNS, block_layout, dense_mask  # noqa: E402
from kernels.blocks import block_plan, kernel_order, tile_bounds  # noqa: E402

pytest.importorskip("triton")
from kernels.triton import attention as triton_attention  # noqa: E402
from kernels.triton import tuning  # noqa: E402
from kernels.triton import available, sparse_attention  # noqa: E402

CONV_PATTERNS = ("conv_like", "conv_like_centered")


class Case(NamedTuple):
    batch: int
    heads: int
    seq: int
    dim_head: int
    text_len: int
    fmap_size: int
    kernel_size: int = 5
    dilation: int = 1
    block_m: int = 64
    block_n: int = 64

    @property
    def geometry(self) -> dict[str, int]:
        return dict(text_len=self.text_len, fmap_size=self.fmap_size, kernel_size=self.kernel_size,
                    dilation=self.dilation)


# text 7 + 8x8 grid stopped mid-grid, 16-row query tiles against 32-row key tiles.
RAGGED = Case(1, 2, 66, 32, 7, 8, 3, 2, block_m=16, block_n=32)


def make_inputs(case: Case, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """q, k, v and an upstream gradient, drawn in float64 and rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.heads, case.seq, case.dim_head)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4)]


def dense_attention(case: Case, pattern: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """Plain masked softmax attention in the inputs' own dtype."""
    mask = dense_mask(pattern, case.seq, **case.geometry)
    scale = case.dim_head ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def triton_fn(case: Case, pattern: str, scale: float | None = None):
    return lambda q, k, v: triton_attention.sparse_attention(
        q, k, v, pattern=pattern, scale=scale, block_m=case.block_m, block_n=case.block_n, **case.geometry)


def run(attention, inputs: list[torch.Tensor], backward: bool) -> list[torch.Tensor]:
    """Output and, with ``backward``, (dq, dk, dv) for the upstream gradient ``inputs[3]``."""
    q, k, v = (x.detach().requires_grad_(backward) for x in inputs[:3])
    out = attention(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), inputs[3])] if backward else [out]


def check(case: Case, pattern: str, dtype: torch.dtype, *, seed: int = 0, backward: bool = True,
          scale: float | None = None) -> None:
    inputs = make_inputs(case, dtype, seed)
    got = run(triton_fn(case, pattern, scale), inputs, backward)
    plain = run(lambda q, k, v: dense_attention(case, pattern, q, k, v, scale), inputs, backward)
    exact = run(lambda q, k, v: dense_attention(case, pattern, q, k, v, scale), [x.double() for x in inputs],
                backward)
    for name, ours, torch_x, exact_x in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        assert ours.dtype == dtype and ours.shape == exact_x.shape
        err = (ours.double() - exact_x).abs().max().item()
        # The small eps is the kernel's own floor, a few fp32 ulps of the result: it accumulates in fp32 at every
        # dtype, and on tiny fp32 problems torch's error is too close to that floor for the 2x ratio alone.
        floor = 4 * torch.finfo(torch.float32).eps * exact_x.abs().max().item()
        budget = 2 * (torch_x.double() - exact_x).abs().max().item() + floor
        assert err <= budget, f"{name}: error {err:.3g} exceeds budget {budget:.3g}"


# --------------------------------------------------------------------------------------------------------------
# Kernels vs float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_ragged_grid(pattern: str, dtype: torch.dtype) -> None:
    check(RAGGED, pattern, dtype, seed=1)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_seq_97_text_33(pattern: str) -> None:
    # Full 8x8 grid after a 33-token caption: a 1-token text tile, image tiles from position 33.
    check(Case(1, 1, 97, 64, 33, 8, block_m=16, block_n=16), pattern, torch.float16, seed=2)


@pytest.mark.parametrize("pattern", ["axial_row", "conv_like_centered"])
def test_bos_only_caption_dim_128(pattern: str) -> None:
    check(Case(1, 1, 26, 128, 1, 5, block_m=16, block_n=16), pattern, torch.float32, seed=3)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_caption_257_default_tiles(pattern: str) -> None:
    check(Case(1, 1, 257 + 16, 32, 257, 4, 3), pattern, torch.float16, seed=4)


# Every setting a GPU may launch: each table row's defaults and the alternatives its autotuner times.
TILE_CANDIDATES = sorted({t for key in tuning.DEFAULTS for kernel in tuning.KERNELS
                          for t in tuning.candidates(kernel, key)}, key=str)


@pytest.mark.parametrize("tiles", TILE_CANDIDATES, ids=str)
def test_every_tile_candidate(tiles, monkeypatch) -> None:
    """Forward, dK/dV and dQ with one setting; dK/dV and dQ then run on plans of another tile shape."""
    transposed = replace(tiles, block_m=tiles.block_n, block_n=tiles.block_m)
    chosen = {"fwd": tiles, "dkdv": tiles, "dq": transposed}
    monkeypatch.setattr(tuning, "choose", lambda kernel, key, q, shape, launch: chosen[kernel])
    case = Case(1, 1, 9 + 11 * 11 - 3, 24, 9, 11, 3)  # 3 tiles of 128, ragged text and grid ends
    check(case._replace(block_m=0, block_n=0), "conv_like", torch.float32, seed=21)


def test_forced_tile_sizes_are_not_tuned(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the autotuner was consulted")

    monkeypatch.setattr(tuning, "choose", refuse)
    check(RAGGED, "axial_row", torch.float16, seed=22)


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("kernel_size", [3, 4, 5, 7])
@pytest.mark.parametrize("pattern", CONV_PATTERNS)
def test_conv_windows(pattern: str, kernel_size: int, dilation: int) -> None:
    check(Case(1, 1, 4 + 45, 32, 4, 7, kernel_size, dilation, block_m=16, block_n=16), pattern, torch.float32,
          seed=5)


def test_head_dim_not_a_power_of_two() -> None:
    check(Case(1, 1, 6 + 25, 40, 6, 5, block_m=16, block_n=16), "conv_like", torch.float16, seed=14)


def test_batch_and_heads() -> None:
    check(Case(2, 3, 5 + 36, 64, 5, 6, 3, 1, block_m=32, block_n=16), "conv_like", torch.float16, seed=6)


def test_axial_col_aligned_text_default_tiles() -> None:
    check(Case(1, 1, 64 + 256, 32, 64, 16), "axial_col", torch.float16, seed=7)


def test_grid_32_forward() -> None:
    check(Case(1, 1, 16 + 32 * 32, 32, 16, 32), "axial_col", torch.float16, seed=8, backward=False)


@pytest.mark.parametrize("seq", [1, 5, 8])
def test_text_only_prefixes(seq: int) -> None:
    # At seq 1 the exact dq is 0 and torch hits it by cancellation, which leaves no error budget: forward only.
    check(Case(1, 1, seq, 32, 7, 4, block_m=16, block_n=16), "axial_col", torch.float32, seed=seq,
          backward=seq > 1)


def test_custom_scale() -> None:
    check(RAGGED, "conv_like", torch.float32, seed=9, scale=0.3)


def test_strided_inputs_and_public_entry_point() -> None:
    case = Case(2, 2, 3 + 25, 32, 3, 5)
    q, k, v, grad = make_inputs(case, torch.float32, 10)
    qkv = torch.stack([q, k, v], dim=3).requires_grad_()  # (b, h, s, 3, d): q, k, v share a strided buffer
    out = sparse_attention(*qkv.unbind(3), pattern="axial_row", **case.geometry)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    want = run(triton_fn(case._replace(block_m=0, block_n=0), "axial_row"), [q, k, v, grad], backward=True)
    assert torch.equal(out, want[0]) and torch.equal(dqkv, torch.stack(want[1:], dim=3))


def test_deterministic() -> None:
    inputs = make_inputs(RAGGED, torch.float16, 11)
    first, second = (run(triton_fn(RAGGED, "axial_col"), inputs, backward=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_torch_compile_fullgraph() -> None:
    case = Case(1, 1, 7 + 20, 32, 7, 5, block_m=16, block_n=16)
    inputs = make_inputs(case, torch.float32, 12)
    compiled = torch.compile(triton_fn(case, "axial_col"), backend="aot_eager", fullgraph=True)
    for got, want in zip(run(compiled, inputs, True), run(triton_fn(case, "axial_col"), inputs, True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_opcheck() -> None:
    q, k, v, _ = make_inputs(Case(1, 1, 3 + 9, 16, 3, 3), torch.float32, 13)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), "conv_like", 3, 3, 3, 1, 0.25, 16, 16)
    torch.library.opcheck(torch.ops.dalle_engine.sparse_attention_fwd.default, args)


@pytest.mark.parametrize(
    ("dtype", "dim_head", "interpret", "match"),
    [(torch.float64, 32, "1", "fp16, bf16 and fp32"), (torch.float32, 256, "1", "up to 128"),
     (torch.float32, 32, "0", "GPU tensors")],
)
def test_rejects_unsupported(dtype: torch.dtype, dim_head: int, interpret: str, match: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q = torch.zeros(1, 1, 6, dim_head, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, q, q, pattern="full", text_len=2, fmap_size=2)


def test_import_is_lazy() -> None:
    code = "import sys, kernels, kernels.triton; assert 'triton' not in sys.modules; print(kernels.triton.available())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "True" and available()


# --------------------------------------------------------------------------------------------------------------
# Block plans


def reordered_mask(pattern: str, seq: int, text_len: int, fmap_size: int, kernel_size: int = 5,
                   dilation: int = 1) -> torch.Tensor:
    """The dense mask in kernel order (axial_col: padded to the full grid and transposed)."""
    order = kernel_order(pattern, seq, text_len=text_len, fmap_size=fmap_size)
    length = seq if order is None else order.numel()
    mask = dense_mask(pattern, length, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                      dilation=dilation)
    return mask if order is None else mask[order][:, order]


PLAN_GEOMETRIES = [  # (seq, text_len, fmap_size, kernel_size, dilation, block_m, block_n)
    (66, 7, 8, 3, 2, 16, 32),
    (97, 33, 8, 5, 1, 16, 16),
    (257 + 100, 257, 16, 7, 1, 64, 64),
    (5, 7, 4, 5, 1, 16, 16),
    (1 + 49, 1, 7, 3, 2, 32, 16),
]


@pytest.mark.parametrize("geometry", PLAN_GEOMETRIES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_plan_matches_dense_mask(pattern: str, geometry: tuple[int, ...]) -> None:
    seq, text_len, fmap_size, kernel_size, dilation, block_m, block_n = geometry
    plan = block_plan(pattern, seq, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                      dilation=dilation, block_m=block_m, block_n=block_n)
    mask = reordered_mask(pattern, seq, text_len, fmap_size, kernel_size, dilation)
    assert plan.seq_len == mask.shape[0]
    qb, kb = plan.q_bounds.tolist(), plan.k_bounds.tolist()
    assert qb == tile_bounds(plan.seq_len, text_len, block_m) and kb == tile_bounds(plan.seq_len, text_len, block_n)
    for i in range(len(qb) - 1):
        for j in range(len(kb) - 1):
            tile = mask[qb[i]:qb[i + 1], kb[j]:kb[j + 1]]
            assert plan.layout[i, j] == tile.any() and plan.full[i, j] == tile.all(), (i, j)
    per_query_tile = (plan.kv_counts, plan.kv_indices, plan.kv_full, plan.layout, plan.full)
    per_key_tile = (plan.q_counts, plan.q_indices, plan.q_full, plan.layout.t(), plan.full.t())
    for counts, indices, flags, layout, full in (per_query_tile, per_key_tile):
        for row in range(layout.shape[0]):
            visits = indices[row, :counts[row]]
            assert torch.equal(visits, layout[row].nonzero().flatten().int())
            assert torch.equal(flags[row, :counts[row]], full[row, visits.long()])
            assert not flags[row, counts[row]:].any()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_plan_equals_block_layout_when_text_is_aligned(pattern: str) -> None:
    plan = block_plan(pattern, 32 + 100, text_len=32, fmap_size=12, block_m=16, block_n=16)
    if pattern == "axial_col":  # kernel order: axial_row on the full grid
        want = block_layout("axial_row", 32 + 144, text_len=32, fmap_size=12, block_size=16)
    else:
        want = block_layout(pattern, 32 + 100, text_len=32, fmap_size=12, block_size=16)
    assert torch.equal(plan.layout, want)


def test_axial_col_plan_skips_like_axial_row() -> None:
    geometry = dict(text_len=64, fmap_size=16)
    col = block_plan("axial_col", 64 + 256, **geometry)
    row = block_plan("axial_row", 64 + 256, **geometry)
    raster = block_layout("axial_col", 64 + 256, block_size=64, **geometry)
    assert torch.equal(col.layout, row.layout) and col.num_visits < int(raster.sum())


def test_image_tiles_start_at_text_len() -> None:
    # DALLE-pytorch's 257-token text: a uniform tiling would cut every image tile across two grid rows.
    geometry = dict(text_len=257, fmap_size=16)
    plan = block_plan("axial_row", 257 + 256, **geometry)
    uniform = block_layout("axial_row", 257 + 256, block_size=64, **geometry)
    assert plan.num_visits < int(uniform.sum())


def test_kernel_order_is_an_involution_mapping_axial_col_to_axial_row() -> None:
    order = kernel_order("axial_col", 5 + 30, text_len=5, fmap_size=6)
    assert torch.equal(order[order], torch.arange(5 + 36))
    col = dense_mask("axial_col", 5 + 36, text_len=5, fmap_size=6)[order][:, order]
    assert torch.equal(col, dense_mask("axial_row", 5 + 36, text_len=5, fmap_size=6))
    assert kernel_order("axial_row", 20, text_len=5, fmap_size=6) is None
    assert kernel_order("axial_col", 5, text_len=5, fmap_size=6) is None


def test_plan_is_cached() -> None:
    assert block_plan("conv_like", 40, text_len=4, fmap_size=6) is block_plan("conv_like", 40, text_len=4,
                                                                                  fmap_size=6)
