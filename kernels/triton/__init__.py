"""Triton block-sparse attention for the DALL-E patterns (forward and backward).

Importing this package never imports Triton: the kernels (``attention.py``) load on the first call, so
``import kernels`` works on machines without Triton. Set ``TRITON_INTERPRET=1`` before that first call to run
the kernels on CPU tensors with Triton's interpreter.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["available", "sparse_attention"]


def available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


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
    """Causal attention restricted to a DALL-E pattern, computed by the Triton kernels.

    Same arguments, semantics and result as ``kernels.reference.sparse_attention``; q, k, v are fp16, bf16 or fp32
    with ``dim_head <= 128``, on a CUDA device (or CPU under ``TRITON_INTERPRET=1``). Differentiable.
    """
    from .attention import sparse_attention as triton_sparse_attention

    return triton_sparse_attention(q, k, v, pattern=pattern, text_len=text_len, fmap_size=fmap_size,
                                   kernel_size=kernel_size, dilation=dilation, scale=scale)
