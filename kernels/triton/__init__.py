"""Triton kernels: block-sparse training attention for the DALL-E patterns (forward and backward,
``attention.py``), KV-cache decode attention (``decode.py``) and the weight-only int8 linear layer of sampling
(``linear.py``).

Importing this package never imports Triton: each kernel module loads on its first call, so ``import kernels``
works on machines without Triton. Set ``TRITON_INTERPRET=1`` before that first call to run
the kernels on CPU tensors with Triton's interpreter.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["available", "decode_attention", "sparse_attention", "weight_only_linear"]


# Checked once without importing Triton: a constant is also what torch.compile can trace through.
_AVAILABLE = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether Triton can be imported."""
    return _AVAILABLE


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
    """One query per sequence at position ``pos`` against its pattern's keys in a KV cache, by the Triton kernels.

    Same arguments, semantics and result as ``kernels.reference.decode_attention``; fp16, bf16 or fp32 with
    ``dim_head <= 128``, on a CUDA device (or CPU under ``TRITON_INTERPRET=1``). A device tensor ``pos`` (0-dim, or
    one position per row) keeps the call free of host syncs and CUDA-graph replayable. ``num_splits``: FlashDecoding
    key splits (default: a heuristic). Not differentiable.
    """
    from .decode import decode_attention as triton_decode_attention

    return triton_decode_attention(q, k_cache, v_cache, pos, pattern=pattern, text_len=text_len, fmap_size=fmap_size,
                                   kernel_size=kernel_size, dilation=dilation, scale=scale, num_splits=num_splits)


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * scale[:, None], bias)`` for int8 ``weight`` (out, in) read as stored, float32 ``scale``
    (out,), x (rows, in) fp16 or bf16 on a CUDA device (or CPU under ``TRITON_INTERPRET=1``). Not
    differentiable."""
    from .linear import weight_only_linear as triton_weight_only_linear

    return triton_weight_only_linear(x, weight, scale, bias)
