"""The decoder-only transformer: PreNorm + LayerScale branches, GEGLU feed-forward, pattern attention,
token shift, weight sharing and reversible layers."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import kernels
from engine.config import DALLEConfig
from engine.rotary import apply_rotary, rotary_table


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


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)  # GEGLU: first half times GELU(second half)
        return self.proj_out(self.dropout(a * F.gelu(gate)))


class Attention(nn.Module):
    def __init__(self, config: DALLEConfig, attn_type: str):
        super().__init__()
        self.heads, self.dim_head = config.heads, config.dim_head
        self.pattern = "conv_like_centered" if attn_type == "conv_like" and config.conv_centered else attn_type
        self.geometry = dict(text_len=config.text_len, fmap_size=config.image_fmap_size,
                             kernel_size=config.conv_kernel_size, dilation=config.conv_dilation)
        inner = config.heads * config.dim_head
        self.to_qkv = nn.Linear(config.dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, config.dim)
        self.dropout = nn.Dropout(config.attn_dropout)  # on the output, as in DALLE-pytorch

    def forward(self, x: torch.Tensor, rotary: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        if rotary is not None:  # DALLE-pytorch rotates v as well; trained checkpoints depend on it
            q, k, v = (apply_rotary(rotary, t) for t in (q, k, v))
        out = kernels.sparse_attention(q, k, v, pattern=self.pattern, **self.geometry)
        return self.dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))


class Branch(nn.Module):
    """LayerScale(PreNorm(fn)): norm -> optional token shift -> fn -> optional sandwich norm -> scale."""

    def __init__(self, config: DALLEConfig, fn: nn.Module, layer: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((config.dim,), layer_scale_init(layer)))
        self.norm = nn.LayerNorm(config.dim)
        self.fn = fn
        self.norm_out = nn.LayerNorm(config.dim) if config.sandwich_norm else nn.Identity()
        self.shift = (config.text_len, config.image_fmap_size) if config.shift_tokens else None

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        h = self.norm(x)
        if self.shift is not None:
            h = shift_tokens(h, *self.shift)
        return self.norm_out(self.fn(h, **kwargs)) * self.scale


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotary = None if self.rotary is None else self.rotary[: x.shape[1]]
        if not self.reversible:
            for layer in self.layers:
                x = x + layer.attn(x, rotary=rotary)
                x = x + layer.ff(x)
            return x
        x = torch.cat([x, x], dim=-1)
        if torch.is_grad_enabled() and x.requires_grad:
            x = _ReversibleFunction.apply(x, self.layers, rotary)
        else:
            x = run_coupled(x, self.layers, rotary)
        return torch.stack(x.chunk(2, dim=-1)).mean(dim=0)


# --- reversible layers --------------------------------------------------------------------------------------------


def run_coupled(x: torch.Tensor, layers: nn.ModuleList, rotary: torch.Tensor | None) -> torch.Tensor:
    """RevNet coupling y1 = x1 + f(x2), y2 = x2 + g(y1) over all layers, with ordinary autograd."""
    x1, x2 = x.chunk(2, dim=-1)
    for layer in layers:
        x1 = x1 + layer.attn(x2, rotary=rotary)
        x2 = x2 + layer.ff(x1)
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
