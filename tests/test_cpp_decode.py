"""The C++ decode kernel (``kernels.cpp.decode_attention``) vs a float64 masked softmax over a ``kernels.masks`` row.

Error budget as in test_cpp_attention.py (``kernels.md`` §10.5): in float32, bfloat16 and float16 the kernel's max
error vs float64 is at most twice the max error of plain PyTorch computing the same masked attention in the input
dtype, plus a floor of a few float32 ulps of the result's magnitude (a decode step has few outputs, and on few values
plain PyTorch can be exact by luck). float64 results must match to 1e-10. Each case checks every position of its cache
(or a handful on the large one) and pools the errors over them.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import PATTERNS, cpp, reference
from kernels.masks import allowed

pytestmark = [pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}"),
              pytest.mark.usefixtures("cpu_isa")]  # every test once per instruction set the CPU has

# (text_len, fmap_size, kernel_size, dilation, max_seq)
Geometry = tuple[int, int, int, int, int]

SMALL: Geometry = (5, 4, 3, 1, 21)  # every kind of position: text, first image token, row starts and ends, last
GEOMETRIES: list[Geometry] = [
    SMALL,
    (1, 4, 5, 1, 17),    # bos-only caption
    (7, 7, 5, 2, 40),    # caption 7, cache stops mid-grid (row 4, column 5 of 7x7); dilation 2
    (3, 1, 5, 1, 4),     # 1x1 grid
    (257, 32, 5, 1, 1281),  # caption 257 (bos + 256) + full 32x32 grid: the positions in LARGE_POSITIONS only
]
# Text (first, middle, last), first image token, ends and starts of rows, mid-grid, the last two rows, last token.
LARGE_POSITIONS = (0, 128, 256, 257, 288, 289, 300, 800, 1216, 1248, 1279, 1280)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FLOOR_ULPS = 4


def kwargs(geometry: Geometry) -> dict[str, int]:
    text_len, fmap_size, kernel_size, dilation, _ = geometry
    return dict(text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size, dilation=dilation)


def positions(geometry: Geometry) -> list[int]:
    return list(LARGE_POSITIONS) if geometry[-1] > 1000 else list(range(geometry[-1]))


def make_inputs(geometry: Geometry, count: int, dtype: torch.dtype, *, batch: int = 2, heads: int = 4,
                dim_head: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` queries (count, batch, heads, dim_head) and one cache pair, drawn in float64, rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(count, batch, heads, dim_head)] + 2 * [(batch, heads, geometry[-1], dim_head)]
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, pattern: str, geometry: Geometry,
          scale: float | None = None) -> torch.Tensor:
    """Plain masked softmax attention of the query at ``pos`` over the cache prefix, in the inputs' own dtype."""
    mask = allowed(pattern, pos, torch.arange(pos + 1), **kwargs(geometry))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q[:, :, None] @ k[:, :, : pos + 1].transpose(-2, -1)) * scale
    return (scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v[:, :, : pos + 1])[:, :, 0]


def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int | torch.Tensor, pattern: str,
         geometry: Geometry, scale: float | None = None) -> torch.Tensor:
    return cpp.decode_attention(q, k, v, pos, pattern=pattern, scale=scale, **kwargs(geometry))


def check(pattern: str, geometry: Geometry, dtype: torch.dtype, *, scale: float | None = None, **shape) -> None:
    """The kernel at every position of ``geometry`` (pooled) within the error budget of ``dtype``."""
    todo = positions(geometry)
    qs, k, v = make_inputs(geometry, len(todo), dtype, **shape)
    got = torch.stack([ours(q, k, v, pos, pattern, geometry, scale) for q, pos in zip(qs, todo)])
    exact = torch.stack([dense(q.double(), k.double(), v.double(), pos, pattern, geometry, scale)
                         for q, pos in zip(qs, todo)])
    assert got.dtype == dtype and got.shape == qs.shape
    if dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-10)
        return
    plain = torch.stack([dense(q, k, v, pos, pattern, geometry, scale) for q, pos in zip(qs, todo)])
    assert_within_budget(got, exact, plain)


