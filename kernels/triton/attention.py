"""Triton block-sparse FlashAttention for the DALL-E patterns: forward, backward and the torch op wrappers.

Each query tile walks only the key tiles its ``kernels.blocks`` plan lists (online softmax, fp32 accumulators,
log2-domain log-sum-exp saved per row). Full tiles skip the element mask; partial tiles compute the DALL-E mask
from positions in-kernel (a few integer ops, no mask storage). The backward pass recomputes probabilities from
the saved log-sum-exp: one kernel per key tile accumulates dK/dV over the transposed plan, one per query tile
accumulates dQ over the plan, so no atomics are needed and the results are deterministic.

The kernels are exposed as the torch ops ``dalle_engine::sparse_attention_fwd`` / ``_bwd`` (with fake
implementations and autograd), so ``torch.compile`` treats them as opaque nodes instead of breaking the graph.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..blocks import BlockPlan, block_plan, kernel_order
from ..masks import check_geometry
from . import tuning
from .tuning import Tiles

__all__ = ["sparse_attention"]

# Image rule codes for the in-kernel mask; axial_col runs as axial_row in column-major order.
_PATTERN_CODES = {"full": 0, "axial_row": 1, "axial_col": 1, "conv_like": 2, "conv_like_centered": 3}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _allowed(qi, kj, k_end, text_len, fmap_size, reach, dilation, PATTERN: tl.constexpr):
    """DALL-E mask for broadcastable query / key position tensors (kernel order), plus the key tile's end.

    Mirrors ``kernels.masks.allowed``. Image row/column arithmetic on text positions gives garbage, but the
    ``kj < text_len`` term (text keys) or causality (image keys are never seen by text queries) masks it.
    """
    ok = (kj <= qi) & (kj < k_end)
    if PATTERN != 0:
        tq = qi - text_len
        tk = kj - text_len
        dr = tq // fmap_size - tk // fmap_size
        if PATTERN == 1:
            image = dr == 0
        else:
            dc = tq % fmap_size - tk % fmap_size
            # Causality already gives dr >= 0; `% dilation == 0` is sign-safe for either remainder convention.
            lattice = (dr % dilation == 0) & (dc % dilation == 0) & (dr <= reach)
            if PATTERN == 2:
                image = lattice & (dc >= 0) & (dc <= reach)
            else:
                image = lattice & (dc >= -reach) & (dc <= reach)
        ok = ok & ((kj < text_len) | image)
    return ok


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse,
    q_bounds, k_bounds, kv_counts, kv_indices, kv_full, lut_stride,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    num_heads, seq_len, qk_scale, text_len, fmap_size, reach, dilation,
    PATTERN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: batch * heads * seq * dim may pass 2**31
    b, h = bh // num_heads, bh % num_heads
    q_start = tl.load(q_bounds + tile)
    q_end = tl.load(q_bounds + tile + 1)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_end
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for j in range(0, tl.load(kv_counts + tile)):
        kb = tl.load(kv_indices + tile * lut_stride + j)
        k_start = tl.load(k_bounds + kb)
        k_end = tl.load(k_bounds + kb + 1)
        offs_n = k_start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < k_end) & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # A short (ragged) key tile reads the next tile's keys, so it needs the mask even when full.
        if (tl.load(kv_full + tile * lut_stride + j) == 0) | (k_end - k_start < BLOCK_N):
            allowed = _allowed(offs_m[:, None], offs_n[None, :], k_end, text_len, fmap_size, reach, dilation,
                               PATTERN)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key yet keeps m = -inf; shift by 0 so exp2 gives 0 rather than NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Every real row attends at least to itself; the guards only keep padding rows finite.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh * seq_len + offs_m, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, Delta, sob, soh, sos, sdb, sdh, sds, num_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax-backward correction term."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // num_heads, bh % num_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    q_bounds, k_bounds, q_counts, q_indices, q_full, lut_stride,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sgb, sgh, sgs,
    num_heads, seq_len, qk_scale, scale, text_len, fmap_size, reach, dilation,
    PATTERN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per key tile: dK, dV summed over the query tiles that see it. Works on transposed scores
    (keys x queries) so every product is a plain ``tl.dot`` of a loaded tile. DK and DV share the ``sg*``
    strides (both are allocated contiguous)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // num_heads, bh % num_heads
    k_start = tl.load(k_bounds + tile)
    k_end = tl.load(k_bounds + tile + 1)
    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < k_end) & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    short_k = k_end - k_start < BLOCK_N
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for i in range(0, tl.load(q_counts + tile)):
        qb = tl.load(q_indices + tile * lut_stride + i)
        q_start = tl.load(q_bounds + qb)
        q_end = tl.load(q_bounds + qb + 1)
        offs_m = q_start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_end
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DOut + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=q_mask, other=0.0)
        # lse = +inf on rows past the tile makes their probabilities exactly 0.
        lse = tl.load(Lse + bh * seq_len + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh * seq_len + offs_m, mask=row_ok, other=0.0)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (keys, queries)
        if (tl.load(q_full + tile * lut_stride + i) == 0) | short_k:
            allowed = _allowed(offs_m[None, :], offs_n[:, None], k_end, text_len, fmap_size, reach, dilation,
                               PATTERN)
            s_t = tl.where(allowed, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    tl.store(DK + b * sgb + h * sgh + offs_n[:, None] * sgs + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + b * sgb + h * sgh + offs_n[:, None] * sgs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    q_bounds, k_bounds, kv_counts, kv_indices, kv_full, lut_stride,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sgb, sgh, sgs,
    num_heads, seq_len, qk_scale, scale, text_len, fmap_size, reach, dilation,
    PATTERN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per query tile: dQ summed over the plan's key tiles."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // num_heads, bh % num_heads
    q_start = tl.load(q_bounds + tile)
    q_end = tl.load(q_bounds + tile + 1)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_end
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DOut + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(Lse + bh * seq_len + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh * seq_len + offs_m, mask=row_ok, other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for j in range(0, tl.load(kv_counts + tile)):
        kb = tl.load(kv_indices + tile * lut_stride + j)
        k_start = tl.load(k_bounds + kb)
        k_end = tl.load(k_bounds + kb + 1)
        offs_n = k_start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < k_end) & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if (tl.load(kv_full + tile * lut_stride + j) == 0) | (k_end - k_start < BLOCK_N):
            allowed = _allowed(offs_m[:, None], offs_n[None, :], k_end, text_len, fmap_size, reach, dilation,
                               PATTERN)
            s = tl.where(allowed, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _device_guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else nullcontext()


def _arch(q: torch.Tensor) -> int | None:
    """The compute capability the kernels are compiled for (90 for sm_90), None in the interpreter."""
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        return 10 * major + minor
    if _interpreting():
        return None
    return triton.runtime.driver.active.get_current_target().arch  # compiled ahead of time: kernels.triton.static


_PRE_ROWS = 32  # rows per program of the delta = rowsum(dO * O) pass: 2 x 32 x 128 fp32 values fit 4 warps' registers


def _tiles(kernel: str, q: torch.Tensor, geometry: tuple, block_m: int, block_n: int,
           launch: Callable[[Tiles], object]) -> Tiles:
    """``kernel``'s settings for this call (``kernels.triton.tuning``; the interpreter takes sm_90's table):
    ``block_m`` / ``block_n`` (non-zero) force the tile sizes, else the autotuner chooses among its candidates."""
    key = tuning.table_key(_arch(q) or 90, q.dtype, _precision(q), q.shape[-1])
    if block_m or block_n:
        tiles = tuning.default(kernel, key)
        return replace(tiles, block_m=block_m or tiles.block_m, block_n=block_n or tiles.block_n)
    pattern, text_len, fmap_size, kernel_size, dilation, _ = geometry
    shape = f"{pattern}|seq{q.shape[2]}|text{text_len}|fmap{fmap_size}|k{kernel_size}|dil{dilation}"
    return tuning.choose(kernel, key, q, shape, launch)


def _setup(q: torch.Tensor, geometry: tuple, tiles: Tiles) -> tuple[BlockPlan, tuple[int, int, int, int], dict]:
    """The block plan, the in-kernel mask's runtime scalars and the compile-time constants of one launch."""
    pattern, text_len, fmap_size, kernel_size, dilation, _ = geometry
    plan = block_plan(pattern, q.shape[2], text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                      dilation=dilation, block_m=tiles.block_m, block_n=tiles.block_n, device=str(q.device))
    reach = (kernel_size - 1) * dilation if pattern == "conv_like" else (kernel_size // 2) * dilation
    const = dict(PATTERN=_PATTERN_CODES[pattern], HEAD_DIM=q.shape[-1], BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                 BLOCK_D=_block_d(q), UPCAST=_upcast(q), PRECISION=_precision(q))
    return plan, (text_len, fmap_size, reach, dilation), const


def _block_d(q: torch.Tensor) -> int:
    return max(16, triton.next_power_of_2(q.shape[-1]))


def _upcast(q: torch.Tensor) -> bool:
    """The interpreter multiplies raw bf16 bit patterns in tl.dot (kernels.md §6.2): upcast tiles there."""
    return q.dtype == torch.bfloat16 and _interpreting()


def _precision(q: torch.Tensor) -> str:
    """tl.dot's input precision: fp32 inputs take TF32 tensor cores when PyTorch's matmuls may (its
    ``allow_tf32`` / ``set_float32_matmul_precision("high")``), else exact fp32 products like torch's."""
    exact = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return "ieee" if exact or _upcast(q) or _interpreting() else "tf32"


def _launch_fwd(q, k, v, out, lse, geometry: tuple, tiles: Tiles) -> None:
    batch, heads, seq, _ = q.shape
    plan, mask_args, const = _setup(q, geometry, tiles)
    _fwd_kernel[(plan.q_bounds.numel() - 1, batch * heads)](
        q, k, v, out, lse,
        plan.q_bounds, plan.k_bounds, plan.kv_counts, plan.kv_indices, plan.kv_full.view(torch.uint8),
        plan.kv_indices.stride(0),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, seq, geometry[-1] * _LOG2E, *mask_args,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **const,
    )


def _launch_dkdv(q, k, v, grad_out, lse, delta, dk, dv, geometry: tuple, tiles: Tiles) -> None:
    """dK and dV: a program per key tile, over the transposed plan."""
    batch, heads, seq, _ = q.shape
    plan, mask_args, const = _setup(q, geometry, tiles)
    _bwd_dkdv_kernel[(plan.k_bounds.numel() - 1, batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv,
        plan.q_bounds, plan.k_bounds, plan.q_counts, plan.q_indices, plan.q_full.view(torch.uint8),
        plan.q_indices.stride(0),
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk),
        heads, seq, geometry[-1] * _LOG2E, geometry[-1], *mask_args,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **const,
    )


def _launch_dq(q, k, v, grad_out, lse, delta, dq, geometry: tuple, tiles: Tiles) -> None:
    batch, heads, seq, _ = q.shape
    plan, mask_args, const = _setup(q, geometry, tiles)
    _bwd_dq_kernel[(plan.q_bounds.numel() - 1, batch * heads)](
        q, k, v, grad_out, lse, delta, dq,
        plan.q_bounds, plan.k_bounds, plan.kv_counts, plan.kv_indices, plan.kv_full.view(torch.uint8),
        plan.kv_indices.stride(0),
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
        heads, seq, geometry[-1] * _LOG2E, geometry[-1], *mask_args,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **const,
    )


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, text_len: int, fmap_size: int,
             kernel_size: int, dilation: int, scale: float, block_m: int = 0, block_n: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last(x) for x in (q, k, v))
    geometry = (pattern, text_len, fmap_size, kernel_size, dilation, scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    with _device_guard(q):
        tiles = _tiles("fwd", q, geometry, block_m, block_n,
                       lambda t: _launch_fwd(q, k, v, torch.empty_like(out), torch.empty_like(lse), geometry, t))
        _launch_fwd(q, k, v, out, lse, geometry, tiles)
    return out, lse


def _backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, pattern: str, text_len: int, fmap_size: int, kernel_size: int, dilation: int,
              scale: float, block_m: int = 0, block_n: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad_out = (_unit_last(x) for x in (q, k, v, out, grad_out))
    batch, heads, seq, head_dim = q.shape
    geometry = (pattern, text_len, fmap_size, kernel_size, dilation, scale)
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    inputs = (q, k, v, grad_out, lse, delta)
    with _device_guard(q):
        _bwd_preprocess_kernel[(triton.cdiv(seq, _PRE_ROWS), batch * heads)](
            out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, seq,
            HEAD_DIM=head_dim, BLOCK_M=_PRE_ROWS, BLOCK_D=_block_d(q),
        )
        # Each kernel walks the plan of its own tiles (dK/dV its transpose): their best shapes differ, as the
        # product whose result feeds the next one needs as many rows as its warps cover (16 each).
        tiles = _tiles("dkdv", q, geometry, block_m, block_n,
                       lambda t: _launch_dkdv(*inputs, torch.empty_like(dk), torch.empty_like(dv), geometry, t))
        _launch_dkdv(*inputs, dk, dv, geometry, tiles)
        tiles = _tiles("dq", q, geometry, block_m, block_n,
                       lambda t: _launch_dq(*inputs, torch.empty_like(dq), geometry, t))
        _launch_dq(*inputs, dq, geometry, tiles)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# Torch ops: opaque to torch.compile, with shapes from the fakes and gradients from the backward op.


@torch.library.custom_op("dalle_engine::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, text_len: int,
                         fmap_size: int, kernel_size: int, dilation: int, scale: float, block_m: int, block_n: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-row log2-sum-exp (fp32) on kernel-order inputs."""
    return _forward(q, k, v, pattern, text_len, fmap_size, kernel_size, dilation, scale, block_m, block_n)


@sparse_attention_fwd.register_fake
def _(q, k, v, pattern, text_len, fmap_size, kernel_size, dilation, scale, block_m, block_n):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("dalle_engine::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, pattern: str, text_len: int, fmap_size: int,
                         kernel_size: int, dilation: int, scale: float, block_m: int, block_n: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV for the upstream gradient ``grad_out``."""
    return _backward(grad_out, q, k, v, out, lse, pattern, text_len, fmap_size, kernel_size, dilation, scale,
                     block_m, block_n)


@sparse_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, pattern, text_len, fmap_size, kernel_size, dilation, scale, block_m, block_n):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *ctx.geometry = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)


