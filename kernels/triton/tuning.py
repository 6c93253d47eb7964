"""Launch settings of the training attention kernels: a table per GPU family, product type and head dim, a few
alternatives, and the fastest of them timed on the GPU at a shape's first launch, the choice kept on disk.

Every setting here, default or alternative, passes ``bench/gpu_static.py``'s gate on sm_80 and sm_90: no spills,
16-bit and TF32 products on tensor cores, no MMA work repeated across warps (``tests/test_gpu_static.py``). The
defaults were chosen from its figures (the most blocks per SM among the passing settings); the alternatives are
the passing settings that trade occupancy for larger tiles or deeper pipelines, which only a GPU can rank
(``python bench/gpu_static.py --search`` lists every passing setting).

On a CUDA device, a shape's first launch of each kernel times its candidates with ``triton.testing.do_bench`` on
the call's own inputs (each kernel is a pure function of them) and keeps the fastest, in memory and in a JSON file
(``DALLE_ENGINE_TILE_CACHE``, default ``~/.cache/dalle_engine/attention-tiles.json``) keyed by device, Triton
version and shape, so that later processes start with it. ``DALLE_ENGINE_AUTOTUNE=0`` launches the table's
defaults and never times: tile sizes change the order of floating-point sums, so a run that must repeat bit for bit
on another machine or a fresh cache sets it. Under the static driver (``kernels.triton.static``) every candidate is
launched, i.e. compiled for the gate, and the default kept; in the interpreter the default runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

__all__ = ["ALTERNATIVES", "DEFAULTS", "KERNELS", "Tiles", "candidates", "choose", "default", "table_key"]


@dataclass(frozen=True)
class Tiles:
    """A kernel's launch settings; each kernel's block plan is built from its own tile sizes."""

    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}"


KERNELS = ("fwd", "dkdv", "dq")
Key = tuple[int, str, bool]  # (architecture family 80 | 90, products "16-bit" | "tf32" | "fp32", head_dim > 64)

# (fwd, dK/dV, dQ). 8 warps need 128 rows in the product whose result feeds the next one (2 warpgroups x 64 on
# sm_90, 8 warps x 16 on sm_80) to avoid repeated MMA work; exact fp32 runs on CUDA cores, where the register file
# limits the tiles.
DEFAULTS: dict[Key, tuple[Tiles, Tiles, Tiles]] = {
    (90, "16-bit", False): (Tiles(64, 64, 4, 3), Tiles(64, 64, 4, 2), Tiles(64, 64, 4, 2)),
    (90, "16-bit", True): (Tiles(64, 64, 8, 2), Tiles(32, 128, 8, 2), Tiles(128, 32, 8, 2)),
    (80, "16-bit", False): (Tiles(64, 64, 4, 3), Tiles(32, 64, 4, 2), Tiles(64, 32, 4, 2)),
    (80, "16-bit", True): (Tiles(64, 64, 8, 2), Tiles(64, 64, 8, 2), Tiles(64, 64, 8, 2)),
    (90, "tf32", False): (Tiles(64, 32, 4, 2), Tiles(32, 64, 4, 1), Tiles(64, 32, 4, 1)),
    (90, "tf32", True): (Tiles(64, 32, 8, 2), Tiles(32, 128, 8, 1), Tiles(128, 32, 8, 1)),
    (80, "tf32", False): (Tiles(64, 32, 4, 2), Tiles(32, 64, 4, 1), Tiles(64, 32, 4, 1)),
    (80, "tf32", True): (Tiles(64, 32, 8, 2), Tiles(64, 64, 8, 1), Tiles(64, 64, 8, 1)),
    (90, "fp32", False): (Tiles(32, 32, 4, 2), Tiles(16, 32, 4, 1), Tiles(32, 16, 4, 1)),
    (90, "fp32", True): (Tiles(32, 32, 4, 2), Tiles(16, 32, 4, 1), Tiles(32, 16, 4, 1)),
    (80, "fp32", False): (Tiles(32, 32, 4, 2), Tiles(16, 16, 4, 1), Tiles(16, 16, 4, 1)),
    (80, "fp32", True): (Tiles(32, 16, 4, 2), Tiles(32, 32, 8, 1), Tiles(32, 16, 4, 1)),
}

# What the autotuner times beside each default, (fwd, dK/dV, dQ): settings that pass the gate at every head dim and
# pattern of their row (`bench/gpu_static.py --search`, then the full report), one with larger tiles and one with
# more resident warps per SM (blocks per SM x warps) or a deeper pipeline, where such a setting passes.
ALTERNATIVES: dict[Key, tuple[tuple[Tiles, ...], tuple[Tiles, ...], tuple[Tiles, ...]]] = {
    (90, "16-bit", False): (
        (Tiles(128, 128, 8, 1), Tiles(64, 128, 4, 1)),
        (Tiles(64, 128, 8, 1),),
        (Tiles(128, 128, 8, 1), Tiles(64, 128, 4, 1))),
    (90, "16-bit", True): (
        (Tiles(128, 128, 8, 1), Tiles(32, 32, 8, 3)),
        (Tiles(32, 128, 8, 3),),
        (Tiles(128, 64, 8, 1), Tiles(32, 64, 8, 3))),
    (80, "16-bit", False): (
        (Tiles(128, 128, 8, 1), Tiles(64, 128, 4, 1)),
        (Tiles(32, 128, 8, 1),),
        (Tiles(128, 64, 8, 1),)),
    (80, "16-bit", True): (
        (Tiles(128, 128, 8, 1), Tiles(64, 64, 8, 3)),
        (Tiles(128, 64, 8, 1), Tiles(64, 64, 8, 3)),
        (Tiles(64, 128, 8, 1), Tiles(32, 64, 8, 2))),
    (90, "tf32", False): (
        (Tiles(128, 128, 8, 1), Tiles(64, 128, 4, 1)),
        (Tiles(64, 128, 8, 1), Tiles(64, 64, 4, 1)),
        (Tiles(128, 128, 8, 1), Tiles(64, 32, 4, 2))),
    (90, "tf32", True): (
        (Tiles(64, 128, 8, 1), Tiles(64, 32, 8, 1)),
        (),
        (Tiles(128, 64, 8, 1), Tiles(128, 32, 8, 2))),
    (80, "tf32", False): (
        (Tiles(128, 128, 8, 1), Tiles(64, 128, 4, 1)),
        (),
        (Tiles(128, 32, 4, 2),)),
    (80, "tf32", True): (
        (Tiles(128, 64, 8, 2), Tiles(64, 32, 8, 1)),
        (Tiles(64, 64, 8, 2),),
        (Tiles(64, 64, 8, 2),)),
    (90, "fp32", False): (
        (Tiles(16, 16, 8, 2),),
        (Tiles(32, 16, 8, 2),),
        (Tiles(64, 64, 8, 1), Tiles(32, 64, 8, 2))),
    (90, "fp32", True): (
        (Tiles(64, 64, 8, 2), Tiles(32, 16, 8, 2)),
        (Tiles(32, 16, 8, 2),),
        (Tiles(32, 64, 8, 1), Tiles(16, 32, 8, 2))),
    (80, "fp32", False): (
        (Tiles(64, 64, 8, 1), Tiles(16, 32, 8, 2)),
        (Tiles(32, 16, 8, 1), Tiles(32, 32, 4, 1)),
        (Tiles(32, 64, 8, 1), Tiles(16, 16, 4, 2))),
    (80, "fp32", True): (
        (Tiles(64, 64, 8, 1), Tiles(32, 16, 8, 2)),
        (Tiles(32, 64, 8, 1), Tiles(16, 16, 8, 2)),
        (Tiles(32, 64, 8, 1), Tiles(16, 16, 8, 2))),
}

_CACHE_VERSION = 1


def table_key(arch: int, dtype: torch.dtype, precision: str, head_dim: int) -> Key:
    """The table row of a launch: sm_8x GPUs take sm_80's settings, later ones sm_90's."""
    products = "16-bit" if dtype != torch.float32 else "tf32" if precision == "tf32" else "fp32"
    return 90 if arch >= 90 else 80, products, head_dim > 64


def default(kernel: str, key: Key) -> Tiles:
    """``kernel``'s ("fwd", "dkdv" or "dq") setting at ``key`` when nothing is timed."""
    return DEFAULTS[key][KERNELS.index(kernel)]


