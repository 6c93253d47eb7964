"""C++ CPU kernels (``kernels._C``, built from ``csrc/`` by ``pip install --no-build-isolation -e .``).

The library registers ``torch.ops.dalle_engine_cpu.sparse_attention_fwd`` (q, k, v -> out, lse),
``sparse_attention_bwd`` (q, k, v, out, lse, dout -> dq, dk, dv), ``decode_attention`` (q, k_cache, v_cache, pos
-> out, one query per sequence against a KV cache), ``small_linear`` (x, weight, bias -> x @ weight^T + bias for a
handful of rows, bound by streaming the weight), ``decode_layer`` (one transformer layer of a decode step),
``counter_uniform`` (the sampler's counter-based noise), ``geglu_fwd`` / ``geglu_bwd`` (the feed-forward's GEGLU) and
``cross_entropy_rows`` (the training loss's rows), each row kernel built for AVX-512, AVX2 and baseline x86-64 and run
for the best the CPU has (``cpu_isa``, ``use_cpu_isa``); this module loads it, gives the ops fake (meta)
implementations so ``torch.compile`` can trace them, and wraps the sparse attention pair in an autograd.Function. It
never fails to import: ``available()`` says whether the kernels can be used, ``load_error()`` why not.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch

from . import masks

__all__ = ["BRANCH_TENSORS", "PACK_LANES", "available", "counter_uniform", "cpu_isa", "cpu_isas", "cross_entropy_rows",
           "decode_attention", "decode_layer", "decode_stack", "geglu", "load_error", "pack_weight", "small_linear",
           "sparse_attention", "use_cpu_isa"]

_NAMESPACE = "dalle_engine_cpu"


def _load() -> str | None:
    """Load the library and register the fake implementations; returns why it could not be loaded, or None."""
    if hasattr(torch.ops, _NAMESPACE) and hasattr(getattr(torch.ops, _NAMESPACE), "sparse_attention_fwd"):
        return None  # already registered (module reloaded)
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None or spec.origin is None:
        return "kernels._C is not built (run `pip install --no-build-isolation -e .`)"
    try:
        # Loaded as a plain shared library (it has no Python module init): its static initialisers register the ops.
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as error:
        return f"kernels._C failed to load: {error}"

    @torch.library.register_fake(f"{_NAMESPACE}::sparse_attention_fwd")
    def _fwd_fake(q, k, v, pattern, text_len, fmap_size, kernel_size, dilation, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_compute_dtype(q.dtype))

    @torch.library.register_fake(f"{_NAMESPACE}::sparse_attention_bwd")
    def _bwd_fake(q, k, v, out, lse, dout, pattern, text_len, fmap_size, kernel_size, dilation, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)

    @torch.library.register_fake(f"{_NAMESPACE}::decode_attention")
    def _decode_fake(q, k_cache, v_cache, pos, pattern, text_len, fmap_size, kernel_size, dilation, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake(f"{_NAMESPACE}::small_linear")
    def _small_linear_fake(x, weight, bias, scale=None):
        return x.new_empty(x.shape[0], weight.shape[0] * (weight.shape[2] if weight.dim() == 3 else 1))

    @torch.library.register_fake(f"{_NAMESPACE}::counter_uniform")
    def _counter_uniform_fake(keys, step, columns):
        return keys.new_empty(keys.shape[0], columns, dtype=torch.float32)

    @torch.library.register_fake(f"{_NAMESPACE}::geglu_fwd")
    def _geglu_fwd_fake(x, bias=None):
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)

    @torch.library.register_fake(f"{_NAMESPACE}::geglu_bwd")
    def _geglu_bwd_fake(x, bias, grad):
        return x.new_empty(x.shape), x.new_empty(x.shape[-1] if bias is not None else 0)

    @torch.library.register_fake(f"{_NAMESPACE}::cross_entropy_rows")
    def _cross_entropy_rows_fake(logits, bias, target, grad):
        return logits.new_empty(logits.shape[0])

    @torch.library.register_fake(f"{_NAMESPACE}::decode_layer")
    def _decode_layer_fake(x, attn, ff, k_cache, v_cache, pos, rotary_cos, rotary_sin, ring_attn, ring_ff,
                           shift_weights, pattern, text_len, fmap_size, kernel_size, dilation, eps, reversible):
        return x.new_empty(x.shape)

    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_LOAD_ERROR = _load()


def available() -> bool:
    """Whether the C++ kernels are built and loaded."""
    return _LOAD_ERROR is None


def load_error() -> str | None:
    """Why the C++ kernels are unavailable, or None."""
    return _LOAD_ERROR


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, geometry):
        # The kernels read contiguous heads: copied here once, for both passes (views of a QKV projection are not).
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, lse = getattr(torch.ops, _NAMESPACE).sparse_attention_fwd(q, k, v, *geometry)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geometry = geometry
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = getattr(torch.ops, _NAMESPACE).sparse_attention_bwd(q, k, v, out, lse, dout, *ctx.geometry)
        return dq, dk, dv, None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: str,
    text_len: int,
    fmap_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """``kernels.reference.sparse_attention`` on the C++ CPU kernels, differentiable in q, k and v.

    q, k, v: ``(batch, heads, seq, dim_head)`` CPU tensors of one dtype (float32, float64, bfloat16 or float16; any
    strides). Computes in float32 (float64 for float64 inputs) and returns the input dtype. ``scale`` defaults to
    ``dim_head ** -0.5``. Raises RuntimeError if the kernels are unavailable (see ``load_error()``).
    """
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    masks.check_geometry(pattern, text_len=text_len, fmap_size=fmap_size, kernel_size=kernel_size,
                         dilation=dilation, seq_len=q.shape[2] if q.dim() == 4 else None)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    geometry = (pattern, text_len, fmap_size, kernel_size, dilation, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SparseAttention.apply(q, k, v, geometry)
    return getattr(torch.ops, _NAMESPACE).sparse_attention_fwd(q, k, v, *geometry)[0]


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return getattr(torch.ops, _NAMESPACE).geglu_fwd(x, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        dx, dbias = getattr(torch.ops, _NAMESPACE).geglu_bwd(x, bias, grad)
        return dx, dbias if bias is not None else None


def geglu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """GEGLU on the C++ CPU kernels, differentiable: ``a * F.gelu(gate)`` for ``a, gate = (x + bias).chunk(2, -1)``,
    x a float32 or float64 CPU tensor and bias None or ``(x.shape[-1],)`` of its dtype (a projection's bias, left to
    the kernels: added as x is read, its gradient summed as x's is written, where the projection's would cost a copy
    forward and a pass backward). Forward and backward are each one pass over x, where ATen makes five (chunk, GELU,
    product, and in the backward their gradients and the concatenation of the halves'); the exact (erf) GELU to a few
    float32 ulps, the fused decode layer's. Raises RuntimeError if the kernels are unavailable (see
    ``load_error()``)."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _GEGLU.apply(x, bias)
    return getattr(torch.ops, _NAMESPACE).geglu_fwd(x, bias)


