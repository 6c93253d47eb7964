"""Self-contained, safe checkpoints.

One safetensors file holds the model config, the weights, the VAE (class, config and weights, under `vae.`) and
the tokenizer (its model-file bytes), so sampling needs nothing else. Loading never unpickles anything, and every
write goes to a temporary file that is renamed over the target, so a crash mid-save keeps the previous file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.clip import CLIP, CLIPConfig
from engine.config import DALLEConfig
from engine.dalle import DALLE
from engine.openai_dvae import OpenAIDiscreteVAE, OpenAIDVAEConfig
from engine.tokenizers import Tokenizer, tokenizer_from_bytes
from engine.vae import DiscreteVAE, DiscreteVAEConfig
from engine.vqgan import VQGanConfig, VQGanVAE

FORMAT = "dalle-engine/1"
_TOKENIZER_KEY = "__tokenizer__"
_AUX_PREFIX = "__aux__."  # extra tensors, e.g. optimizer state for resuming; reserved keys start with "__"
VAE_CLASSES: dict[str, tuple[type, type]] = {
    "DiscreteVAE": (DiscreteVAE, DiscreteVAEConfig),
    "VQGanVAE": (VQGanVAE, VQGanConfig),
    "OpenAIDiscreteVAE": (OpenAIDiscreteVAE, OpenAIDVAEConfig),
}


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of the expected kind."""


@dataclass
class Checkpoint:
    model: torch.nn.Module  # a DALLE, a CLIP, or a VAE for VAE checkpoints
    tokenizer: Tokenizer | None
    extra: dict[str, Any] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


# --- writing ------------------------------------------------------------------------------------------------------


