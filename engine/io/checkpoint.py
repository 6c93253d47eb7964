"""Self-contained, safe checkpoints.

One safetensors file holds the model config, the weights, the VAE (class, config and weights, under `vae.`) and
the tokenizer (its model-file bytes), so sampling needs nothing else. Loading never unpickles anything, and every
write goes to a temporary file that is renamed over the target, so a crash mid-save keeps the previous file.

Loading checks a file before building anything from it: the stored configs are typed JSON objects with bounded
sizes, the model they describe, built on the meta device, must have exactly the header's tensor names and shapes,
and its weights must be finite. A bad file gives a CheckpointError, or FileNotFoundError, or (a DALLE-pytorch
pickle that could run code) UnsafePickleError.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.codecs.openai_dvae import OpenAIDiscreteVAE, OpenAIDVAEConfig
from engine.codecs.tokenizers import Tokenizer, tokenizer_from_bytes
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.codecs.vqgan import VQGanConfig, VQGanVAE
from engine.io.dalle_pytorch import is_dalle_pytorch_checkpoint, load_dalle_pytorch
from engine.io.files import umask
from engine.io.formats import (
    Checkpoint,
    CheckpointError,
    build_on_meta,
    canonical_names,
    check_config_ints,
    check_finite,
    check_footprint,
    check_tensors,
    file_format,
)
from engine.model.clip import CLIP, CLIPConfig
from engine.model.config import DALLEConfig
from engine.model.dalle import DALLE

FORMAT = "dalle-engine/1"
_TMP_SUFFIX = ".tmp"  # of the temporary file a save writes before renaming it over the checkpoint
_TOKENIZER_KEY = "__tokenizer__"
_AUX_PREFIX = "__aux__."  # extra tensors, e.g. optimizer state for resuming; reserved keys start with "__"
VAE_CLASSES: dict[str, tuple[type, type]] = {
    "DiscreteVAE": (DiscreteVAE, DiscreteVAEConfig),
    "VQGanVAE": (VQGanVAE, VQGanConfig),
    "OpenAIDiscreteVAE": (OpenAIDiscreteVAE, OpenAIDVAEConfig),
}


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
    names = canonical_names(module)
    return {name: t for name, t in module.state_dict(keep_vars=True).items() if names[name] == name}


def _unique_state(module: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None):
    source = module.state_dict() if state_dict is None else state_dict
    return {name: source[name].detach().to("cpu", copy=True).contiguous() for name in _unique_items(module)}


def _write(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], extra: dict[str, Any] | None) -> None:
    path = Path(path)
    metadata = {"format": FORMAT, **metadata, "extra": json.dumps(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's files are private (0600); a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files of saves to `path` that never finished (the process was killed mid-save). Only safe to
    delete when no other process can be saving to `path`."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"))


# --- reading ------------------------------------------------------------------------------------------------------


def load_dalle(path: str | os.PathLike, device: str | torch.device = "cpu", **dalle_pytorch_options) -> Checkpoint:
    """A checkpoint written by ``save_dalle``, or a DALLE-pytorch ``dalle.pt`` (or its DeepSpeed folder), imported by
    ``engine.io.dalle_pytorch.load_dalle_pytorch`` with ``dalle_pytorch_options`` (vqgan and tokenizer choices; unused
    for this engine's own files, which store their tokenizer)."""
    if is_dalle_pytorch_checkpoint(path):
        return load_dalle_pytorch(path, device, **dalle_pytorch_options)
    metadata, shapes = _read_header(path, "dalle")
    config = _config(DALLEConfig, metadata, "config", path)
    build_vae = _vae_builder(metadata, path) if "vae_class" in metadata else lambda: None
    model, tensors = _build_and_load(lambda: DALLE(config, build_vae()), shapes, path)
    return Checkpoint(model.to(device), _tokenizer(metadata, tensors, path), _json_object(metadata, "extra", path),
                      _aux_from(tensors))


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint written by ``save_clip``."""
    metadata, shapes = _read_header(path, "clip")
    config = _config(CLIPConfig, metadata, "config", path)
    model, tensors = _build_and_load(lambda: CLIP(config), shapes, path)
    return Checkpoint(model.to(device), _tokenizer(metadata, tensors, path), _json_object(metadata, "extra", path),
                      _aux_from(tensors))


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    metadata, shapes = _read_header(path, "vae")
    vae, tensors = _build_and_load(_vae_builder(metadata, path), shapes, path)
    return Checkpoint(vae.to(device), None, _json_object(metadata, "extra", path), _aux_from(tensors))


def _aux_from(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(_AUX_PREFIX):]: v for k, v in tensors.items() if k.startswith(_AUX_PREFIX)}


def _read_header(path, kind: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The metadata and the tensor shapes of a checkpoint of ``kind``, read from its header alone (no tensor data)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    found = file_format(path)
    if found in ("zip", "pickle"):
        raise CheckpointError(
            f"{path} is a PyTorch pickle (torch.save) file, not a dalle-engine checkpoint; "
            "pickles are never loaded because they can execute code"
        )
    if found != "safetensors":
        raise CheckpointError(f"{path} is not a readable dalle-engine checkpoint (truncated or corrupt?): "
                              "it has no valid safetensors header")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable dalle-engine checkpoint (truncated or corrupt?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a dalle-engine checkpoint "
                              f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {metadata.get('kind')!r} checkpoint, expected a {kind!r} one")
    return metadata, shapes


def _json_object(metadata: dict[str, str], key: str, path) -> dict[str, Any]:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise CheckpointError(f"{path}: its metadata lacks {key!r}") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: its metadata {key!r} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: its metadata {key!r} must be a JSON object, not a {type(value).__name__}")
    return value


def _config(cls: type, metadata: dict[str, str], key: str, path) -> Any:
    """The dataclass ``cls`` from the JSON object ``metadata[key]``, every field checked against its annotation."""
    values = _json_object(metadata, key, path)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name not in hints:
            raise CheckpointError(f"{path}: {key} has an unknown field {name!r} (not a {cls.__name__} field)")
        if not _json_fits(value, hints[name]):
            raise CheckpointError(f"{path}: {key} field {name!r} must be {_describe(hints[name])}, got {value!r}")
    check_config_ints(values, path, key)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {key}: {e}") from e


def _json_fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value is of a config field's type (tuples arrive as lists)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return any(_json_fits(value, a) for a in args)
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_json_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_json_fits, value, args))
    if annotation is float:  # JSON's NaN and Infinity would slip past the configs' range checks
        return type(value) is int or (type(value) is float and math.isfinite(value))
    return type(value) is annotation  # bool, int, str, None: bool is not an int here


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return " or ".join(map(_describe, typing.get_args(annotation)))
    if typing.get_origin(annotation) is tuple:
        return "a list"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(annotation, "null")


def _vae_builder(metadata: dict[str, str], path) -> Callable[[], torch.nn.Module]:
    name = metadata.get("vae_class")
    if name not in VAE_CLASSES:
        raise CheckpointError(f"{path} holds a VAE of unknown class {name!r}; known: {', '.join(VAE_CLASSES)}")
    vae_cls, config_cls = VAE_CLASSES[name]
    return functools.partial(vae_cls, _config(config_cls, metadata, "vae_config", path))


def _build_and_load(build: Callable[[], torch.nn.Module], shapes: dict[str, tuple[int, ...]],
                    path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model ``build`` makes, with the file's weights, and all the file's tensors. The model is first built on the
    meta device and checked against the file's header, so a config that does not match the tensors (e.g. declares a
    far larger model) is refused before any memory is allocated for it."""
    meta = build_on_meta(build, len(shapes), path)
    names = _check_state(meta, shapes, path)
    check_footprint(meta, Path(path).stat().st_size, path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable dalle-engine checkpoint (truncated or corrupt?): {e}") from e
    weights = {name: tensors[name] for name in names}
    check_finite(weights, path)
    model = build()
    model.load_state_dict(weights, strict=False)
    return model, tensors


def _check_state(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]], path) -> list[str]:
    """The stored names that fill ``module``'s state dict; raise unless the file's tensors (reserved ``__`` keys
    aside) are exactly the module's, each stored once, with its shapes."""
    expected = {name: tuple(t.shape) for name, t in _unique_items(module).items()}
    aliases = set(module.state_dict()) - set(expected)  # weight-shared names, filled through their first name
    stored = {k: v for k, v in shapes.items() if not k.startswith("__") and k not in aliases}
    check_tensors(expected, stored, path, "its own config")
    return list(stored)


def _tokenizer(metadata: dict[str, str], tensors: dict[str, torch.Tensor], path) -> Tokenizer | None:
    data = tensors.get(_TOKENIZER_KEY)
    if data is None:
        return None
    kind = metadata.get("tokenizer_kind")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise CheckpointError(f"{path}: its tokenizer must be stored as bytes (a 1-D uint8 tensor), got "
                              f"{data.dtype} of shape {tuple(data.shape)}")
    try:
        return tokenizer_from_bytes(kind, data.numpy().tobytes())
    except (ValueError, ImportError) as e:
        raise CheckpointError(f"{path}: cannot load its {kind!r} tokenizer: {e}") from e
