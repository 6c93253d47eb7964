"""Eager decode steps on CPUs through the fused C++ layer (``kernels.cpp.decode_layer``): one call per layer per
step instead of ~50 PyTorch operations, each costing more dispatch than arithmetic at a handful of rows. The result is
the layer-by-layer step's, to rounding (the same operations in the same order; float64 agrees to 1e-12).

``Transformer`` takes this path by itself for a decode step it can serve: float32 or float64 rows on a CPU with the
C++ kernels built and chosen for decode attention, no gradient, eval mode, and not inside ``torch.compile`` (a
compiled step fuses the layer-by-layer graph itself). ``unfused()`` turns it off, to compare or measure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

import kernels
from engine.model.linear import kernel_takes
from kernels import cpp

_DTYPES = (torch.float32, torch.float64)
_enabled = True


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Inside: decode steps run layer by layer in PyTorch operations."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def applies(transformer: nn.Module, x: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the fused layer can run ``transformer``'s decode step of rows ``x`` on caches like ``k_cache``."""
    if not (_enabled and x.dtype in _DTYPES and x.device.type == "cpu" and k_cache.dtype == x.dtype):
        return False
    if transformer.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or not cpp.available():
        return False
    if kernels.choose_decode_backend(x) != "cpp":  # e.g. DALLE_ENGINE_ATTENTION=reference
        return False
    return all(kernel_takes(linear.weight.dtype, x.dtype) for layer in transformer.layers
               for linear in _projections(layer))


def decode(transformer: nn.Module, x: torch.Tensor, cache, pos: torch.Tensor,
           rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``Transformer.forward`` of one position per row: x (batch, 1, dim) at ``pos`` (0-dim or (batch,)) through every
    layer, reading and writing ``cache``; ``rotary``: the positions' (cos, sin), (1 or batch, 1, 1, rot)."""
    if rotary is not None:
        rotary = tuple(t.view(t.shape[0], -1) for t in rotary)
    shift = None if transformer.shift_weights is None else transformer.shift_weights.index_select(0, pos.view(-1))
    h = x[:, 0]
    if transformer.reversible:
        h = torch.cat([h, h], dim=-1)
    for i, layer in enumerate(transformer.layers):
        attn = layer.attn.fn
        h = cpp.decode_layer(h, _branch(layer.attn), _branch(layer.ff), *cache.layer(i), pos, rotary=rotary,
                             rings=cache.rings(i), shift_weights=shift, pattern=attn.pattern, **attn.geometry,
                             eps=layer.attn.norm.eps, reversible=transformer.reversible)
    if transformer.reversible:
        h = torch.stack(h.chunk(2, dim=-1)).mean(dim=0)
    return h[:, None]


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    attn, ff = layer.attn.fn, layer.ff.fn
    return attn.to_qkv, attn.to_out, ff.proj_in, ff.proj_out


def _branch(branch: nn.Module) -> list[torch.Tensor | None]:
    """A ``Branch``'s tensors in ``kernels.cpp.BRANCH_TENSORS`` order."""
    fn = branch.fn
    into, out = (fn.to_qkv, fn.to_out) if hasattr(fn, "to_qkv") else (fn.proj_in, fn.proj_out)
    norm_out = branch.norm_out
    sandwich = (norm_out.weight, norm_out.bias) if isinstance(norm_out, nn.LayerNorm) else (None, None)
    return [branch.norm.weight, branch.norm.bias, into.weight, into.bias, getattr(into, "scale", None), out.weight,
            out.bias, getattr(out, "scale", None), *sandwich, branch.scale]
