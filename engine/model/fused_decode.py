"""Eager decode steps on CPUs through fused C++ layers: all of a step's layers in one call
(``kernels.cpp.decode_stack``, each layer as ``kernels.cpp.decode_layer`` computes it), with the output head too when
``DALLE.decode_step`` asks for logits, instead of ~50 PyTorch operations per layer, each costing more dispatch than
arithmetic at a handful of rows. Its result is the layer-by-layer step's to rounding (float64 agrees to ~1e-15).

``Transformer`` takes this path by itself for a decode step it can serve: float32 or float64 rows on a CPU with the
C++ kernels built and chosen for decode attention, weights the C++ products take, no gradient, eval mode, and not
inside ``torch.compile`` (a compiled step fuses the layer-by-layer graph itself). ``unfused()`` turns it off, to
compare or measure.

A step passes ~25 tensors per layer: gathered through ``nn.Module.__getattr__`` at every step, that alone cost ~40 us
per layer, and passing them through the dispatcher about as much again. So they are gathered once into a plan and
handed to the C++ stack, which holds and checks them once; a step passes only its rows, the caches and the position.
The plan passes each projection's weight packed along output features (``engine.model.packed``), and is gathered
again when the model's modules or tensors are replaced or its weights change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

import kernels
from engine.model import packed
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


def try_decode(transformer: nn.Module, x: torch.Tensor, cache, pos: torch.Tensor) -> torch.Tensor | None:
    """``Transformer.forward`` of one position per row through the fused layers, or None where they do not apply
    (nothing is written then): x (batch, 1, dim) at ``pos`` (0-dim or (batch,)) through every layer, reading and
    writing ``cache``."""
    plan = _applicable_plan(transformer, x, cache)
    return None if plan is None else plan.stack.step(x[:, 0], *cache.flat(), pos)[:, None]


def try_logits(model: nn.Module, x: torch.Tensor, cache, pos: torch.Tensor) -> torch.Tensor | None:
    """``DALLE.decode_step``'s logits over the image vocabulary from the embedded x (batch, 1, dim), through the
    fused layers and output head (DivideMax of a stable model, LayerNorm, projection) in the same call; None where
    they do not apply."""
    plan = _applicable_plan(model.transformer, x, cache, head=model)
    return None if plan is None else plan.stack.logits(x[:, 0], *cache.flat(), pos)


def _applicable_plan(transformer: nn.Module, x: torch.Tensor, cache, head: nn.Module | None = None) -> _Plan | None:
    """The transformer's plan (with ``head``'s output head) where the fused step applies to x, else None."""
    k0 = cache.layer(0)[0]
    if not (_enabled and x.dtype in _DTYPES and x.device.type == "cpu" and k0.dtype == x.dtype):
        return None
    if transformer.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or not cpp.available():
        return None
    if kernels.choose_decode_backend(x) != "cpp":  # e.g. DALLE_ENGINE_ATTENTION=reference
        return None
    plan = _plan(transformer, head)
    return plan if plan.takes(x.dtype) else None


class _Plan(NamedTuple):
    """What a fused step passes, gathered once: (attention tensors, feed-forward tensors, pattern, geometry) per
    layer, with the projections' weights packed, held by the C++ stack that runs them; every projection's weight as
    the model holds it (their dtypes decide whether the C++ products take them) and its version when packed."""

    generation: int
    layers: list[tuple[list, list, str, dict]]
    weights: list[torch.Tensor]
    versions: list[int]
    stack: torch.ScriptObject
    head: bool  # the stack has the output head (set_head)

    def takes(self, dtype: torch.dtype) -> bool:
        return all(kernel_takes(w.dtype, dtype) for w in self.weights)

    def current(self) -> bool:
        """Whether the packed weights are still the model's: none replaced, none changed in place."""
        return self.generation == packed.generation() and all(w._version == v for w, v in zip(self.weights,
                                                                                                self.versions))


def forget(transformer: nn.Module) -> None:
    """Drop ``transformer``'s gathered plan (its tensors are about to be replaced)."""
    transformer.__dict__.pop("_fused_plan", None)


