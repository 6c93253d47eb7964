"""FlexAttention (``torch.nn.attention.flex_attention``, torch >= 2.5) for the DALL-E patterns: where the Triton kernels
fail on a GPU, the next fastest exact implementation (a compiled, block-sparse kernel that inductor generates).

Its BlockMask is built from ``kernels.masks.allowed``, as in ``bench/attn.py``, once per pattern, geometry, sequence
length and device. Used in eager mode only: the masks are cached outside any graph.
"""

from __future__ import annotations

import importlib.util

import torch

from . import masks

__all__ = ["available", "sparse_attention"]

# A constant, as for Triton: torch.compile traces through ``available()``.
_AVAILABLE = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
_block_masks: dict[tuple, object] = {}
_compiled = None


def available() -> bool:
    """Whether this torch has FlexAttention."""
    return _AVAILABLE


def _block_mask(pattern: str, seq: int, device: torch.device, geometry: dict):
    key = (pattern, seq, str(device), *sorted(geometry.items()))
    if key not in _block_masks:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return masks.allowed(pattern, q_idx, kv_idx, **geometry)

        _block_masks[key] = create_block_mask(mask_mod, None, None, seq, seq, device=device)
    return _block_masks[key]


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
    """Causal attention restricted to a DALL-E pattern, by compiled FlexAttention; same arguments, semantics and
    result as ``kernels.reference.sparse_attention``. Differentiable (on GPUs: this torch has no CPU backward)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention)  # uncompiled, it materialises the scores as the reference does
    geometry = dict(text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size, dilation=dilation)
    block_mask = _block_mask(pattern, q.shape[2], q.device, geometry)
    return _compiled(q, k, v, block_mask=block_mask, scale=scale)
