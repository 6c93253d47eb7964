"""The C++ small-batch linear kernel (``kernels.cpp.small_linear``) and its use by ``engine.model.linear.linear``.

Error budget, element by element against the float64 ``x @ w^T + b``: twice F.linear's float32 accumulation error at
the same shape, plus one ulp of the result in the output dtype (its final rounding, the whole error of a bfloat16 or
float16 result but for cancellation). The accumulation error is counted in units of float32's eps times the
root-sum-square of the summed products, which unlike the result does not shrink when the products cancel, and
measured on 4096 output features: on one or two outputs plain PyTorch can be nearly exact by luck. float64 matches to
1e-12 relative. The sizes cover the kernel's remainders: odd rows (a one-row tile), out features not a multiple of 4
(a partial block), in features not a multiple of the vector width (the scalar tail) and past one or two summation
blocks of 512.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from engine.model import linear as linear_module
from kernels import cpp

pytestmark = [pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}"),
              pytest.mark.usefixtures("cpu_isa")]  # every test once per instruction set the CPU has

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ROWS = [1, 2, 3, 4, 5, 7, 8, 16, 33]
IN_FEATURES = [1, 7, 8, 31, 256, 1000, 1100]
OUT_FEATURES = [1, 3, 17, 512, 2050]
EPS32 = torch.finfo(torch.float32).eps


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Drawn in float64 and rounded to ``dtype``, so the float64 reference sees exactly the kernel's inputs."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


@functools.cache
def pool(dtype: torch.dtype) -> torch.Tensor:
    """Random values to cut the many operands of test_matches_float64 from (drawing each is most of its time)."""
    return randn(max(ROWS) * max(IN_FEATURES) + max(OUT_FEATURES) * (max(IN_FEATURES) + 1), dtype=dtype,
                 gen=torch.Generator().manual_seed(0))


def cut(values: torch.Tensor, start: int, *shape: int) -> torch.Tensor:
    """A contiguous ``shape`` tensor of ``values[start:]``."""
    return values[start: start + math.prod(shape)].view(shape)


def exact_and_scale(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ w^T + b`` in float64, and the root-sum-square of the products (and bias) each element sums."""
    xd, wd = x.double(), w.double()
    exact = xd @ wd.T + (0 if b is None else b.double())
    squares = xd.square() @ wd.square().T + (0 if b is None else b.double().square())
    return exact, squares.sqrt()


@functools.cache
def float32_error(rows: int, in_features: int) -> float:
    """F.linear's largest error in float32 on 4096 random output features of this shape, in units of float32's eps
    times each element's root-sum-square of products."""
    gen = torch.Generator().manual_seed(2)
    x = randn(rows, in_features, dtype=torch.float32, gen=gen)
    w, b = randn(4096, in_features, dtype=torch.float32, gen=gen), randn(4096, dtype=torch.float32, gen=gen)
    exact, scale = exact_and_scale(x, w, b)
    return ((F.linear(x, w, b).double() - exact).abs() / (EPS32 * scale)).max().item()


