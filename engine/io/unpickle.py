"""Restricted loading of ``torch.save`` files (e.g. taming's Lightning ``.ckpt``) without running pickled code.

`safe_load` admits tensors, storages, dtypes and plain containers, and turns Lightning / OmegaConf / NumPy
bookkeeping objects (callback state, hyper-parameters, numpy scalars) and the modules of OpenAI's pickled dVAE
(``dall_e`` classes and the torch.nn layers inside them) into inert `PickleStub`s that only keep their pickled
state. Anything else, e.g. ``os.system`` or an arbitrary class, is refused by name before a single byte is
unpickled.

Two layers: a static scan of every global the pickle names (so refusals name the culprit and stubs can be made
for the exact names found), then ``torch.load(weights_only=True)`` with only those stubs added, so torch's own
restricted unpickler still enforces what may be called and built. In a zip archive every pickle member is scanned,
and archives whose member names collide ignoring case are refused: torch looks members up ignoring case, so it
could otherwise read a pickle other than the one scanned. The one exception is a legacy-format (non-zip)
file of pickled modules: it records each module's class as a persistent id, which weights_only refuses, so it is
read by torch's legacy loader through a ``pickle.Unpickler`` whose ``find_class`` hands out only what the scan
admitted (the pickle documentation's "restricting globals").
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import os
import pickle
import pickletools
import struct
import types
import typing
import warnings
import zipfile
from typing import IO, Any

import torch

from engine.io.formats import CheckpointError, Format, file_format

# Bookkeeping that Lightning checkpoints pickle next to the weights; replaced by inert stubs, never imported.
STUB_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "numpy.")
# OpenAI's encoder.pkl / decoder.pkl are whole pickled modules: exactly these classes become stubs whose state is the
# module's __dict__ (_parameters, _modules, n_hid, vocab_size, ...), from which engine.codecs.openai_dvae takes the
# weights.
STUB_NAMES = frozenset({
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
})

# Real objects admitted besides torch's own weights_only set: harmless types that OmegaConf metadata and older
# Lightning state refer to (calling them cannot run code).
_EXTRA_GLOBALS: tuple[Any, ...] = (dict, list, tuple, set, frozenset, int, float, str, bool, typing.Any)
_EXTRA_NAMES = frozenset(f"{g.__module__}.{g.__qualname__}" for g in _EXTRA_GLOBALS)
# What the static scan lets through to torch.load; torch's weights_only unpickler then checks these exactly.
_TENSOR_GLOBALS = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.Size",
    "torch.device",
    "torch.storage.UntypedStorage",
    "torch.storage.TypedStorage",
    "builtins.bytearray",
    "builtins.complex",
    "_codecs.encode",  # protocol-2 pickles store bytes as _codecs.encode(str, "latin1")
})

# What torch.load raises, besides UnpicklingError, on a malformed file: its zip reader's RuntimeError, and whatever
# the pickle's opcodes make the unpickler do wrong (a short stream, a tensor rebuilt from the wrong arguments, ...).
_MALFORMED = (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError,
              struct.error, zipfile.BadZipFile)


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint that names a global outside the allow-list (it could run code when unpickled)."""


class NotATorchFileError(pickle.UnpicklingError, CheckpointError):
    """A file that is not a readable ``torch.save`` file: malformed, truncated, or something else entirely. Also a
    CheckpointError, so callers of the checkpoint loaders need catch only that."""


class PickleStub:
    """Inert stand-in for a Lightning/OmegaConf/NumPy/dall_e object: keeps its arguments and state, runs no code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickleStub:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {type(self).__module__}.{type(self).__qualname__}>"


@functools.lru_cache(maxsize=None)
def stub_class(module: str, name: str) -> type[PickleStub]:
    """One stub class per pickled global; its module and name match the pickle so torch's allow-list finds it."""
    return type(name, (PickleStub,), {"__module__": module, "__qualname__": name})


