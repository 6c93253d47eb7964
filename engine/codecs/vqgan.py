"""taming-transformers VQGAN (``VQModel`` and ``GumbelVQ``) as a frozen image tokenizer, without importing taming.

Module and parameter names follow taming's, so a released ``last.ckpt`` state dict (minus its ``loss.*`` networks)
loads strictly: ``VQGanVAE.from_taming("last.ckpt", "model.yaml")``. The interface matches `DiscreteVAE`'s:
[0, 1] images -> codes (`get_codebook_indices`) and codes -> [0, 1] images (`decode`), both run in fp32.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.codecs.vae import ConfiguredVAE
from engine.io.formats import CheckpointError, build_on_meta, check_finite, check_tensors
from engine.io.unpickle import safe_load
from engine.model.config import help_field

_GROUPS = 32  # taming's Normalize: GroupNorm(32, C, eps=1e-6)


@dataclass
class VQGanConfig:
    embed_dim: int = help_field("width of one codebook vector", default=256)
    n_embed: int = help_field("codebook size (image vocabulary)", default=1024)
    gumbel: bool = help_field("GumbelVQ (argmax of projected logits) instead of VQModel (nearest code)", default=False)
    double_z: bool = help_field("encoder outputs 2 * z_channels (unused by VQGANs; must be False)", default=False)
    z_channels: int = help_field("encoder output / decoder input channels", default=256)
    resolution: int = help_field("training resolution; places the attention blocks", default=256)
    in_channels: int = help_field("image channels in", default=3)
    out_ch: int = help_field("image channels out", default=3)
    ch: int = help_field("base channel width", default=128)
    ch_mult: tuple[int, ...] = help_field("width multiplier per level; len - 1 halvings", default=(1, 1, 2, 2, 4))
    num_res_blocks: int = help_field("ResnetBlocks per encoder level (decoder: one more)", default=2)
    attn_resolutions: tuple[int, ...] = help_field("levels (by side length at `resolution`) with attention",
                                                   default=(16,))
    dropout: float = help_field("ResnetBlock dropout (inactive in the frozen tokenizer)", default=0.0)
    image_size: int | None = help_field("side of the input images; None = resolution", default=None)

    def __post_init__(self) -> None:
        # JSON (checkpoint metadata) and YAML hand back lists.
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)
        if self.image_size is None:
            self.image_size = self.resolution
        for name in ("embed_dim", "n_embed", "z_channels", "resolution", "in_channels", "out_ch", "ch",
                     "num_res_blocks", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.ch_mult or any(self.ch * m % _GROUPS for m in self.ch_mult):
            raise ValueError(f"every ch * ch_mult must be a multiple of {_GROUPS} (GroupNorm groups), "
                             f"got ch={self.ch}, ch_mult={self.ch_mult}")
        if self.double_z:
            raise ValueError("double_z=True is not a VQGAN configuration (quant_conv expects z_channels)")
        # taming builds GumbelQuantize's proj for z_channels inputs but feeds it quant_conv's embed_dim outputs.
        if self.gumbel and self.z_channels != self.embed_dim:
            raise ValueError(f"GumbelVQ needs z_channels == embed_dim, got {self.z_channels} and {self.embed_dim}")
        if self.image_size % self.factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by the downsampling factor "
                             f"{self.factor} = 2 ** (len(ch_mult) - 1)")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_tokens(self) -> int:
        return self.n_embed

    @property
    def fmap_size(self) -> int:
        """Side of the token grid."""
        return self.image_size // self.factor

    @property
    def channels(self) -> int:
        return self.in_channels

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, image_size: int | None = None) -> VQGanConfig:
        """Read taming's model yaml (``model.target`` a ``VQModel`` or ``GumbelVQ``; ``model.params``)."""
        import yaml  # only needed here (PyYAML comes with webdataset)

        with open(path, encoding="utf-8") as f:
            try:
                document = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(document, dict):
            raise ValueError(f"{path} is not a taming config: it holds a {type(document).__name__}, not a mapping")
        model = _mapping(document, "model", path)
        target, params = str(model.get("target", "")), _mapping(model, "params", path)
        if not target.endswith(("VQModel", "GumbelVQ")) or "ddconfig" not in params:
            raise ValueError(f"{path} is not a taming VQModel / GumbelVQ config (model.target = {target!r})")
        if params.get("remap"):
            raise ValueError(f"{path}: remapped codebooks (params.remap) are not supported")
        dd = _mapping(params, "ddconfig", path)
        known = {f.name for f in dataclasses.fields(cls)} - {"embed_dim", "n_embed", "gumbel", "image_size"}
        if unknown := sorted(map(str, set(dd) - known)):
            raise ValueError(f"{path}: unsupported ddconfig keys {unknown}")
        try:
            return cls(embed_dim=params["embed_dim"], n_embed=params["n_embed"], gumbel=target.endswith("GumbelVQ"),
                       image_size=image_size, **dd)
        except KeyError as e:
            raise ValueError(f"{path}: model.params lacks {e}") from None
        except TypeError as e:  # e.g. a number where a list belongs
            raise ValueError(f"{path}: invalid taming config: {e}") from e


