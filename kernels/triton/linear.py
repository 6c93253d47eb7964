"""Triton weight-only int8 linear layer: y = (x @ q^T) * scale + bias, with q int8 (out, in) and one float32 scale
per output feature (``engine.model.quantize``), x fp16 or bf16 (rows, in): how a GPU samples (fp32 rows take
PyTorch's product with the weight converted, ``engine.model.linear``).

Sampling multiplies a few rows by every weight matrix, so the product is bound by reading the weight: the kernel
reads it once as int8 (a quarter of fp32's bytes, half of bf16's) and converts each tile to x's dtype in registers
right before the tensor-core product, where converting the whole weight first would write and re-read it at twice
its size. A program takes ``BLOCK_M`` rows (16 to 64, as few as cover the rows) by ``BLOCK_N`` output features and
walks the input features; scale and bias are applied to its float32 accumulator. Wrapped as the torch op
``dalle_engine::weight_only_linear`` (with a fake implementation), opaque to ``torch.compile`` and CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _device_guard, _interpreting

__all__ = ["weight_only_linear"]

_DTYPES = (torch.float16, torch.bfloat16)
_BLOCK_N = 64
_BLOCK_K = 128


@triton.jit
def _w8_linear_kernel(X, W, S, B, Y, M, N, K, sxm, sxk, swn, swk, sym, syn,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(X + offs_m[:, None] * sxm + k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :] * swn + k[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if UPCAST:  # exact products in fp32, as tensor cores form them
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:  # tensor cores; |q| <= 127 is exact in fp16 and bf16
            acc += tl.dot(x, w.to(x.dtype))
    acc *= tl.load(S + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows, out_features = x.shape[0], weight.shape[0]
    # The interpreter rounds fp32 to bf16 by truncation: there the kernel writes fp32 and torch rounds to nearest.
    upcast = x.dtype == torch.bfloat16 and _interpreting()
    y = x.new_empty(rows, out_features, dtype=torch.float32 if upcast else x.dtype)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, _BLOCK_N))
    with _device_guard(x):
        _w8_linear_kernel[grid](x, weight, scale, bias, y, rows, out_features, x.shape[1], *x.stride(),
                                *weight.stride(), *y.stride(), HAS_BIAS=bias is not None,
                                # the interpreter multiplies raw bf16 bit patterns in tl.dot (kernels.md §6.2)
                                UPCAST=_interpreting(), BLOCK_M=block_m,
                                BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
                                num_warps=4, num_stages=3)
    return y.to(x.dtype)


@torch.library.custom_op("dalle_engine::weight_only_linear", mutates_args=())
def weight_only_linear_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """``(rows, out)`` in x's dtype."""
    return _launch(x, weight, scale, bias)


@weight_only_linear_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * scale[:, None], bias)`` reading the int8 ``weight`` as stored.

    Args:
        x: ``(rows, in)`` fp16 or bf16, any strides, on a CUDA device (or on CPU under ``TRITON_INTERPRET=1``).
        weight: ``(out, in)`` int8, any strides; scale: ``(out,)`` float32; bias: ``(out,)`` in x's dtype, or None.

    Returns:
        ``(rows, out)`` in x's dtype, from a float32 accumulator.
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"triton weight_only_linear supports fp16 and bf16 rows, got {x.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (rows, in) and weight (out, in), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != torch.int8 or scale.dtype != torch.float32 or scale.shape != (weight.shape[0],):
        raise ValueError(f"weight must be int8 and scale float32 of shape ({weight.shape[0]},), got {weight.dtype} "
                         f"and {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) in x's dtype {x.dtype}, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if x.device.type == "cpu" and not _interpreting():
        raise ValueError("triton weight_only_linear needs GPU tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if len({x.device, weight.device, scale.device} | ({bias.device} if bias is not None else set())) != 1:
        raise ValueError("x, weight, scale and bias must be on one device")
    return weight_only_linear_op(x, weight, scale.contiguous(), None if bias is None else bias.contiguous())
