"""What a checkpoint file is, and the checks every loader shares.

A file's kind is decided from its structure before its first bytes: a safetensors file begins with its header's
length, which can be any byte, so a leading 0x80 (pickle's PROTO opcode) or "PK" (a zip's local header) proves
nothing. Safetensors is recognised by parsing its header, a zip by its central directory, and a legacy (non-zip)
``torch.save`` pickle only when neither holds.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from engine.codecs.tokenizers import Tokenizer

Format = Literal["safetensors", "zip", "pickle", "directory", "unknown"]
_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers
_MODULES_PER_TENSOR = 4  # sub-modules a model makes per state-dict tensor, with room to spare (ours: under 2)
_BUFFER_SLACK = 256 << 20  # bytes a model may compute beyond twice its stored weights (masks, tables)
# Beyond any real model's sizes; a larger count in a config makes even its validation slow (2 ** num_layers, lists of
# depth layer ids), before any model could be checked against the file.
MAX_CONFIG_INT = 1 << 20
_M = TypeVar("_M", bound=nn.Module)


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of the expected kind."""


def file_format(path: str | os.PathLike) -> Format:
    """The kind of ``path``; a missing path raises FileNotFoundError.

    Safetensors is tested first: a torch zip or pickle can never pass its header check, while a safetensors file
    may well start with 0x80 or "PK" (or end with something that looks like a zip directory).
    """
    path = Path(path)
    if path.is_dir():
        return "directory"
    if path.exists() and not path.is_file():  # a FIFO or a device: reading it could block for ever
        return "unknown"
    with open(path, "rb") as f:
        if _is_safetensors(f, os.fstat(f.fileno()).st_size):
            return "safetensors"
        f.seek(0)
        head = f.read(4)
        # A zip that lost its central directory (a truncated torch.save download) still starts with a local header.
        if zipfile.is_zipfile(f) or head == b"PK\x03\x04":
            return "zip"
        return "pickle" if head[:1] == b"\x80" else "unknown"


def _is_safetensors(f: IO[bytes], size: int) -> bool:
    """An 8-byte little-endian header length that fits the file, then that many bytes of UTF-8 JSON holding an
    object (safetensors writes and requires a header starting with "{")."""
    length = int.from_bytes(f.read(8), "little")
    if not 2 <= length <= min(size - 8, _MAX_HEADER) or f.read(1) != b"{":
        return False
    try:
        return isinstance(json.loads((b"{" + f.read(length - 1)).decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return False


def check_finite(tensors: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse floating-point weights holding NaN or Inf, naming the first such tensor: they would give NaN images
    without any error."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            count = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{os.fspath(path)}: tensor {name!r} holds {count} NaN/Inf values")


def check_tensors(expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, tuple[int, ...]],
                  path: str | os.PathLike, source: str) -> None:
    """Raise unless ``stored`` names exactly the ``expected`` tensors, with their shapes (``source``: what the
    expectation comes from, e.g. "its own config")."""
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{os.fspath(path)} does not match {source}: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all)")
    for name, shape in stored.items():
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(f"{os.fspath(path)}: {name} has shape {tuple(shape)}, expected "
                                  f"{tuple(expected[name])} from {source}")


def check_config_ints(values: Mapping[str, Any], path: str | os.PathLike, what: str) -> None:
    """Refuse integers beyond MAX_CONFIG_INT among a config's values (and inside its list values), read from a file
    whose tensors cannot be checked before the config is built."""
    for name, value in values.items():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, int) and abs(v) > MAX_CONFIG_INT:
                raise CheckpointError(f"{os.fspath(path)}: {what} field {name!r} is {v}, beyond any model this engine "
                                      f"builds (at most {MAX_CONFIG_INT})")


def build_on_meta(build: Callable[[], _M], stored_tensors: int, path: str | os.PathLike) -> _M:
    """``build()`` on the meta device, so that the model a file's config describes can be checked against the file's
    tensor names and shapes before any memory is allocated for it.

    Sub-modules are counted as they are made: a config declaring far more layers than the file holds tensors (every
    layer stores some of its own) is refused at once, not after a build that could take minutes even on meta.
    """
    limit = _MODULES_PER_TENSOR * stored_tensors + 64
    count, thread = 0, threading.get_ident()

    def count_module(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        nonlocal count
        if threading.get_ident() == thread:  # the hook is global: leave other threads' models alone
            count += 1
            if count > limit:
                raise CheckpointError(f"{os.fspath(path)}: its config describes a model of more than {limit} "
                                      f"modules, but the file holds only {stored_tensors} tensors")

    handle = nn.modules.module.register_module_module_registration_hook(count_module)
    try:
        with torch.device("meta"):
            return build()
    except CheckpointError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # sizes the model's own code refuses
        raise CheckpointError(f"{os.fspath(path)}: cannot build the model its config describes: {e}") from e
    finally:
        handle.remove()


def check_footprint(meta_model: nn.Module, stored_bytes: int, path: str | os.PathLike) -> None:
    """Refuse a model whose parameters and buffers, all of them, need far more memory than the file's weights.

    The weights are checked against the file's tensors, but buffers computed from the config (DALLE's logits mask
    is total_seq_len x total_tokens) are not stored, and a small file could otherwise declare a huge one.
    """
    needed = sum(t.numel() * t.element_size() for t in itertools.chain(meta_model.parameters(), meta_model.buffers()))
    if needed > 2 * stored_bytes + _BUFFER_SLACK:
        raise CheckpointError(f"{os.fspath(path)}: its config describes a model that needs {needed / 2**20:.0f} MiB, "
                              f"far more than the {stored_bytes / 2**20:.1f} MiB of weights the file holds")


@dataclass
class Checkpoint:
    """What a loader returns: the model, its tokenizer, and what else the file held."""

    model: nn.Module  # a DALLE, a CLIP, or a VAE for VAE checkpoints
    tokenizer: Tokenizer | None
    extra: dict[str, Any] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Each state-dict name -> the first name of the tensor it aliases. Weight-shared modules hand out the same
    tensor object under every name, on the meta device too (where storage pointers are all 0)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(t), name) for name, t in module.state_dict(keep_vars=True).items()}

