"""The training loss's output projection and cross-entropy in one pass over row chunks
(``engine.model.cross_entropy.linear_cross_entropy``) and its C++ rows (``kernels.cpp.cross_entropy_rows``), against
``F.cross_entropy(F.linear(...))``.

float64 must match to 1e-12. In float32 the loss's and every gradient's max error vs float64 may be at most twice the
plain float32 computation's own plus a few float32 ulps (the project's rule for fast paths).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import cross_entropy
from engine.model.cross_entropy import linear_cross_entropy
from kernels import cpp


def plain(x, weight, bias, target):
    return F.cross_entropy(F.linear(x, weight, bias), target)


def loss_and_grads(fn, x, weight, bias, target, scale: float = 1.0, **kwargs) -> list[torch.Tensor]:
    """fn's loss and the gradients of scale * loss in x, weight and (if any) bias."""
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    loss = fn(*leaves[:2], leaves[2] if bias is not None else None, target, **kwargs)
    return [loss.detach(), *torch.autograd.grad(scale * loss, leaves)]


def problem(rows: int, dim: int, vocabulary: int, dtype: torch.dtype, with_bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocabulary, dim, generator=gen, dtype=torch.float64) / dim ** 0.5 * 4  # peaked softmaxes
    bias = torch.randn(vocabulary, generator=gen, dtype=torch.float64) if with_bias else None
    target = torch.randint(0, vocabulary, (rows,), generator=gen)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), target


# (rows, dim, vocabulary, chunk): one chunk, several with a short last one, a chunk of one row, odd widths.
CASES = [(64, 32, 1000, None), (37, 16, 50, 8), (5, 7, 3, 1), (300, 24, 129, 128)]


def on_kernel(use: bool):
    """Whether the rows run on the C++ kernel (True) or ATen's operations (False, as off a CPU)."""
    if use and not cpp.available():
        pytest.skip(f"C++ kernels unavailable: {cpp.load_error()}")
    return use


@pytest.fixture(params=[True, False], ids=["C++ rows", "ATen rows"])
def rows_path(request, monkeypatch: pytest.MonkeyPatch) -> bool:
    if not on_kernel(request.param):
        monkeypatch.setattr(cross_entropy.cpp, "available", lambda: False)
    return request.param


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("case", CASES)
def test_float64_matches_plain(case, with_bias: bool, rows_path: bool) -> None:
    rows, dim, vocabulary, chunk = case
    x, weight, bias, target = problem(rows, dim, vocabulary, torch.float64, with_bias)
    got = loss_and_grads(linear_cross_entropy, x, weight, bias, target, scale=0.7, chunk=chunk)
    want = loss_and_grads(plain, x, weight, bias, target, scale=0.7)
    assert len(got) == len(want)
    for name, g, w in zip(("loss", "dx", "dweight", "dbias"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=name)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("chunk", [None, 100])
def test_float32_error_budget(chunk: int | None, rows_path: bool) -> None:
    x, weight, bias, target = problem(512, 64, 2000, torch.float64)
    exact = loss_and_grads(plain, x, weight, bias, target)
    as_float = [t.float() for t in (x, weight, bias)]
    ours = loss_and_grads(linear_cross_entropy, *as_float, target, chunk=chunk)
    theirs = loss_and_grads(plain, *as_float, target)
    for name, got, ref, want in zip(("loss", "dx", "dweight", "dbias"), ours, theirs, exact):
        ulps = 4 * torch.finfo(torch.float32).eps * want.abs().max()
        assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + ulps, name


def test_frozen_inputs_get_no_gradient_and_no_grad_gives_the_loss() -> None:
    x, weight, bias, target = problem(20, 8, 30, torch.float64)
    weight.requires_grad_(True)
    loss = linear_cross_entropy(x, weight, bias, target, chunk=6)
    (dweight,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(dweight, torch.autograd.grad(plain(x, weight, bias, target), weight)[0],
                               rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, weight, bias, target, chunk=6),
                                   plain(x, weight, bias, target), rtol=0, atol=1e-12)


def test_no_rows_give_nan_and_zero_gradients() -> None:
    x, weight, bias, target = problem(0, 8, 30, torch.float64)
    got = loss_and_grads(linear_cross_entropy, x, weight, bias, target)
    want = loss_and_grads(plain, x, weight, bias, target)
    assert got[0].isnan() and want[0].isnan()
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g, w)


def test_second_backward_through_a_retained_graph() -> None:
    x, weight, bias, target = problem(20, 8, 30, torch.float64)
    x.requires_grad_(True)
    loss = linear_cross_entropy(x, weight, bias, target)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(3 * loss, x)[0]
    torch.testing.assert_close(second, 3 * first, rtol=0, atol=1e-14)


def test_autocast_and_half_precision_take_the_plain_calls() -> None:
    x, weight, bias, target = problem(16, 8, 30, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, weight, bias, target)
        want = plain(x, weight, bias, target)
    assert torch.equal(got, want)
    half = [t.bfloat16() for t in (x, weight, bias)]
    assert torch.equal(linear_cross_entropy(*half, target), plain(*half, target))


def test_rejects_bad_shapes_and_targets() -> None:
    x, weight, bias, target = problem(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=r"x must be \(rows, dim\)"):
        linear_cross_entropy(x[None], weight, bias, target)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(x, weight, bias, target[:3])
    if cpp.available():
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            linear_cross_entropy(x, weight, bias, torch.tensor([0, 1, 10, 2]))


@pytest.mark.skipif(not cpp.available(), reason="C++ kernels unavailable")
def test_rows_op_passes_opcheck_and_rows_are_independent() -> None:
    logits = torch.randn(6, 33) * 5
    bias, target = torch.randn(33), torch.randint(0, 33, (6,))
    torch.library.opcheck(torch.ops.dalle_engine_cpu.cross_entropy_rows.default, (logits.clone(), bias, target, True))
    whole = logits.clone()
    loss = cpp.cross_entropy_rows(whole, bias, target, True)
    row = logits[2:3].clone()
    assert torch.equal(cpp.cross_entropy_rows(row, bias, target[2:3], True), loss[2:3])  # a row alone: same bits
    assert torch.equal(row, whole[2:3])