def candidates(kernel: str, key: Key) -> list[Tiles]:
    """The settings the autotuner times for ``kernel`` at ``key``, the default first."""
    return [default(kernel, key), *ALTERNATIVES[key][KERNELS.index(kernel)]]


def enabled() -> bool:
    return os.environ.get("DALLE_ENGINE_AUTOTUNE", "1") != "0"


def choose(kernel: str, key: Key, q: torch.Tensor, shape: str, launch: Callable[[Tiles], object]) -> Tiles:
    """The settings ``kernel`` runs with at ``key`` for the call whose inputs are ``q`` (and ``shape``, the rest of
    what its speed depends on); ``launch(tiles)`` runs the kernel on the call's inputs into scratch outputs."""
    untimed = default(kernel, key)
    if not q.is_cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":  # the static driver: compile every candidate for the gate
            for tiles in candidates(kernel, key):
                launch(tiles)
        return untimed
    if not enabled():
        return untimed
    name = _entry_name(kernel, key, q, shape)
    if (tiles := _cache().get(name, kernel, key)) is not None:
        return tiles
    if torch.cuda.is_current_stream_capturing():  # timing would break the graph being captured
        return untimed
    return _cache().put(name, *_time(kernel, key, launch), untimed)


def _time(kernel: str, key: Key, launch: Callable[[Tiles], object]) -> tuple[Tiles, dict[str, float | str]]:
    """The fastest candidate and every candidate's median time in ms (or why it could not run here, e.g. a GPU
    with less shared memory than sm_80's)."""
    times: dict[str, float | str] = {}
    errors = []
    for tiles in candidates(kernel, key):
        try:
            times[str(tiles)] = triton.testing.do_bench(lambda: launch(tiles), return_mode="median")
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a candidate that cannot run here is skipped, not fatal
            times[str(tiles)] = f"{type(error).__name__}: {error}"[:200]
            errors.append(error)
    timed = [(ms, tiles) for tiles in candidates(kernel, key) if isinstance(ms := times[str(tiles)], float)]
    if not timed:
        raise errors[0]  # no candidate runs on this GPU: kernels.fallback takes over
    return min(timed, key=lambda t: t[0])[1], times


