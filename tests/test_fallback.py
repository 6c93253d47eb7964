"""Dispatch falls back when a Triton (or FlexAttention) kernel fails on the GPU at hand, instead of crashing.

Driven on a CPU: ``kernels._on_gpu`` is patched so that float64 CPU tensors qualify for Triton, and the Triton entry
points are replaced by stubs that fail as a kernel does at its first call (compile or launch)."""

import ast
import warnings

import pytest
import torch

import kernels
from kernels import fallback

GEOMETRY = dict(text_len=5, fmap_size=4)
CPU = torch.device("cpu")


def qkv(requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 5 + 16, 8, dtype=torch.float64, generator=generator).requires_grad_(requires_grad)
            for _ in range(3)]


def compilation_error(message: str) -> Exception:
    try:
        from triton.compiler.errors import CompilationError
    except ImportError:  # a stand-in: dispatch recognises Triton's errors by their module
        return type("CompilationError", (Exception,), {"__module__": "triton.compiler.errors"})(message)
    src = "acc = tl.dot(q, k)"
    return CompilationError(src, ast.parse(src).body[0], message)


class Failing:
    """A kernel stub that raises ``error`` at every call, counting the calls."""

    def __init__(self, error: Exception):
        self.error, self.calls = error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.error


def recording(fn):
    """``fn()`` and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


@pytest.fixture
def gpu(monkeypatch):
    """Dispatch as on a GPU with Triton installed, no failure remembered yet and FlexAttention unavailable."""
    monkeypatch.setattr(kernels, "_on_gpu", lambda q: True)
    monkeypatch.setattr(kernels, "_TRITON_DTYPES", (*kernels._TRITON_DTYPES, torch.float64))
    monkeypatch.setattr(kernels.triton_kernels, "available", lambda: True)
    monkeypatch.setattr(kernels.flex, "available", lambda: False)
    monkeypatch.setattr(kernels, "_warned_no_triton", False)
    monkeypatch.setattr(fallback, "_broken", {})
    monkeypatch.setattr(fallback, "_backward_checked", set())
    monkeypatch.delenv("DALLE_ENGINE_ATTENTION", raising=False)


def sparse(q, k, v, pattern="axial_row", **kwargs):
    return kernels.sparse_attention(q, k, v, pattern=pattern, **GEOMETRY, **kwargs)


def decode(q, k, v, pos=9, **kwargs):
    return kernels.decode_attention(q[:, :, pos], k, v, pos, pattern="axial_row", **GEOMETRY, **kwargs)


def assert_reference_output_and_grads(out, q, k, v, pattern="axial_row"):
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    expected = kernels.reference.sparse_attention(*inputs, pattern=pattern, **GEOMETRY)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    for grad, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(expected, inputs, dout)):
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


def test_a_failing_triton_kernel_falls_back_to_the_reference_once(gpu, monkeypatch):
    triton, triton_decode = Failing(compilation_error("unsupported on sm_61")), Failing(RuntimeError("unreachable"))
    monkeypatch.setattr(kernels.triton_kernels, "sparse_attention", triton)
    monkeypatch.setattr(kernels.triton_kernels, "decode_attention", triton_decode)
    q, k, v = qkv(requires_grad=True)
    out, messages = recording(lambda: sparse(q, k, v))
    assert len(messages) == 1, messages
    assert "Triton attention failed on cpu; using the pure-PyTorch reference instead" in messages[0]
    assert "CompilationError: " in messages[0] and "unsupported on sm_61" in messages[0]
    assert_reference_output_and_grads(out, q, k, v)

    # Later calls, and decoding on the same device, go straight to the reference.
    out, messages = recording(lambda: sparse(q, k, v, pattern="conv_like"))
    assert messages == [] and triton.calls == 1
    assert_reference_output_and_grads(out, q, k, v, pattern="conv_like")
    q, k, v = qkv()
    out, messages = recording(lambda: decode(q, k, v))
    assert messages == [] and triton_decode.calls == 0
    torch.testing.assert_close(out, decode(q, k, v, backend="reference"), rtol=0, atol=0)


def test_a_failing_triton_decode_kernel_falls_back_to_the_reference_once(gpu, monkeypatch):
    triton = Failing(RuntimeError("CUDA error: no kernel image is available for execution on the device"))
    monkeypatch.setattr(kernels.triton_kernels, "decode_attention", triton)
    q, k, v = qkv()
    out, messages = recording(lambda: decode(q, k, v))
    assert len(messages) == 1 and "RuntimeError: CUDA error: no kernel image" in messages[0], messages
    torch.testing.assert_close(out, decode(q, k, v, backend="reference"), rtol=0, atol=0)
    out, messages = recording(lambda: decode(q, k, v, pos=12))
    assert messages == [] and triton.calls == 1
    assert kernels.choose_backend(q, "axial_row") == "reference"  # remembered for the device, not the op


def test_flexattention_comes_first_and_falls_back_to_the_reference_when_it_cannot_compile(gpu, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    triton = Failing(RuntimeError("Triton Error [CUDA]: device kernel image is invalid"))
    monkeypatch.setattr(kernels.triton_kernels, "sparse_attention", triton)
    monkeypatch.setattr(kernels.flex, "available", lambda: True)
    # Eager FlexAttention stands in for the compiled one (this torch cannot compile it for float64 CPU tensors).
    monkeypatch.setattr(kernels.flex, "_compiled", flex_attention)
    q, k, v = qkv()
    for pattern in ("axial_row", "axial_col", "conv_like_centered"):
        out, messages = recording(lambda: sparse(q, k, v, pattern=pattern))
        messages = [m for m in messages if "without torch.compile" not in m]  # eager FlexAttention's own warning
        assert messages == (["Triton attention failed on cpu; using FlexAttention instead for the rest of this "
                             "process. Cause: RuntimeError: Triton Error [CUDA]: device kernel image is invalid"]
                            if pattern == "axial_row" else [])
        torch.testing.assert_close(out, sparse(q, k, v, pattern=pattern, backend="reference"), rtol=0, atol=1e-12)
    assert triton.calls == 1

    flex = Failing(RuntimeError("InductorError: no working Triton installation"))
    monkeypatch.setattr(kernels.flex, "_compiled", flex)
    q, k, v = qkv(requires_grad=True)
    out, messages = recording(lambda: sparse(q, k, v))
    assert len(messages) == 1 and "FlexAttention attention failed on cpu; using the pure-PyTorch reference" in \
        messages[0] and "InductorError: no working Triton" in messages[0], messages
    assert_reference_output_and_grads(out, q, k, v)
    out, messages = recording(lambda: sparse(q, k, v))
    assert messages == [] and triton.calls == 1 and flex.calls == 1


def test_a_backward_that_fails_falls_back_at_the_first_call(gpu, monkeypatch):
    """The backward kernels compile in ``loss.backward()``, where nothing can fall back: dispatch runs them once at
    the first differentiable call."""
    calls = []

    class ForwardOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return kernels.reference.sparse_attention(q, k, v, pattern="axial_row", **GEOMETRY)

        @staticmethod
        def backward(ctx, dout):
            raise compilation_error("out of resource: shared memory, Required: 180224, Hardware limit: 101376")

    def triton(q, k, v, **kwargs):
        calls.append(1)
        return ForwardOnly.apply(q, k, v)

    monkeypatch.setattr(kernels.triton_kernels, "sparse_attention", triton)
    q, k, v = qkv(requires_grad=True)
    out, messages = recording(lambda: sparse(q, k, v))
    assert len(messages) == 1 and "shared memory" in messages[0]
    assert_reference_output_and_grads(out, q, k, v)
    sparse(q, k, v)
    assert len(calls) == 1


def test_a_forced_backend_raises_the_failure(gpu, monkeypatch):
    error = compilation_error("unsupported on sm_61")
    monkeypatch.setattr(kernels.triton_kernels, "sparse_attention", Failing(error))
    monkeypatch.setattr(kernels.triton_kernels, "decode_attention", Failing(error))
    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error), match="unsupported on sm_61"):
            sparse(q, k, v, backend="triton")
        with pytest.raises(type(error)):
            decode(q, k, v, backend="triton")
        monkeypatch.setenv("DALLE_ENGINE_ATTENTION", "triton")
        with pytest.raises(type(error)):
            sparse(q, k, v)
    assert not fallback.broken("triton", CPU)


def test_user_errors_are_not_swallowed(gpu, monkeypatch):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="shapes differ"):
        sparse(q, k[:, :1], v)
    with pytest.raises(ValueError, match="seq_len must be"):
        kernels.sparse_attention(q, k, v, pattern="axial_row", text_len=5, fmap_size=3)
    # Errors a fallback would not fix propagate, and Triton stays chosen.
    for error in (ValueError("a bug of ours"), torch.cuda.OutOfMemoryError("CUDA out of memory")):
        monkeypatch.setattr(kernels.triton_kernels, "sparse_attention", Failing(error))
        with pytest.raises(type(error)):
            sparse(q, k, v)
    assert kernels.choose_backend(q, "axial_row") == "triton"


def test_without_triton_gpu_tensors_use_the_reference_with_one_warning(gpu, monkeypatch):
    monkeypatch.setattr(kernels.triton_kernels, "available", lambda: False)
    monkeypatch.setattr(kernels.flex, "available", lambda: True)  # its GPU kernels need Triton: not chosen
    monkeypatch.setattr(kernels.triton_kernels, "sparse_attention", Failing(RuntimeError("unreachable")))
    q, k, v = qkv(requires_grad=True)
    out, messages = recording(lambda: sparse(q, k, v))
    assert len(messages) == 1 and "Triton is not installed" in messages[0]
    assert_reference_output_and_grads(out, q, k, v)
    out, messages = recording(lambda: (sparse(q, k, v), decode(q.detach(), k.detach(), v.detach())))
    assert messages == [] and kernels.choose_decode_backend(q) == "reference"


def test_sdpa_and_flex_mean_auto_for_decoding(monkeypatch):
    for name in ("sdpa", "flex"):
        monkeypatch.setenv("DALLE_ENGINE_ATTENTION", name)
        assert kernels.choose_decode_backend(torch.empty(1, 1, 8)) in ("cpp", "reference")


def test_a_remembered_failure_holds_under_torch_compile(gpu, monkeypatch):
    """Compiled code dispatches without try/except (fullgraph): to what the failure left."""
    monkeypatch.setattr(kernels.triton_kernels, "sparse_attention", Failing(RuntimeError("unreachable")))
    monkeypatch.setitem(fallback._broken, ("triton", "cpu"), "RuntimeError: earlier")
    q, k, v = qkv()
    compiled = torch.compile(lambda q, k, v: sparse(q, k, v), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), sparse(q, k, v, backend="reference"), rtol=0, atol=1e-12)
