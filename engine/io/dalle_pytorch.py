"""Import DALLE-pytorch checkpoints (``dalle.pt`` from its ``train_dalle.py``, or the ``<name>-ds-cp`` DeepSpeed
folder) into this engine's `DALLE`, giving the same logits.

Files are read with the restricted unpickler (`engine.io.unpickle.safe_load`); no DALLE-pytorch code is imported.
Transformer weights are matched by layer index and terminal parameter name, because the chain of ``fn.`` wrappers
in front of them changed across DALLE-pytorch versions (dalle-semantics.md §10.4). Every parameter and persistent
buffer of the engine's model must be filled exactly once, from the checkpoint alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from engine.codecs.tokenizers import build_tokenizer
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.codecs.vqgan import VQGanConfig, VQGanVAE
from engine.io.formats import (
    Checkpoint,
    CheckpointError,
    build_on_meta,
    canonical_names,
    check_config_ints,
    check_finite,
    check_footprint,
    file_format,
)
from engine.io.unpickle import safe_load
from engine.model.config import DALLEConfig
from engine.model.dalle import DALLE

_AUX_FILE = "auxiliary.pt"
_MODEL_STATES = "mp_rank_00_model_states.pt"
# DALLE kwargs that are DALLEConfig fields of the same name and meaning.
_HPARAMS = ("num_text_tokens", "text_seq_len", "dim", "depth", "heads", "dim_head", "reversible", "attn_dropout",
            "ff_dropout", "attn_types", "loss_img_weight", "stable", "sandwich_norm", "shift_tokens", "rotary_emb",
            "shared_attn_ids", "shared_ff_ids", "share_input_output_emb")
# DALLE kwargs that change neither weights nor logits: `sparse_attn` is a no-op and `optimize_for_inference`
# computes the same axial masks as static ones.
_IGNORED_HPARAMS = ("sparse_attn", "optimize_for_inference")
# Not weights: buffers the engine recomputes (the logits mask, optimize_for_inference's static masks, saved by some
# versions) and taming's training losses (discriminator, LPIPS) inside a VQGAN.
_SKIPPED = re.compile(r"(.*\.)?(logits_mask|static_mask)|vae\.model\.loss\..*")
_LAYER = re.compile(r"transformer\.layers\.(?:layers\.(\d+)\.([01])|blocks\.(\d+)\.([fg])\.net)\.((?:fn\.)*)(.+)")
_BRANCH = {"0": "attn", "f": "attn", "1": "ff", "g": "ff"}
# Terminal name (after the fn. hops) -> name inside the engine's Branch.
_TERMINAL = {
    "scale": "scale",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
    "norm_out.weight": "norm_out.weight", "norm_out.bias": "norm_out.bias",
    "to_qkv.weight": "fn.to_qkv.weight",
    "to_out.0.weight": "fn.to_out.weight", "to_out.0.bias": "fn.to_out.bias",
    "net.0.weight": "fn.proj_in.weight", "net.0.bias": "fn.proj_in.bias",
    "net.3.weight": "fn.proj_out.weight", "net.3.bias": "fn.proj_out.bias",
}
# axial_positional_embedding names its tables weights_0/1 (0.2.x) or weights.0/1 (0.3.x).
_AXIAL = re.compile(r"image_pos_emb\.weights[._]([01])")


def is_dalle_pytorch_checkpoint(path: str | os.PathLike) -> bool:
    """A ``torch.save`` file (DALLE-pytorch's ``dalle.pt``) or a DeepSpeed folder with ``auxiliary.pt``, as opposed
    to this engine's safetensors checkpoints."""
    path = Path(path)
    if path.is_dir():
        return (path / _AUX_FILE).is_file()
    if not path.is_file():
        return _deepspeed_dir(path).is_dir()
    return file_format(path) in ("zip", "pickle")  # torch.save's zip archive, or its legacy raw pickle


def load_dalle_pytorch(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    vqgan_model_path: str | os.PathLike | None = None,
    vqgan_config_path: str | os.PathLike | None = None,
    bpe_path: str | os.PathLike | None = None,
    hug: bool = False,
    chinese: bool = False,
    conv_centered: bool | None = None,
) -> Checkpoint:
    """The model (fp32, with its VAE) and tokenizer of a DALLE-pytorch checkpoint.

    ``path``: a ``dalle.pt``, or a ``<name>-ds-cp`` DeepSpeed folder (also found from ``<name>.pt``). The tokenizer
    is chosen as by DALLE-pytorch's flags (``bpe_path``, ``hug``, ``chinese``; default CLIP's BPE) and must have the
    checkpoint's vocabulary size. ``vqgan_config_path`` is the yaml of the VQGAN a ``VQGanVAE`` model was trained
    with (the checkpoint holds its weights, not its config; default: DALLE-pytorch's ImageNet f16-1024 VQGAN);
    ``vqgan_model_path`` supplies the VQGAN weights only if the checkpoint lacks them. ``conv_centered`` overrides
    the conv_like semantics picked from the checkpoint's version (centred before 1.5.0).
    """
    try:
        tokenizer = build_tokenizer(bpe_path=bpe_path, hug=hug, chinese=chinese)
    except ValueError as e:  # the file names itself in the message
        raise CheckpointError(f"cannot build the tokenizer for {path}: {e}") from e
    meta, weights, extra = _read(Path(path))
    hparams = meta.get("hparams")
    if not isinstance(hparams, dict) or not isinstance(weights, dict):
        raise CheckpointError(f"{path} is not a DALLE-pytorch dalle.pt: it lacks the hparams or weights dict")
    if bad := [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]:
        raise CheckpointError(f"{path}: its weights dict holds something other than named tensors, e.g. {bad[0]!r}")
    weights = {k: v for k, v in weights.items() if not _SKIPPED.fullmatch(k)}
    check_finite(weights, path)

    vae_class = meta.get("vae_class_name") or _guess_vae_class(meta, weights)
    vae_cls, vae_config = _vae(vae_class, meta.get("vae_params"), weights, vqgan_model_path, vqgan_config_path, path)
    config = _config(hparams, weights, vae_config, meta.get("version"), conv_centered, path)
    # Checked on the meta device first: the hparams may describe a model far larger than the weights.
    meta_model = build_on_meta(lambda: DALLE(config, vae_cls(vae_config)), len(weights), path)
    _match_weights(meta_model, weights, path)
    check_footprint(meta_model, sum(t.numel() * t.element_size() for t in weights.values()), path)
    model = DALLE(config, vae_cls(vae_config))
    model.load_state_dict(_match_weights(model, weights, path), strict=False)
    if tokenizer.vocab_size != config.num_text_tokens:
        raise CheckpointError(
            f"{path} was trained with a {config.num_text_tokens}-token vocabulary but the {type(tokenizer).__name__} "
            f"has {tokenizer.vocab_size}; pass the tokenizer it was trained with (--bpe_path, --hug, --chinese)"
        )
    extra.update(dalle_pytorch_version=_plain(meta.get("version")), epoch=_plain(meta.get("epoch")),
                 vae_class_name=vae_class)
    return Checkpoint(model.to(device), tokenizer, extra)


def _plain(value: Any) -> str | int | float | None:
    """A metadata value as JSON stores it: ``extra`` is written into converted checkpoints."""
    return value if value is None or isinstance(value, (str, int, float)) else str(value)


# --- reading ------------------------------------------------------------------------------------------------------


def _deepspeed_dir(path: Path) -> Path:
    """train_dalle.py's DeepSpeed folder for a checkpoint path: dalle.pt -> dalle-ds-cp."""
    return path.parent / f"{path.stem}-ds-cp"


def _read(path: Path) -> tuple[dict, Any, dict[str, Any]]:
    """(metadata dict, weights, extra) of a dalle.pt or a DeepSpeed folder."""
    if path.name == _AUX_FILE:
        path = path.parent
    elif not path.exists() and _deepspeed_dir(path).is_dir():
        path = _deepspeed_dir(path)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"no DALLE-pytorch checkpoint at {path}")
        meta = _load_dict(path)
        return meta, meta.get("weights"), {}

    meta = _load_dict(path / _AUX_FILE)
    latest = path / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{path} is not a DeepSpeed checkpoint folder: it has no 'latest' tag file")
    tag = latest.read_bytes().decode("utf-8", errors="replace").strip()
    step = path / tag
    if not (step / _MODEL_STATES).is_file():
        if any(step.glob("zero_pp_rank_*_model_states.pt")):  # ZeRO-3 keeps only per-rank parameter shards
            raise CheckpointError(_zero_message(path, 3))
        raise CheckpointError(f"{path}: the latest tag {tag!r} has no {_MODEL_STATES}")
    states = _load_dict(step / _MODEL_STATES)
    stage = _zero_stage(states.get("ds_config"))
    # Without a stored config (old DeepSpeed) the stage is unknown, but below ZeRO-3 the module weights are whole.
    if stage is not None and stage >= 2:
        raise CheckpointError(_zero_message(path, stage))
    return meta, states.get("module"), {"deepspeed_tag": tag}