def _entry_name(kernel: str, key: Key, q: torch.Tensor, shape: str) -> str:
    rows = triton.next_power_of_2(q.shape[0] * q.shape[1])  # batch x heads, in powers of two
    return (f"{torch.cuda.get_device_name(q.device)}|triton {triton.__version__}|{kernel}|{str(q.dtype)[6:]}|"
            f"{key[1]}|d{q.shape[-1]}|bh{rows}|{shape}")


class _TileCache:
    """The autotuner's choices: read from the JSON file once, written back (atomically) after each new choice."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(path.read_text())
            if data.get("version") == _CACHE_VERSION and isinstance(data.get("entries"), dict):
                self.entries = data["entries"]
        except (FileNotFoundError, NotADirectoryError):
            pass
        except (OSError, ValueError, AttributeError) as error:
            warnings.warn(f"ignoring the attention tile cache {path}: {error}", stacklevel=4)

    def get(self, name: str, kernel: str, key: Key) -> Tiles | None:
        """A stored choice, if it is still one of the candidates (a newer table may have dropped it)."""
        entry = self.entries.get(name)
        try:
            tiles = Tiles(**entry["tiles"]) if entry else None
        except (TypeError, KeyError):
            return None
        return tiles if tiles in candidates(kernel, key) else None

    def put(self, name: str, tiles: Tiles, times: dict[str, float | str], default: Tiles) -> Tiles:
        self.entries[name] = {"tiles": asdict(tiles), "ms": times, "default": str(default)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:  # other processes' choices made since this one read the file are kept
                on_disk = json.loads(self.path.read_text()).get("entries", {})
            except (OSError, ValueError, AttributeError):
                on_disk = {}
            entries = {**on_disk, **self.entries} if isinstance(on_disk, dict) else self.entries
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": _CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as error:  # a read-only home: the choice holds for this process only
            warnings.warn(f"cannot write the attention tile cache {self.path}: {error}", stacklevel=4)
        return tiles


_caches: dict[Path, _TileCache] = {}


def cache_path() -> Path:
    if path := os.environ.get("DALLE_ENGINE_TILE_CACHE"):
        return Path(path)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dalle_engine" / "attention-tiles.json"


def _cache() -> _TileCache:
    path = cache_path()
    if path not in _caches:
        _caches[path] = _TileCache(path)
    return _caches[path]