def cross_entropy_rows(logits: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                       grad: bool) -> torch.Tensor:
    """Each row's cross-entropy, ``logsumexp(row) - row[target]`` of the row plus ``bias``, on the C++ CPU kernel,
    one visit of the row.

    logits: ``(rows, vocabulary)`` contiguous float32 or float64 CPU; bias: ``(vocabulary,)`` of its dtype, or None;
    target: ``(rows,)`` int64 ids in ``[0, vocabulary)``. Returns ``(rows,)`` in logits' dtype. Overwrites logits:
    with ``grad``, each row becomes its loss's gradient, softmax minus the one-hot target; without, it is left
    unspecified. Not differentiable. The op checks its arguments (RuntimeError); raises RuntimeError if the kernels
    are unavailable (see ``load_error()``)."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    return getattr(torch.ops, _NAMESPACE).cross_entropy_rows(logits, bias, target, grad)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int | torch.Tensor,
    *,
    pattern: str,
    text_len: int,
    fmap_size: int,
    kernel_size: int = 5,
    dilation: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """``kernels.reference.decode_attention`` on the C++ CPU kernel, which reads only the keys the pattern allows.

    q: ``(batch, heads, dim_head)``; k_cache, v_cache: ``(batch, heads, max_seq, dim_head)`` CPU tensors of q's dtype
    (float32, float64, bfloat16 or float16; any strides), row ``b`` holding positions ``0..pos[b]``. ``pos``: an int
    or a one-element CPU integer tensor (every row at that position), or a ``(batch,)`` CPU integer tensor (row ``b``
    at ``pos[b]``); each row's result is bitwise the same as computed alone. Computes in float32 (float64 for float64
    inputs) and returns ``(batch, heads, dim_head)`` in q's dtype. ``scale`` defaults to ``dim_head ** -0.5``. Not
    differentiable. The op checks the arguments, positions included (RuntimeError); raises RuntimeError if the kernels
    are unavailable (see ``load_error()``).
    """
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    pos = pos if isinstance(pos, torch.Tensor) else torch.tensor(pos)  # a tensor: no graph break when compiled
    return getattr(torch.ops, _NAMESPACE).decode_attention(q, k_cache, v_cache, pos, pattern, text_len,
                                                           fmap_size, kernel_size, dilation, scale)


def cpu_isa() -> str:
    """The instruction set the C++ row kernels run: "avx512", "avx2" or "baseline" (x86-64 SSE2). The best the CPU
    has unless ``DALLE_ENGINE_CPU_ISA`` (read when the kernels first run) or ``use_cpu_isa`` chose a lower one."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    return getattr(torch.ops, _NAMESPACE).cpu_isa()