def _load_dict(path: Path) -> dict:
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a DALLE-pytorch checkpoint dict")
    return obj


def _zero_stage(ds_config: Any) -> int | None:
    if not isinstance(ds_config, dict) or "zero_optimization" not in ds_config:
        return None
    zero = ds_config["zero_optimization"]
    stage = zero.get("stage", 0) if isinstance(zero, dict) else bool(zero)  # legacy: true = stage 1
    if isinstance(stage, int) or (isinstance(stage, str) and stage.isdecimal()):
        return int(stage)
    return None  # unreadable: the weights' names and shapes will tell


def _zero_message(path: Path, stage: int) -> str:
    return (f"{path} is a DeepSpeed ZeRO stage {stage} checkpoint, whose fp32 weights live in the per-rank shards; "
            "consolidate them first with DeepSpeed's zero_to_fp32.py (get_fp32_state_dict_from_zero_checkpoint"
            "; see DALLE-pytorch's wiki page 'DeepSpeed-Checkpoints') and save them as a dalle.pt with the hparams, "
            "vae_params and version of its auxiliary.pt")


# --- the model ----------------------------------------------------------------------------------------------------


def _guess_vae_class(meta: dict, weights: dict) -> str:
    """Checkpoints before DALLE-pytorch 1.1.6 do not name their VAE class; its weights do."""
    if meta.get("vae_params") is not None:
        return "DiscreteVAE"
    if any(k.startswith("vae.model.") for k in weights):
        return "VQGanVAE"
    return "OpenAIDiscreteVAE"