def save_dalle(
    path: str | os.PathLike,
    model: DALLE,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
    aux: dict[str, torch.Tensor] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `model` (with its VAE) and `tokenizer` to one self-contained file, atomically.

    `extra` (JSON) and `aux` (tensors) carry anything else, e.g. training state. `state_dict` replaces the
    model's own weights, e.g. by ones gathered from ZeRO-3 shards.
    """
    metadata = {"kind": "dalle", "config": json.dumps(model.config.to_dict())}
    if model.vae is not None:
        metadata.update(_vae_metadata(model.vae))
    tensors = {**_unique_state(model, state_dict), **_aux_tensors(aux)}
    if tokenizer is not None:
        metadata["tokenizer_kind"] = tokenizer.kind
        tensors[_TOKENIZER_KEY] = torch.frombuffer(bytearray(tokenizer.to_bytes()), dtype=torch.uint8)
    _write(path, tensors, metadata, extra)


def save_clip(path: str | os.PathLike, clip: CLIP, tokenizer: Tokenizer | None = None,
              extra: dict[str, Any] | None = None, aux: dict[str, torch.Tensor] | None = None) -> None:
    """Write `clip` and the `tokenizer` its captions come from to one self-contained file, atomically."""
    metadata = {"kind": "clip", "config": json.dumps(clip.config.to_dict())}
    tensors = {**_unique_state(clip), **_aux_tensors(aux)}
    if tokenizer is not None:
        metadata["tokenizer_kind"] = tokenizer.kind
        tensors[_TOKENIZER_KEY] = torch.frombuffer(bytearray(tokenizer.to_bytes()), dtype=torch.uint8)
    _write(path, tensors, metadata, extra)


def save_vae(path: str | os.PathLike, vae: torch.nn.Module, extra: dict[str, Any] | None = None,
             aux: dict[str, torch.Tensor] | None = None) -> None:
    _write(path, {**_unique_state(vae), **_aux_tensors(aux)}, {"kind": "vae", **_vae_metadata(vae)}, extra)


def _aux_tensors(aux: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {_AUX_PREFIX + name: t.detach().to("cpu", copy=True).contiguous() for name, t in (aux or {}).items()}


def _vae_metadata(vae: torch.nn.Module) -> dict[str, str]:
    name = type(vae).__name__
    if name not in VAE_CLASSES:
        raise CheckpointError(f"cannot save a VAE of class {name}; known classes: {', '.join(VAE_CLASSES)}")
    return {"vae_class": name, "vae_config": json.dumps(dataclasses.asdict(vae.config))}


def _unique_items(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with weight-shared tensors kept once, under their first name."""
    seen: set[tuple] = set()
    items = {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            items[name] = t
    return items


def _unique_state(module: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None):
    source = module.state_dict() if state_dict is None else state_dict
    return {name: source[name].detach().to("cpu", copy=True).contiguous() for name in _unique_items(module)}


def _write(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], extra: dict[str, Any] | None) -> None:
    path = Path(path)
    metadata = {"format": FORMAT, **metadata, "extra": json.dumps(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# --- reading ------------------------------------------------------------------------------------------------------


def load_dalle(path: str | os.PathLike, device: str | torch.device = "cpu", **dalle_pytorch_options) -> Checkpoint:
    """A checkpoint written by ``save_dalle``, or a DALLE-pytorch ``dalle.pt`` (or its DeepSpeed folder), imported by
    ``engine.dalle_pytorch.load_dalle_pytorch`` with ``dalle_pytorch_options`` (vqgan and tokenizer choices; unused
    for this engine's own files, which store their tokenizer)."""
    from engine.dalle_pytorch import is_dalle_pytorch_checkpoint, load_dalle_pytorch  # it imports this module

    if is_dalle_pytorch_checkpoint(path):
        return load_dalle_pytorch(path, device, **dalle_pytorch_options)
    metadata, tensors = _read(path, "dalle")
    config = DALLEConfig.from_dict(json.loads(metadata["config"]))
    vae = _build_vae(metadata) if "vae_class" in metadata else None
    model = DALLE(config, vae)
    _load_state(model, tensors, path)
    tokenizer = None
    if _TOKENIZER_KEY in tensors:
        tokenizer = tokenizer_from_bytes(metadata["tokenizer_kind"], tensors[_TOKENIZER_KEY].numpy().tobytes())
    return Checkpoint(model.to(device), tokenizer, json.loads(metadata["extra"]), _aux_from(tensors))


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint written by ``save_clip``."""
    metadata, tensors = _read(path, "clip")
    model = CLIP(CLIPConfig.from_dict(json.loads(metadata["config"])))
    _load_state(model, tensors, path)
    tokenizer = None
    if _TOKENIZER_KEY in tensors:
        tokenizer = tokenizer_from_bytes(metadata["tokenizer_kind"], tensors[_TOKENIZER_KEY].numpy().tobytes())
    return Checkpoint(model.to(device), tokenizer, json.loads(metadata["extra"]), _aux_from(tensors))


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    metadata, tensors = _read(path, "vae")
    vae = _build_vae(metadata)
    _load_state(vae, tensors, path)
    return Checkpoint(vae.to(device), None, json.loads(metadata["extra"]), _aux_from(tensors))


def _aux_from(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(_AUX_PREFIX):]: v for k, v in tensors.items() if k.startswith(_AUX_PREFIX)}


def _build_vae(metadata: dict[str, str]) -> torch.nn.Module:
    name = metadata["vae_class"]
    if name not in VAE_CLASSES:
        raise CheckpointError(f"checkpoint holds a VAE of unknown class {name}; known: {', '.join(VAE_CLASSES)}")
    vae_cls, config_cls = VAE_CLASSES[name]
    return vae_cls(config_cls(**json.loads(metadata["vae_config"])))


def _read(path, kind: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a PyTorch pickle (torch.save) file, not a dalle-engine checkpoint; "
            "pickles are never loaded because they can execute code"
        )
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable dalle-engine checkpoint (truncated or corrupt?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a dalle-engine checkpoint "
                              f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {metadata.get('kind')!r} checkpoint, expected a {kind!r} one")
    return metadata, tensors


def _load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    expected = _unique_items(module)
    aliases = set(module.state_dict()) - set(expected)  # weight-shared names, filled through their first name
    weights = {k: v for k, v in tensors.items() if not k.startswith("__") and k not in aliases}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its own config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, t in weights.items():
        if expected[name].shape != t.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
    module.load_state_dict(weights, strict=False)
