"""The Triton weight-only int8 linear layer (``kernels/triton/linear.py``), run by Triton's CPU interpreter.

Checked against the float64 product with the weight it stands for (q * scale), with the error budget of the C++
linear kernel's tests (``test_small_linear.py``): twice F.linear's float32 accumulation error at the same shape, in
units of float32's eps times each element's root-sum-square of products, plus one rounding of the result in its
dtype (the whole error of an fp16 or bf16 result but for cancellation). Row counts cover each row tile (16, 32, 64)
and a partial one, feature counts partial tiles of 64 outputs and of 128 inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from kernels.triton import weight_only_linear  # noqa: E402
from kernels.triton.linear import weight_only_linear_op  # noqa: E402
from test_small_linear import EPS32, exact_and_scale, float32_error  # noqa: E402

from engine.model.quantize import int8_per_feature  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16)


def operands(rows: int, in_features: int, out_features: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen, dtype=torch.float64).to(dtype)
    q, scale = int8_per_feature(torch.randn(out_features, in_features, generator=gen))
    bias = torch.randn(out_features, generator=gen, dtype=torch.float64).to(dtype)
    return x, q, scale, bias


def check(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    assert out.dtype == x.dtype and out.shape == (x.shape[0], q.shape[0])
    exact, products = exact_and_scale(x, q.double() * scale.double()[:, None], bias)
    budget = 2 * float32_error(*x.shape) * EPS32 * products + torch.finfo(x.dtype).eps * exact.abs()
    err = (out.double() - exact).abs()
    worst = int((err - budget).argmax())
    assert (err <= budget).all(), f"error {err.flatten()[worst]:.3g} > budget {budget.flatten()[worst]:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64, 100])
def test_matches_float64(dtype: torch.dtype, rows: int) -> None:
    for in_features, out_features in ((1, 1), (7, 5), (130, 70), (256, 192)):
        x, q, scale, bias = operands(rows, in_features, out_features, dtype, seed=rows + in_features)
        check(weight_only_linear(x, q, scale, bias), x, q, scale, bias)
        check(weight_only_linear(x, q, scale), x, q, scale, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows_and_sliced_weight(dtype: torch.dtype) -> None:
    x, q, scale, bias = operands(9, 300, 200, dtype, seed=3)
    for rows in (x.t().contiguous().t(), torch.cat([x, x], dim=1)[:, 150:450]):
        check(weight_only_linear(rows[:, :300], q, scale, bias), rows[:, :300], q, scale, bias)
    # The image rows of a logits projection: a row slice of a bigger weight, read in place.
    check(weight_only_linear(x, q[50:], scale[50:], bias[50:]), x, q[50:], scale[50:], bias[50:])


def test_bad_arguments() -> None:
    x, q, scale, bias = operands(3, 8, 5, torch.bfloat16, seed=4)
    bad = {
        "supports fp16 and bf16 rows": (x.float(), q, scale, None),
        r"x must be \(rows, in\)": (x[:, :7], q, scale, None),
        "weight must be int8": (x, q.float(), scale, None),
        r"scale float32 of shape \(5,\)": (x, q, scale[:4], None),
        r"bias must be \(5,\) in x's dtype": (x, q, scale, bias.float()),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            weight_only_linear(*args)


def test_op_passes_opcheck() -> None:
    x, q, scale, bias = operands(4, 32, 24, torch.float16, seed=5)
    for args in ((x, q, scale, bias), (x, q, scale, None)):
        torch.library.opcheck(weight_only_linear_op, args)
