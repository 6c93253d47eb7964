"""Weights packed along output features for the C++ products on a CPU (``kernels.cpp.pack_weight``), kept beside the
model's own weights for as long as those stay what they were when packed.

Products on a CPU through the C++ kernel (``engine.model.linear``: a handful of rows without gradients, or any number
while decoding) and the fused decode step (``engine.model.fused_decode``) read the packed copy: 1.5-3x faster, for a
copy as large as the weight as stored. Every such product packs, so a result never depends on which ran first.

A copy is current while its weight has the storage, dtype and version it had when packed (in-place changes bump the
version: ``load_state_dict``, ``copy_``; casts and moves swap the storage), and no module, parameter or buffer has been
registered and no optimizer has stepped since (module surgery replaces weights; fused optimizers change them in place
without bumping their versions). Modules whose class says ``holds_weights = False`` (a KV cache, made for every sampling
call) do not count. Changes through ``.data`` bypass versions: ``changed()`` marks every copy stale, and
``DALLE.train()`` / ``.eval()`` call it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.modules.module import (register_module_buffer_registration_hook, register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from kernels import cpp

_generation = 0


def _changed(owner, *_) -> None:
    global _generation
    # The class's attribute: a module being built may not answer getattr yet (torch.compile's wrapper registers its
    # first submodule through a __getattr__ that looks for that very submodule).
    if getattr(type(owner), "holds_weights", True):
        _generation += 1


for _register in (register_module_module_registration_hook, register_module_parameter_registration_hook,
                  register_module_buffer_registration_hook, register_optimizer_step_post_hook):
    _register(_changed)


def changed() -> None:
    """Make every copy stale: for weights changed where neither their version counters nor the hooks above see it
    (through ``.data``). ``DALLE.train()`` and ``.eval()`` call it, so a model sampled between training steps is
    packed again."""
    _changed(None)


def generation() -> int:
    """Bumped by every registration (but a KV cache's) and every optimizer step."""
    return _generation


class _Copy(NamedTuple):
    state: tuple  # _state(weight) when packed
    packed: torch.Tensor


_copies = WeakIdKeyDictionary()  # weight -> _Copy, by identity, dropped with the weight


def _state(weight: torch.Tensor) -> tuple:
    """What must not have changed for a packed copy of ``weight`` to stay current (its storage and dtype: a cast or
    move swaps a parameter's data in place)."""
    return _generation, weight._version, weight.data_ptr(), weight.dtype, weight.shape


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight``'s current packed copy, made if there is none. A slice of a weight's rows on group boundaries (a part
    of an output projection: the logits of one vocabulary) is that slice of the whole weight's copy. ``weight`` itself
    where it cannot be packed: output features not a multiple of ``kernels.cpp.PACK_LANES``, another view, or inside
    ``torch.compile`` (whose graphs pass the weights as they are)."""
    if torch.compiler.is_compiling():
        return weight
    base = weight._base
    if base is not None:
        rows = _group_rows(weight, base)
        whole = base if rows is None else pack(base)
        return weight if whole is base else whole[rows[0] // cpp.PACK_LANES: rows[1] // cpp.PACK_LANES]
    if weight.shape[0] % cpp.PACK_LANES:
        return weight
    state = _state(weight)
    copy = _copies.get(weight)
    if copy is None or copy.state != state:
        copy = _copies[weight] = _Copy(state, cpp.pack_weight(weight))
    return copy.packed


def _group_rows(view: torch.Tensor, base: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) when ``view`` is rows [start, stop) of the contiguous matrix ``base``, both multiples of
    ``kernels.cpp.PACK_LANES``; else None."""
    if base.dim() != 2 or view.dim() != 2 or not base.is_contiguous() or view.stride() != base.stride() or \
            view.shape[1] != base.shape[1] or base.shape[1] == 0:
        return None
    start, rest = divmod(view.storage_offset() - base.storage_offset(), base.stride(0))
    if rest or start % cpp.PACK_LANES or view.shape[0] % cpp.PACK_LANES:
        return None
    return start, start + view.shape[0]