def assert_within_budget(got: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor) -> None:
    """``got``'s max error vs ``exact`` (float64) within twice plain PyTorch's (``plain``) plus the float32 floor."""
    err = (got.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    budget = 2 * plain_err + FLOOR_ULPS * torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert err <= budget, f"error {err:.3g} exceeds budget {budget:.3g} (plain PyTorch: {plain_err:.3g})"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_error_budget(pattern: str, dtype: torch.dtype, geometry: Geometry) -> None:
    check(pattern, geometry, dtype)


@pytest.mark.parametrize("pattern", ["conv_like", "conv_like_centered"])
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conv_windows(pattern: str, kernel_size: int, dilation: int, dtype: torch.dtype) -> None:
    check(pattern, (7, 7, kernel_size, dilation, 56), dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dim_head", [16, 32, 48, 64, 128, 13])  # 13: vector loop remainders
@pytest.mark.parametrize("geometry", [SMALL, (37, 5, 3, 1, 62)], ids=str)  # the second: spans past 16 and 32 keys
def test_dim_head(pattern: str, dim_head: int, geometry: Geometry) -> None:
    """Every head width, on AVX-512 float32 also the 16-key blocks of the 16-64 wide heads and the keys after them."""
    check(pattern, geometry, torch.float32, dim_head=dim_head, batch=3, heads=2)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_custom_scale(pattern: str) -> None:
    check(pattern, SMALL, torch.float64, scale=0.3)
    check(pattern, SMALL, torch.float32, scale=0.3)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(pattern: str, dtype: torch.dtype) -> None:
    geometry = (7, 7, 3, 2, 56)
    todo = positions(geometry)
    qs, k, v = make_inputs(geometry, len(todo), dtype, seed=1)
    atol, rtol = (1e-10, 0) if dtype == torch.float64 else (None, None)  # else assert_close's defaults for dtype
    for q, pos in zip(qs, todo):
        want = reference.decode_attention(q, k, v, pos, pattern=pattern, **kwargs(geometry))
        torch.testing.assert_close(ours(q, k, v, pos, pattern, geometry), want, atol=atol, rtol=rtol)


def poisoned(pattern: str, geometry: Geometry, pos: int, x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` as a strided view into a bigger preallocated cache, NaN in every slot query ``pos`` may not read."""
    batch, heads, max_seq, dim_head = x.shape
    if layout == "seq_major":  # (batch, seq, heads, dim_head) storage, sliced along batch and seq
        view = torch.empty(batch + 2, max_seq + 5, heads, dim_head, dtype=x.dtype)[1: batch + 1, :max_seq]
        view = view.transpose(1, 2)
    else:  # "dim_major": dim_head is not contiguous, so the op makes a contiguous copy
        view = torch.empty(batch, heads, dim_head, max_seq + 3, dtype=x.dtype)[..., :max_seq].transpose(2, 3)
    view.fill_(float("nan"))
    keep = allowed(pattern, pos, torch.arange(max_seq), **kwargs(geometry))
    view[:, :, keep] = x[:, :, keep]
    return view


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", ["seq_major", "dim_major"])
def test_strided_cache_reads_only_allowed_keys(pattern: str, layout: str) -> None:
    """Results on strided views of a cache whose unread slots (later positions, keys outside the pattern) hold NaN
    equal those on the clean contiguous cache; q is a strided view too."""
    geometry = (5, 4, 3, 2, 21)
    todo = positions(geometry)
    qs, k, v = make_inputs(geometry, len(todo), torch.float32, seed=2)
    for q, pos in zip(qs, todo):
        q_view = torch.zeros(q.shape[0], q.shape[1], 3, q.shape[2])[:, :, 1]  # as the model's q[:, :, 0]
        q_view.copy_(q)
        k_view, v_view = (poisoned(pattern, geometry, pos, x, layout) for x in (k, v))
        assert not (q_view.is_contiguous() or k_view.is_contiguous() or v_view.is_contiguous())
        got = ours(q_view, k_view, v_view, pos, pattern, geometry)
        assert torch.equal(got, ours(q, k, v, pos, pattern, geometry)), f"pos {pos}"


def test_pos_as_tensor() -> None:
    q, k, v = make_inputs(SMALL, 1, torch.float32)
    for pos in (3, 5, 12):
        want = ours(q[0], k, v, pos, "conv_like", SMALL)
        for tensor in (torch.tensor(pos), torch.tensor(pos, dtype=torch.int32)):
            assert torch.equal(ours(q[0], k, v, tensor, "conv_like", SMALL), want)


# Batches whose rows sit at their own positions (continuous batching): (geometry, one position per row).
PER_ROW: list[tuple[Geometry, tuple[int, ...]]] = [
    (SMALL, (2, 5, 11, 20)),                 # text, first image token, mid-grid, last token
    ((1, 4, 5, 1, 17), (16, 0, 1)),          # bos-only caption, odd batch, the longest row first
    ((7, 7, 5, 2, 40), (39, 6, 7, 25, 13)),  # cache stopping mid-grid, dilation 2, rows at ends and starts of rows
]


def per_row_inputs(geometry: Geometry, todo: tuple[int, ...], dtype: torch.dtype, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = make_inputs(geometry, 1, dtype, batch=len(todo), heads=3, seed=seed)
    return q[0], k, v


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("geometry", "todo"), PER_ROW, ids=lambda x: str(x).replace(" ", ""))
def test_per_row_positions(geometry: Geometry, todo: tuple[int, ...], pattern: str, dtype: torch.dtype,
                           backend: str) -> None:
    """Row b at pos[b] equals the float64 attention of that row alone (error budget, pooled over the rows); the C++
    kernel's row is bitwise the row computed alone with a scalar pos, and the whole batch at that scalar pos."""
    q, k, v = per_row_inputs(geometry, todo, dtype, seed=20)
    got = kernels.decode_attention(q, k, v, torch.tensor(todo), pattern=pattern, backend=backend, **kwargs(geometry))
    assert got.dtype == dtype and got.shape == q.shape
    rows = [slice(b, b + 1) for b in range(len(todo))]
    exact = torch.cat([dense(q[r].double(), k[r].double(), v[r].double(), pos, pattern, geometry)
                       for r, pos in zip(rows, todo)])
    plain = torch.cat([dense(q[r], k[r], v[r], pos, pattern, geometry) for r, pos in zip(rows, todo)])
    assert_within_budget(got, exact, plain)
    if backend == "cpp":
        for r, pos in zip(rows, todo):
            assert torch.equal(got[r], ours(q[r], k[r], v[r], pos, pattern, geometry)), f"row {r.start} alone"
            assert torch.equal(got[r], ours(q, k, v, pos, pattern, geometry)[r]), f"row {r.start}, batch at {pos}"


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_per_row_reads_only_each_rows_keys(pattern: str, backend: str) -> None:
    """NaN in every slot a row may not read (after its own position, outside its pattern), though other rows read
    them: the result equals the clean cache's, bitwise."""
    geometry, todo = PER_ROW[-1]
    q, k, v = per_row_inputs(geometry, todo, torch.float32, seed=21)
    pos = torch.tensor(todo)
    keep = allowed(pattern, pos[:, None], torch.arange(geometry[-1]), **kwargs(geometry))  # (batch, max_seq)
    k_bad, v_bad = (x.masked_fill(~keep[:, None, :, None], float("nan")) for x in (k, v))
    got = kernels.decode_attention(q, k_bad, v_bad, pos, pattern=pattern, backend=backend, **kwargs(geometry))
    assert got.isfinite().all()
    assert torch.equal(got, kernels.decode_attention(q, k, v, pos, pattern=pattern, backend=backend,
                                                     **kwargs(geometry)))


def test_per_row_pos_dtypes_and_broadcast() -> None:
    """An int32 or strided (batch,) pos reads as int64 does; one element of any shape is every row's position."""
    q, k, v = per_row_inputs(SMALL, (0, 0, 0), torch.float32, seed=22)
    want = ours(q, k, v, torch.tensor([7, 12, 20]), "axial_row", SMALL)
    assert torch.equal(ours(q, k, v, torch.tensor([7, 12, 20], dtype=torch.int32), "axial_row", SMALL), want)
    assert torch.equal(ours(q, k, v, torch.tensor([7, 0, 12, 0, 20])[::2], "axial_row", SMALL), want)
    same = ours(q, k, v, 12, "axial_row", SMALL)
    for pos in (torch.tensor([12]), torch.tensor([[12]]), torch.tensor([12, 12, 12])):
        assert torch.equal(ours(q, k, v, pos, "axial_row", SMALL), same), tuple(pos.shape)


def test_public_api_dispatches_to_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = make_inputs(SMALL, 1, torch.float32)
    monkeypatch.delenv("DALLE_ENGINE_ATTENTION", raising=False)
    assert kernels.choose_decode_backend(q[0]) == "cpp"
    calls = []
    real = cpp.decode_attention

    def spy(*args, **kw):
        calls.append(args[3])
        return real(*args, **kw)

    monkeypatch.setattr(cpp, "decode_attention", spy)
    got = kernels.decode_attention(q[0], k, v, 9, pattern="axial_col", backend="cpp", **kwargs(SMALL))
    assert calls == [9]
    assert torch.equal(got, real(q[0], k, v, 9, pattern="axial_col", **kwargs(SMALL)))


def test_op_passes_opcheck() -> None:
    """Schema, fake (meta) implementation and dispatcher checks."""
    q, k, v = make_inputs(SMALL, 1, torch.float32)
    for pos in (torch.tensor(11), torch.tensor([11, 4])):  # one position, one per row
        args = (q[0], k, v, pos, "conv_like_centered", *kwargs(SMALL).values(), 0.25)
        torch.library.opcheck(torch.ops.dalle_engine_cpu.decode_attention.default, args)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"pos": 21}, r"pos must lie in \[0, 21\), got 21"),
        ({"pos": -1}, r"pos must lie in \[0, 21\), got -1"),
        ({"pos": torch.tensor([3, 21])}, r"pos\[1\] must lie in \[0, 21\), got 21"),
        ({"pos": torch.tensor([-1, 3])}, r"pos\[0\] must lie in \[0, 21\), got -1"),
        ({"pos": torch.tensor([3, 4, 5])}, r"one per row \(shape \(batch,\) = \(2,\)\), got shape \[3\]"),
        ({"pos": torch.tensor([[3], [4]])}, r"one per row \(shape \(batch,\) = \(2,\)\), got shape \[2, 1\]"),
        ({"pos": torch.tensor([3.0, 4.0])}, "pos must be a CPU integer tensor, got Float"),
        ({"pos": torch.tensor([True, False])}, "pos must be a CPU integer tensor, got Bool"),
        ({"q": torch.zeros(2, 4, 31)}, "does not match the cache"),
        ({"q": torch.zeros(2, 4, 1, 32)}, r"q must be \(batch, heads, dim_head\)"),
        ({"v_cache": torch.zeros(2, 4, 20, 32)}, r"one \(batch, heads, max_seq, dim_head\) shape"),
        ({"v_cache": torch.zeros(2, 4, 21, 32, dtype=torch.float64)}, "share one dtype"),
        ({"dtype": torch.int64}, "float32, float64, bfloat16 or float16"),
        ({"pattern": "sparse"}, "valid patterns"),
        ({"fmap_size": 3}, "max_seq must be in 1..14"),
        ({"dilation": 0}, "must be >= 1"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_bad_arguments(change: dict, match: str) -> None:
    change = dict(change)  # the parameter itself is shared by every instruction set's run
    dtype = change.pop("dtype", torch.float32)
    q, k = torch.zeros(2, 4, 32, dtype=dtype), torch.zeros(2, 4, 21, 32, dtype=dtype)
    args = dict(q=q, k_cache=k, v_cache=k, pos=7, pattern="full", text_len=5, fmap_size=4, dilation=1) | change
    with pytest.raises(RuntimeError, match=match):
        cpp.decode_attention(**args)


def test_public_api_rejects_a_tensor_pos_out_of_range() -> None:
    """An int pos is checked in Python (ValueError); a tensor one (or one per row), without a host sync there, by the
    op."""
    q, k = torch.zeros(2, 4, 32), torch.zeros(2, 4, 21, 32)
    with pytest.raises(ValueError, match="pos must lie in"):
        kernels.decode_attention(q, k, k, 21, pattern="full", backend="cpp", **kwargs(SMALL))
    with pytest.raises(RuntimeError, match="pos must lie in"):
        kernels.decode_attention(q, k, k, torch.tensor(21), pattern="full", backend="cpp", **kwargs(SMALL))
    with pytest.raises(RuntimeError, match=r"pos\[1\] must lie in \[0, 21\), got 21"):
        kernels.decode_attention(q, k, k, torch.tensor([3, 21]), pattern="full", backend="cpp", **kwargs(SMALL))


@pytest.mark.parametrize(
    ("pos", "match"),
    [(torch.tensor([3, 4, 5]), r"\(batch,\) = \(2,\) integer tensor, got torch.int64 of shape \(3,\)"),
     (torch.tensor([[3], [4]]), r"got torch.int64 of shape \(2, 1\)"),
     (torch.tensor([3.0, 4.0]), r"got torch.float32 of shape \(2,\)"),
     (torch.tensor(3.0), r"got torch.float32 of shape \(\)"),
     (torch.tensor([3, 4], device="meta"), "pos must be on q's device cpu, got meta")],
    ids=["length", "2-D", "float", "float 0-dim", "device"],
)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_public_api_rejects_a_bad_tensor_pos(pos: torch.Tensor, match: str, backend: str) -> None:
    q, k = torch.zeros(2, 4, 32), torch.zeros(2, 4, 21, 32)
    with pytest.raises(ValueError, match=match):
        kernels.decode_attention(q, k, k, pos, pattern="full", backend=backend, **kwargs(SMALL))