def check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """``out`` (the kernel's result for x, w, b) against the float64 product, within the error budget."""
    assert out.shape == (x.shape[0], w.shape[0]) and out.dtype == x.dtype
    exact, scale = exact_and_scale(x, w, b)
    err = (out.double() - exact).abs()
    if x.dtype == torch.float64:
        assert err.max() <= 1e-12 * exact.abs().max()
        return
    info = torch.finfo(out.dtype)
    ulp = info.eps * exact.abs() + info.eps * info.smallest_normal  # the second term: subnormal results
    budget = 2 * float32_error(*x.shape) * EPS32 * scale + ulp
    worst = int((err / budget).argmax())
    assert err.flatten()[worst] <= budget.flatten()[worst], (
        f"error {err.flatten()[worst]:.3g} > budget {budget.flatten()[worst]:.3g} at {divmod(worst, out.shape[1])} "
        f"(result {exact.flatten()[worst]:.3g}, products' root-sum-square {scale.flatten()[worst]:.3g})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_float64(dtype: torch.dtype, rows: int) -> None:
    values = pool(dtype)
    for in_features in IN_FEATURES:
        for out_features in OUT_FEATURES:
            # Operands from shifted places in the pool, so that no two cases share all their values.
            x = cut(values, rows * in_features + out_features, rows, in_features)
            w = cut(values, max(ROWS) * max(IN_FEATURES) + in_features, out_features, in_features)
            b = cut(values, values.numel() - out_features - rows, out_features)
            check(cpp.small_linear(x, w, b), x, w, b)
            check(cpp.small_linear(x, w), x, w, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_sliced_weight_and_strided_x(dtype: torch.dtype) -> None:
    """Row slices of bigger matrices (the model's logits projection is one) and x views of every stride kind."""
    gen = torch.Generator().manual_seed(1)
    big = randn(700, 256, dtype=dtype, gen=gen)
    w, b = big[100:612], randn(700, dtype=dtype, gen=gen)[100:612]
    assert w.storage_offset() == 100 * 256
    w_strided = randn(700, 300, dtype=dtype, gen=gen)[100:612, 20:276]  # row stride 300 > 256 in features
    wide = randn(5, 600, dtype=dtype, gen=gen)
    views = {
        "contiguous": randn(5, 256, dtype=dtype, gen=gen),
        "transposed": randn(256, 5, dtype=dtype, gen=gen).t(),
        "column slice": wide[:, 300:556],
        "every other column": wide[:, :512:2],
        "expanded row": randn(1, 256, dtype=dtype, gen=gen).expand(5, 256),
    }
    for name, x in views.items():
        assert x.shape == (5, 256), name
        check(cpp.small_linear(x, w, b), x, w, b)
        check(cpp.small_linear(x, w_strided, b), x, w_strided, b)
    # A weight whose rows overlap in memory (row stride 1) is read in place too.
    flat = randn(300, dtype=dtype, gen=gen)
    w_overlap = flat.as_strided((40, 256), (1, 1))
    check(cpp.small_linear(views["contiguous"], w_overlap), views["contiguous"], w_overlap, None)


def test_empty_sizes() -> None:
    w, b = torch.randn(3, 0), torch.randn(3)
    assert torch.equal(cpp.small_linear(torch.randn(2, 0), w, b), b.expand(2, 3))
    assert cpp.small_linear(torch.randn(0, 4), torch.randn(3, 4)).shape == (0, 3)
    assert cpp.small_linear(torch.randn(2, 4), torch.randn(0, 4)).shape == (2, 0)


class _Calls:
    """Counts calls to ``kernels.cpp.small_linear`` as ``engine.model.linear`` makes them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        real = cpp.small_linear

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(linear_module.cpp, "small_linear", counted)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_engine_linear_flattens_leading_dims(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _Calls(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    x = randn(2, 3, 64, dtype=dtype, gen=gen)
    w, b = randn(96, 64, dtype=dtype, gen=gen), randn(96, dtype=dtype, gen=gen)
    with torch.no_grad():
        out = linear_module.linear(x, w, b)
    assert calls.count == 1 and out.shape == (2, 3, 96)
    check(out.reshape(6, 96), x.reshape(6, 64), w, b)
    # More rows than the kernel is used for: the BLAS paths, same result.
    x_many = randn(4, linear_module.SMALL_LINEAR_MAX_ROWS, 64, dtype=dtype, gen=gen)
    with torch.no_grad():
        out = linear_module.linear(x_many, w, b)
    assert calls.count == 1 and out.shape == (4, linear_module.SMALL_LINEAR_MAX_ROWS, 96)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_row_never_depends_on_the_other_rows(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """What batch-invariant sampling relies on: each row's result is bit for bit the same alone, in any batch and in
    any order, across row tiles (150 rows) and summation blocks (1,030 features); inside row_invariant() the engine's
    linear sends every row count to the kernel."""
    gen = torch.Generator().manual_seed(4)
    x = randn(150, 1030, dtype=dtype, gen=gen)
    w, b = randn(37, 1030, dtype=dtype, gen=gen), randn(37, dtype=dtype, gen=gen)
    together = cpp.small_linear(x, w, b)
    for row in (0, 1, 63, 64, 100, 149):
        assert torch.equal(cpp.small_linear(x[row:row + 1], w, b)[0], together[row])
    for rows in (3, 65, 129):
        assert torch.equal(cpp.small_linear(x[:rows], w, b), together[:rows])
    order = torch.randperm(150, generator=gen)
    assert torch.equal(cpp.small_linear(x[order], w, b), together[order])
    calls = _Calls(monkeypatch)
    with torch.no_grad(), linear_module.row_invariant():
        assert torch.equal(linear_module.linear(x, w, b), together)
    assert calls.count == 1


def test_engine_linear_keeps_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """With inputs requiring grad the C++ op (no autograd) must not run; gradients match F.linear's."""
    calls = _Calls(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    x = randn(4, 32, dtype=torch.float64, gen=gen).requires_grad_()
    layer = linear_module.Linear(32, 24).double()
    for inputs in [(x, layer.weight, layer.bias), (x.detach(), layer.weight, layer.bias), (x, layer.weight.detach())]:
        out = linear_module.linear(*inputs)
        expected = F.linear(*inputs)
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(out.square().sum(), [t for t in inputs if t.requires_grad])
        expected_grads = torch.autograd.grad(expected.square().sum(), [t for t in inputs if t.requires_grad])
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad)
    assert calls.count == 0
    # Without grad mode the same inputs take the kernel.
    with torch.no_grad():
        layer(x)
    assert calls.count == 1


@pytest.mark.parametrize(
    ("x", "w", "b", "match"),
    [
        (torch.zeros(2, 5), torch.zeros(3, 4), None, "x has 5 features but weight expects 4"),
        (torch.zeros(5), torch.zeros(3, 5), None, r"x must be \(rows, in\) and weight \(out, in\)"),
        (torch.zeros(1, 2, 5), torch.zeros(3, 5), None, r"x must be \(rows, in\) and weight \(out, in\)"),
        (torch.zeros(2, 5), torch.zeros(15), None, r"x must be \(rows, in\) and weight \(out, in\)"),
        (torch.zeros(2, 5), torch.zeros(3, 5, dtype=torch.float64), None, "weight must have x's dtype"),
        (torch.zeros(2, 5), torch.zeros(3, 5), torch.zeros(3, dtype=torch.float16), "bias must have x's dtype"),
        (torch.zeros(2, 5), torch.zeros(3, 5), torch.zeros(4), r"bias must be \(3,\)"),
        (torch.zeros(2, 5), torch.zeros(3, 5), torch.zeros(1, 3), r"bias must be \(3,\)"),
        (torch.zeros(2, 5, dtype=torch.int32), torch.zeros(3, 5, dtype=torch.int32), None, "must be float32"),
        (torch.zeros(2, 5), torch.zeros(5, 3).t(), None, "unit stride along in features"),
    ],
    ids=["in features", "1-D x", "3-D x", "1-D weight", "weight dtype", "bias dtype", "bias size", "2-D bias",
         "integer", "transposed weight"],
)
def test_bad_inputs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        cpp.small_linear(x, w, b)


def test_engine_linear_bad_inputs() -> None:
    with torch.no_grad(), pytest.raises(RuntimeError, match="x has 5 features but weight expects 4"):
        linear_module.linear(torch.zeros(2, 5), torch.zeros(3, 4))
    with torch.no_grad(), pytest.raises(RuntimeError):
        linear_module.linear(torch.zeros(2, 5), torch.zeros(3, 5), torch.zeros(4))


@pytest.mark.parametrize("bias", [True, False])
def test_op_passes_opcheck(bias: bool) -> None:
    """Schema, fake (meta) implementation and dispatcher checks."""
    gen = torch.Generator().manual_seed(4)
    x, w = randn(3, 40, dtype=torch.float32, gen=gen), randn(9, 40, dtype=torch.float32, gen=gen)
    b = randn(9, dtype=torch.float32, gen=gen) if bias else None
    torch.library.opcheck(torch.ops.dalle_engine_cpu.small_linear.default, (x, w, b))


def test_engine_linear_compiles_fullgraph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch traces without graph breaks, into the op (its fake implementation gives the shapes)."""
    calls = _Calls(monkeypatch)
    x, w, b = torch.randn(3, 1, 24), torch.randn(40, 24), torch.randn(40)
    compiled = torch.compile(linear_module.linear, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x, w, b)
    assert calls.count == 1
    torch.testing.assert_close(out, F.linear(x, w, b))


# --- weight-only quantised weights: int8 with a scale per output feature, or bfloat16 / float16 beside float32 x ---


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output feature, as ``engine.model.quantize`` does (rows of zeros get scale 1)."""
    scale = (w.abs().amax(dim=1) / 127).where(w.abs().amax(dim=1) > 0, torch.ones(()))
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.float()


WEIGHT_KINDS = ["int8", "bfloat16", "float16"]


def stored(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(the weight as stored, its scale or None, the float64 weight the product computes with)."""
    if kind == "int8":
        q, scale = quantize_int8(w.float())
        return q, scale, q.double() * scale.double()[:, None]
    low = w.to(getattr(torch, kind))
    return low, None, low.double()


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 33])
def test_weight_only_matches_float64(kind: str, x_dtype: torch.dtype, rows: int) -> None:
    """The product with the stored weight is the float64 product with the weight it stands for (int8: q * scale),
    within the float32 budget: the conversion of each weight element is exact, the scale one more rounding."""
    if x_dtype == torch.bfloat16 and kind == "float16":
        pytest.skip("16-bit weights go with float32 rows (or their own dtype)")
    values = pool(torch.float32)
    for in_features in IN_FEATURES:
        for out_features in OUT_FEATURES:
            x = cut(values, rows * in_features + out_features, rows, in_features).to(x_dtype)
            w = cut(values, max(ROWS) * max(IN_FEATURES) + in_features, out_features, in_features)
            b = cut(values, values.numel() - out_features - rows, out_features).to(x_dtype)
            weight, scale, exact_w = stored(w, kind)
            check(cpp.small_linear(x, weight, b, scale), x, exact_w, b)
            check(cpp.small_linear(x, weight, None, scale), x, exact_w, None)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_weight_only_rows_never_depend_on_the_other_rows(kind: str) -> None:
    """Batch-invariant sampling with stored weights: every row count converts the weight the same way."""
    gen = torch.Generator().manual_seed(5)
    x = randn(150, 1030, dtype=torch.float32, gen=gen)
    weight, scale, _ = stored(randn(37, 1030, dtype=torch.float32, gen=gen), kind)
    b = randn(37, dtype=torch.float32, gen=gen)
    together = cpp.small_linear(x, weight, b, scale)
    for row in (0, 1, 63, 64, 100, 149):
        assert torch.equal(cpp.small_linear(x[row:row + 1], weight, b, scale)[0], together[row])
    for rows in (2, 3, 65, 129):
        assert torch.equal(cpp.small_linear(x[:rows], weight, b, scale), together[:rows])


def test_weight_only_argument_errors() -> None:
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    q, scale = quantize_int8(w)
    bad = {
        "int8 weights need a scale": lambda: cpp.small_linear(x, q),
        "a scale goes only with int8 weights": lambda: cpp.small_linear(x, w, None, scale),
        "scale must be a float32 CPU tensor of shape (5,)": lambda: cpp.small_linear(x, q, None, scale.double()),
        "scale must be a float32 CPU tensor of shape (5,), got Float [4]": lambda: cpp.small_linear(x, q, None,
                                                                                                 scale[:4]),
        "weight must have x's dtype Double": lambda: cpp.small_linear(x.double(), w.bfloat16()),
        "weight must have x's dtype BFloat16": lambda: cpp.small_linear(x.bfloat16(), w.half()),
        "weight must have x's dtype Float": lambda: cpp.small_linear(x, w.double()),
    }
    for message, call in bad.items():
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            call()



def test_weight_only_op_passes_opcheck() -> None:
    x, w, b = torch.randn(3, 16), torch.randn(5, 16), torch.randn(5)
    q, scale = quantize_int8(w)
    for args in [(x, q, b, scale), (x, q, None, scale), (x, w.bfloat16(), b)]:
        torch.library.opcheck(torch.ops.dalle_engine_cpu.small_linear.default, args)


# --- weights packed along output features (kernels.cpp.pack_weight): the form the fused decode step passes ---

PACKED_OUT_FEATURES = [16, 48, 80, 2048]  # one group; 3 (a partial block of 4 groups); 5 (a block and one); many


@pytest.mark.parametrize("kind", ["same", *WEIGHT_KINDS])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
def test_packed_matches_float64(kind: str, x_dtype: torch.dtype, rows: int) -> None:
    """A packed weight of every dtype the products take, within the budget of the (out, in) weight: row tiles of 4,
    2 and 1, group blocks of 4 and 1, and in features past one and several summation blocks."""
    if kind != "same" and kind != "int8" and x_dtype != torch.float32:
        pytest.skip("16-bit weights go with float32 rows (or their own dtype)")
    values = pool(torch.float32 if x_dtype != torch.float64 else torch.float64)
    for in_features in IN_FEATURES:
        for out_features in PACKED_OUT_FEATURES:
            x = cut(values, rows * in_features + out_features, rows, in_features).to(x_dtype)
            w = cut(values, max(ROWS) * max(IN_FEATURES) + in_features, out_features, in_features)
            b = cut(values, values.numel() - out_features - rows, out_features).to(x_dtype)
            weight, scale, exact_w = (w.to(x_dtype), None, w.to(x_dtype)) if kind == "same" else stored(w, kind)
            packed = cpp.pack_weight(weight)
            assert packed.shape == (out_features // 16, in_features, 16) and packed.dtype == weight.dtype
            check(cpp.small_linear(x, packed, b, scale), x, exact_w, b)
            check(cpp.small_linear(x, packed, None, scale), x, exact_w, None)


@pytest.mark.parametrize("kind", ["same", *WEIGHT_KINDS])
def test_packed_rows_never_depend_on_the_other_rows(kind: str) -> None:
    gen = torch.Generator().manual_seed(6)
    x = randn(37, 300, dtype=torch.float32, gen=gen)
    w = randn(80, 300, dtype=torch.float32, gen=gen)
    weight, scale, _ = (w, None, w) if kind == "same" else stored(w, kind)
    packed, b = cpp.pack_weight(weight), randn(80, dtype=torch.float32, gen=gen)
    together = cpp.small_linear(x, packed, b, scale)
    for row in (0, 1, 4, 36):
        assert torch.equal(cpp.small_linear(x[row:row + 1], packed, b, scale)[0], together[row])
    for rows in (2, 3, 5, 6, 7):
        assert torch.equal(cpp.small_linear(x[:rows], packed, b, scale), together[:rows])


@pytest.mark.skipif("avx512" not in cpp.cpu_isas() if cpp.available() else True, reason="needs an AVX-512 CPU")
@pytest.mark.parametrize("kind", ["same", "int8", "bfloat16"])
def test_packed_avx512_and_avx2_agree_bit_for_bit(kind: str) -> None:
    """Both builds run the same multiply-adds in the same order, each lane one output feature."""
    gen = torch.Generator().manual_seed(7)
    x, w = randn(5, 1000, dtype=torch.float32, gen=gen), randn(80, 1000, dtype=torch.float32, gen=gen)
    weight, scale, _ = (w, None, w) if kind == "same" else stored(w, kind)
    packed, b = cpp.pack_weight(weight), randn(80, dtype=torch.float32, gen=gen)
    with cpp.use_cpu_isa("avx512"):
        wide = cpp.small_linear(x, packed, b, scale)
    with cpp.use_cpu_isa("avx2"):
        assert torch.equal(cpp.small_linear(x, packed, b, scale), wide)


def test_packed_argument_errors() -> None:
    x, w = torch.randn(2, 8), torch.randn(32, 8)
    packed = cpp.pack_weight(w)
    with pytest.raises(ValueError, match=r"out a multiple of 16, got shape \(24, 8\)"):
        cpp.pack_weight(w[:24])
    bad = {
        "a packed weight must be contiguous": lambda: cpp.small_linear(x, packed.transpose(0, 1).contiguous()
                                                                        .transpose(0, 1)),
        r"packed \(out / 16, in, 16\), got \[2, 8\] and \[2, 8, 2, 8\]":
            lambda: cpp.small_linear(x, packed.view(2, 8, 2, 8)),
        r"packed weight must be contiguous, \(out / 16, in, 16\), got \[2, 8, 8\]":
            lambda: cpp.small_linear(x, packed[..., :8]),
        "x has 7 features but weight expects 8": lambda: cpp.small_linear(x[:, :7], packed),
        r"bias must be \(32,\)": lambda: cpp.small_linear(x, packed, torch.randn(16)),
    }
    for message, call in bad.items():
        with pytest.raises(RuntimeError, match=message):
            call()


def test_packed_op_passes_opcheck() -> None:
    x, w, b = torch.randn(3, 16), torch.randn(32, 16), torch.randn(32)
    q, scale = quantize_int8(w)
    for args in [(x, cpp.pack_weight(w), b), (x, cpp.pack_weight(q), b, scale),
                 (x, cpp.pack_weight(w.bfloat16()), None)]:
        torch.library.opcheck(torch.ops.dalle_engine_cpu.small_linear.default, args)
