"""Command-line checks shared by the scripts: typed flag values, devices and writable outputs, so that a bad flag or
an unwritable folder is an argparse error before any work starts, never a traceback halfway through a run; and how a
process a launcher started ends."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

MAX_SEED = 2**32 - 1  # every RNG seeded from it (torch, random, numpy, DataLoader workers) takes this range


def number(kind: type, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: a `kind` number for which `ok` holds, else an error saying what was expected."""
    def parse(value: str):
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return x
    return parse


positive_int = number(int, lambda n: n >= 1, "an integer >= 1")
non_negative_int = number(int, lambda n: n >= 0, "an integer >= 0")
positive_float = number(float, lambda x: 0 < x < math.inf, "a finite number > 0")
non_negative_float = number(float, lambda x: 0 <= x < math.inf, "a finite number >= 0")
fraction = number(float, lambda x: 0 < x <= 1, "a number in (0, 1]")
rng_seed = number(int, lambda n: 0 <= n <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def top_k_arg(value: str) -> float | int:
    """In [0, 1): DALLE-pytorch's threshold (a float); a whole number >= 1: a count of image tokens (an int).
    1 and 1.0 coincide: the count 1 is greedy, and so is the threshold 1, which keeps one token."""
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if 0 <= x < 1:
        return x
    if x >= 1 and x.is_integer():  # inf.is_integer() is False
        return int(x)
    raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole count >= 1, got {value!r}")


def check_device(p: argparse.ArgumentParser, value: str) -> str:
    """`value` if it names a CPU or an available CUDA device, else an argparse error."""
    try:
        device = torch.device(value)
    except RuntimeError:
        p.error(f"--device {value!r} is not a device (cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {value!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {value}, but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {value}, but there are only {torch.cuda.device_count()} CUDA devices")
    return value


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into `folder` (created if needed), or None when they can. Nothing is left behind:
    the check creates and deletes a file in the folder, or in its nearest existing parent if it does not exist yet."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot write to {existing}: {e.strerror or e}"
    return None


def check_writable(p: argparse.ArgumentParser, flag: str, folder: str | os.PathLike) -> None:
    """An argparse error naming `flag` unless files can be written into `folder`."""
    if (why := unwritable(folder)) is not None:
        p.error(f"{flag}: {why}")


def leave_process_group() -> NoReturn:
    """End a process of a multi-process launch once its work is done: wait for every process, then exit at once.
    Shutting the process group down, or leaving it to interpreter exit, tears gloo's threads and the TCP store down
    while another process may still talk to them, which can abort a process ("terminate called without an active
    exception") after its work is done and fail the whole launch."""
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

