"""Eager decode steps on CPUs through the fused C++ layer (``kernels.cpp.decode_layer``): one call per layer per
step instead of ~50 PyTorch operations, each costing more dispatch than arithmetic at a handful of rows. Its result is
the layer-by-layer step's to rounding (float64 agrees to ~1e-15).

``Transformer`` takes this path by itself for a decode step it can serve: float32 or float64 rows on a CPU with the
C++ kernels built and chosen for decode attention, weights the C++ products take, no gradient, eval mode, and not
inside ``torch.compile`` (a compiled step fuses the layer-by-layer graph itself). ``unfused()`` turns it off, to
compare or measure.

A step passes ~25 tensors per layer: gathered through ``nn.Module.__getattr__`` at every step, that alone cost ~40 us
per layer, so they are gathered once into a plan, kept until the model's modules or tensors are replaced. The plan
also holds each projection's weight packed along output features (``kernels.cpp.pack_weight``), the form in which the
C++ products run 2-3x faster at a handful of rows: a copy, as large as the weights as stored (int8, bfloat16 or the
model's dtype), made at the first fused step and again whenever a weight changes in place (an optimizer step,
``load_state_dict``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.nn.modules.module import (register_module_buffer_registration_hook, register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)

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


def try_decode(transformer: nn.Module, x: torch.Tensor, cache, pos: torch.Tensor) -> torch.Tensor | None:
    """``Transformer.forward`` of one position per row through the fused layers, or None where they do not apply
    (nothing is written then): x (batch, 1, dim) at ``pos`` (0-dim or (batch,)) through every layer, reading and
    writing ``cache``."""
    k0 = cache.layer(0)[0]
    if not (_enabled and x.dtype in _DTYPES and x.device.type == "cpu" and k0.dtype == x.dtype):
        return None
    if transformer.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or not cpp.available():
        return None
    if kernels.choose_decode_backend(x) != "cpp":  # e.g. DALLE_ENGINE_ATTENTION=reference
        return None
    plan = _plan(transformer)
    if not plan.takes(x.dtype):
        return None
    rotary = None
    if transformer.rotary is not None:
        angles = transformer.rotary.index_select(0, pos.view(-1))  # (1 or batch, rot)
        rotary = (angles.cos(), angles.sin())
    shift = None if transformer.shift_weights is None else transformer.shift_weights.index_select(0, pos.view(-1))
    h = x[:, 0]
    if plan.reversible:
        h = torch.cat([h, h], dim=-1)
    for i, (attn, ff, pattern, geometry) in enumerate(plan.layers):
        h = cpp.decode_layer(h, attn, ff, *cache.layer(i), pos, rotary=rotary, rings=cache.rings(i),
                             shift_weights=shift, pattern=pattern, **geometry, eps=plan.eps,
                             reversible=plan.reversible)
    if plan.reversible:
        h = torch.stack(h.chunk(2, dim=-1)).mean(dim=0)
    return h[:, None]


class _Plan(NamedTuple):
    """What a fused step passes for each layer, gathered once: (attention tensors, feed-forward tensors, pattern,
    geometry) per layer, with the projections' weights packed; every projection's weight as the model holds it (their
    dtypes decide whether the C++ products take them) and its version when packed; the norms' eps and whether the
    layers are reversible."""

    generation: int
    layers: list[tuple[list, list, str, dict]]
    weights: list[torch.Tensor]
    versions: list[int]
    eps: float
    reversible: bool

    def takes(self, dtype: torch.dtype) -> bool:
        return all(kernel_takes(w.dtype, dtype) for w in self.weights)

    def current(self) -> bool:
        """Whether the packed weights are still the model's: none replaced, none changed in place."""
        return self.generation == _generation and all(w._version == v for w, v in zip(self.weights, self.versions))


# Bumped whenever a module, parameter or buffer is registered anywhere (module surgery such as quantize_weights, a
# parameter replaced) and after every optimizer step (fused optimizers change weights in place without bumping their
# version counters): a plan gathered before then may hold replaced tensors or stale packed copies, so it is gathered
# again. Casts and moves (Module._apply) replace tensors too: Transformer._apply calls forget. Modules whose class
# says ``holds_weights = False`` (a KV cache, made for every sampling call) do not count.
_generation = 0


def _changed(owner, *_) -> None:
    global _generation
    if getattr(owner, "holds_weights", True):
        _generation += 1


for _register in (register_module_module_registration_hook, register_module_parameter_registration_hook,
                  register_module_buffer_registration_hook, register_optimizer_step_post_hook):
    _register(_changed)


def forget(transformer: nn.Module) -> None:
    """Drop ``transformer``'s gathered plan (its tensors are about to be replaced)."""
    transformer.__dict__.pop("_fused_plan", None)


def _plan(transformer: nn.Module) -> _Plan:
    plan = transformer.__dict__.get("_fused_plan")
    if plan is None or not plan.current():
        forget(transformer)  # the old packed copies go before the new ones are made
        layers, weights, packed = [], [], {}  # packed: by id, once for weights the layers share
        for layer in transformer.layers:
            attn, ff = (layer._modules[name] for name in ("attn", "ff"))
            fn = attn.fn
            branches = _branch(attn), _branch(ff)
            for branch in branches:
                for i in _WEIGHTS:
                    weights.append(branch[i])
                    if id(branch[i]) not in packed:
                        packed[id(branch[i])] = _packed(branch[i])
                    branch[i] = packed[id(branch[i])]
            layers.append((*branches, fn.pattern, fn.geometry))
        plan = _Plan(_generation, layers, weights, [w._version for w in weights], transformer.layers[0].attn.norm.eps,
                     transformer.reversible)
        transformer.__dict__["_fused_plan"] = plan
    return plan


_WEIGHTS = (cpp.BRANCH_TENSORS.index("in_weight"), cpp.BRANCH_TENSORS.index("out_weight"))


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` packed for the C++ products, or as it is where its output features are not a multiple of 16."""
    return weight if weight.shape[0] % cpp.PACK_LANES else cpp.pack_weight(weight)


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
