"""The C++ GEGLU (``kernels.cpp.geglu``, the feed-forward's on a CPU, with or without the projection's bias) against
ATen's operations (the plain path).

float64 must match to 1e-12. In float32 the kernel's max error vs float64, forward and backward, may be at most twice
plain float32's own plus a few float32 ulps (the project's rule for fast paths).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import transformer
from engine.model.config import DALLEConfig
from engine.model.dalle import DALLE
from kernels import cpp

pytestmark = [pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}"),
              pytest.mark.usefixtures("cpu_isa")]  # every test once per instruction set the CPU has


def plain(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    a, gate = (x if bias is None else x + bias).chunk(2, dim=-1)
    return a * F.gelu(gate)


def value_and_grads(fn, x: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor) -> list[torch.Tensor]:
    """fn(x, bias), and the gradients of x and (if any) the bias."""
    leaves = [t.detach().requires_grad_(True) for t in (x, bias) if t is not None]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def inputs(shape: tuple[int, ...], dtype: torch.dtype, with_bias: bool = False):
    """x, bias (or None) and an output gradient."""
    x = torch.randn(shape, dtype=torch.float64) * 3  # GELU's curved part and both tails
    bias = torch.randn(shape[-1], dtype=torch.float64) if with_bias else None
    grad = torch.randn(*shape[:-1], shape[-1] // 2, dtype=torch.float64)
    return x.to(dtype), None if bias is None else bias.to(dtype), grad.to(dtype)


# Odd widths: the vector loops' remainders; 200 rows: several blocks of the bias's partial sums, the last one short.
SHAPES = [(4, 7, 2 * 37), (3, 2 * 1024), (1, 2), (200, 2 * 24)]


@pytest.mark.parametrize("with_bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_plain(shape: tuple[int, ...], with_bias: bool) -> None:
    x, bias, grad = inputs(shape, torch.float64, with_bias)
    for got, want in zip(value_and_grads(cpp.geglu, x, bias, grad), value_and_grads(plain, x, bias, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no bias", "bias"])
def test_float32_error_budget(with_bias: bool) -> None:
    x, bias, grad = inputs((256, 2 * 512), torch.float64, with_bias)
    exact = value_and_grads(plain, x, bias, grad)
    as_float = [None if t is None else t.float() for t in (x, bias, grad)]
    ours, theirs = value_and_grads(cpp.geglu, *as_float), value_and_grads(plain, *as_float)
    for got, ref, want in zip(ours, theirs, exact):
        ulps = 4 * torch.finfo(torch.float32).eps * want.abs().max()
        assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + ulps


def test_derivative_by_finite_differences() -> None:
    x = (torch.randn(3, 2 * 5, dtype=torch.float64) * 3).requires_grad_()
    bias = torch.randn(2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cpp.geglu, (x,))
    assert torch.autograd.gradcheck(cpp.geglu, (x, bias))


def test_rows_independent_and_strided_input() -> None:
    x = torch.randn(6, 4 * 33)[:, ::2]  # strided rows
    out = cpp.geglu(x)
    assert torch.equal(out[2:3], cpp.geglu(x[2:3].contiguous()))  # a row alone gives the same bits
    torch.testing.assert_close(out, plain(x))


def test_bias_gradient_same_bits_on_any_thread_count() -> None:
    x, bias, grad = inputs((300, 2 * 40), torch.float32, with_bias=True)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(torch.ops.dalle_engine_cpu.geglu_bwd(x, bias, grad))
    finally:
        torch.set_num_threads(threads)
    for dx, dbias in got[1:]:
        assert torch.equal(dx, got[0][0]) and torch.equal(dbias, got[0][1])


def test_ops_pass_opcheck() -> None:
    x, bias, grad = inputs((2, 3, 2 * 16), torch.float32, with_bias=True)
    torch.library.opcheck(torch.ops.dalle_engine_cpu.geglu_fwd.default, (x,))
    torch.library.opcheck(torch.ops.dalle_engine_cpu.geglu_fwd.default, (x, bias))
    torch.library.opcheck(torch.ops.dalle_engine_cpu.geglu_bwd.default, (x, None, grad))
    torch.library.opcheck(torch.ops.dalle_engine_cpu.geglu_bwd.default, (x, bias, grad))


def test_rejects_odd_width_integers_and_a_wrong_bias() -> None:
    with pytest.raises(RuntimeError, match="even"):
        cpp.geglu(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpp.geglu(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"bias must be \(4,\)"):
        cpp.geglu(torch.randn(2, 4), torch.randn(6))


def test_training_loss_and_gradients_match_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 DALL-E's training loss and every parameter gradient, with the feed-forward's GEGLU on the kernels
    and on ATen's operations."""
    config = DALLEConfig(num_text_tokens=50, text_seq_len=6, num_image_tokens=16, image_fmap_size=4, dim=32, depth=2,
                         heads=2, dim_head=16, attn_types=("full", "axial_row"))
    model = DALLE(config).double().train()
    text, codes = torch.randint(1, 50, (2, 6)), torch.randint(0, 16, (2, 16))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same null captions and dropout masks
        loss = model(text, codes, return_loss=True)
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    calls = []  # the bias each call was given: the training path leaves the projection's to the kernel
    monkeypatch.setattr(cpp, "geglu", lambda x, bias=None, fused=cpp.geglu: calls.append(bias) or fused(x, bias))
    fused = loss_and_grads()
    assert len(calls) == config.depth and all(bias is not None for bias in calls)
    monkeypatch.setattr(transformer, "geglu_kernel_takes", lambda h: False)
    for got, want in zip(fused, loss_and_grads()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
