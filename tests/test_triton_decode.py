"""Triton KV-cache decode attention (``kernels/triton/decode.py``), run by Triton's CPU interpreter.

Results are checked against float64 masked attention with the error budget of ``test_triton_attention.py``: the
kernel's max error may be at most twice that of plain PyTorch computing the same masked softmax in the input dtype,
plus a few fp32 ulps of the result. The interpreter is slow (tens of ms a call), so geometries are tiny and each
test visits only the positions that matter: text, the first image token, row starts and ends, the last token.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import kernels  # noqa: E402
from kernels import PATTERNS, reference  # noqa: E402
from kernels.masks import allowed  # noqa: E402

pytest.importorskip("triton")
from kernels.triton import decode as triton_decode  # noqa: E402
from kernels.triton import decode_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONV_PATTERNS = ("conv_like", "conv_like_centered")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Geometry(NamedTuple):
    text_len: int
    fmap_size: int
    kernel_size: int = 5
    dilation: int = 1

    @property
    def seq(self) -> int:
        return self.text_len + self.fmap_size ** 2

    def image(self, row: int, col: int) -> int:
        """Sequence position of image cell (row, col)."""
        return self.text_len + row * self.fmap_size + col


SMALL = Geometry(7, 4, 3)
# Last text, first image token, end of row 0, start of row 1, a mid-grid cell, the last token.
SMALL_POSITIONS = (6, 7, 10, 11, 16, 22)


def make_inputs(batch: int, heads: int, seq: int, dim_head: int, dtype: torch.dtype, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``(batch, heads, dim_head)`` and a full k, v cache, drawn in float64 and rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim_head, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, seq, dim_head, generator=gen, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def key_mask(pattern: str, geo: Geometry, pos: int, seq: int | None = None) -> torch.Tensor:
    return allowed(pattern, pos, torch.arange(geo.seq if seq is None else seq), **geo._asdict())


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Plain masked softmax attention of the one query, in the inputs' own dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q[:, :, None] @ k.transpose(-2, -1)) * scale
    return (scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v)[:, :, 0]


def assert_within_budget(got: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         scale: float | None = None) -> None:
    plain = masked_attention(q, k, v, mask, scale)
    exact = masked_attention(q.double(), k.double(), v.double(), mask, scale)
    assert got.dtype == q.dtype and got.shape == exact.shape
    err = (got.double() - exact).abs().max().item()
    # The kernel accumulates in fp32 at every dtype: a few fp32 ulps of the result are its own floor.
    floor = 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    budget = 2 * (plain.double() - exact).abs().max().item() + floor
    assert err <= budget, f"error {err:.3g} exceeds budget {budget:.3g}"


def check(pattern: str, geo: Geometry, positions, dtype: torch.dtype = torch.float32, *, batch: int = 1,
          heads: int = 1, dim_head: int = 32, num_splits: int | None = None, scale: float | None = None,
          seed: int = 0) -> None:
    q, k, v = make_inputs(batch, heads, geo.seq, dim_head, dtype, seed)
    for pos in positions:
        got = decode_attention(q, k, v, pos, pattern=pattern, scale=scale, num_splits=num_splits, **geo._asdict())
        assert_within_budget(got, q, k, v, key_mask(pattern, geo, pos), scale)


# --------------------------------------------------------------------------------------------------------------
# Kernel vs float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_and_position(pattern: str, dtype: torch.dtype) -> None:
    positions = (0, 3, *SMALL_POSITIONS) if dtype == torch.float32 else SMALL_POSITIONS
    check(pattern, SMALL, positions, dtype, seed=1)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bos_only_caption(pattern: str) -> None:
    geo = Geometry(1, 4, 3)
    check(pattern, geo, (0, 1, geo.image(0, 3), geo.image(1, 0), geo.seq - 1), torch.float16, seed=2)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_caption_257(pattern: str) -> None:
    # Five text chunks (the last holds one key) dealt to three splits, then the image chunks after them.
    geo = Geometry(257, 4, 3)
    check(pattern, geo, (100, 256, 257, geo.image(2, 1), geo.seq - 1), torch.float16, num_splits=3, seed=3)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_one_cell_grid(pattern: str) -> None:
    geo = Geometry(7, 1)
    check(pattern, geo, (6, 7), seed=4)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_grid_7(pattern: str) -> None:
    geo = Geometry(5, 7, 3, 2)
    check(pattern, geo, (geo.image(0, 6), geo.image(3, 0), geo.image(3, 4), geo.seq - 1), torch.float16, seed=5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_grid_32(pattern: str) -> None:
    # full at the last token reads the whole 32 x 32 grid in column tiles of 32, two rows a chunk.
    geo = Geometry(16, 32)
    positions = (geo.seq - 1,) if pattern == "full" else (geo.image(17, 0), geo.image(31, 31))
    check(pattern, geo, positions, torch.bfloat16, seed=6)


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("pattern", CONV_PATTERNS)
def test_conv_windows(pattern: str, kernel_size: int, dilation: int) -> None:
    # Corners and edges clip the window differently on each side; (3, 3) is the interior.
    geo = Geometry(4, 7, kernel_size, dilation)
    cells = ((0, 0), (0, 6), (1, 0), (2, 5), (3, 3), (6, 1), (6, 6))
    check(pattern, geo, [geo.image(*cell) for cell in cells], seed=7)


@pytest.mark.parametrize("dim_head", [32, 64, 128, 40])
def test_dim_head(dim_head: int) -> None:
    check("conv_like", SMALL, (SMALL.image(2, 2),), torch.float16, dim_head=dim_head, seed=8)


def test_batch_and_heads() -> None:
    check("axial_col", SMALL, (5, SMALL.image(3, 1)), torch.float16, batch=2, heads=3, num_splits=2, seed=9)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_num_splits(num_splits: int) -> None:
    # 257 text keys and a 9-row window: 5 + 3 chunks, so 8 splits get one chunk each.
    geo = Geometry(257, 4, 3)
    check("full", geo, (geo.image(2, 3),), num_splits=num_splits, seed=10)


@pytest.mark.parametrize(("pattern", "pos"), [("full", 0), ("axial_col", 7), ("conv_like", 8)])
def test_splits_without_keys(pattern: str, pos: int) -> None:
    # One or two chunks in all, four splits: the empty splits' (-inf, 0, 0) partials must merge to nothing.
    check(pattern, SMALL, (pos,), num_splits=4, seed=11)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("pattern", ["full", "axial_row"])
def test_rows_wider_than_a_column_tile(pattern: str, num_splits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two-column tiles on a 4-wide grid: rows take two tiles, and at cell (0, 0) the second tile is all future keys,
    # the only chunk of split 2 (-inf max inside the kernel, not just in the merge).
    monkeypatch.setattr(triton_decode, "_MAX_COLS", 2)
    check(pattern, SMALL, (SMALL.image(0, 0), SMALL.image(1, 1), SMALL.image(3, 2)), num_splits=num_splits, seed=18)


def test_custom_scale() -> None:
    check("conv_like_centered", SMALL, (SMALL.image(2, 1),), scale=0.3, seed=12)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_strided_cache_reads_only_allowed_keys(pattern: str) -> None:
    """A (batch, seq, heads, dim) layer slice of a larger cache, NaN in every slot the query must not read."""
    geo, batch, heads, dim_head = Geometry(3, 4, 3), 2, 2, 32
    buffer = torch.full((2, batch, geo.seq + 2, heads, 2, dim_head), float("nan"))  # layers, ..., (k | v), dim
    q_buffer = torch.full((batch, heads, 3, dim_head), float("nan"))
    q_buffer[:, :, 1], k, v = make_inputs(batch, heads, geo.seq, dim_head, torch.float32, 13)
    q = q_buffer[:, :, 1]
    k_cache, v_cache = buffer[1, :, : geo.seq].permute(3, 0, 2, 1, 4)
    for pos_arg in (1, torch.tensor(geo.image(0, 2)), geo.image(1, 0), torch.tensor(geo.image(2, 3)), geo.seq - 1):
        mask = key_mask(pattern, geo, int(pos_arg))
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
        k_cache[:, :, mask], v_cache[:, :, mask] = k[:, :, mask], v[:, :, mask]
        got = decode_attention(q, k_cache, v_cache, pos_arg, pattern=pattern, num_splits=1, **geo._asdict())
        assert_within_budget(got, q, k, v, mask)


def check_per_row(pattern: str, geo: Geometry, positions: tuple[int, ...], dtype: torch.dtype = torch.float32, *,
                  heads: int = 2, num_splits: int | None = None, seed: int = 0, strided_pos: bool = False) -> None:
    """One call with row b at positions[b], NaN in every cache slot row b may not read (other rows read some of
    them); each row within the budget of the float64 attention of that row alone."""
    q, k, v = make_inputs(len(positions), heads, geo.seq, 32, dtype, seed)
    masks = torch.stack([key_mask(pattern, geo, pos) for pos in positions])  # (batch, seq)
    k_bad, v_bad = (x.masked_fill(~masks[:, None, :, None], float("nan")) for x in (k, v))
    pos = torch.tensor(positions)
    if strided_pos:  # a (batch,) view with stride 2: the kernel reads pos[b] through its stride
        pos = torch.stack([pos, torch.full_like(pos, -1)], 1)[:, 0]
    got = decode_attention(q, k_bad, v_bad, pos, pattern=pattern, num_splits=num_splits, **geo._asdict())
    for b, mask in enumerate(masks):
        row = slice(b, b + 1)
        assert_within_budget(got[row], q[row], k[row], v[row], mask, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_per_row_positions(pattern: str, dtype: torch.dtype) -> None:
    # Text, the first image token, mid-grid, the last token; the longest row in the middle. fp32 also with two heads
    # (row b = program // heads) and a strided pos.
    fp32 = dtype == torch.float32
    check_per_row(pattern, SMALL, (3, SMALL.image(0, 0), SMALL.seq - 1, SMALL.image(2, 1)), dtype,
                  heads=2 if fp32 else 1, seed=20, strided_pos=fp32)


@pytest.mark.parametrize("pattern", CONV_PATTERNS)
def test_per_row_conv_windows(pattern: str) -> None:
    # Dilation 2, a 7x7 grid, five rows (corners, edge, interior, text) dealt to three splits.
    geo = Geometry(4, 7, 5, 2)
    positions = (geo.image(6, 6), 2, geo.image(0, 6), geo.image(3, 3), geo.image(1, 0))
    check_per_row(pattern, geo, positions, heads=1, num_splits=3, seed=21)


def test_per_row_equal_positions_match_one_position() -> None:
    q, k, v = make_inputs(3, 1, SMALL.seq, 32, torch.float16, 22)
    pos = SMALL.image(2, 0)
    one = decode_attention(q, k, v, torch.tensor(pos), pattern="conv_like", **SMALL._asdict())
    assert torch.equal(one, decode_attention(q, k, v, torch.full((3,), pos), pattern="conv_like", **SMALL._asdict()))


def test_int_and_tensor_pos_agree() -> None:
    q, k, v = make_inputs(1, 2, SMALL.seq, 32, torch.float16, 14)
    for pos in (4, SMALL.image(2, 0)):
        by_int, by_tensor, by_int32 = (
            decode_attention(q, k, v, p, pattern="axial_row", **SMALL._asdict())
            for p in (pos, torch.tensor(pos), torch.tensor(pos, dtype=torch.int32)))
        assert torch.equal(by_int, by_tensor) and torch.equal(by_int, by_int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_through_public_entry_point(dtype: torch.dtype) -> None:
    q, k, v = make_inputs(2, 2, SMALL.seq, 32, dtype, 15)
    for pattern, pos in (("conv_like", SMALL.image(3, 2)), ("axial_col", 5), ("axial_row", torch.tensor([5, 20]))):
        got = kernels.decode_attention(q, k, v, pos, pattern=pattern, backend="triton", **SMALL._asdict())
        want = reference.decode_attention(q, k, v, pos, pattern=pattern, **SMALL._asdict())
        torch.testing.assert_close(got, want)


def test_opcheck() -> None:
    q, k, v = make_inputs(1, 2, SMALL.seq, 16, torch.float32, 16)
    for num_splits in (1, 2):
        args = (q, k, v, torch.tensor(SMALL.image(1, 2)), "conv_like", *SMALL, 0.25, num_splits)
        torch.library.opcheck(torch.ops.dalle_engine.decode_attention.default, args)
    q, k, v = make_inputs(2, 1, SMALL.seq, 16, torch.float32, 16)
    args = (q, k, v, torch.tensor([SMALL.image(1, 2), 4]), "conv_like", *SMALL, 0.25, 2)  # one position per row
    torch.library.opcheck(torch.ops.dalle_engine.decode_attention.default, args)


def test_torch_compile_fullgraph() -> None:
    q, k, v = make_inputs(1, 2, SMALL.seq, 32, torch.float32, 17)

    def step(q, k, v, pos):
        return decode_attention(q * 2, k, v, pos, pattern="conv_like", **SMALL._asdict()) + 1

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for pos in (5, SMALL.image(2, 2), SMALL.seq - 1):
        pos = torch.tensor(pos)
        torch.testing.assert_close(compiled(q, k, v, pos), step(q, k, v, pos), rtol=0, atol=0)
    assert counter.frame_count == 1  # a tensor pos: one graph serves every position


def test_torch_compile_fullgraph_per_row_pos() -> None:
    q, k, v = make_inputs(3, 1, SMALL.seq, 32, torch.float32, 23)

    def step(q, k, v, pos):
        return decode_attention(q * 2, k, v, pos, pattern="axial_col", **SMALL._asdict()) + 1

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for pos in ((5, SMALL.image(2, 2), SMALL.seq - 1), (SMALL.image(0, 0), 0, SMALL.image(3, 1))):
        pos = torch.tensor(pos)
        torch.testing.assert_close(compiled(q, k, v, pos), step(q, k, v, pos), rtol=0, atol=0)
    assert counter.frame_count == 1  # new positions, same graph


@pytest.mark.parametrize(
    ("change", "match"),
    [(dict(dtype=torch.float64), "fp16, bf16 and fp32"), (dict(dim_head=256), "up to 128"),
     (dict(interpret="0"), "GPU tensors"), (dict(num_splits=0), "num_splits"), (dict(pos=SMALL.seq), "pos must lie"),
     (dict(pos=torch.tensor(3.0)), "0-dim integer"),
     (dict(pos=torch.tensor([3, 4])), r"\(batch,\) = \(1,\) integer tensor, got torch.int64 of shape \(2,\)"),
     (dict(pos=torch.tensor([[3]])), r"got torch.int64 of shape \(1, 1\)"),
     (dict(pos=torch.tensor([3.0])), r"got torch.float32 of shape \(1,\)"),
     (dict(pos=torch.tensor([3], device="meta")), "pos must be on q's device")],
    ids=lambda x: x if isinstance(x, str) else "-".join(
        f"{key}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}" for key, value in x.items()),
)
def test_rejects_unsupported(change: dict, match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", change.get("interpret", "1"))
    q = torch.zeros(1, 1, change.get("dim_head", 32), dtype=change.get("dtype", torch.float32))
    cache = q[:, :, None].expand(1, 1, SMALL.seq, q.shape[-1])
    with pytest.raises(ValueError, match=match):
        decode_attention(q, cache, cache, change.get("pos", 3), pattern="full", num_splits=change.get("num_splits"),
                         **SMALL._asdict())


# --------------------------------------------------------------------------------------------------------------
# Native kernels (CUDA only)


def native_cuda_check() -> None:
    """bf16 kernels against float64, every pattern, with the heuristic's splits and with one, at one position and
    at one position per row; then CUDA graphs captured once and replayed at new positions written into their pos
    tensor (0-dim, and per row). Runs in a process without TRITON_INTERPRET, as the interpreter choice is fixed when
    the kernels are defined."""
    geo, batch, heads, dim_head = Geometry(64, 16), 2, 4, 64
    q, k, v = (x.cuda() for x in make_inputs(batch, heads, geo.seq, dim_head, torch.bfloat16, 19))
    positions = (10, 64, geo.image(7, 0), geo.image(9, 11), geo.seq - 1)
    for pattern in PATTERNS:
        for num_splits in (None, 1):
            for pos in positions:
                got = decode_attention(q, k, v, torch.tensor(pos, device="cuda"), pattern=pattern,
                                       num_splits=num_splits, **geo._asdict())
                assert_within_budget(got, q, k, v, key_mask(pattern, geo, pos).cuda())
            for rows in ((10, geo.seq - 1), (geo.image(9, 11), 64)):
                got = decode_attention(q, k, v, torch.tensor(rows, device="cuda"), pattern=pattern,
                                       num_splits=num_splits, **geo._asdict())
                for b, pos in enumerate(rows):
                    row = slice(b, b + 1)
                    assert_within_budget(got[row], q[row], k[row], v[row], key_mask(pattern, geo, pos).cuda())

    pos_t = torch.tensor(0, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        decode_attention(q, k, v, pos_t, pattern="conv_like", **geo._asdict())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, pos_t, pattern="conv_like", **geo._asdict())
    for pos in positions:
        pos_t.fill_(pos)
        graph.replay()
        want = reference.decode_attention(q, k, v, pos, pattern="conv_like", **geo._asdict())
        torch.testing.assert_close(out, want)

    rows_t = torch.zeros(batch, dtype=torch.int64, device="cuda")
    with torch.cuda.stream(stream):
        decode_attention(q, k, v, rows_t, pattern="axial_row", **geo._asdict())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, rows_t, pattern="axial_row", **geo._asdict())
    for rows in ((10, geo.seq - 1), (geo.image(7, 0), 64), (geo.image(9, 11), geo.image(9, 11))):
        rows_t.copy_(torch.tensor(rows))
        graph.replay()
        want = reference.decode_attention(q, k, v, rows_t, pattern="axial_row", **geo._asdict())
        torch.testing.assert_close(out, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_cuda_native_bf16_and_graph_replay() -> None:
    env = dict(os.environ, TRITON_INTERPRET="0")  # not unset: this module would default it to 1
    code = f"import runpy; runpy.run_path({str(Path(__file__))!r})['native_cuda_check']()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
