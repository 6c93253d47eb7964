"""The reference sparse attention vs a dense masked softmax built from ``kernels.masks.dense_mask``."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import PATTERNS, dense_mask, reference

# (batch, heads, seq, dim_head, text_len, fmap_size, kernel_size, dilation)
Config = tuple[int, int, int, int, int, int, int, int]

# text_len 5 with a 3x3 grid: empty, text-only, boundary, one image token, training length, full grid.
CONFIGS: list[Config] = [(2, 3, seq, 7, 5, 3, 3, 1) for seq in (1, 4, 5, 6, 13, 14)] + [
    (1, 2, 19, 8, 4, 4, 3, 2),   # the spec's 4x4 example with a dilated window
    (2, 1, 27, 5, 3, 5, 2, 1),   # even kernel
    (1, 1, 17, 3, 1, 4, 5, 1),   # bos-only text
    (1, 2, 39, 9, 4, 6, 4, 3),   # dilation that reaches past the grid
    (1, 1, 2, 1, 1, 1, 5, 1),    # 1x1 grid, dim_head 1
]

LOW_PRECISION_CONFIGS: list[Config] = [(2, 2, 40, 16, 5, 6, 5, 1), (1, 3, 44, 24, 8, 6, 3, 2)]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Plain masked softmax attention in the inputs' own dtype."""
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def make_inputs(config: Config, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v and an upstream gradient, drawn in float64 and rounded to ``dtype``."""
    batch, heads, seq, dim_head = config[:4]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim_head, generator=gen, dtype=torch.float64).to(dtype)
            for _ in range(4)]


def run(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Output and (dq, dk, dv) of ``fn`` for the given upstream gradient."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


def geometry(config: Config, pattern: str) -> dict:
    text_len, fmap_size, kernel_size, dilation = config[4:]
    return dict(pattern=pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                dilation=dilation)


def dense_reference(config: Config, pattern: str, scale: float | None = None):
    kwargs = geometry(config, pattern)
    mask = dense_mask(kwargs.pop("pattern"), config[2], **kwargs)
    scale = config[3] ** -0.5 if scale is None else scale
    return lambda q, k, v: dense_attention(q, k, v, mask, scale)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_float64_matches_dense(pattern: str, config: Config) -> None:
    q, k, v, grad_out = make_inputs(config, torch.float64)
    ours = run(lambda q, k, v: reference.sparse_attention(q, k, v, **geometry(config, pattern)), q, k, v, grad_out)
    expected = run(dense_reference(config, pattern), q, k, v, grad_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, expected):
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_custom_scale(pattern: str) -> None:
    config = CONFIGS[-4]
    q, k, v, grad_out = make_inputs(config, torch.float64)
    ours = run(lambda q, k, v: reference.sparse_attention(q, k, v, scale=0.3, **geometry(config, pattern)),
               q, k, v, grad_out)
    expected = run(dense_reference(config, pattern, scale=0.3), q, k, v, grad_out)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", LOW_PRECISION_CONFIGS, ids=str)
def test_low_precision_error_budget(pattern: str, dtype: torch.dtype, config: Config) -> None:
    """FlashAttention-style budget: our error vs float64 is at most twice plain PyTorch's error in ``dtype``."""
    inputs = make_inputs(config, dtype)
    dense = dense_reference(config, pattern)
    ours = run(lambda q, k, v: reference.sparse_attention(q, k, v, **geometry(config, pattern)), *inputs)
    plain = run(dense, *inputs)
    exact = run(dense, *(x.double() for x in inputs))
    for name, got, baseline, want in zip(("out", "dq", "dk", "dv"), ours, plain, exact):
        assert got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        budget = 2 * (baseline.double() - want).abs().max().item() + 1e-6
        assert err <= budget, f"{name}: error {err:.3g} exceeds budget {budget:.3g}"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_public_entry_point_matches_reference(pattern: str) -> None:
    config = CONFIGS[6]
    q, k, v, _ = make_inputs(config, torch.float32)
    kwargs = geometry(config, pattern)
    assert torch.equal(kernels.sparse_attention(q, k, v, **kwargs), reference.sparse_attention(q, k, v, **kwargs))


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "full"])
def test_sparse_patterns_do_not_materialise_seq_by_seq(pattern: str) -> None:
    text_len, fmap_size, seq = 8, 16, 8 + 16 * 16
    q, k, v = (torch.randn(1, 1, seq, 2, requires_grad=True) for _ in range(3))
    saved: list[int] = []

    def record(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        reference.sparse_attention(q, k, v, pattern=pattern, text_len=text_len, fmap_size=fmap_size)
    assert saved and max(saved) < seq * seq // 4


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((1, 1, 6, 4), (1, 1, 5, 4), (1, 1, 6, 4)), {}, "shapes differ"),
        (((1, 1, 6, 4), (1, 1, 6, 4), (1, 1, 6, 3)), {}, "shapes differ"),
        (((1, 6, 4),) * 3, {}, r"\(batch, heads, seq, dim_head\)"),
        (((1, 1, 15, 4),) * 3, {}, "seq_len"),
        (((1, 1, 6, 4),) * 3, {"pattern": "sparse"}, "valid patterns"),
        (((1, 1, 6, 4),) * 3, {"kernel_size": 0}, "kernel_size"),
        (((1, 1, 6, 4),) * 3, {"dilation": -1}, "dilation"),
        (((1, 1, 6, 4),) * 3, {"text_len": 0}, "text_len"),
    ],
)
def test_bad_arguments(shapes: tuple, kwargs: dict, match: str) -> None:
    q, k, v = (torch.randn(shape) for shape in shapes)
    args = dict(pattern="conv_like", text_len=5, fmap_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        kernels.sparse_attention(q, k, v, **args)


def test_integer_inputs_rejected() -> None:
    q = torch.zeros(1, 1, 6, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="float dtype"):
        kernels.sparse_attention(q, q, q, pattern="full", text_len=5, fmap_size=3)
