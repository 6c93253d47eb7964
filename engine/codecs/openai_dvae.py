"""OpenAI's DALL-E dVAE (``dall_e`` package) as a frozen image tokenizer, without importing dall_e.

Module and parameter names follow dall_e's (``blocks.group_1.block_1.res_path.conv_1.w``, ...), under ``enc.`` and
``dec.`` as in DALLE-pytorch's ``OpenAIDiscreteVAE``, so its checkpoints' ``vae.*`` weights load as they are.
OpenAI's ``encoder.pkl`` / ``decoder.pkl`` are pickled modules; `OpenAIDiscreteVAE.from_openai` reads them through
the restricted unpickler (the dall_e classes become inert stubs) and copies their tensors into native modules.
The interface matches `DiscreteVAE`'s: [0, 1] images -> codes and codes -> [0, 1] images, both run in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.codecs.vae import ConfiguredVAE
from engine.io.formats import CheckpointError, build_on_meta, check_config_ints, check_finite, check_tensors
from engine.io.unpickle import PickleStub, safe_load
from engine.model.config import help_field

LOGIT_LAPLACE_EPS = 0.1  # dall_e.utils.logit_laplace_eps: pixels live in [eps, 1 - eps] for the logit-Laplace loss
_MAX_NESTING = 16  # module levels in a pickled dall_e model (it has 4); deeper is not one, and would recurse deeply
OPENAI_URLS = ("https://cdn.openai.com/dall-e/encoder.pkl", "https://cdn.openai.com/dall-e/decoder.pkl")


@dataclass
class OpenAIDVAEConfig:
    n_hid: int = help_field("width of the first group; group g has n_hid * 2**g (encoder) channels", default=256)
    n_blk_per_group: int = help_field("residual blocks per group", default=2)
    vocab_size: int = help_field("codebook size (image vocabulary)", default=8192)
    input_channels: int = help_field("image channels in", default=3)
    group_count: int = help_field("groups; 2x pooling (encoder) / upsampling (decoder) between them", default=4)
    n_init: int = help_field("decoder width after its input conv of the one-hot codes", default=128)
    output_channels: int = help_field("image channels out (the decoder outputs twice as many)", default=3)
    image_size: int = help_field("side of the input images", default=256)

    def __post_init__(self) -> None:
        for name in ("n_hid", "n_blk_per_group", "vocab_size", "input_channels", "group_count", "n_init",
                     "output_channels", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_hid % 4:  # each block's hidden width is a quarter of its output width
            raise ValueError(f"n_hid must be a multiple of 4, got {self.n_hid}")
        if self.image_size % self.factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by the downsampling factor "
                             f"{self.factor} = 2 ** (group_count - 1)")

    @property
    def factor(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def num_tokens(self) -> int:
        return self.vocab_size

    @property
    def fmap_size(self) -> int:
        """Side of the token grid."""
        return self.image_size // self.factor

    @property
    def channels(self) -> int:
        return self.input_channels

    @property
    def widths(self) -> list[int]:
        """Encoder group widths (the decoder runs them in reverse)."""
        return [self.n_hid * 2**g for g in range(self.group_count)]


def map_pixels(x: Tensor) -> Tensor:
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: Tensor) -> Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


# --- building blocks (dall_e/utils.py, encoder.py, decoder.py) -----------------------------------------------------


class Conv2d(nn.Module):
    """dall_e.utils.Conv2d: an odd kw x kw convolution with 'same' padding, parameters named `w` and `b`."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw**2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class Block(nn.Module):
    """EncoderBlock / DecoderBlock: id_path(x) + post_gain * res_path(x), a ReLU before each res_path conv.

    post_gain = 1 / n_layers**2, n_layers being the number of blocks in the whole network (not in this group).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        self.post_gain = 1 / n_layers**2
        # Identity has no parameters, so id_path.* appears only where channels change, as in dall_e.
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        sizes = [n_in, *[n_out // 4] * (len(kernels) - 1), n_out]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kw in enumerate(kernels, 1):
            layers[f"relu_{i}"], layers[f"conv_{i}"] = nn.ReLU(), Conv2d(sizes[i - 1], sizes[i], kw)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(cfg: OpenAIDVAEConfig, c_first: int, widths: list[int], kernels: tuple[int, ...],
            resample: Callable[[], nn.Module], name: str) -> OrderedDict[str, nn.Module]:
    """group_1 .. group_<group_count> of n_blk_per_group blocks each, `resample` (as `name`) after all but the last."""
    n_layers = cfg.group_count * cfg.n_blk_per_group
    groups: OrderedDict[str, nn.Module] = OrderedDict()
    for g, (c_in, c_out) in enumerate(zip([c_first, *widths], widths)):
        group = OrderedDict((f"block_{i + 1}", Block(c_in if i == 0 else c_out, c_out, n_layers, kernels))
                            for i in range(cfg.n_blk_per_group))
        if g < len(widths) - 1:
            group[name] = resample()
        groups[f"group_{g + 1}"] = nn.Sequential(group)
    return groups


class Encoder(nn.Module):
    """[eps, 1 - eps] images -> (b, vocab_size, fmap, fmap) logits over the codebook."""

    def __init__(self, cfg: OpenAIDVAEConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(cfg.input_channels, cfg.n_hid, 7)),
            *_groups(cfg, cfg.n_hid, cfg.widths, (3, 3, 3, 1), lambda: nn.MaxPool2d(kernel_size=2), "pool").items(),
            ("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(cfg.widths[-1], cfg.vocab_size, 1)))),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """codes (b, fmap, fmap) -> (b, 2 * output_channels, image_size, image_size): logit-Laplace means, then scales."""

    def __init__(self, cfg: OpenAIDVAEConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(cfg.vocab_size, cfg.n_init, 1)),  # dall_e feeds it the one-hot code map
            *_groups(cfg, cfg.n_init, cfg.widths[::-1], (1, 3, 3, 3),
                     lambda: nn.Upsample(scale_factor=2, mode="nearest"), "upsample").items(),
            ("output", nn.Sequential(OrderedDict(relu=nn.ReLU(),
                                                 conv=Conv2d(cfg.widths[0], 2 * cfg.output_channels, 1)))),
        ]))

    def forward(self, codes: Tensor) -> Tensor:
        # The 1x1 conv of a one-hot map picks one column of w and adds b: the same numbers without the
        # (b, vocab_size, fmap, fmap) one-hot tensor. The permuted result is channels-last, like DALLE-pytorch's
        # permuted one-hot map and hence dall_e's activations; kept so, the convs pick the same kernels and match it.
        conv = self.blocks.input
        x = F.embedding(codes, conv.w.flatten(1).t()) + conv.b
        return self.blocks[1:](x.permute(0, 3, 1, 2))


# --- the tokenizer -------------------------------------------------------------------------------------------------


class OpenAIDiscreteVAE(ConfiguredVAE):
    """dall_e's Encoder (`enc`) and Decoder (`dec`), tokenising by the argmax of the encoder logits.

    Build with `OpenAIDiscreteVAE(config)`, `OpenAIDiscreteVAE(config, field=override)` or
    `OpenAIDiscreteVAE.from_openai("encoder.pkl", "decoder.pkl")`.
    """

    def __init__(self, config: OpenAIDVAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = cfg = dataclasses.replace(config or OpenAIDVAEConfig(), **overrides)
        self.enc = Encoder(cfg)
        self.dec = Decoder(cfg)

    @classmethod
    def from_openai(cls, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike,
                    image_size: int | None = None) -> OpenAIDiscreteVAE:
        """OpenAI's ``encoder.pkl`` and ``decoder.pkl``, read without running pickled code (see engine.io.unpickle)."""
        if absent := [os.fspath(p) for p in (encoder_path, decoder_path) if not os.path.isfile(p)]:
            raise FileNotFoundError(f"OpenAI dVAE file(s) not found: {', '.join(absent)}. Download them from "
                                    f"{' and '.join(OPENAI_URLS)} (this library never downloads anything)")
        enc, enc_state = _read_module(encoder_path, "dall_e.encoder.Encoder", ("input_channels",))
        dec, dec_state = _read_module(decoder_path, "dall_e.decoder.Decoder", ("n_init", "output_channels"))
        for name in ("n_hid", "n_blk_per_group", "vocab_size", "group_count"):
            if enc[name] != dec[name]:
                raise CheckpointError(f"{encoder_path} and {decoder_path} do not belong together: "
                                      f"{name} is {enc[name]} in the encoder but {dec[name]} in the decoder")
        sizes = dict(n_hid=enc["n_hid"], n_blk_per_group=enc["n_blk_per_group"], vocab_size=enc["vocab_size"],
                     input_channels=enc["input_channels"], group_count=enc["group_count"], n_init=dec["n_init"],
                     output_channels=dec["output_channels"])
        check_config_ints(sizes, encoder_path, "the pickled modules'")
        try:
            config = OpenAIDVAEConfig(**sizes, **({} if image_size is None else {"image_size": image_size}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{encoder_path}, {decoder_path}: the pickled modules' sizes are invalid: {e}") from e
        # Checked on the meta device first, so attributes that do not fit the tensors allocate nothing.
        meta = build_on_meta(lambda: cls(config), len(enc_state) + len(dec_state), encoder_path)
        for module, state, path in ((meta.enc, enc_state, encoder_path), (meta.dec, dec_state, decoder_path)):
            check_tensors({k: t.shape for k, t in module.state_dict().items()}, {k: t.shape for k, t in state.items()},
                          path, "its own attributes")
            check_finite(state, path)
        vae = cls(config)
        vae.enc.load_state_dict(enc_state)
        vae.dec.load_state_dict(dec_state)
        return vae.eval()

    def _dtype(self) -> torch.dtype:
        # fp32 unless the module itself was cast (e.g. by DeepSpeed), in which case inputs must follow its weights.
        return self.enc.blocks.input.w.dtype

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """[0, 1] images (b, channels, image_size, image_size) -> codes (b, fmap_size**2), row-major."""
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"expected images of shape (b, {shape}), got {tuple(images.shape)}")
        # fp32 throughout: dall_e's own CPU numerics. (On CUDA dall_e runs all convs but the encoder's output and the
        # decoder's input in fp16; the codes are meant to be its fp32 argmax, not that rounding.)
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = map_pixels(images.float()).to(self._dtype())
            return self.enc(x).argmax(1).flatten(1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (b, fmap_size**2) -> images (b, output_channels, image_size, image_size) in [0, 1]."""
        self.check_codes(codes)
        f = self.fmap_size
        with torch.autocast(device_type=codes.device.type, enabled=False):
            stats = self.dec(codes.long().view(-1, f, f)).float()
        # The first output_channels channels are the logit-Laplace means; the rest (scales) only matter for training.
        return unmap_pixels(torch.sigmoid(stats[:, :self.config.output_channels]))


# --- reading OpenAI's pickles --------------------------------------------------------------------------------------


def _read_module(path: str | os.PathLike, class_name: str,
                 own_attrs: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A pickled dall_e module's attributes (n_hid, vocab_size, ...) and its tensors under state-dict names."""
    obj = safe_load(path)
    found = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if found != class_name or not isinstance(getattr(obj, "state", None), dict):
        raise CheckpointError(f"{os.fspath(path)} is not a pickled {class_name} (it holds a {found})")
    attrs = dict(obj.state)
    attrs.setdefault("group_count", 4)  # a class attribute of dall_e's Encoder/Decoder, so never pickled
    if absent := [a for a in ("n_hid", "n_blk_per_group", "vocab_size", *own_attrs) if a not in attrs]:
        raise CheckpointError(f"{os.fspath(path)}: the pickled {class_name} lacks the attributes {absent}")
    tensors: dict[str, Tensor] = {}
    _collect(obj, "", tensors, path)
    return attrs, tensors


def _collect(stub: Any, prefix: str, out: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Walk the stubbed module tree (each stub's state is the module's __dict__) as nn.Module.state_dict does."""
    state = stub.state if isinstance(stub, PickleStub) else None
    if not isinstance(state, dict) or prefix.count(".") > _MAX_NESTING:
        raise CheckpointError(f"{os.fspath(path)}: {prefix or 'the top level'} is not a pickled dall_e module")
    for table in ("_parameters", "_buffers", "_modules"):
        entries = state.get(table) or {}
        if not isinstance(entries, dict) or not all(isinstance(name, str) for name in entries):
            raise CheckpointError(f"{os.fspath(path)}: {table} of {prefix or 'the top level'} is not a dict by name")
    for table in ("_parameters", "_buffers"):
        for name, t in (state.get(table) or {}).items():
            if isinstance(t, Tensor):
                out[prefix + name] = t
            elif t is not None:
                raise CheckpointError(f"{os.fspath(path)}: {prefix}{name} is a {type(t).__name__}, not a tensor")
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out, path)