def _vae(name: str, vae_params: Any, weights: dict, vqgan_model_path, vqgan_config_path, path) -> tuple[type, Any]:
    """The VAE's class and config."""
    if name == "DiscreteVAE":
        if not isinstance(vae_params, dict) or not all(isinstance(k, str) for k in vae_params):
            raise CheckpointError(f"{path} holds a DiscreteVAE but no vae_params dict to rebuild it from")
        check_config_ints(vae_params, path, "vae_params")
        try:
            return DiscreteVAE, DiscreteVAEConfig(**vae_params)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unsupported DiscreteVAE vae_params {vae_params}: {e}") from e
    if name == "VQGanVAE":
        return VQGanVAE, _vqgan_config(weights, vqgan_model_path, vqgan_config_path, path)
    if name == "OpenAIDiscreteVAE":
        try:
            from engine.codecs.openai_dvae import OpenAIDiscreteVAE, OpenAIDVAEConfig
        except ImportError as e:
            raise CheckpointError(f"{path} was trained on OpenAI's dVAE, which this installation cannot load "
                                  f"(engine.codecs.openai_dvae: {e})") from e
        return OpenAIDiscreteVAE, openai_config(weights, OpenAIDVAEConfig, path)
    raise CheckpointError(f"{path} holds a VAE of unknown class {name!r}")


def openai_config(weights: dict, config_cls: type, path) -> Any:
    """OpenAI's dVAE config from its weights under ``vae.`` (DALLE-pytorch always used the released 256 px model,
    but the sizes are read rather than assumed)."""
    try:
        enc_in, dec_in = weights["vae.enc.blocks.input.w"], weights["vae.dec.blocks.input.w"]
        dec_out = weights["vae.dec.blocks.output.conv.w"]
    except KeyError as e:
        raise CheckpointError(f"{path} holds an OpenAIDiscreteVAE without its weight {e}") from None
    if enc_in.dim() != 4 or dec_in.dim() != 4 or dec_out.dim() != 4:
        raise CheckpointError(f"{path}: its OpenAIDiscreteVAE's input and output convolutions are not 4-D")
    groups = {k.split(".")[3] for k in weights if k.startswith("vae.enc.blocks.group_")}
    blocks = {k.split(".")[4] for k in weights if k.startswith("vae.enc.blocks.group_1.block_")}
    return config_cls(n_hid=enc_in.shape[0], input_channels=enc_in.shape[1], vocab_size=dec_in.shape[1],
                      n_init=dec_in.shape[0], output_channels=dec_out.shape[0] // 2, group_count=len(groups),
                      n_blk_per_group=len(blocks), image_size=256)


