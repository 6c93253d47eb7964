"""Exact pure-PyTorch attention for the DALL-E patterns: the portable fallback and the baseline for fast kernels.

``full`` is dense causal attention. The sparse patterns never build ``seq x seq`` scores: text queries run causal
attention over the text (``text_len x text_len``), and image queries run one joint softmax over ``[all text keys |
their pattern's image keys]``, so scores take ``O(seq * (text_len + keys per query))`` memory. The image part is
zero-padded to the full grid; padded keys are never attended because they come after every real query and every
pattern is causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from . import masks

__all__ = ["decode_attention", "sparse_attention"]


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
) -> torch.Tensor:
    """``softmax(q @ k^T * scale)`` restricted to the pattern's allowed keys, times ``v``.

    q, k, v: ``(batch, heads, seq, dim_head)`` of one float dtype; returns the same shape and dtype. Scores and
    softmax run in float32 (float64 for float64 inputs). ``scale`` defaults to ``dim_head ** -0.5``. Arguments are
    assumed valid; ``kernels.sparse_attention`` checks them.
    """
    dtype = q.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    if pattern == "full":
        return _causal_attention(q, k, v, scale).to(dtype)

    seq = q.shape[2]
    out = _causal_attention(q[:, :, :text_len], k[:, :, :text_len], v[:, :, :text_len], scale)
    if seq <= text_len:
        return out.to(dtype)

    num_image = seq - text_len
    image_q, image_k, image_v = (F.pad(x[:, :, text_len:], (0, 0, 0, fmap_size ** 2 - num_image))
                                 for x in (q, k, v))
    text_k, text_v = k[:, :, :text_len], v[:, :, :text_len]
    if pattern in ("axial_row", "axial_col"):
        image_out = _axial_attention(image_q, image_k, image_v, text_k, text_v, scale=scale,
                                     fmap_size=fmap_size, along_columns=pattern == "axial_col")
    else:
        image_out = _window_attention(image_q, image_k, image_v, text_k, text_v, scale=scale,
                                      fmap_size=fmap_size, offsets=_window_offsets(pattern, kernel_size, dilation))
    return torch.cat([out, image_out[:, :, :num_image]], dim=2).to(dtype)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention. Explicit rather than SDPA: the CPU SDPA kernel's dq is measurably less accurate."""
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v


def _joint_softmax(
    text_scores: torch.Tensor, image_scores: torch.Tensor, image_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over ``[text | image]`` keys (last dim); returns the two probability blocks.

    -inf is safe here: every query has all text keys allowed, so no row is fully masked and no NaN appears.
    """
    image_scores = image_scores.masked_fill(~image_valid, float("-inf"))
    probs = torch.cat([text_scores, image_scores], dim=-1).softmax(dim=-1)
    return probs.split([text_scores.shape[-1], image_scores.shape[-1]], dim=-1)


def _axial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    *,
    scale: float,
    fmap_size: int,
    along_columns: bool,
) -> torch.Tensor:
    """Image queries of a full grid attend to all text plus the earlier keys on their own row (or column)."""
    # View the grid as lines (rows, or columns for axial_col), each a causal sequence of `fmap_size` keys.
    to_lines = "b h (r c) d -> b h c r d" if along_columns else "b h (r c) d -> b h r c d"
    q, k, v = (rearrange(x, to_lines, c=fmap_size) for x in (q, k, v))
    text_scores = torch.einsum("bhlid,bhtd->bhlit", q, text_k) * scale
    line_scores = torch.einsum("bhlid,bhljd->bhlij", q, k) * scale
    causal = torch.ones(fmap_size, fmap_size, dtype=torch.bool, device=q.device).tril()
    text_probs, line_probs = _joint_softmax(text_scores, line_scores, causal)
    out = text_probs @ text_v.unsqueeze(2) + line_probs @ v
    from_lines = "b h c r d -> b h (r c) d" if along_columns else "b h r c d -> b h (r c) d"
    return rearrange(out, from_lines)


def _window_offsets(pattern: str, kernel_size: int, dilation: int) -> list[tuple[int, int]]:
    """(row, col) offsets, key minus query, of the conv window keys that can be causal."""
    if pattern == "conv_like":
        steps = range(-(kernel_size - 1) * dilation, 1, dilation)  # the query is the window's bottom-right corner
        return [(dr, dc) for dr in steps for dc in steps]
    reach = (kernel_size // 2) * dilation
    steps = range(-reach, reach + 1, dilation)
    # Centred window: keep the raster-causal half (rows above, then the own row up to the query).
    return [(dr, dc) for dr in steps for dc in steps if (dr, dc) <= (0, 0)]


def _window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    *,
    scale: float,
    fmap_size: int,
    offsets: list[tuple[int, int]],
) -> torch.Tensor:
    """Image queries of a full grid attend to all text plus the in-grid keys at the given window offsets."""
    cells = torch.arange(fmap_size ** 2, device=q.device)[:, None]
    dr, dc = torch.tensor(offsets, device=q.device).unbind(dim=1)
    rows, cols = cells // fmap_size + dr, cells % fmap_size + dc  # (cells, window)
    valid = (rows >= 0) & (rows < fmap_size) & (cols >= 0) & (cols < fmap_size)
    index = torch.where(valid, rows * fmap_size + cols, 0)  # invalid slots read cell 0 and are masked
    window_k, window_v = k[:, :, index], v[:, :, index]  # (b, h, cells, window, d)
    text_scores = torch.einsum("bhnd,bhtd->bhnt", q, text_k) * scale
    window_scores = torch.einsum("bhnd,bhnwd->bhnw", q, window_k) * scale
    text_probs, window_probs = _joint_softmax(text_scores, window_scores, valid)
    return text_probs @ text_v + torch.einsum("bhnw,bhnwd->bhnd", window_probs, window_v)


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
) -> torch.Tensor:
    """Attention of the one query per row at sequence position ``pos`` over the cached keys its pattern allows.

    q: ``(batch, heads, dim_head)``; k_cache, v_cache: ``(batch, heads, max_seq, dim_head)``, row ``b`` holding
    positions ``0..pos[b]`` (the query's own key included; later slots are ignored, even NaN). ``pos`` is an int or a
    0-dim integer tensor (every row at that position; a tensor keeps shapes static for CUDA graphs), or a
    ``(batch,)`` integer tensor (row ``b`` at ``pos[b]``). Returns ``(batch, heads, dim_head)`` in q's dtype. This
    reference masks the whole cache, so its cost does not depend on the pattern; the fast kernels read only the
    allowed keys.
    """
    dtype = q.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = torch.arange(k_cache.shape[2], device=q.device)
    if isinstance(pos, torch.Tensor) and pos.dim() == 1:
        pos = pos[:, None]  # one row of keys per sequence
    mask = masks.allowed(pattern, pos, keys, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                         dilation=dilation)
    mask = mask.expand(q.shape[0], keys.shape[0])[:, None]  # (batch, 1, max_seq): one mask for every head
    scores = torch.einsum("bhd,bhsd->bhs", q.to(compute), k_cache.to(compute)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    values = v_cache.to(compute).masked_fill(~mask[..., None], 0)  # unread slots may hold anything, even NaN
    return torch.einsum("bhs,bhsd->bhd", probs, values).to(dtype)
