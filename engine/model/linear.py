"""``nn.Linear`` with faster CPU paths for a handful of rows, the shape of every matrix product while decoding."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.model import packed
from kernels import cpp
from kernels import triton as triton_kernels

# Rows up to which the C++ kernel (``kernels.cpp.small_linear``) is used: it wins clearly up to 8 rows; at 16 it wins
# with the weight out of cache (1.1-1.4x) and loses with it in cache (0.7-1.0x), a net gain in the decode step.
SMALL_LINEAR_MAX_ROWS = 16
# Rows up to which ``weight @ x^T`` beats ``F.linear``.
ADDMM_MAX_ROWS = 128
_SMALL_LINEAR_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_NARROW_WEIGHTS = (torch.bfloat16, torch.float16)  # stored beside float32 x (weight-only)
_TRITON_INT8_ROWS = (torch.float16, torch.bfloat16)  # what the Triton int8 kernel takes (tensor cores)
_row_invariant = False


@contextlib.contextmanager
def row_invariant() -> Iterator[None]:
    """Inside: every CPU product the C++ kernel can compute goes to it, whatever the number of rows. Its rows are
    computed one by one in a fixed order, so a row's result never depends on the rows beside it (float32 and
    float64), which a BLAS GEMM does not promise (its blocking follows the matrix shape): what makes sampled images
    independent of the batch they were sampled in."""
    global _row_invariant
    before, _row_invariant = _row_invariant, True
    try:
        yield
    finally:
        _row_invariant = before


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with faster CPU paths for few rows, where the product is bound by streaming the weight from memory.

    The weight may be stored in fewer bits than x (``engine.model.quantize``): int8 with ``scale``, one float32 per
    output feature (``F.linear(x, weight * scale[:, None], bias)``), or bfloat16 beside float32 x. On a CPU the C++
    kernel reads it as stored whenever it takes the product, and on a GPU the Triton kernel reads int8 weights beside
    fp16 / bf16 rows; elsewhere the weight is converted to x's dtype for the product and the scale applied to its
    result.

    Up to ``SMALL_LINEAR_MAX_ROWS`` rows (all leading dims together) it runs the C++ kernel, which reads the weight
    once for all rows; it has no autograd, so only where no gradient is needed (under ``no_grad`` or
    ``inference_mode``, as when decoding, or with no input requiring grad). Otherwise, up to ``ADDMM_MAX_ROWS`` rows,
    it computes ``weight @ x^T``, which the CPU BLAS does faster than ``F.linear`` in that regime. Measured on a 2-core
    EPYC, 4 rows of a 2048 x 256 float32 weight in cache / out of cache: C++ kernel 84 / 196 us, ``weight @ x^T``
    156 / 222 us, ``F.linear`` 150 / 600 us (18 GB/s, a plain 2-thread read, would take 116 us out of cache).
    Inside ``row_invariant()`` the C++ kernel takes every row count.
    """
    # Dispatch costs a few us per call against products of tens of us: attribute checks kept to the cheap ones.
    if x.dim() < 2:
        return _converted_linear(x, weight, bias, scale)
    flat = x if x.dim() == 2 else x.flatten(0, -2)
    rows = flat.shape[0]
    if rows == 0 or flat.shape[1] == 0:
        return _converted_linear(x, weight, bias, scale)
    if x.is_cuda and weight.dtype == torch.int8 and x.dtype in _TRITON_INT8_ROWS and triton_kernels.available():
        # reads the int8 weight as stored: converting it first would write and re-read it at twice its size
        out = triton_kernels.weight_only_linear(flat, weight, scale, bias)
    elif not x.is_cpu or (rows > ADDMM_MAX_ROWS and not _row_invariant):
        return _converted_linear(x, weight, bias, scale)
    elif (rows <= SMALL_LINEAR_MAX_ROWS or _row_invariant) and _small_linear_applies(x, weight, bias, scale):
        out = cpp.small_linear(flat, packed.pack(weight), bias, scale)  # 1.5-3x faster packed (engine.model.packed)
    elif weight.dtype != x.dtype:
        return _converted_linear(x, weight, bias, scale)
    elif 2 <= rows <= ADDMM_MAX_ROWS:
        out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
        out = out.t()
    else:
        return F.linear(x, weight, bias)
    return out if x.dim() == 2 else out.unflatten(0, x.shape[:-1])


def _converted_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      scale: torch.Tensor | None) -> torch.Tensor:
    """The product with a stored weight converted to x's dtype, the int8 scale applied to the result (one multiply
    per output, not per weight element); ``F.linear`` itself when the weight is x's dtype."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    out = F.linear(x, weight.to(x.dtype))
    if scale is not None:
        out = out * scale.to(x.dtype)
    return out if bias is None else out + bias


def kernel_takes(weight: torch.dtype, x: torch.dtype) -> bool:
    """Whether the C++ kernel takes a weight of dtype ``weight`` beside rows of dtype ``x``: x's own, int8 (with a
    scale), or bfloat16 / float16 beside float32."""
    return weight == x or weight == torch.int8 or (weight in _NARROW_WEIGHTS and x == torch.float32)


def _small_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          scale: torch.Tensor | None) -> bool:
    """Whether the C++ kernel can compute this product: built, no gradient wanted, and arguments it takes."""
    if not cpp.available() or x.dtype not in _SMALL_LINEAR_DTYPES or not weight.is_cpu:
        return False
    if not kernel_takes(weight.dtype, x.dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False
    if weight.dim() != 2 or (weight.shape[1] > 1 and weight.stride(1) != 1):
        return False
    if scale is not None and not (scale.is_cpu and scale.dtype == torch.float32):
        return False
    return bias is None or (bias.dim() == 1 and bias.dtype == x.dtype and bias.is_cpu)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def part(self, x: torch.Tensor, features: slice) -> torch.Tensor:
        """Only the output features ``features`` (the rest of the product skipped)."""
        return linear(x, self.weight[features], None if self.bias is None else self.bias[features])