def without_plan(state: dict) -> dict:
    """A transformer's ``__dict__`` without its plan (which holds a C++ object that neither copies nor pickles)."""
    return {name: value for name, value in state.items() if name != "_fused_plan"}


def _plan(transformer: nn.Module, head: nn.Module | None = None) -> _Plan:
    """The transformer's current plan, gathered again where it is stale or lacks the output head of ``head`` (the
    DALLE the transformer belongs to) that was asked for."""
    plan = transformer.__dict__.get("_fused_plan")
    if plan is None or not plan.current() or (head is not None and not plan.head):
        forget(transformer)  # the old packed copies go before the new ones are made
        layers, weights = [], []
        for layer in transformer.layers:
            attn, ff = (layer._modules[name] for name in ("attn", "ff"))
            fn = attn.fn
            branches = _branch(attn), _branch(ff)
            for branch in branches:
                for i in _WEIGHTS:
                    weights.append(branch[i])
                    branch[i] = packed.pack(branch[i])  # one copy for a weight the layers share
            layers.append((*branches, fn.pattern, fn.geometry))
        stack = _stack(transformer, layers)
        if head is not None:
            weights.append(_set_head(stack, head))
        plan = _Plan(packed.generation(), layers, weights, [w._version for w in weights], stack, head is not None)
        transformer.__dict__["_fused_plan"] = plan
    return plan


def _set_head(stack: torch.ScriptObject, model: nn.Module) -> torch.Tensor:
    """Give ``stack`` the output head of ``model`` (a DALLE) over the image vocabulary; returns the projection's
    weight as the model holds it."""
    norm, projection = model.to_logits
    weight, bias, scale = _projection(projection)
    image = slice(model.config.num_text_tokens_internal, None)
    stack.set_head(norm.weight, norm.bias, norm.eps, packed.pack(weight[image]),
                   None if bias is None else bias[image], None if scale is None else scale[image],
                   model.config.stable)
    return weight


_WEIGHTS = (cpp.BRANCH_TENSORS.index("in_weight"), cpp.BRANCH_TENSORS.index("out_weight"))
_GEOMETRY = ("text_len", "fmap_size", "kernel_size", "dilation")


def _stack(transformer: nn.Module, layers: list[tuple[list, list, str, dict]]) -> torch.ScriptObject:
    """The C++ stack of ``layers``, with the rotary angles' cos and sin and the token-shift weights of every
    position."""
    rotary = transformer.rotary
    return cpp.decode_stack([t for attn, ff, _, _ in layers for t in attn + ff], [layer[2] for layer in layers],
                            [layer[3][name] for layer in layers for name in _GEOMETRY],
                            rotary=None if rotary is None else (rotary.cos(), rotary.sin()),
                            shift_weights=transformer.shift_weights, eps=transformer.layers[0].attn.norm.eps,
                            reversible=transformer.reversible)


def _branch(branch: nn.Module) -> list[torch.Tensor | None]:
    """A ``Branch``'s tensors in ``kernels.cpp.BRANCH_TENSORS`` order."""
    modules = branch._modules
    norm, fn, norm_out = (modules[name] for name in ("norm", "fn", "norm_out"))
    into, out = (fn._modules[name] for name in (("to_qkv", "to_out") if "to_qkv" in fn._modules
                                                else ("proj_in", "proj_out")))
    return [*_norm(norm), *_projection(into), *_projection(out), *_norm(norm_out), branch._parameters["scale"]]


def _norm(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of a ``LayerNorm``; (None, None) for the ``Identity`` of a branch without a sandwich norm."""
    parameters = norm._parameters
    return (parameters["weight"], parameters["bias"]) if "weight" in parameters else (None, None)


def _projection(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias, scale) of a ``Linear`` or a ``StoredLinear`` (as stored)."""
    tensors = linear._buffers if "weight" in linear._buffers else linear._parameters
    return tensors["weight"], tensors["bias"], tensors.get("scale")
