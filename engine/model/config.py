"""The model configuration: one typed dataclass shared by the model, its checkpoints and the command line.

Field names follow DALLE-pytorch's ``DALLE`` keyword arguments, so its ``hparams`` dicts map onto it directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

ATTN_TYPES = ("full", "axial_row", "axial_col", "conv_like")
# The share of null captions in training and the guidance scale sampling then uses by default, both chosen on the
# built-in data's trained and held-out prompts over three seeds (README, "Guidance"): a tenth cost held-out accuracy
# little there, a fifth cost much; 1.5 was the best scale, 2 lowered trained prompts and 3 broke images.
NULL_COND_PROB = 0.1
GUIDED_COND_SCALE = 1.5


def help_field(text: str, aliases: tuple[str, ...] = (), **kw: Any) -> Any:
    """A dataclass field with a help string (and extra flag names), from which the command-line flag is generated."""
    return field(metadata={"help": text, "aliases": aliases}, **kw)


@dataclass
class DALLEConfig:
    num_text_tokens: int = help_field("raw tokenizer vocabulary size (pad ids are added on top)", default=10000)
    text_seq_len: int = help_field("fixed caption length in tokens", default=256)
    num_image_tokens: int = help_field("VAE codebook size (taken from the VAE)", default=512)
    image_fmap_size: int = help_field("side of the VAE's token grid (taken from the VAE)", default=8)
    dim: int = help_field("model width", default=512)
    depth: int = help_field("number of transformer layers", default=2)
    heads: int = help_field("attention heads", default=8)
    dim_head: int = help_field("width of one attention head", default=64)
    attn_types: tuple[str, ...] = help_field(
        "attention pattern per layer, cycled over depth: " + ", ".join(ATTN_TYPES), default=("full",)
    )
    conv_kernel_size: int = help_field("conv_like window side", default=5)
    conv_dilation: int = help_field("conv_like window dilation", default=1)
    conv_centered: bool = help_field(
        "conv_like uses the pre-1.5 centred causal window (old checkpoints)", default=False
    )
    reversible: bool = help_field("reversible residual layers (activation memory independent of depth)", default=False)
    attn_dropout: float = help_field("dropout after the attention output projection", default=0.0)
    ff_dropout: float = help_field("dropout inside the feed-forward block", default=0.0)
    loss_img_weight: float = help_field("image loss weight: loss = (text + w*image) / (w + 1)", default=7.0)
    stable: bool = help_field("CogView stability tricks: embedding gradient shrink and DivideMax",
                              aliases=("--stable_softmax",), default=False)
    sandwich_norm: bool = help_field("extra LayerNorm on every branch output", default=False)
    shift_tokens: bool = help_field(
        "token shift (text: previous token; image: token above and to the left)", default=True
    )
    rotary_emb: bool = help_field("rotary embeddings (text 1-D + image 2-D) instead of learned positions", default=True)
    shared_attn_ids: tuple[int, ...] | None = help_field(
        "attention weight-sharing ids, cycled over depth", default=None
    )
    shared_ff_ids: tuple[int, ...] | None = help_field(
        "feed-forward weight-sharing ids, cycled over depth", default=None
    )
    share_input_output_emb: bool = help_field("token embeddings are rows of the output projection", default=False)
    null_cond_prob: float = help_field(
        "probability of training on the null caption, which sampling's classifier-free guidance needs "
        "(DALLE-pytorch: 0)",
        default=NULL_COND_PROB,
    )

    def __post_init__(self) -> None:
        # Accept lists and comma strings (DALLE-pytorch's CLI passes "full,axial_row" and "0,0,1").
        self.attn_types = _as_tuple(self.attn_types, str)
        self.shared_attn_ids = None if self.shared_attn_ids is None else _as_tuple(self.shared_attn_ids, int)
        self.shared_ff_ids = None if self.shared_ff_ids is None else _as_tuple(self.shared_ff_ids, int)
        for name in ("num_text_tokens", "text_seq_len", "num_image_tokens", "image_fmap_size", "dim", "depth",
                     "heads", "dim_head", "conv_kernel_size", "conv_dilation"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.attn_types:
            raise ValueError("attn_types must name at least one attention type")
        unknown = [t for t in self.attn_types if t not in ATTN_TYPES]
        if unknown:
            raise ValueError(f"unknown attention type(s) {unknown}; valid types are {', '.join(ATTN_TYPES)}")
        for name in ("attn_dropout", "ff_dropout", "null_cond_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.loss_img_weight < 0:
            raise ValueError(f"loss_img_weight must be >= 0, got {self.loss_img_weight}")
        for ids in (self.shared_attn_ids, self.shared_ff_ids):
            if ids is not None and not ids:
                raise ValueError("shared ids, when given, must not be empty")
        if self.shared_attn_ids is not None:
            seen: dict[int, str] = {}
            for attn_id, attn_type in zip(self.layer_attn_ids, self.layer_attn_types):
                if seen.setdefault(attn_id, attn_type) != attn_type:
                    raise ValueError(
                        f"shared attention id {attn_id} is used by layers of different types "
                        f"({seen[attn_id]} and {attn_type}); shared layers must have one attention type"
                    )

    # Derived quantities (never stored, so they can never disagree with the fields).
    @property
    def text_len(self) -> int:
        """bos + caption positions."""
        return self.text_seq_len + 1

    @property
    def image_seq_len(self) -> int:
        return self.image_fmap_size**2

    @property
    def total_seq_len(self) -> int:
        return self.text_seq_len + self.image_seq_len

    @property
    def num_text_tokens_internal(self) -> int:
        """Caption vocabulary plus one unique pad id per text position."""
        return self.num_text_tokens + self.text_seq_len

    @property
    def total_tokens(self) -> int:
        return self.num_text_tokens_internal + self.num_image_tokens

    @property
    def default_cond_scale(self) -> float:
        """The guidance scale sampling uses unless told: guided for a model trained with null captions, off (1)
        for one trained without, which guidance does not help."""
        return GUIDED_COND_SCALE if self.null_cond_prob > 0 else 1.0

    @property
    def layer_attn_types(self) -> list[str]:
        return [self.attn_types[i % len(self.attn_types)] for i in range(self.depth)]

    @property
    def layer_attn_ids(self) -> list[int]:
        return _cycle_ids(self.shared_attn_ids, self.depth)

    @property
    def layer_ff_ids(self) -> list[int]:
        return _cycle_ids(self.shared_ff_ids, self.depth)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DALLEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)


def _cycle_ids(ids: tuple[int, ...] | None, depth: int) -> list[int]:
    return list(range(depth)) if ids is None else [ids[i % len(ids)] for i in range(depth)]


def _as_tuple(value: Any, kind: type) -> tuple:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    return tuple(kind(v.strip()) if isinstance(v, str) else kind(v) for v in value)


# --- command line -----------------------------------------------------------------------------------------------


def _base_type(annotation: Any) -> Any:
    """The flag type of a field annotation: `tuple[int, ...] | None` -> tuple, `int` -> int."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def add_config_args(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """Add one `--field` flag per dataclass field; defaults and help come from the dataclass only."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = _base_type(hints[f.name])
        default = f.default
        help_text = f.metadata.get("help", "")
        flags = [f"--{f.name}", *f.metadata.get("aliases", ())]
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        elif kind is tuple:
            shown = None if default is None else ",".join(map(str, default))
            group.add_argument(*flags, dest=f.name, type=str, default=shown, help=f"{help_text} (comma list)")
        else:
            group.add_argument(*flags, dest=f.name, type=kind, default=default, help=help_text)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
