"""Attention kernels for DALL-E-style text+image sequences.

``sparse_attention`` is the public entry point: it checks its arguments once and dispatches to an implementation:

- ``triton``: block-sparse Triton kernels, for CUDA tensors (``kernels/triton``);
- ``cpp``: the C++ CPU kernels (``csrc/``, ``kernels.cpp``), for CPU tensors when the extension is built;
- ``sdpa``: PyTorch's fused dense causal attention, for the ``full`` pattern, where nothing is sparse;
- ``reference``: the exact pure-PyTorch implementation (``kernels.reference``), the fallback everywhere.

``backend=`` or the ``DALLE_ENGINE_ATTENTION`` environment variable forces one (e.g. ``reference``). Mask helpers live
in ``masks``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from . import cpp, masks, reference
from . import triton as triton_kernels
from .masks import PATTERNS, block_layout, dense_mask

__all__ = ["BACKENDS", "PATTERNS", "block_layout", "choose_backend", "dense_mask", "masks", "reference",
           "sparse_attention"]

BACKENDS = ("auto", "reference", "sdpa", "cpp", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned_no_cpp = False


def choose_backend(q: torch.Tensor, pattern: str, backend: str | None = None) -> str:
    """The implementation ``sparse_attention`` runs for ``q`` and ``pattern`` (``backend``: a forced choice)."""
    global _warned_no_cpp
    backend = backend or os.environ.get("DALLE_ENGINE_ATTENTION", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if pattern == "full":
        return "sdpa"
    if q.is_cuda and triton_kernels.available() and q.dtype in _TRITON_DTYPES and q.shape[-1] <= 128:
        return "triton"
    if q.device.type == "cpu":
        if cpp.available():
            return "cpp"
        if not _warned_no_cpp:
            _warned_no_cpp = True
            warnings.warn(f"C++ attention kernels unavailable ({cpp.load_error()}); using the slower reference",
                          stacklevel=3)
    return "reference"


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
    backend: str | None = None,
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
        backend: one of ``BACKENDS``; default ``$DALLE_ENGINE_ATTENTION`` or ``auto`` (see ``choose_backend``).

    Returns:
        ``(batch, heads, seq, dim_head)`` in the input dtype.
    """
    _check_qkv(q, k, v)
    masks.check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                         dilation=dilation, seq_len=q.shape[2])
    chosen = choose_backend(q, pattern, backend)
    if chosen == "sdpa":
        if pattern != "full":
            raise ValueError(f"the sdpa backend computes only the full pattern, not {pattern!r}")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    implementation = {"reference": reference, "cpp": cpp, "triton": triton_kernels}[chosen]
    return implementation.sparse_attention(q, k, v, pattern=pattern, text_len=text_len, fmap_size=fmap_size,
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
