"""The decoder-only transformer: PreNorm + LayerScale branches, GEGLU feed-forward, pattern attention,
token shift, weight sharing and reversible layers; plus cached decoding (``KVCache``): a prefill pass over a prefix,
then one position per step, giving the same hidden states as a full forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import kernels
from engine.model import fused_decode
from engine.model.config import DALLEConfig
from engine.model.linear import Linear
from engine.model.rotary import apply_rotary, rotary_table
from kernels import cpp


def layer_scale_init(layer: int) -> float:
    """LayerScale's initial value for 1-based layer index `layer` (CaiT's schedule, as DALLE-pytorch)."""
    if layer <= 18:
        return 0.1
    if layer <= 24:
        return 1e-5
    return 1e-6


def shift_tokens(x: torch.Tensor, text_len: int, fmap_size: int) -> torch.Tensor:
    """Token shift. Text: the first feature half comes from the previous position. Image: feature quarter 0
    from the token above, quarter 1 from the token to the left (zeros at the grid's top row / left column)."""
    text, img = x[:, :text_len], x[:, text_len:]
    shifted, passed = text.chunk(2, dim=-1)
    text = torch.cat([F.pad(shifted, (0, 0, 1, -1)), passed], dim=-1)
    n_img = img.shape[1]
    if n_img == 0:
        return text
    img = F.pad(img, (0, 0, 0, fmap_size**2 - n_img))
    img = rearrange(img, "b (h w) d -> b h w d", h=fmap_size)
    top, left, *rest = img.chunk(4, dim=-1)
    top = F.pad(top, (0, 0, 0, 0, 1, -1))
    left = F.pad(left, (0, 0, 1, -1))
    img = rearrange(torch.cat([top, left, *rest], dim=-1), "b h w d -> b (h w) d")
    return torch.cat([text, img[:, :n_img]], dim=1)


def shift_weights(text_len: int, fmap_size: int, dim: int, seq_len: int) -> torch.Tensor:
    """``shift_tokens`` as per-position feature weights (seq_len, 3, dim) on (own, previous, above) features: token p
    after the shift is ``h[p] * w[p, 0] + h[p - 1] * w[p, 1] + h[p - fmap_size] * w[p, 2]``."""
    p = torch.arange(seq_len)[:, None]
    feature = torch.arange(dim)[None]
    half, quarter = -(-dim // 2), -(-dim // 4)  # chunk(2) / chunk(4) sizes, as in shift_tokens
    is_text, t = p < text_len, p - text_len
    shifted = torch.where(is_text, feature < half, feature < 2 * quarter)
    from_above = shifted & ~is_text & (feature < quarter)
    from_prev = shifted & ~from_above
    # Zeros where the source lies before the sequence, above the grid's top row or left of its first column.
    prev_exists = torch.where(is_text, p > 0, t % fmap_size != 0)
    return torch.stack([~shifted, from_prev & prev_exists, from_above & (t >= fmap_size)], dim=1).float()


class ShiftState(NamedTuple):
    """A branch's token-shift decoding state: ``ring`` (batch, fmap_size + 1, dim) holds its normed inputs of the last
    fmap_size + 1 positions, position p in slot p % (fmap_size + 1); ``pos`` (a 0-dim tensor, or one position per
    row; None during a prefill) and ``weights`` (1 or batch, 3, dim), those positions' rows of ``shift_weights``."""

    ring: torch.Tensor
    pos: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # per-row pos: ``ring_slots(pos, ring)``


def row_slots(pos: torch.Tensor, groups: int, size: int) -> torch.Tensor:
    """Per-row positions ``pos`` (batch,) as rows of a flattened (batch * groups * size, ...) view: row pos[b] % size
    of each of row b's ``groups`` blocks of ``size`` rows. A step's layers all write and read the same rows, so a step
    computes them once."""
    first = torch.arange(pos.shape[0] * groups, device=pos.device) * size
    return first + (pos % size).repeat_interleave(groups)


def ring_slots(pos: torch.Tensor, ring: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row positions: the rows ``shift_step`` writes, and reads as the previous token and the one above, in the
    (batch * size, dim) view of ``ring``-shaped rings."""
    return tuple(row_slots(pos + d, 1, ring.shape[1]) for d in (0, -1, 1))


def shift_step(h: torch.Tensor, state: ShiftState) -> torch.Tensor:
    """``shift_tokens`` for the one position ``state.pos`` of ``h`` (batch, 1, dim): writes h into the ring, then reads
    the previous token and the one a grid row above from it. No branches on the position: static shapes, no host
    synchronisation. The one spare slot lets the write come first (it overwrites pos - fmap_size - 1, which no read
    needs): a compiled step that read the ring before writing it would copy the whole ring at every step."""
    ring, pos, w, _ = state
    size = ring.shape[1]
    if pos.dim() == 0:
        ring.index_copy_(1, (pos % size).view(1), h)
        prev = ring.index_select(1, ((pos - 1) % size).view(1))
        above = ring.index_select(1, ((pos + 1) % size).view(1))  # pos - fmap_size, as size = fmap_size + 1
    else:  # each row at its own position: rows of the (batch * size, dim) view
        rows = ring.view(-1, ring.shape[2])
        write, prev, above = state.slots
        rows.index_copy_(0, write, h[:, 0])
        prev, above = rows.index_select(0, prev)[:, None], rows.index_select(0, above)[:, None]
    w = w.to(h.dtype)[:, :, None]  # (1 or batch, 3, 1, dim)
    return h * w[:, 0] + prev * w[:, 1] + above * w[:, 2]


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.proj_in = Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj_in
        if (torch.is_grad_enabled() and type(proj) is Linear and proj.bias is not None and geglu_kernel_takes(x)
                and x.dtype == proj.weight.dtype and not torch.is_autocast_enabled(x.device.type)):
            # Training: the bias left to the kernel, which sums its gradient as it writes x's (ATen would copy the
            # bias into the product's output, and sum the output's gradient in a pass of its own).
            h = cpp.geglu(F.linear(x, proj.weight), proj.bias)
        else:
            h = geglu(proj(x))
        return self.proj_out(self.dropout(h))


def geglu_kernel_takes(h: torch.Tensor) -> bool:
    """Whether the C++ GEGLU computes it: a float32 or float64 CPU tensor, the kernels built, not compiling (compiled
    graphs keep ATen's operations, which the compiler fuses itself)."""
    return h.is_cpu and h.dtype in (torch.float32, torch.float64) and cpp.available() and \
        not torch.compiler.is_compiling()


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU: the first feature half times GELU(second half). On a CPU, float32 or float64, the C++ kernels
    (``kernels.cpp.geglu``): one pass forward and one backward, where ATen's operations took a tenth of a training
    step."""
    if geglu_kernel_takes(h):
        return cpp.geglu(h)
    a, gate = h.chunk(2, dim=-1)
    # GELU of a strided view takes another code path than of a contiguous tensor, a last bit off: one row alone is
    # contiguous, several are not. Contiguous rows take one path, so a row's result never depends on the others.
    return a * F.gelu(gate.contiguous())


class Attention(nn.Module):
    def __init__(self, config: DALLEConfig, attn_type: str):
        super().__init__()
        self.heads, self.dim_head = config.heads, config.dim_head
        self.pattern = "conv_like_centered" if attn_type == "conv_like" and config.conv_centered else attn_type
        self.geometry = dict(text_len=config.text_len, fmap_size=config.image_fmap_size,
                             kernel_size=config.conv_kernel_size, dilation=config.conv_dilation)
        inner = config.heads * config.dim_head
        self.to_qkv = Linear(config.dim, inner * 3, bias=False)
        self.to_out = Linear(inner, config.dim)
        self.dropout = nn.Dropout(config.attn_dropout)  # on the output, as in DALLE-pytorch

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        qkv = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (3, b, h, n, d)
        if rotary is not None:  # DALLE-pytorch rotates v as well; trained checkpoints depend on it
            qkv = apply_rotary(rotary, qkv)
        q, k, v = qkv.unbind(0)
        if cache is not None and cache.pos is not None:  # decoding one position
            if cache.pos.dim() == 0:
                cache.k.index_copy_(2, cache.pos.view(1), k)
                cache.v.index_copy_(2, cache.pos.view(1), v)
            else:  # each row at its own position: rows of the (batch * heads * seq, dim_head) view
                cache.k.view(-1, k.shape[3]).index_copy_(0, cache.slots, k.flatten(0, 2))
                cache.v.view(-1, v.shape[3]).index_copy_(0, cache.slots, v.flatten(0, 2))
            out = kernels.decode_attention(q[:, :, 0], cache.k, cache.v, cache.pos, pattern=self.pattern,
                                           **self.geometry)[:, :, None]
        else:
            if cache is not None:  # prefill: the prefix starts at position 0
                cache.k[:, :, : k.shape[2]] = k
                cache.v[:, :, : v.shape[2]] = v
            out = kernels.sparse_attention(q, k, v, pattern=self.pattern, **self.geometry)
        return self.dropout(self.to_out(out.transpose(1, 2).flatten(2)))


class Branch(nn.Module):
    """LayerScale(PreNorm(fn)): norm -> optional token shift -> fn -> optional sandwich norm -> scale."""

    def __init__(self, config: DALLEConfig, fn: nn.Module, layer: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((config.dim,), layer_scale_init(layer)))
        self.norm = nn.LayerNorm(config.dim)
        self.fn = fn
        self.norm_out = nn.LayerNorm(config.dim) if config.sandwich_norm else nn.Identity()
        self.shift = (config.text_len, config.image_fmap_size) if config.shift_tokens else None

    def forward(self, x: torch.Tensor, shift_state: ShiftState | None = None, **fn_kwargs) -> torch.Tensor:
        """``shift_state``: the token shift's decoding state (see ``KVCache``); ``fn_kwargs`` go to ``fn``."""
        h = self.norm(x)
        if self.shift is not None:
            if shift_state is not None and shift_state.pos is not None:
                h = shift_step(h, shift_state)
            else:
                if shift_state is not None:  # prefill: keep the last positions the ring holds, p in slot p % size
                    ring, n = shift_state.ring, h.shape[1]
                    ring.zero_()  # slots the prefix does not fill are read with weight 0: no stale NaN
                    first = max(n - ring.shape[1], 0)
                    ring.index_copy_(1, torch.arange(first, n, device=h.device) % ring.shape[1], h[:, first:])
                h = shift_tokens(h, *self.shift)
        return self.norm_out(self.fn(h, **fn_kwargs)) * self.scale


class Layer(nn.Module):
    def __init__(self, attn: Branch, ff: Branch):
        super().__init__()
        self.attn, self.ff = attn, ff


class Transformer(nn.Module):
    def __init__(self, config: DALLEConfig):
        super().__init__()
        self.reversible = config.reversible
        attns: dict[int, Attention] = {}
        ffs: dict[int, FeedForward] = {}
        layers = []
        for i, (attn_type, attn_id, ff_id) in enumerate(
            zip(config.layer_attn_types, config.layer_attn_ids, config.layer_ff_ids), start=1
        ):
            # Shared ids reuse the inner module only; each layer keeps its own norms and LayerScale.
            attn = attns.setdefault(attn_id, Attention(config, attn_type))
            ff = ffs.setdefault(ff_id, FeedForward(config.dim, config.ff_dropout))
            layers.append(Layer(Branch(config, attn, i), Branch(config, ff, i)))
        self.layers = nn.ModuleList(layers)
        if config.rotary_emb:
            self.register_buffer("rotary", rotary_table(config.text_len, config.image_fmap_size, config.dim_head))
        else:
            self.rotary = None
        shift = None
        if config.shift_tokens:
            shift = shift_weights(config.text_len, config.image_fmap_size, config.dim, config.total_seq_len)
        self.register_buffer("shift_weights", shift, persistent=False)

    def _apply(self, fn, recurse=True):
        fused_decode.forget(self)  # casts and moves replace the tensors a fused decode step passes
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return fused_decode.without_plan(self.__dict__)  # a copy (deepcopy, pickle) gathers a plan of its own

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of ``x`` (batch, n, dim).

        Without ``cache``: the n positions from 0. With ``cache`` and no ``pos``: the same (a prefill), also writing
        the cache. With both: x (batch, 1, dim) is the one position ``pos`` (a 0-dim long tensor), or each row at its
        own position (a (batch,) long tensor), attending to the cache.
        """
        if pos is not None and (out := fused_decode.try_decode(self, x, cache, pos)) is not None:
            return out
        rotary = None
        if self.rotary is not None:
            if pos is None:
                angles = self.rotary[: x.shape[1]]
            else:  # (1 or batch, 1, 1, rot): one position for all rows, or one per row
                angles = self.rotary.index_select(0, pos.view(-1))[:, None, None]
            rotary = (angles.cos(), angles.sin())
        calls = list(self._branch_kwargs(rotary, cache, pos))
        if not self.reversible:
            for layer, (attn_kwargs, ff_kwargs) in zip(self.layers, calls):
                x = x + layer.attn(x, **attn_kwargs)
                x = x + layer.ff(x, **ff_kwargs)
            return x
        x = torch.cat([x, x], dim=-1)
        if torch.is_grad_enabled() and x.requires_grad:
            x = _ReversibleFunction.apply(x, self.layers, rotary)
        else:
            x = run_coupled(x, self.layers, calls)
        return torch.stack(x.chunk(2, dim=-1)).mean(dim=0)

    def _branch_kwargs(self, rotary: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
                       pos: torch.Tensor | None) -> Iterator[tuple[dict, dict]]:
        """Per layer, the keyword arguments of its attention and feed-forward branches."""
        if cache is None:
            yield from [({"rotary": rotary}, {})] * len(self.layers)
            return
        shift = cache.rings(0) is not None
        weights = kv_slots = ring = None  # what every layer of a decode step shares
        if pos is not None:
            weights = self.shift_weights.index_select(0, pos.view(-1)) if shift else None
            if pos.dim() == 1:
                _, heads, seq, _ = cache.layer(0)[0].shape
                kv_slots = row_slots(pos, heads, seq)
                ring = ring_slots(pos, cache.rings(0)[0]) if shift else None
        for i in range(len(self.layers)):
            kv = LayerCache(*cache.layer(i), pos, kv_slots)
            rings = cache.rings(i)
            if rings is None:
                yield {"rotary": rotary, "cache": kv}, {}
                continue
            ring_attn, ring_ff = rings
            yield ({"rotary": rotary, "cache": kv, "shift_state": ShiftState(ring_attn, pos, weights, ring)},
                   {"shift_state": ShiftState(ring_ff, pos, weights, ring)})


class LayerCache(NamedTuple):
    """One layer's view of a ``KVCache``: keys and values (batch, heads, seq, dim_head) and the decoded position, or
    one per row (None during a prefill)."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor | None
    slots: torch.Tensor | None = None  # per-row pos: the rows written, ``row_slots(pos, heads, seq)``


class KVCache(nn.Module):
    """Static decoding state for ``batch`` sequences, allocated once for the whole sequence (buffers, so that a
    compiled or CUDA-graph decode step mutates it in place).

    ``layer(i)``: layer i's rotated keys and values, each (batch, heads, total_seq_len, dim_head). Sparse layers only
    ever read their pattern's keys from them (``kernels.decode_attention``). ``rings(i)`` (token shift only, else
    None): layer i's attention and feed-forward branch rings, each (batch, fmap_size + 1, dim), the branch's normed
    inputs of the last fmap_size + 1 positions, which hold all the shift reads (the previous token and the one a grid
    row above; see ``shift_step``). Every layer and ring is a buffer of its own, not a view of one stacked tensor:
    torch.compile turns a write into a view of a shared buffer into a copy of the whole buffer, at every layer of every
    step.
    """

    holds_weights = False  # registering its buffers leaves fused decode plans current (engine.model.fused_decode)

    def __init__(self, config: DALLEConfig, batch: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.shift = config.shift_tokens
        shape = (batch, config.heads, config.total_seq_len, config.dim_head)
        ring_shape = (batch, config.image_fmap_size + 1, config.dim)
        for i in range(config.depth):
            for name in ("k", "v"):
                self.register_buffer(f"{name}{i}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            for name in ("ring_attn", "ring_ff") if config.shift_tokens else ():
                self.register_buffer(f"{name}{i}", torch.zeros(ring_shape, device=device, dtype=dtype),
                                     persistent=False)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def rings(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (getattr(self, f"ring_attn{i}"), getattr(self, f"ring_ff{i}")) if self.shift else None

    def flat(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([k0, v0, k1, v1, ...], [ring_attn0, ring_ff0, ...] or []): every layer's buffers at once, as a fused
        decode step passes them (gathered once, until a cast or move replaces them)."""
        if "_flat" not in self.__dict__:
            depth = sum(name.startswith("k") for name in self._buffers)
            self.__dict__["_flat"] = ([t for i in range(depth) for t in self.layer(i)],
                                      [t for i in range(depth) for t in self.rings(i) or ()])
        return self.__dict__["_flat"]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_flat", None)
        return super()._apply(fn, recurse)

    @property
    def batch(self) -> int:
        return self.k0.shape[0]

    def rows(self, start: int, stop: int) -> CacheRows:
        """Rows [start, stop) as a cache of their own (views: what a prefill or decode step writes lands here)."""
        return CacheRows(self, slice(start, stop))

    def move_rows(self, source: torch.Tensor, dest: torch.Tensor) -> None:
        """Copy rows ``source`` onto rows ``dest`` (index tensors) in every buffer: a batch closing its gaps."""
        for buffer in self.buffers():
            buffer[dest] = buffer[source]


class CacheRows(NamedTuple):
    """Some consecutive rows of a ``KVCache``, read and written in place; a decode step takes it as a cache."""

    cache: KVCache
    span: slice

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t[self.span] for t in self.cache.layer(i))

    def rings(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        rings = self.cache.rings(i)
        return None if rings is None else tuple(t[self.span] for t in rings)

    def flat(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        caches, rings = self.cache.flat()
        return [t[self.span] for t in caches], [t[self.span] for t in rings]

    @property
    def batch(self) -> int:
        return self.cache.k0[self.span].shape[0]


# --- reversible layers --------------------------------------------------------------------------------------------


def run_coupled(x: torch.Tensor, layers: nn.ModuleList, calls: list[tuple[dict, dict]]) -> torch.Tensor:
    """RevNet coupling y1 = x1 + f(x2), y2 = x2 + g(y1) over all layers, with ordinary autograd; ``calls`` holds each
    layer's branch keyword arguments."""
    x1, x2 = x.chunk(2, dim=-1)
    for layer, (attn_kwargs, ff_kwargs) in zip(layers, calls):
        x1 = x1 + layer.attn(x2, **attn_kwargs)
        x2 = x2 + layer.ff(x1, **ff_kwargs)
    return torch.cat([x1, x2], dim=-1)


class _RngState:
    """Captures the RNG so a branch's dropout mask is replayed exactly when it is recomputed in backward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda_state is not None else []):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


class _ReversibleFunction(torch.autograd.Function):
    """Stores only the final activations; backward reconstructs each layer's inputs from its outputs."""

    @staticmethod
    def forward(ctx, x, layers, rotary):
        x1, x2 = x.chunk(2, dim=-1)
        states = []
        with torch.no_grad():
            for layer in layers:
                f_rng = _RngState(x.device)
                x1 = x1 + layer.attn(x2, rotary=rotary)
                g_rng = _RngState(x.device)
                x2 = x2 + layer.ff(x1)
                states.append((f_rng, g_rng))
        ctx.layers, ctx.rotary, ctx.states = layers, rotary, states
        y = torch.cat([x1, x2], dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        y1, y2 = (t.detach() for t in y.chunk(2, dim=-1))
        dy1, dy2 = dy.chunk(2, dim=-1)
        for layer, (f_rng, g_rng) in zip(reversed(ctx.layers), reversed(ctx.states)):
            with torch.enable_grad():
                y1.requires_grad_(True)
                with g_rng.replay():
                    gy1 = layer.ff(y1)
                torch.autograd.backward(gy1, dy2)  # accumulates parameter grads, sets y1.grad
            with torch.no_grad():
                x2 = y2 - gy1
                dx1 = dy1 + y1.grad
            with torch.enable_grad():
                x2.requires_grad_(True)
                with f_rng.replay():
                    fx2 = layer.attn(x2, rotary=ctx.rotary)
                torch.autograd.backward(fx2, dx1)
            with torch.no_grad():
                y1, y2 = y1.detach() - fx2, x2.detach()
                dy1, dy2 = dx1, dy2 + x2.grad
            y1 = y1.detach()
        return torch.cat([dy1, dy2], dim=-1), None, None
