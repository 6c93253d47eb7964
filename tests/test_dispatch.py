"""Which attention implementation runs where: the model's training path must reach the fast kernels."""

import warnings

import pytest
import torch
from conftest import tiny_config

import kernels
from engine.model.dalle import DALLE

GEOMETRY = dict(text_len=5, fmap_size=4)


def qkv(dtype=torch.float32):
    return [torch.randn(1, 2, 5 + 16, 8, dtype=dtype) for _ in range(3)]


@pytest.fixture
def calls(monkeypatch):
    """Counts calls into each backend, still running the real implementation."""
    counts = {"cpp": 0, "reference": 0, "sdpa": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kernels.cpp, "sparse_attention", counting("cpp", kernels.cpp.sparse_attention))
    reference = kernels.reference.sparse_attention
    monkeypatch.setattr(kernels.reference, "sparse_attention", counting("reference", reference))
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention",
                        counting("sdpa", torch.nn.functional.scaled_dot_product_attention))
    monkeypatch.delenv("DALLE_ENGINE_ATTENTION", raising=False)
    return counts


needs_cpp = pytest.mark.skipif(not kernels.cpp.available(), reason=f"C++ kernels: {kernels.cpp.load_error()}")


@needs_cpp
def test_cpu_tensors_go_to_cpp_full_included(calls, monkeypatch):
    assert kernels.choose_backend(torch.empty(1, device="cpu"), "axial_row") == "cpp"
    assert kernels.choose_backend(torch.empty(1), "full") == "cpp"
    with monkeypatch.context() as gpu:
        gpu.setattr(kernels, "_on_gpu", lambda q: True)
        assert kernels.choose_backend(torch.empty(1), "full") == "sdpa"  # GPUs: PyTorch's fused kernels
    q, k, v = qkv()
    for pattern in ("axial_row", "axial_col", "conv_like", "conv_like_centered"):
        out = kernels.sparse_attention(q, k, v, pattern=pattern, **GEOMETRY)
        expected = kernels.sparse_attention(q, k, v, pattern=pattern, backend="reference", **GEOMETRY)
        torch.testing.assert_close(out, expected)
    dense = kernels.sparse_attention(q, k, v, pattern="full", **GEOMETRY)
    torch.testing.assert_close(dense, kernels.reference.sparse_attention(q, k, v, pattern="full", **GEOMETRY))
    assert calls == {"cpp": 5, "reference": 5, "sdpa": 0}


@needs_cpp
def test_model_training_step_uses_the_kernels(calls):
    model = DALLE(tiny_config(attn_types=("full", "axial_row", "conv_like"), depth=3))
    text = torch.randint(1, model.config.num_text_tokens, (2, model.config.text_seq_len))
    codes = torch.randint(0, model.config.num_image_tokens, (2, model.config.image_seq_len))
    model(text, codes, return_loss=True).backward()
    assert calls == {"cpp": 3, "reference": 0, "sdpa": 0}


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_kernels.available()),
                    reason="needs CUDA and Triton")
def test_model_training_step_on_cuda_uses_triton(calls, monkeypatch):
    counts = {"triton": 0}
    triton_fn = kernels.triton_kernels.sparse_attention

    def counting(*args, **kwargs):
        counts["triton"] += 1
        return triton_fn(*args, **kwargs)

    monkeypatch.setattr(kernels.triton_kernels, "sparse_attention", counting)
    model = DALLE(tiny_config(attn_types=("full", "axial_row", "axial_col"), depth=3)).cuda()
    text = torch.randint(1, model.config.num_text_tokens, (2, model.config.text_seq_len), device="cuda")
    codes = torch.randint(0, model.config.num_image_tokens, (2, model.config.image_seq_len), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(text, codes, return_loss=True)
    loss.backward()
    assert counts["triton"] == 2 and calls == {"cpp": 0, "reference": 0, "sdpa": 1}


def test_environment_forces_the_reference(calls, monkeypatch):
    monkeypatch.setenv("DALLE_ENGINE_ATTENTION", "reference")
    q, k, v = qkv()
    kernels.sparse_attention(q, k, v, pattern="axial_row", **GEOMETRY)
    kernels.sparse_attention(q, k, v, pattern="full", **GEOMETRY)
    assert calls == {"cpp": 0, "reference": 2, "sdpa": 0}
    monkeypatch.setenv("DALLE_ENGINE_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="unknown attention backend 'fastest'"):
        kernels.sparse_attention(q, k, v, pattern="axial_row", **GEOMETRY)
    with pytest.raises(ValueError, match="only the full pattern"):
        kernels.sparse_attention(q, k, v, pattern="axial_row", backend="sdpa", **GEOMETRY)


def test_without_the_extension_cpu_falls_back_to_the_reference_with_one_warning(calls, monkeypatch):
    monkeypatch.setattr(kernels.cpp, "available", lambda: False)
    monkeypatch.setattr(kernels, "_warned_no_cpp", False)
    q, k, v = qkv()
    with pytest.warns(UserWarning, match="C\\+\\+ attention kernels unavailable"):
        kernels.sparse_attention(q, k, v, pattern="axial_row", **GEOMETRY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        kernels.sparse_attention(q, k, v, pattern="axial_col", **GEOMETRY)
    assert calls == {"cpp": 0, "reference": 2, "sdpa": 0}
