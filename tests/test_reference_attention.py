"""The reference sparse attention vs a dense masked softmax built from ``kernels.masks.dense_mask``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kernels
from kernels import PATTERNS, dense_mask, reference

# (batch, heads, seq, dim_head, text_len, fmap_size, kernel_size, dilation)
Config = tuple[int, int, int, int, int, int, int, int]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SPEC_CONFIG: Config = (1, 2, 19, 8, 4, 4, 3, 2)  # the spec's 4x4 example with a dilated window
EVEN_KERNEL_CONFIG: Config = (2, 1, 27, 5, 3, 5, 2, 1)

# text_len 5 with a 3x3 grid: one token, text-only, boundary, one image token, training length, full grid.
CONFIGS: list[Config] = [(2, 3, seq, 7, 5, 3, 3, 1) for seq in (1, 4, 5, 6, 13, 14)] + [
    SPEC_CONFIG,
    EVEN_KERNEL_CONFIG,
    (1, 1, 17, 3, 1, 4, 5, 1),  # bos-only text
    (1, 2, 39, 9, 4, 6, 4, 3),  # dilation that reaches past the grid
    (1, 1, 2, 1, 1, 1, 5, 1),   # 1x1 grid, dim_head 1
]

# Large enough that the max error is a stable statistic; on tiny problems the 2x ratio below is noisy.
LOW_PRECISION_CONFIGS: list[Config] = [(2, 4, 68, 32, 5, 8, 5, 1), (2, 4, 100, 16, 9, 10, 3, 2)]


def geometry(config: Config) -> dict[str, int]:
    text_len, fmap_size, kernel_size, dilation = config[4:]
    return dict(text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size, dilation=dilation)


def ours(config: Config, pattern: str, scale: float | None = None) -> Attention:
    return lambda q, k, v: reference.sparse_attention(q, k, v, pattern=pattern, scale=scale, **geometry(config))


def dense(config: Config, pattern: str, scale: float | None = None) -> Attention:
    """Plain masked softmax attention, computed in the inputs' own dtype."""
    mask = dense_mask(pattern, config[2], **geometry(config))
    scale = config[3] ** -0.5 if scale is None else scale

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * scale
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v

    return attend


def make_inputs(config: Config, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v and an upstream gradient, drawn in float64 and rounded to ``dtype``."""
    batch, heads, seq, dim_head = config[:4]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim_head, generator=gen, dtype=torch.float64).to(dtype)
            for _ in range(4)]


def run(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Output and (dq, dk, dv) for the given upstream gradient."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_float64_matches_dense(pattern: str, config: Config) -> None:
    inputs = make_inputs(config, torch.float64)
    for name, got, want in zip(("out", "dq", "dk", "dv"), run(ours(config, pattern), *inputs),
                               run(dense(config, pattern), *inputs)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_custom_scale(pattern: str) -> None:
    inputs = make_inputs(EVEN_KERNEL_CONFIG, torch.float64)
    for got, want in zip(run(ours(EVEN_KERNEL_CONFIG, pattern, scale=0.3), *inputs),
                         run(dense(EVEN_KERNEL_CONFIG, pattern, scale=0.3), *inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", LOW_PRECISION_CONFIGS, ids=str)
def test_low_precision_error_budget(pattern: str, dtype: torch.dtype, config: Config) -> None:
    """FlashAttention-style budget: our error vs float64 is at most twice plain PyTorch's error in ``dtype``."""
    inputs = make_inputs(config, dtype)
    got = run(ours(config, pattern), *inputs)
    plain = run(dense(config, pattern), *inputs)
    exact = run(dense(config, pattern), *(x.double() for x in inputs))
    for name, ours_x, plain_x, exact_x in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        assert ours_x.dtype == dtype
        err = (ours_x.double() - exact_x).abs().max().item()
        budget = 2 * (plain_x.double() - exact_x).abs().max().item() + 1e-2 * torch.finfo(dtype).eps
        assert err <= budget, f"{name}: error {err:.3g} exceeds budget {budget:.3g}"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_public_entry_point_forced_to_the_reference_is_the_reference(pattern: str) -> None:
    q, k, v, _ = make_inputs(SPEC_CONFIG, torch.float32)
    kwargs = dict(pattern=pattern, **geometry(SPEC_CONFIG))
    forced = kernels.sparse_attention(q, k, v, backend="reference", **kwargs)
    assert torch.equal(forced, reference.sparse_attention(q, k, v, **kwargs))


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "full"])
def test_sparse_patterns_do_not_materialise_seq_by_seq(pattern: str) -> None:
    text_len, fmap_size = 8, 16
    seq = text_len + fmap_size ** 2
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
def test_bad_arguments(shapes: tuple[tuple[int, ...], ...], kwargs: dict, match: str) -> None:
    q, k, v = (torch.randn(shape) for shape in shapes)
    args = dict(pattern="conv_like", text_len=5, fmap_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        kernels.sparse_attention(q, k, v, **args)


def test_integer_inputs_rejected() -> None:
    q = torch.zeros(1, 1, 6, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="float dtype"):
        kernels.sparse_attention(q, q, q, pattern="full", text_len=5, fmap_size=3)