def cpu_isas() -> list[str]:
    """The instruction sets this CPU (and build) can run the row kernels with, best first."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    order = ["avx512", "avx2", "baseline"]
    return order[order.index(getattr(torch.ops, _NAMESPACE).best_cpu_isa()):]


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Inside: the row kernels run the ``name`` build (one of ``cpu_isas()``), e.g. to measure an AVX2-only machine on
    an AVX-512 one. Process-wide, not per thread."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    before = getattr(torch.ops, _NAMESPACE).set_cpu_isa(name)
    try:
        yield
    finally:
        getattr(torch.ops, _NAMESPACE).set_cpu_isa(before)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for 2-D x on the C++ CPU kernel, which streams the weight once for all rows (fastest for a handful).

    x: ``(rows, in)``, any strides; weight: ``(out, in)`` with unit stride along ``in``, any row stride (row and column
    slices of a bigger matrix are read in place), or packed by ``pack_weight`` (2-3x faster at a handful of rows); bias:
    ``(out,)`` or None. CPU tensors of one dtype (float32, float64, bfloat16 or float16), except that the weight may be
    stored in fewer bits (weight-only quantisation): int8 with ``scale``, a float32 ``(out,)`` tensor (``(x @ weight^T)
    * scale + bias``), or bfloat16 / float16 beside float32 x. Computes in float32 (float64 for float64 inputs) and
    returns ``(rows, out)``, contiguous, in x's dtype. Not differentiable. The op checks the arguments (RuntimeError);
    raises RuntimeError if the kernels are unavailable (see ``load_error()``).
    """
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    return getattr(torch.ops, _NAMESPACE).small_linear(x, weight, bias, scale)


