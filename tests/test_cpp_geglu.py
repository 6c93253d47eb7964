"""The C++ GEGLU (``kernels.cpp.geglu``, the feed-forward's on a CPU) against ATen's operations (the plain path).

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


def plain(x: torch.Tensor) -> torch.Tensor:
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)


def value_and_grad(fn, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    out = fn(x)
    out.backward(grad)
    return out.detach(), x.grad


def inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(shape, dtype=torch.float64) * 3  # GELU's curved part and both tails
    grad = torch.randn(*shape[:-1], shape[-1] // 2, dtype=torch.float64)
    return x.to(dtype), grad.to(dtype)


@pytest.mark.parametrize("shape", [(4, 7, 2 * 37), (3, 2 * 1024), (1, 2)])  # odd widths: the vector loops' remainders
def test_float64_matches_plain(shape: tuple[int, ...]) -> None:
    x, grad = inputs(shape, torch.float64)
    for got, want in zip(value_and_grad(cpp.geglu, x, grad), value_and_grad(plain, x, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_float32_error_budget() -> None:
    x, grad = inputs((64, 2 * 512), torch.float64)
    exact = value_and_grad(plain, x, grad)
    ours = value_and_grad(cpp.geglu, x.float(), grad.float())
    theirs = value_and_grad(plain, x.float(), grad.float())
    for got, ref, want in zip(ours, theirs, exact):
        ulps = 4 * torch.finfo(torch.float32).eps * want.abs().max()
        assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + ulps


def test_derivative_by_finite_differences() -> None:
    x = torch.randn(3, 2 * 5, dtype=torch.float64, requires_grad=True) * 3
    assert torch.autograd.gradcheck(cpp.geglu, (x.detach().requires_grad_(),))


def test_rows_independent_and_strided_input() -> None:
    x = torch.randn(6, 4 * 33)[:, ::2]  # strided rows
    out = cpp.geglu(x)
    assert torch.equal(out[2:3], cpp.geglu(x[2:3].contiguous()))  # a row alone gives the same bits
    torch.testing.assert_close(out, plain(x))


def test_ops_pass_opcheck() -> None:
    x, grad = inputs((2, 3, 2 * 16), torch.float32)
    torch.library.opcheck(torch.ops.dalle_engine_cpu.geglu_fwd.default, (x,))
    torch.library.opcheck(torch.ops.dalle_engine_cpu.geglu_bwd.default, (x, grad))


def test_rejects_odd_width_and_integers() -> None:
    with pytest.raises(RuntimeError, match="even"):
        cpp.geglu(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpp.geglu(torch.ones(2, 4, dtype=torch.int64))


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

    calls = []
    monkeypatch.setattr(cpp, "geglu", lambda x, fused=cpp.geglu: calls.append(1) or fused(x))
    fused = loss_and_grads()
    assert len(calls) == config.depth
    monkeypatch.setattr(transformer, "geglu", plain)
    for got, want in zip(fused, loss_and_grads()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
