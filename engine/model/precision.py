"""The precision a run trains or samples in, decided once from the flags and the device.

Training: an explicit --fp32, --bf16 or --fp16 wins; by default a CUDA GPU with native bf16 trains under bf16
autocast, one without it under fp16 autocast with loss scaling, and anything else (a CPU) in fp32. Sampling casts
the model to its precision, on a GPU by default the checkpoint's training precision or bf16 (`sampling_precision`).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

from engine.model.quantize import quantize_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLAG_ORDER = ("fp16", "bf16", "fp32")  # as the conflict message names them


def add_precision_args(group: argparse._ActionsContainer) -> None:
    group.add_argument("--fp16", action="store_true",
                       help="fp16 autocast with loss scaling (the default on a GPU without bf16)")
    group.add_argument("--bf16", action="store_true", help="bf16 autocast (the default on a GPU that supports it)")
    group.add_argument("--fp32", action="store_true", help="train in fp32 (the default on a CPU)")


def requested_precision(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The precision flag given ("fp16", "bf16" or "fp32"), else "auto"; more than one is an argparse error."""
    given = [name for name in FLAG_ORDER if getattr(args, name)]
    if len(given) > 1:
        p.error("choose one of " + " and ".join(f"--{name}" for name in given))
    return given[0] if given else "auto"


def training_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """The precision to train in, for a request ("auto" or a precision) on a device of `device_type`."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "fp32"  # CPU runs keep their fp32 numbers
    return "bf16" if bf16_supported else "fp16"


def sampling_precision(requested: str, device_type: str, bf16_supported: bool, trained: str | None) -> str:
    """The precision to sample in. "auto" on a GPU: the checkpoint's training precision `trained` when that was fp16,
    else bf16 where the GPU supports it (a bf16 or fp32 model samples well in bf16), else fp32; off a GPU, fp32."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "fp32"
    if trained == "fp16":
        return "fp16"
    # fp16 only for a model trained in it: its range (up to 65504) can overflow other models' activations.
    return "bf16" if bf16_supported else "fp32"


def add_sampling_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("auto", *DTYPES), default="auto",
                   help="the model's dtype while sampling. auto: fp32 on a CPU; on a GPU fp16 for a model trained in "
                        "fp16, else bf16 where the GPU supports it, else fp32")


def gpu_bf16_supported(device: str | torch.device) -> bool:
    """Whether `device` is a CUDA GPU with native bf16."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        # Emulated bf16 (pre-Ampere GPUs) is slower than fp16 with loss scaling, and cuDNN lacks its convolutions:
        # count it as unsupported (older torch lacks the argument).
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.cuda.is_bf16_supported()


def autocast(device_type: str, precision: str):
    """Autocast to `precision`, or nothing for fp32."""
    return nullcontext() if precision == "fp32" else torch.autocast(device_type, dtype=DTYPES[precision])


def describe(precision: str, requested: str, device_type: str, *, deepspeed: bool = False) -> str:
    """The line a training run prints at start, e.g. "precision: bf16 autocast (default on this GPU; ...)"."""
    how = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}[precision]
    if deepspeed and precision != "fp32":
        how = f"{precision} via DeepSpeed"  # which casts the model itself
    if requested != "auto":
        why = f"--{requested}"
    elif precision == "fp32":
        why = f"default on {'CPU' if device_type == 'cpu' else device_type}"
    elif precision == "bf16":
        why = "default on this GPU; --fp32 to train in fp32"
    else:
        why = "default on this GPU, which lacks bf16; --fp32 to train in fp32"
    return f"precision: {how} ({why})"


def prepare_sampling(model, requested: str, device: str | torch.device, trained: str | None, weights: str) -> str:
    """Set ``model`` up to sample: its weights cast to the precision ``sampling_precision`` picks (the weights
    themselves, not autocast: the KV cache and the decode kernels take their dtype, and half-size weights halve the
    memory traffic of every decode step), then stored as ``weights`` (``engine.model.quantize``). Returns the
    precision."""
    precision = sampling_precision(requested, torch.device(device).type, gpu_bf16_supported(device), trained)
    if precision != "fp32":
        model.to(DTYPES[precision])
    quantize_weights(model, weights)  # after the cast, which would turn the int8 scales to the model's dtype
    return precision