def _grad(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = sparse_attention_bwd(grad_out, q, k, v, out, lse, *ctx.geometry)
    return (dq, dk, dv) + (None,) * len(ctx.geometry)


sparse_attention_fwd.register_autograd(_grad, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: str,
    text_len: int,
    fmap_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal attention restricted to a DALL-E pattern; same contract as ``kernels.reference.sparse_attention``.

    Args:
        q, k, v: ``(batch, heads, seq, dim_head)``, one dtype of fp16 / bf16 / fp32, on a CUDA device (or on CPU
            under ``TRITON_INTERPRET=1``); ``dim_head`` at most 128.
        pattern, text_len, fmap_size, kernel_size, dilation: the pattern and geometry (``kernels.masks``).
        scale: score scale, default ``dim_head ** -0.5``.
        block_m, block_n: query / key tile sizes, powers of two >= 16 (default: ``kernels.triton.tuning``'s choice
            for the GPU, dtype, head dim and shape).

    Returns:
        ``(batch, heads, seq, dim_head)`` in the input dtype.
    """
    check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size, dilation=dilation,
                   seq_len=q.shape[2])
    if q.dtype not in _DTYPES:
        raise ValueError(f"triton sparse_attention supports fp16, bf16 and fp32, got {q.dtype}")
    if q.shape[-1] > 128:
        raise ValueError(f"triton sparse_attention supports dim_head up to 128, got {q.shape[-1]}")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError("triton sparse_attention needs GPU tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seq = q.shape[2]

    order = kernel_order(pattern, seq, text_len=text_len, fmap_size=fmap_size, device=q.device)
    if order is not None:  # axial_col: pad to the full grid, run as axial_row in column-major order
        q, k, v = (F.pad(x, (0, 0, 0, order.numel() - seq)).index_select(2, order) for x in (q, k, v))
    out, _ = sparse_attention_fwd(q, k, v, pattern, text_len, fmap_size, kernel_size, dilation, scale,
                                  block_m or 0, block_n or 0)
    if order is not None:  # the order is its own inverse
        out = out.index_select(2, order[:seq])
    return out