def safe_load(path: str | os.PathLike) -> Any:
    """Load a ``torch.save`` file (zip or legacy format) onto the CPU, refusing anything but data (see module doc)."""
    found = file_format(path)
    names, problem = _pickle_globals(path, found)
    stubs, refused = [], []
    for module, name in sorted(names):
        full = f"{module}.{name}"
        if full.startswith(STUB_PREFIXES) or full in STUB_NAMES:
            stubs.append(stub_class(module, name))
        elif not (full in _TENSOR_GLOBALS or full in _EXTRA_NAMES or _is_dtype_or_storage(module, name)):
            refused.append(full)
    if refused:
        raise UnsafePickleError(
            f"refusing to unpickle {os.fspath(path)}: it references {', '.join(refused)}, which could run code "
            "(only tensors, containers, Lightning/OmegaConf/NumPy bookkeeping and OpenAI dVAE modules are allowed)"
        )
    if problem is not None:
        raise NotATorchFileError(f"{os.fspath(path)} is not a readable torch.save file: {problem}")
    try:
        if found == "pickle" and any(f"{s.__module__}.{s.__qualname__}" in STUB_NAMES for s in stubs):
            return _load_legacy_modules(path, stubs)
        with torch.serialization.safe_globals([*stubs, *_EXTRA_GLOBALS]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except UnsafePickleError:
        raise
    except pickle.UnpicklingError as e:  # torch's weights_only unpickler refusing something
        raise UnsafePickleError(f"refusing to unpickle {os.fspath(path)}: {e}") from e
    except _MALFORMED as e:
        raise NotATorchFileError(f"{os.fspath(path)} is not a readable torch.save file: {e}") from e


def _load_legacy_modules(path: str | os.PathLike, stubs: list[type[PickleStub]]) -> Any:
    """A legacy-format file of pickled modules, whose globals `safe_load` has already checked (see module doc)."""
    by_name = {f"{s.__module__}.{s.__qualname__}": s for s in stubs}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module, name = _python3_name(module, name)
            full = f"{module}.{name}"
            if full in by_name:
                return by_name[full]
            if full in _TENSOR_GLOBALS or full in _EXTRA_NAMES or _is_dtype_or_storage(module, name):
                return super().find_class(module, name)
            raise UnsafePickleError(f"refusing to unpickle {os.fspath(path)}: it references {full}")

    restricted = types.ModuleType("restricted_pickle")  # torch.load's pickle_module: Unpickler and load
    restricted.Unpickler, restricted.load = Unpickler, lambda f, **kw: Unpickler(f, **kw).load()
    with warnings.catch_warnings():
        # torch compares each recorded module source with the class's; stubs have none, which is expected.
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)


def _is_dtype_or_storage(module: str, name: str) -> bool:
    # Legacy typed storages (torch.FloatStorage, ...) name the storage type; tensors name their dtype (torch.float32).
    return module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype))


def _pickle_globals(path: str | os.PathLike, found: Format) -> tuple[set[tuple[str, str]], str | None]:
    """(module, name) of every GLOBAL / INST opcode, mapped to Python 3 names as the unpickler will see them, and
    what makes the pickles unreadable (None: nothing). The globals met before a malformed spot are kept, so that a
    refusal still names them."""
    if found == "safetensors":
        raise NotATorchFileError(f"{os.fspath(path)} is a safetensors file, not a torch.save file")
    if found not in ("zip", "pickle"):
        raise NotATorchFileError(f"{os.fspath(path)} is not a readable torch.save file")
    names: set[tuple[str, str]] = set()
    try:
        if found == "pickle":
            with open(path, "rb") as f:
                _scan(f, 4, path, names)  # legacy format: magic number, protocol, sys info, then the object
        else:
            with zipfile.ZipFile(path) as archive:
                for member in _archive_pickles(archive, path):
                    _scan(io.BytesIO(archive.read(member)), 1, path, names)
    except NotATorchFileError:
        raise
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        return names, str(e)
    return names, None


def _archive_pickles(archive: zipfile.ZipFile, path: str | os.PathLike) -> list[str]:
    """The members of a torch.save archive that torch could unpickle, i.e. all of them named ``*.pkl``."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.load's own test; anything else it would read as a legacy pickle
            raise NotATorchFileError(f"{os.fspath(path)} is a zip file but not a torch.save archive")
    names = archive.namelist()
    folded = [n.lower().replace("\\", "/") for n in names]
    counts = collections.Counter(folded)
    if clashes := sorted(n for n, f in zip(names, folded) if counts[f] > 1):
        raise UnsafePickleError(f"refusing to unpickle {os.fspath(path)}: its members {clashes} have the same name "
                                "ignoring case, and torch, which looks members up ignoring case, might read an "
                                "unchecked one")
    if sum(f.endswith("/data.pkl") and f.count("/") == 1 for f in folded) != 1:
        raise NotATorchFileError(f"{os.fspath(path)} is a zip file but not a torch.save archive (no data.pkl)")
    if compressed := [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]:
        # torch.save stores every member as is; a compressed one could inflate far beyond the file's size
        raise NotATorchFileError(f"{os.fspath(path)} is not a torch.save archive: it compresses {compressed[:3]}")
    return [n for n, f in zip(names, folded) if f.endswith(".pkl")]


def _scan(f: IO[bytes], pickles: int, path: str | os.PathLike, names: set[tuple[str, str]]) -> None:
    for _ in range(pickles):
        for op, arg, _pos in pickletools.genops(f):
            if op.name in ("GLOBAL", "INST"):
                names.add(_python3_name(*arg.split(" ", 1)))
            elif op.name in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):
                raise UnsafePickleError(
                    f"refusing to unpickle {os.fspath(path)}: it names objects by {op.name}, which cannot be checked "
                    "before unpickling (torch.save writes pickle protocol 2, which names them by GLOBAL)"
                )


def _python3_name(module: str, name: str) -> tuple[str, str]:
    # Protocol <= 2 pickles use Python 2 names (__builtin__.set); map them back as the unpickler does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[module, name]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name
