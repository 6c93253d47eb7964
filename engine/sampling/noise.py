"""Counter-based random numbers: every value is a hash of (row key, step, column), so a row's numbers depend only on
its own key, never on the rows sampled beside it, the batch size, the process or the device.

Arithmetic stays in int64 tensors holding 32-bit words: products of two words below 2^32 could overflow int64, so
each multiplication goes by 16-bit halves. Everything is element-wise tensor code: no host synchronisation, and it
traces under ``torch.compile`` and CUDA graphs; on a CPU a C++ kernel computes the same bits.
"""

from __future__ import annotations

import torch

from kernels import cpp

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 32-bit words x and constant c, without int64 overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + (((high * c) & 0xFFFF) << 16)) & _MASK


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32"); x: int64 words in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """The key of each row: a hash of (seed, index), e.g. an image's index among the images of its prompt."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in [0, 2^63), got {seed}")
    seed_word = hash32(hash32(torch.tensor(seed & _MASK)) ^ (seed >> 32))
    return hash32(seed_word.to(indices.device) ^ hash32((indices.long() * _GOLDEN) & _MASK))


def uniform(keys: torch.Tensor, step: torch.Tensor | int, columns: int) -> torch.Tensor:
    """(rows, columns) float32 uniforms in (0, 1), 24 bits each: value (r, c) hashes (keys[r], step, c). On a CPU the
    C++ kernel computes the same bits in one pass (the tensor code below is ~55 operations per call)."""
    if keys.device.type == "cpu" and cpp.available():
        return cpp.counter_uniform(keys, torch.as_tensor(step), columns)
    return tensor_uniform(keys, step, columns)


def tensor_uniform(keys: torch.Tensor, step: torch.Tensor | int, columns: int) -> torch.Tensor:
    """``uniform`` in element-wise tensor code, on any device."""
    step_word = hash32((keys ^ (torch.as_tensor(step, device=keys.device) * _GOLDEN)) & _MASK)
    column = torch.arange(columns, device=keys.device)
    words = hash32(hash32(step_word[:, None] ^ column) ^ keys[:, None])
    return ((words >> 8).float() + 0.5) * 2.0**-24


def gumbel(keys: torch.Tensor, step: torch.Tensor | int, columns: int) -> torch.Tensor:
    """(rows, columns) standard Gumbel noise from ``uniform``: argmax(logits + noise) samples softmax(logits)."""
    return -torch.log(-torch.log(uniform(keys, step, columns)))