def _vqgan_config(weights: dict, model_path, config_path, path) -> VQGanConfig:
    # DALLE-pytorch fixes the VQGAN's image size at 256 and stores the taming module under vae.model.
    if not any(k.startswith("vae.model.") for k in weights):
        if model_path is None or config_path is None:
            raise CheckpointError(f"{path} holds no VQGAN weights; pass --vqgan_model_path and --vqgan_config_path")
        vae = VQGanVAE.from_taming(model_path, config_path, image_size=256)
        weights.update({f"vae.model.{k}": v for k, v in vae.state_dict().items()})
        return vae.config
    config = VQGanConfig.from_yaml(config_path, image_size=256) if config_path else VQGanConfig(image_size=256)
    if config_path is None:  # the default must fit the stored weights exactly; checked on shapes alone
        with torch.device("meta"):
            expected = {k: v.shape for k, v in VQGanVAE(config).state_dict().items()}
        stored = {k[len("vae.model."):]: v.shape for k, v in weights.items() if k.startswith("vae.model.")}
        if stored != expected:
            raise CheckpointError(f"{path} was trained with a custom VQGAN whose config it does not hold; pass its "
                                  "yaml with --vqgan_config_path (and --vqgan_model_path)")
    return config


def _config(hparams: dict, weights: dict, vae_config: Any, version: Any, conv_centered: bool | None,
            path) -> DALLEConfig:
    if not all(isinstance(k, str) for k in hparams):
        raise CheckpointError(f"{path}: its hparams have names that are not strings")
    unknown = sorted(set(hparams) - set(_HPARAMS) - set(_IGNORED_HPARAMS))
    if unknown:
        raise CheckpointError(f"{path}: unsupported DALLE hparams {unknown}")
    values = {k: v for k, v in hparams.items() if k in _HPARAMS}
    for name in ("dim", "depth"):
        if name not in values:
            raise CheckpointError(f"{path}: hparams lack the required {name!r}")
    check_config_ints(values, path, "hparams")
    ff_hops = {len(m[5]) // 3 for k in weights if (m := _LAYER.fullmatch(k)) and m[6] == "net.0.weight"}
    shifted = bool(ff_hops) and min(ff_hops) > 2  # token shift adds wrappers around FF: >= 3 hops, else 2
    # hparams before August 2021 omit these; the class defaults changed since, the weights tell.
    values.setdefault("rotary_emb", "transformer.pos_emb" in weights)
    values.setdefault("shift_tokens", shifted)
    if values["shift_tokens"] != shifted:
        raise CheckpointError(f"{path}: hparams say shift_tokens={values['shift_tokens']} but the weights' layout "
                              f"says {shifted}")
    try:
        values["attn_types"] = values.get("attn_types") or ("full",)
        # train_dalle.py keeps its CLI's ids as strings; only which layers share an id matters.
        for name in ("shared_attn_ids", "shared_ff_ids"):
            if values.get(name) is not None:
                first: dict[Any, int] = {}
                values[name] = tuple(first.setdefault(i, n) for n, i in enumerate(values[name]))
        values["conv_centered"] = _conv_centered(version, conv_centered, values["attn_types"], path)
        values["null_cond_prob"] = 0.0  # train_dalle.py never drops captions, so guidance stays off by default
        config = DALLEConfig(num_image_tokens=vae_config.num_tokens, image_fmap_size=vae_config.fmap_size, **values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: hparams this engine cannot build: {e}") from e
    reversible = any(k.startswith("transformer.layers.blocks.") for k in weights)
    if reversible != config.reversible:
        raise CheckpointError(f"{path}: hparams say reversible={config.reversible} but the weights are laid out "
                              f"{'reversibly' if reversible else 'sequentially'}")
    text_rows = weights.get("text_emb.weight", weights.get("text_emb.linear.weight"))  # tensors, checked above
    if text_rows is not None and text_rows.shape[0] == config.num_text_tokens:
        raise CheckpointError(f"{path} predates DALLE-pytorch 0.9.0 (no per-position padding tokens), whose masked "
                              "text padding this engine does not implement")
    return config


def _conv_centered(version: Any, override: bool | None, attn_types, path) -> bool:
    """conv_like switched from a centred causal window to an up-left one in DALLE-pytorch 1.5.0 (§5.5). Checkpoints
    before 1.1.6 store no version and so are older than 1.5.0."""
    if override is not None:
        return override
    if version is None:
        return True
    match = re.match(r"v?(\d+)\.(\d+)", str(version))
    if match:
        return (int(match[1]), int(match[2])) < (1, 5)
    if "conv_like" in (attn_types.split(",") if isinstance(attn_types, str) else attn_types):
        raise CheckpointError(f"{path}: cannot tell the conv_like semantics from version {version!r}; pass "
                              "conv_centered (True for DALLE-pytorch < 1.5.0)")
    return False


# --- weights ------------------------------------------------------------------------------------------------------


def _engine_name(key: str, vae_class: type) -> str | None:
    """The engine's state-dict name for a DALLE-pytorch key, or None if there is none."""
    if key.startswith("vae."):
        if vae_class is VQGanVAE:  # DALLE-pytorch's wrapper holds the taming module as .model
            return "vae." + key[len("vae.model."):] if key.startswith("vae.model.") else None
        return key
    if m := _LAYER.fullmatch(key):
        index, branch = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
        terminal = _TERMINAL.get(m[6])
        return None if terminal is None else f"transformer.layers.{index}.{_BRANCH[branch]}.{terminal}"
    if m := _AXIAL.fullmatch(key):
        return ("image_pos_emb_row", "image_pos_emb_col")[int(m[1])]
    if key in ("text_emb.linear.weight", "image_emb.linear.weight"):  # share_input_output_emb: views of to_logits
        return "to_logits.1.weight"
    if key in ("text_emb.linear.bias", "image_emb.linear.bias"):
        return "to_logits.1.bias"
    return {"transformer.pos_emb": "transformer.rotary"}.get(key, key)


def _fit(value: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor | None:
    """``value`` reshaped to ``target``'s layout and dtype, or None if it does not fit."""
    if name == "transformer.rotary":
        # (1, n, rot) since 1.1.2; (1, 1, n - 1, rot) before (#383), without the last row, which only pads the
        # image grid inside axial/conv attention and is taken from the engine's own table.
        value = value.reshape(-1, value.shape[-1])
        if value.shape[0] == target.shape[0] - 1:
            value = torch.cat([value.to(target), target[-1:]])
    elif value.numel() == target.numel() and value.ndim != target.ndim:  # LayerScale (1, 1, dim), axial tables
        value = value.reshape(target.shape)
    return value.to(target) if value.shape == target.shape else None  # target's dtype and device (meta: no data)


def _match_weights(model: DALLE, weights: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` that ``weights`` fill, each parameter and persistent buffer exactly once; on a
    meta-device model, a check of names and shapes that reads no tensor data."""
    canonical = canonical_names(model)
    targets = model.state_dict()
    sources: dict[str, str] = {}  # engine name -> the checkpoint key that filled it
    values: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in weights.items():
        name = _engine_name(key, type(model.vae))
        if name not in canonical or not isinstance(value, torch.Tensor):
            unexpected.append(key)
            continue
        name = canonical[name]
        fitted = _fit(value, targets[name], name)
        if fitted is None:
            mismatched.append(f"{key} {tuple(value.shape)} vs {name} {tuple(targets[name].shape)}")
        elif name not in values:
            sources[name], values[name] = key, fitted
        elif not fitted.is_meta and not torch.equal(values[name], fitted):
            raise CheckpointError(f"{path}: {key} and {sources[name]} should be one shared tensor ({name}) but "
                                  "differ; do shared_attn_ids / shared_ff_ids / share_input_output_emb match?")
    missing = sorted(set(canonical.values()) - set(values))
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{path} does not match the model its hparams describe: missing {missing[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}, wrong shapes {mismatched[:8]} "
                              f"({len(missing)} / {len(unexpected)} / {len(mismatched)} in all)")
    return values