def _mapping(parent: dict, key: str, path: str | os.PathLike) -> dict:
    """``parent[key]`` of a parsed YAML document, which must be a mapping (absent or null: empty)."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {key!r} must be a mapping, got a {type(value).__name__}")
    return value


# --- building blocks (taming/modules/diffusionmodules/model.py) ----------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        # Identity has no parameters, so the state dict gets nin_shortcut.* only where channels change, as taming's.
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, scaled by C^-0.5."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (b, h*w, c)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only; must match exactly


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block[j]`, each followed by `attn[j]` when the level has attention."""

    def __init__(self, c_in: int, c_out: int, blocks: int, attention: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(blocks if attention else 0))

    def forward(self, h: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[j](h)
        return h


class Mid(nn.Module):
    def __init__(self, c: int, dropout: float) -> None:
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGanConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i, (c_in, c_out) in enumerate(zip([cfg.ch, *widths], widths)):
            level = Level(c_in, c_out, cfg.num_res_blocks, res in cfg.attn_resolutions, cfg.dropout)
            level.downsample = Downsample(c_out) if i < len(widths) - 1 else nn.Identity()
            self.down.append(level)
            res //= 2
        self.mid = Mid(widths[-1], cfg.dropout)
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.downsample(level(h))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGanConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], cfg.dropout)
        # Built from the coarsest level up, as taming does, but stored so that up[i] is level i.
        levels: list[Level] = []
        res = cfg.resolution // cfg.factor  # not always resolution // 2**i: taming halves, then doubles
        for i in reversed(range(len(widths))):
            c_in = widths[min(i + 1, len(widths) - 1)]
            level = Level(c_in, widths[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions, cfg.dropout)
            level.upsample = Upsample(widths[i]) if i > 0 else nn.Identity()
            levels.insert(0, level)
            res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(level(h))
        return self.conv_out(F.silu(self.norm_out(h)))


# --- quantizers (taming/modules/vqvae/quantize.py) -----------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """VectorQuantizer2: nearest codebook entry by squared L2 distance."""

    def __init__(self, cfg: VQGanConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.n_embed, 1.0 / cfg.n_embed)

    def codes(self, z: Tensor) -> Tensor:
        """z (b, d, h, w) -> codes (b, h, w); the distance runs in fp32 whatever the weights' dtype."""
        flat = z.permute(0, 2, 3, 1).float()
        e = self.embedding.weight.float()
        # |z|^2 + |e|^2 - 2 z.e as taming computes it; argmin takes the first index on ties.
        dist = flat.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * flat @ e.t()
        return dist.argmin(-1)

    def lookup(self, codes: Tensor) -> Tensor:
        return self.embedding(codes)


class GumbelQuantize(nn.Module):
    """GumbelQuantize, deterministic: argmax of the projected logits (taming adds Gumbel noise even in eval)."""

    def __init__(self, cfg: VQGanConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.z_channels, cfg.n_embed, 1)
        self.embed = nn.Embedding(cfg.n_embed, cfg.embed_dim)

    def codes(self, z: Tensor) -> Tensor:
        return self.proj(z).argmax(1)

    def lookup(self, codes: Tensor) -> Tensor:
        return self.embed(codes)  # = one_hot(codes) @ embed.weight


# --- the tokenizer -------------------------------------------------------------------------------------------------


class VQGanVAE(ConfiguredVAE):
    """encoder -> quant_conv -> quantize -> post_quant_conv -> decoder, with taming's state-dict names.

    Build with `VQGanVAE(config)`, `VQGanVAE(config, field=override)` or `VQGanVAE.from_taming(ckpt, yaml)`.
    """

    def __init__(self, config: VQGanConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = cfg = dataclasses.replace(config or VQGanConfig(), **overrides)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantize = GumbelQuantize(cfg) if cfg.gumbel else VectorQuantizer(cfg)

    @classmethod
    def from_taming(cls, model_path: str | os.PathLike, config_path: str | os.PathLike,
                    image_size: int | None = None) -> VQGanVAE:
        """A taming ``.ckpt`` (Lightning checkpoint or bare state dict) and its yaml; `loss.*` weights are dropped."""
        config = VQGanConfig.from_yaml(config_path, image_size=image_size)
        ckpt = safe_load(model_path)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{model_path} holds no state dict (got {type(ckpt).__name__})")
        if bad := [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]:
            raise CheckpointError(f"{model_path}: its state dict holds something other than named tensors: {bad[0]!r}")
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        # Checked on the meta device first, so a mismatched yaml allocates nothing.
        expected = build_on_meta(lambda: cls(config), len(state), model_path).state_dict()
        check_tensors({k: t.shape for k, t in expected.items()}, {k: t.shape for k, t in state.items()}, model_path,
                      os.fspath(config_path))
        check_finite(state, model_path)
        vae = cls(config)
        vae.load_state_dict(state)
        return vae.eval()

    def _dtype(self) -> torch.dtype:
        # fp32 unless the module itself was cast (e.g. by DeepSpeed), in which case inputs must follow its weights.
        return self.quant_conv.weight.dtype

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """[0, 1] images (b, channels, image_size, image_size) -> codes (b, fmap_size**2), row-major."""
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"expected images of shape (b, {shape}), got {tuple(images.shape)}")
        # Outside autocast: VQGAN encoding breaks in fp16 (GroupNorm, attention softmax, codebook distances).
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = (images.float() * 2 - 1).to(self._dtype())
            return self.quantize.codes(self.quant_conv(self.encoder(x))).flatten(1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (b, fmap_size**2) -> images (b, out_ch, image_size, image_size) in [0, 1]."""
        self.check_codes(codes)
        f = self.fmap_size
        with torch.autocast(device_type=codes.device.type, enabled=False):
            z = self.quantize.lookup(codes.long()).view(-1, f, f, self.config.embed_dim).permute(0, 3, 1, 2)
            out = self.decoder(self.post_quant_conv(z))
        return (out.clamp(-1.0, 1.0) + 1) / 2
