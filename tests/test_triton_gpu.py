"""The Triton kernels compiled for a CUDA GPU and run natively, against float64 attention on the same GPU.

Skipped without CUDA; ``make gpu-check`` (``bench/gpu_check.py``) runs it. Covered: ``kernels.triton.sparse_attention``
(output and the q, k, v gradients) for every pattern at a ragged geometry and at DALL-E's as the model trains (bos +
256 caption tokens + a 32 x 32 grid less its last token: text_len 257, seq 1280), in fp16, bf16, exact fp32 and fp32
with TF32; ``kernels.triton.decode_attention`` for every pattern and dtype with one and several key splits; and a
CUDA graph of the decode kernel replayed at new positions written into its device ``pos`` tensor; and every tile
setting the attention autotuner may choose on this GPU (``kernels.triton.tuning``), at DALL-E's geometry.

Error budget (``kernels.md`` §10.5, as ``tests/test_triton_attention.py``): the kernel's max error against float64
may be at most twice that of plain PyTorch attention computed in the same dtype on the same device (with TF32
matmuls in the TF32 case), plus a few fp32 ulps of the result's scale.

This file never sets ``TRITON_INTERPRET``. ``bench/gpu_check.py`` sets, in the processes it starts:
``GPU_CHECK_QUICK=1`` (DALL-E's geometry only); ``GPU_CHECK_DRY_RUN=1`` with ``TRITON_INTERPRET=1`` (CPU tensors in
Triton's interpreter at a tiny geometry, one pattern: the command runs without a GPU); ``GPU_CHECK_RECORD=<path>``
(each comparison's errors appended there as JSON lines).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import NamedTuple

import pytest
import torch

from kernels import PATTERNS, dense_mask
from kernels.masks import allowed
from kernels.triton import decode_attention, sparse_attention, tuning

DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if DRY_RUN:
    READY, WHY = INTERPRET, "the dry run needs TRITON_INTERPRET=1"
else:
    # The interpreter choice is fixed when the kernels are first defined: a session in which another test module has
    # set TRITON_INTERPRET (test_triton_attention.py does) cannot run them natively.
    READY = torch.cuda.is_available() and not INTERPRET
    WHY = "needs CUDA" if not torch.cuda.is_available() else "TRITON_INTERPRET=1 is set: run this file on its own"
pytestmark = pytest.mark.skipif(not READY, reason=WHY)
pytest.importorskip("triton")

DEVICE = "cpu" if DRY_RUN else "cuda"


class Geometry(NamedTuple):
    text_len: int
    fmap_size: int
    seq: int

    def image(self, row: int, col: int) -> int:
        return self.text_len + row * self.fmap_size + col


DALLE = Geometry(257, 32, 1280)
# Text tiles end at 7 and the grid stops mid-row. Its integers are divisible by 16 where DALLE's are, which is what
# Triton specialises kernels on, so the two geometries mostly share compiled kernels.
RAGGED = Geometry(7, 16, 160)
TINY = Geometry(7, 4, 20)
if DRY_RUN:
    GEOMETRIES, TEST_PATTERNS, (BATCH, HEADS, DIM) = {"tiny": TINY}, ("conv_like",), (1, 2, 16)
else:
    GEOMETRIES = {"dalle": DALLE} if os.environ.get("GPU_CHECK_QUICK") == "1" else {"ragged": RAGGED, "dalle": DALLE}
    TEST_PATTERNS, (BATCH, HEADS, DIM) = PATTERNS, (2, 2, 64)
ONE_GEOMETRY = TINY if DRY_RUN else DALLE  # where decoding and the tile candidates run
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PRECISIONS = {**{name: (dtype, False) for name, dtype in DTYPES.items()}, "tf32": (torch.float32, True)}


@contextmanager
def tf32_matmuls(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int) -> list[torch.Tensor]:
    """Drawn in float64 on the CPU (the same numbers on any device), rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for _ in range(count)]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain masked softmax attention in the inputs' own dtype."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def assert_within_budget(name: str, got: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    assert got.dtype == plain.dtype and got.shape == exact.shape
    err = (got.double() - exact).abs().max().item()
    torch_err = (plain.double() - exact).abs().max().item()
    # The kernels accumulate in fp32 at every dtype: a few fp32 ulps of the result are their own floor.
    budget = 2 * torch_err + 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    if os.environ.get("GPU_CHECK_RECORD"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::")[-1]
        with open(os.environ["GPU_CHECK_RECORD"], "a") as f:
            f.write(json.dumps(dict(test=test, name=name, err=err, torch_err=torch_err, budget=budget)) + "\n")
    assert err <= budget, f"{name}: error {err:.3g} exceeds budget {budget:.3g} (PyTorch's own error {torch_err:.3g})"


def forward_backward(attention, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Output and (dq, dk, dv) for the upstream gradient ``inputs[3]``."""
    q, k, v = (x.detach().requires_grad_() for x in inputs[:3])
    out = attention(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), inputs[3])]


def check_attention(geo: Geometry, pattern: str, precision: str, seed: int, label: str = "") -> None:
    """Output and gradients of ``kernels.triton.sparse_attention`` within budget of float64 attention."""
    dtype, tf32 = PRECISIONS[precision]
    inputs = make_inputs((BATCH, HEADS, geo.seq, DIM), dtype, 4, seed=seed)
    mask = dense_mask(pattern, geo.seq, text_len=geo.text_len, fmap_size=geo.fmap_size, device=DEVICE)

    def ours(q, k, v):
        return sparse_attention(q, k, v, pattern=pattern, text_len=geo.text_len, fmap_size=geo.fmap_size)

    with tf32_matmuls(tf32):  # the kernel reads the flag at each call, the backward's too
        got = forward_backward(ours, inputs)
        plain = forward_backward(lambda q, k, v: masked_attention(q, k, v, mask), inputs)
    exact = forward_backward(lambda q, k, v: masked_attention(q, k, v, mask), [x.double() for x in inputs])
    for name, *results in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        assert_within_budget(label + name, *results)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("pattern", TEST_PATTERNS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_attention(geometry: str, pattern: str, precision: str) -> None:
    check_attention(GEOMETRIES[geometry], pattern, precision, seed=PATTERNS.index(pattern))


def tile_candidates() -> list[tuple[str, str, tuning.Tiles]]:
    """(precision, kernel, setting) for every candidate the autotuner may choose on this GPU at head dim ``DIM``."""
    major, minor = torch.cuda.get_device_capability() if READY and DEVICE == "cuda" else (9, 0)
    arch = 10 * major + minor
    cases = []
    for precision, (dtype, tf32) in PRECISIONS.items():
        key = tuning.table_key(arch, dtype, "tf32" if tf32 else "ieee", DIM)
        cases += [(precision, kernel, tiles) for kernel in tuning.KERNELS for tiles in tuning.candidates(kernel, key)]
    return cases[:2] if DRY_RUN else cases


@pytest.mark.parametrize("precision, kernel, tiles", tile_candidates(), ids=lambda x: str(x))
def test_tile_candidates(precision: str, kernel: str, tiles: tuning.Tiles, monkeypatch) -> None:
    """Each setting the autotuner may choose, at DALL-E's geometry (conv_like), the other kernels at their defaults."""
    default = tuning.choose
    monkeypatch.setattr(tuning, "choose", lambda k, *args: tiles if k == kernel else default(k, *args))
    monkeypatch.setenv("DALLE_ENGINE_AUTOTUNE", "0")
    check_attention(ONE_GEOMETRY, "conv_like", precision, seed=30, label=f"{kernel} {tiles} ")


def decode_positions(geo: Geometry) -> list[int]:
    """Mid-text, the last text and first image token, a row's end and the next row's start, mid-grid, the last."""
    mid = geo.fmap_size // 2
    return sorted({geo.text_len // 2, geo.text_len - 1, geo.text_len, geo.image(0, geo.fmap_size - 1), geo.image(1, 0),
                   geo.image(mid, mid), geo.seq - 1})


def decode_check(pattern: str, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int
                 ) -> None:
    geo = ONE_GEOMETRY
    mask = allowed(pattern, pos, torch.arange(geo.seq), text_len=geo.text_len, fmap_size=geo.fmap_size).to(DEVICE)
    plain = masked_attention(q[:, :, None], k, v, mask)[:, :, 0]
    exact = masked_attention(q[:, :, None].double(), k.double(), v.double(), mask)[:, :, 0]
    assert_within_budget(f"pos {pos}", out, plain, exact)


@pytest.mark.parametrize("splits", [1, 4], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", TEST_PATTERNS)
def test_decode(pattern: str, dtype: str, splits: int) -> None:
    geo = ONE_GEOMETRY
    q, k, v = make_inputs((BATCH, HEADS, geo.seq, DIM), DTYPES[dtype], 3, seed=10 + PATTERNS.index(pattern))
    q = q[:, :, 0]
    for pos in decode_positions(geo):
        out = decode_attention(q, k, v, torch.tensor(pos, device=DEVICE), pattern=pattern, text_len=geo.text_len,
                               fmap_size=geo.fmap_size, num_splits=splits)
        decode_check(pattern, out, q, k, v, pos)


def test_decode_graph_replay() -> None:
    """One capture, replayed at each position written into the captured ``pos`` tensor (the default splits)."""
    geo, pattern = ONE_GEOMETRY, "conv_like"
    q, k, v = make_inputs((BATCH, HEADS, geo.seq, DIM), torch.bfloat16, 3, seed=20)
    q, pos_t = q[:, :, 0], torch.tensor(0, device=DEVICE)

    def step():
        return decode_attention(q, k, v, pos_t, pattern=pattern, text_len=geo.text_len, fmap_size=geo.fmap_size)

    if DEVICE == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and warm up outside the capture
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        replay = graph.replay
    else:  # the dry run has no CUDA graphs: the same call, reading the same pos tensor
        out = torch.empty_like(q)

        def replay():
            out.copy_(step())
    for pos in decode_positions(geo):
        pos_t.fill_(pos)
        replay()
        decode_check(pattern, out, q, k, v, pos)
