"""Attention kernels for DALL-E-style text+image sequences.

``sparse_attention`` (training, prefill) and ``decode_attention`` (one query against a KV cache, for sampling) are
the public entry points: each checks its arguments once and dispatches to an implementation:

- ``triton``: block-sparse Triton kernels, for CUDA tensors (``kernels/triton``);
- ``cpp``: the C++ CPU kernels (``csrc/``, ``kernels.cpp``), for CPU tensors when the extension is built, the
  ``full`` pattern included (faster there than PyTorch's CPU flash attention: ``bench/RESULTS.md``);
- ``sdpa``: PyTorch's fused dense causal attention, for the ``full`` pattern elsewhere, where nothing is sparse;
- ``flex``: compiled FlexAttention (``kernels.flex``), for CUDA tensors where the Triton kernels failed;
- ``reference``: the exact pure-PyTorch implementation (``kernels.reference``), the fallback everywhere.

A Triton or FlexAttention kernel that fails to compile or launch on the GPU at hand falls back, in eager mode, to the
next backend with one warning, and stays skipped on that device for the rest of the process (``kernels.fallback``).
``backend=`` or the ``DALLE_ENGINE_ATTENTION`` environment variable forces one (e.g. ``reference``), without
fallback. Mask helpers live in ``masks``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from . import cpp, fallback, flex, masks, reference
from . import triton as triton_kernels
from .masks import PATTERNS, block_layout, dense_mask

__all__ = ["BACKENDS", "PATTERNS", "block_layout", "choose_backend", "decode_attention", "dense_mask", "masks",
           "reference", "sparse_attention"]

BACKENDS = ("auto", "reference", "sdpa", "cpp", "triton", "flex")
_IMPLEMENTATIONS = {"reference": reference, "cpp": cpp, "triton": triton_kernels, "flex": flex}
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned_no_cpp = False
_warned_no_triton = False


def _requested(backend: str | None) -> str:
    backend = backend or os.environ.get("DALLE_ENGINE_ATTENTION", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return backend


def _on_gpu(q: torch.Tensor) -> bool:
    """Whether q is where the Triton kernels run (a function of its own so tests can drive GPU dispatch on a CPU)."""
    return q.is_cuda


def choose_backend(q: torch.Tensor, pattern: str, backend: str | None = None) -> str:
    """The implementation ``sparse_attention`` runs for ``q`` and ``pattern`` (``backend``: a forced choice)."""
    global _warned_no_cpp, _warned_no_triton
    backend = _requested(backend)
    if backend != "auto":
        return backend
    if pattern == "full" and (_on_gpu(q) or q.device.type != "cpu" or not cpp.available()):
        return "sdpa"
    if _on_gpu(q):
        if q.dtype in _TRITON_DTYPES and q.shape[-1] <= 128:
            if triton_kernels.available() and not fallback.broken("triton", q.device):
                return "triton"
            # Inductor compiles FlexAttention with Triton too; eager mode only, as kernels.flex caches its masks.
            if (triton_kernels.available() and flex.available() and not fallback.broken("flex", q.device)
                    and not torch.compiler.is_compiling()):
                return "flex"
        if not triton_kernels.available() and not _warned_no_triton and not torch.compiler.is_compiling():
            _warned_no_triton = True
            warnings.warn("Triton is not installed; attention on GPU tensors uses the slower pure-PyTorch reference",
                          stacklevel=3)
        return "reference"
    if q.device.type == "cpu":
        if cpp.available():
            return "cpp"
        if not _warned_no_cpp:
            _warned_no_cpp = True
            warnings.warn(f"C++ attention kernels unavailable ({cpp.load_error()}); using the slower reference",
                          stacklevel=3)
    return "reference"


def choose_decode_backend(q: torch.Tensor, backend: str | None = None) -> str:
    """The implementation ``decode_attention`` runs for ``q`` (``backend``: a forced choice; ``sdpa`` and ``flex``
    mean auto, as decoding has no dense fast path of its own and FlexAttention nothing for a single query)."""
    requested = _requested(backend)
    if requested not in ("auto", "sdpa", "flex"):
        return requested
    chosen = choose_backend(q, "axial_row", "auto")  # decoding reads a sparse key set for every pattern, full included
    return "reference" if chosen == "flex" else chosen


def _falls_back(chosen: str, auto: bool) -> bool:
    """Whether a kernel failure of ``chosen`` falls back: for a backend dispatch chose (a forced one raises), in
    eager mode (compiled graphs call the kernels that the eager calls before them chose)."""
    return auto and chosen in ("triton", "flex") and not torch.compiler.is_compiling()


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
    implementation = _IMPLEMENTATIONS[chosen]
    kwargs = dict(pattern=pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                  dilation=dilation, scale=scale)
    if _falls_back(chosen, _requested(backend) == "auto"):
        def run():
            out = implementation.sparse_attention(q, k, v, **kwargs)
            fallback.check_backward_once((chosen, str(q.device), pattern, q.dtype, q.shape[-1]), out, (q, k, v))
            return out

        out = fallback.guarded(chosen, q.device, run, lambda: choose_backend(q, pattern, backend))
        return sparse_attention(q, k, v, backend=backend, **kwargs) if out is None else out  # the next in line
    return implementation.sparse_attention(q, k, v, **kwargs)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, heads, seq, dim_head), got q of shape {tuple(q.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


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
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence, at position ``pos``, over the keys of a static KV cache that its
    pattern allows: the caption keys plus the pattern's image keys, never the whole prefix (fast backends).

    Args:
        q: ``(batch, heads, dim_head)``.
        k_cache, v_cache: ``(batch, heads, max_seq, dim_head)``, row ``b`` holding positions ``0..pos[b]`` (the
            query's own key included; later slots are never read); ``max_seq`` at most ``text_len + fmap_size ** 2``.
        pos: the queries' sequence positions: an int or a 0-dim integer tensor (every row at that position), or a
            ``(batch,)`` integer tensor (row ``b`` at ``pos[b]``, as continuous batching needs). A tensor must be on
            q's device; it is read there (no host sync on CUDA), so its values are range-checked only by backends
            that read them on the host (``cpp``). A row's result does not depend on the other rows' positions.
        pattern, text_len, fmap_size, kernel_size, dilation, scale: as for ``sparse_attention``.
        backend: as for ``sparse_attention`` (``sdpa`` means auto here).

    Returns:
        ``(batch, heads, dim_head)`` in q's dtype.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be (batch, heads, dim_head) and k_cache, v_cache one (batch, heads, max_seq, "
                         f"dim_head) shape, got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape != k_cache.shape[:2] + k_cache.shape[3:]:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q and the caches must share one float dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"q and the caches must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    masks.check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                         dilation=dilation, seq_len=k_cache.shape[2])
    masks.check_pos(pos, q, k_cache.shape[2])
    chosen = choose_decode_backend(q, backend)
    implementation = _IMPLEMENTATIONS[chosen]
    kwargs = dict(pattern=pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                  dilation=dilation, scale=scale)
    if _falls_back(chosen, _requested(backend) in ("auto", "sdpa", "flex")):
        def run():
            return implementation.decode_attention(q, k_cache, v_cache, pos, **kwargs)

        out = fallback.guarded(chosen, q.device, run, lambda: choose_decode_backend(q, backend))
        return decode_attention(q, k_cache, v_cache, pos, backend=backend, **kwargs) if out is None else out
    return implementation.decode_attention(q, k_cache, v_cache, pos, **kwargs)
