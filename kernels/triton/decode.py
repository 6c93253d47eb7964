"""Triton KV-cache decode attention (FlashDecoding): one query per sequence against only its pattern's cached keys.

A program handles one (batch, head) pair and one split of the key set. The key set is enumerated as chunks: the
text keys in ``BLOCK_N`` runs, then the image window (``kernels.masks.image_key_window``, recomputed in-kernel from
``pos``) in ``BLOCK_R x BLOCK_C`` tiles of lattice rows and columns. Keys outside the pattern are never loaded, so
the cost follows the pattern's key count, not the prefix length. With ``NUM_SPLITS > 1`` the chunks are dealt
round-robin to the splits, which write fp32 partial (max, sum, acc) triples that a second kernel merges by
log-sum-exp rescaling; with one split the first kernel writes the output itself.

``pos`` (one position for every row, or one per row) is read from device memory, so a call never synchronises with
the host and a captured CUDA graph can be replayed with new positions. Split counts and tile sizes depend only on the
geometry, never on the positions; a row's chunks and their order depend only on its own position. The kernels are
wrapped as the torch op ``dalle_engine::decode_attention`` (with a fake implementation) so ``torch.compile`` treats
them as one opaque node.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..masks import check_geometry, check_pos
from .attention import _DTYPES, _LOG2E, _device_guard, _interpreting

__all__ = ["decode_attention"]

_TEXT_BLOCK = 64    # text keys per chunk
_IMAGE_BLOCK = 64   # image key slots per chunk (rows x columns), unless one row is wider
_MAX_COLS = 128     # widest column tile; wider windows take several column tiles per row
_MAX_SPLITS = 16
_CPU_SPLITS = 2     # interpreter default; tests pass num_splits explicitly to cover other counts


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _attend(q, K, V, keys, ok, sks, skd, svs, svd, offs_d, d_ok, m_i, l_i, acc):
    """Online-softmax update of the running (max, sum, acc), log2 units, with the keys ``keys`` where ``ok``.

    Everything runs in fp32 whatever the cache dtype: decoding is bound by memory, not math, and this also keeps
    bf16 away from the interpreter's wrong bf16 arithmetic (bf16 -> fp32 is exact there).
    """
    mask = ok[:, None] & d_ok[None, :]
    k = tl.load(K + keys[:, None] * sks + offs_d[None, :] * skd, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + keys[:, None] * svs + offs_d[None, :] * svd, mask=mask, other=0.0).to(tl.float32)
    s = tl.where(ok, tl.sum(k * q[None, :], 1), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    # A chunk can be fully masked (a column tile past the query on its own row): shift by 0, not -inf, so exp2
    # gives 0 rather than NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift)
    alpha = tl.exp2(m_i - m_shift)
    return m_new, l_i * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * v, 0)


@triton.jit
def _decode_kernel(
    Q, K, V, Pos, Out, PartMax, PartSum, PartAcc,
    pos_stride, sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    num_heads, qk_scale, text_len, fmap_size, row_up, col_left, col_right, step,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: a whole cache may pass 2**31 elements
    split = tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    pos = tl.load(Pos + b * pos_stride).to(tl.int32)  # pos_stride 0: one position for every row
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32) * qk_scale
    K += b * skb + h * skh
    V += b * svb + h * svh
    m_i = tl.max(tl.full([BLOCK_D], float("-inf"), tl.float32), 0)  # fp32 scalars, as the loop carries them
    l_i = tl.sum(tl.zeros([BLOCK_D], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)

    # Text: keys 0..pos for a text query, all text_len for an image query.
    is_image = pos >= text_len
    n_text = tl.where(is_image, text_len, pos + 1)
    n_text_chunks = tl.cdiv(n_text, BLOCK_N)
    for chunk in range(split, n_text_chunks, NUM_SPLITS):
        keys = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend(q, K, V, keys, keys < n_text, sks, skd, svs, svd, offs_d, d_ok, m_i, l_i, acc)

    # Image window of query cell (r, c), as kernels.masks.image_key_window computes it (keep the two in sync): the
    # host turns each pattern into reaches up / left / right and a lattice step, and the grid clips them.
    t = tl.maximum(pos - text_len, 0)  # text queries get a dummy window and no image chunks
    r = t // fmap_size
    c = t % fmap_size
    row_lo = r - tl.minimum(row_up, r) // step * step
    col_lo = c - tl.minimum(col_left, c) // step * step
    col_hi = c + tl.minimum(col_right, fmap_size - 1 - c) // step * step
    n_rows = (r - row_lo) // step + 1
    n_cols = (col_hi - col_lo) // step + 1
    n_col_tiles = tl.cdiv(n_cols, BLOCK_C)
    n_image_chunks = tl.where(is_image, tl.cdiv(n_rows, BLOCK_R) * n_col_tiles, 0)
    offs_i = tl.arange(0, BLOCK_R * BLOCK_C)
    # Image chunks continue the round-robin where the text chunks stopped (written so no operand is negative).
    first = (split + NUM_SPLITS - n_text_chunks % NUM_SPLITS) % NUM_SPLITS
    for chunk in range(first, n_image_chunks, NUM_SPLITS):
        lat_r = chunk // n_col_tiles * BLOCK_R + offs_i // BLOCK_C
        lat_c = chunk % n_col_tiles * BLOCK_C + offs_i % BLOCK_C
        row = row_lo + lat_r * step
        col = col_lo + lat_c * step
        # Raster causality: on the query's own row only columns up to its own.
        ok = (lat_r < n_rows) & (lat_c < n_cols) & ((row < r) | (col <= c))
        keys = text_len + row * fmap_size + col
        m_i, l_i, acc = _attend(q, K, V, keys, ok, sks, skd, svs, svd, offs_d, d_ok, m_i, l_i, acc)

    if NUM_SPLITS == 1:
        # Every query sees at least key 0, so l_i > 0.
        tl.store(Out + bh * HEAD_DIM + offs_d, (acc / l_i).to(Out.dtype.element_ty), mask=d_ok)
    else:
        part = bh * NUM_SPLITS + split
        tl.store(PartMax + part, m_i)
        tl.store(PartSum + part, l_i)
        tl.store(PartAcc + part * HEAD_DIM + offs_d, acc, mask=d_ok)


@triton.jit
def _combine_kernel(
    PartMax, PartSum, PartAcc, Out,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge one (batch, head)'s split partials: rescale each to the common max, then normalise."""
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    part = bh * NUM_SPLITS + offs_s
    m = tl.load(PartMax + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(PartSum + part, mask=s_ok, other=0.0)
    acc = tl.load(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)
    m_max = tl.max(m, 0)
    # A split that got no keys holds (-inf, 0, 0): weight it 0 explicitly, as exp2(-inf - m_max) would be NaN if
    # m_max were -inf too.
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l_s, 0)
    tl.store(Out + bh * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launcher


def _window_reach(pattern: str, fmap_size: int, kernel_size: int, dilation: int) -> tuple[int, int, int, int]:
    """``image_key_window`` as the kernel computes it: (rows up, columns left, columns right, lattice step), with
    ``fmap_size`` standing for "to the grid edge"."""
    if pattern == "full":
        return fmap_size, fmap_size, fmap_size, 1
    if pattern == "axial_row":
        return 0, fmap_size, 0, 1
    if pattern == "axial_col":
        return fmap_size, 0, 0, 1
    up = (kernel_size - 1 if pattern == "conv_like" else kernel_size // 2) * dilation
    right = 0 if pattern == "conv_like" else (kernel_size // 2) * dilation
    return up, up, right, dilation


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(q: torch.Tensor, max_chunks: int) -> int:
    """Enough splits for about two programs per SM when batch * heads alone cannot fill the GPU, none when it can;
    never more than the most chunks a query can have. Static for a given geometry, as CUDA graphs need."""
    if q.device.type != "cuda":
        return min(_CPU_SPLITS, max_chunks)
    programs = q.shape[0] * q.shape[1]
    return max(1, min(2 * _sm_count(q.device) // programs, max_chunks, _MAX_SPLITS))


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, pattern: str,
            text_len: int, fmap_size: int, kernel_size: int, dilation: int, scale: float,
            num_splits: int | None) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    row_up, col_left, col_right, step = _window_reach(pattern, fmap_size, kernel_size, dilation)
    lattice = -(-fmap_size // step)  # lattice cells per grid row or column
    max_rows = min(row_up // step + 1, lattice)
    max_cols = min((col_left + col_right) // step + 1, lattice)
    block_n = min(_TEXT_BLOCK, triton.next_power_of_2(text_len))
    block_c = min(_MAX_COLS, triton.next_power_of_2(max_cols))
    block_r = min(triton.next_power_of_2(max_rows), max(1, _IMAGE_BLOCK // block_c))
    max_chunks = -(-text_len // block_n) + -(-max_rows // block_r) * -(-max_cols // block_c)
    splits = num_splits or _num_splits(q, max_chunks)
    block_d = triton.next_power_of_2(head_dim)

    # The interpreter rounds fp32 to bf16 by truncation (up to 1 ulp off): there the kernels write fp32 and torch
    # rounds to nearest.
    upcast = q.dtype == torch.bfloat16 and _interpreting()
    out = q.new_empty(q.shape, dtype=torch.float32 if upcast else q.dtype)
    parts = (None, None, None)
    if splits > 1:
        parts = (q.new_empty(batch, heads, splits, dtype=torch.float32),
                 q.new_empty(batch, heads, splits, dtype=torch.float32),
                 q.new_empty(batch, heads, splits, head_dim, dtype=torch.float32))
    pos_stride = pos.stride(0) if pos.dim() == 1 else 0  # (batch,) positions, or one for every row
    with _device_guard(q):
        _decode_kernel[(batch * heads, splits)](
            q, k_cache, v_cache, pos, out, *parts,
            pos_stride, *q.stride(), *k_cache.stride(), *v_cache.stride(),
            heads, scale * _LOG2E, text_len, fmap_size, row_up, col_left, col_right, step,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_C=block_c,
            # 8 warps keep a 64 x 128 fp32 K/V tile pair in registers (4 spill); 80 and 96 fit in 4 (8 spill on sm_80).
            NUM_SPLITS=splits, num_warps=8 if head_dim > 96 else 4,
        )
        if splits > 1:
            _combine_kernel[(batch * heads,)](*parts, out, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=splits,
                                              BLOCK_S=triton.next_power_of_2(splits), num_warps=1)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Torch op: opaque to torch.compile, shape from the fake. Decoding needs no autograd.


@torch.library.custom_op("dalle_engine::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                        pattern: str, text_len: int, fmap_size: int, kernel_size: int, dilation: int, scale: float,
                        num_splits: int | None) -> torch.Tensor:
    """Decode attention output ``(batch, heads, dim_head)``, contiguous, in q's dtype."""
    return _decode(q, k_cache, v_cache, pos, pattern, text_len, fmap_size, kernel_size, dilation, scale, num_splits)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos, pattern, text_len, fmap_size, kernel_size, dilation, scale, num_splits):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int | torch.Tensor,
    *,
    pattern: str,
    text_len: int,
    fmap_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of each row's one query at its position ``pos`` over its pattern's cached keys; same contract as
    ``kernels.reference.decode_attention``.

    Args:
        q: ``(batch, heads, dim_head)``; k_cache, v_cache: ``(batch, heads, max_seq, dim_head)``, any strides (e.g. a
            slice of a larger cache), row ``b`` holding positions ``0..pos[b]``; slots after ``pos[b]`` are never read.
            One dtype of fp16 / bf16 / fp32, on a CUDA device (or on CPU under ``TRITON_INTERPRET=1``); ``dim_head``
            at most 128.
        pos: the queries' positions: an int or a 0-dim integer tensor (every row at that position), or a ``(batch,)``
            integer tensor (row ``b`` at ``pos[b]``), on q's device. Read by the kernel: no host sync, CUDA-graph
            replayable; a tensor's values are not range-checked.
        pattern, text_len, fmap_size, kernel_size, dilation: the pattern and geometry (``kernels.masks``).
        scale: score scale, default ``dim_head ** -0.5``.
        num_splits: FlashDecoding key splits per (batch, head); default from batch * heads and the SM count.

    Returns:
        ``(batch, heads, dim_head)`` in q's dtype.
    """
    check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size, dilation=dilation,
                   seq_len=k_cache.shape[2])
    if q.dtype not in _DTYPES:
        raise ValueError(f"triton decode_attention supports fp16, bf16 and fp32, got {q.dtype}")
    if q.shape[-1] > 128:
        raise ValueError(f"triton decode_attention supports dim_head up to 128, got {q.shape[-1]}")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError("triton decode_attention needs GPU tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    check_pos(pos, q, k_cache.shape[2])
    if not isinstance(pos, torch.Tensor):
        pos = torch.tensor(pos, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return decode_attention_op(q, k_cache, v_cache, pos, pattern, text_len, fmap_size, kernel_size, dilation, scale,
                               num_splits)