PACK_LANES = 16  # output features per group of a packed weight


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(out, in)`` packed along output features for ``small_linear``: ``(out / 16, in, 16)``, contiguous,
    ``packed[g, i, l] = weight[16 g + l, i]`` (a copy, in the weight's dtype). The 16 outputs of a group are then the
    16 lanes of one vector: no sums across lanes, each weight converted once. ``out`` must be a multiple of 16."""
    if weight.dim() != 2 or weight.shape[0] % PACK_LANES:
        raise ValueError(f"pack_weight: weight must be (out, in) with out a multiple of {PACK_LANES}, "
                         f"got shape {tuple(weight.shape)}")
    return weight.detach().unflatten(0, (-1, PACK_LANES)).transpose(1, 2).contiguous()


# What ``decode_layer`` takes for each branch, in order (None where the branch has none).
BRANCH_TENSORS = ("norm_weight", "norm_bias", "in_weight", "in_bias", "in_scale", "out_weight", "out_bias", "out_scale",
                  "norm_out_weight", "norm_out_bias", "layer_scale")


def decode_layer(x: torch.Tensor, attn: list[torch.Tensor | None], ff: list[torch.Tensor | None],
                 k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, *,
                 rotary: tuple[torch.Tensor, torch.Tensor] | None, rings: tuple[torch.Tensor, torch.Tensor] | None,
                 shift_weights: torch.Tensor | None, pattern: str, text_len: int, fmap_size: int, kernel_size: int,
                 dilation: int, eps: float, reversible: bool) -> torch.Tensor:
    """One transformer layer of a cached decode step (``engine.model.fused_decode``): both PreNorm branches with
    their residuals, writing the position's keys and values into the caches and its normed inputs into the
    token-shift rings.

    x: ``(batch, dim)`` float32 or float64 CPU rows, ``(batch, 2 * dim)`` for a reversible layer's two streams.
    attn, ff: each branch's tensors in ``BRANCH_TENSORS`` order (the attention's input weight is its QKV projection,
    the feed-forward's its GEGLU projection; weights as ``small_linear`` takes them). k_cache, v_cache: ``(batch,
    heads, max_seq, dim_head)`` of x's dtype. pos: one position for every row, or ``(batch,)``. rotary: ``(cos, sin)``
    of the positions' angles, each ``(1 or batch, rot)``; rings: the branches' ``(batch, fmap_size + 1, dim)`` rings
    and shift_weights their positions' ``(1 or batch, 3, dim)`` rows of ``shift_weights`` (token shift), or None. All
    of x's dtype, but for the stored weights. Returns x's shape. Not differentiable; the op checks its arguments
    (RuntimeError).
    """
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    cos, sin = rotary if rotary is not None else (None, None)
    ring_attn, ring_ff = rings if rings is not None else (None, None)
    # The overload itself: through the overload packet, matching the schema's tensor lists costs hundreds of us.
    return getattr(torch.ops, _NAMESPACE).decode_layer.default(x, attn, ff, k_cache, v_cache, pos, cos, sin, ring_attn,
                                                       ring_ff, shift_weights, pattern, text_len, fmap_size,
                                                       kernel_size, dilation, eps, reversible)


def decode_stack(tensors: list[torch.Tensor | None], patterns: list[str], geometry: list[int], *,
                 rotary: tuple[torch.Tensor, torch.Tensor] | None, shift_weights: torch.Tensor | None, eps: float,
                 reversible: bool) -> torch.ScriptObject:
    """A whole decode step's layers held in C++ (``torch.classes.dalle_engine_cpu.DecodeStack``): ``decode_layer``
    for every layer in one call, ``stack.step(x, caches, rings, pos)``, its tensors passed and checked once.

    tensors: each layer's attention then feed-forward branch tensors (``BRANCH_TENSORS`` order each), layer after
    layer; patterns: one per layer; geometry: (text_len, fmap_size, kernel_size, dilation) per layer, flattened.
    rotary: ``(cos, sin)`` tables of every position's angles, each ``(max_seq, rot)``; shift_weights: the ``(max_seq,
    3, dim)`` token-shift table; None where the model has none. ``step``'s x is ``(batch, dim)``; caches ``[k0, v0,
    k1, v1, ...]``; rings ``[ring_attn0, ring_ff0, ...]``, or ``[]`` without token shift; pos one position or one per
    row. It returns ``(batch, dim)`` (a reversible stack, the mean of its two streams). Raises RuntimeError for bad
    arguments, or if the kernels are unavailable.
    """
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    cos, sin = rotary if rotary is not None else (None, None)
    return torch.classes.dalle_engine_cpu.DecodeStack(tensors, patterns, geometry, cos, sin, shift_weights, eps,
                                                      reversible)


def counter_uniform(keys: torch.Tensor, step: torch.Tensor, columns: int) -> torch.Tensor:
    """``engine.sampling.noise.uniform`` on the C++ CPU kernel, bit for bit: keys ``(rows,)`` int64 words in [0,
    2^32), step one CPU integer tensor element or one per row. Raises RuntimeError if the kernels are unavailable."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    return getattr(torch.ops, _NAMESPACE).counter_uniform.default(keys, step, columns)
