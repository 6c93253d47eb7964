"""Attention kernels for DALL-E-style text+image sequences.

``sparse_attention`` is the public entry point: it checks its arguments once and dispatches to an implementation
(today the pure-PyTorch ``reference``). Mask helpers live in ``masks``.
"""

from __future__ import annotations

import torch

from . import masks, reference
from .masks import PATTERNS, block_layout, dense_mask

__all__ = ["PATTERNS", "block_layout", "dense_mask", "masks", "reference", "sparse_attention"]


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
    """Causal attention restricted to a DALL-E pattern (see ``kernels.masks`` for the patterns).

    Args:
        q, k, v: ``(batch, heads, seq, dim_head)``, same shape, float dtype and device; ``seq`` at most
            ``text_len + fmap_size ** 2``.
        pattern: one of ``PATTERNS``.
        text_len: bos + caption positions at the start of the sequence.
        fmap_size: side of the image grid that follows the text (row-major).
        kernel_size, dilation: conv window geometry (conv patterns only).
        scale: score scale, default ``dim_head ** -0.5``.

    Returns:
        ``(batch, heads, seq, dim_head)`` in the input dtype.
    """
    _check_qkv(q, k, v)
    masks.check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                         dilation=dilation, seq_len=q.shape[2])
    return reference.sparse_attention(q, k, v, pattern=pattern, text_len=text_len, fmap_size=fmap_size,
                                      kernel_size=kernel_size, dilation=dilation, scale=scale)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, heads, seq, dim_head), got q of shape {tuple(q.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
