"""Remembering kernels that fail on a device, so that dispatch falls back instead of crashing a user's run.

Triton kernels compile on their first call, for the GPU at hand: an older architecture, a Triton/driver mismatch or
too little shared memory surfaces there (``CompilationError``, ``OutOfResources``, ``RuntimeError``, ``ImportError``),
as can a failing inductor compile of FlexAttention. ``guarded`` runs such a call in eager mode; on a failure it
records the backend as broken on that device for the rest of the process and warns once, and ``choose_backend``
then skips it (Triton -> FlexAttention -> reference for training, Triton -> reference for decoding).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["broken", "check_backward_once", "guarded", "is_kernel_failure"]

_NAMES = {"triton": "Triton", "flex": "FlexAttention", "reference": "the pure-PyTorch reference"}
_broken: dict[tuple[str, str], str] = {}  # (backend, device) -> the failure, e.g. ("triton", "cuda:0")
_backward_checked: set[tuple] = set()


def broken(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` failed on ``device`` earlier in this process."""
    return (backend, str(device)) in _broken


def is_kernel_failure(error: Exception) -> bool:
    """Whether ``error`` says the kernel cannot run here, rather than something a fallback would not fix."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False  # the fallbacks need more memory, not less
    return isinstance(error, (ImportError, RuntimeError)) or type(error).__module__.split(".")[0] == "triton"


def guarded(backend: str, device: torch.device, run: Callable[[], torch.Tensor],
            instead: Callable[[], str]) -> torch.Tensor | None:
    """``run()``; or, where it fails as a kernel (``is_kernel_failure``), None after marking ``backend`` broken on
    ``device`` and warning once, naming the cause and ``instead()``, the backend dispatch chooses now."""
    try:
        return run()
    except Exception as error:
        if not is_kernel_failure(error):
            raise
        _broken[(backend, str(device))] = cause = f"{type(error).__name__}: {error}"
        # stacklevel 3: the caller of kernels.sparse_attention / decode_attention
        warnings.warn(f"{_NAMES[backend]} attention failed on {device}; using {_NAMES[instead()]} instead for the "
                      f"rest of this process. Cause: {cause}", stacklevel=3)
    return None


def check_backward_once(key: tuple, out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
    """Run ``out``'s backward kernels once per ``key`` (zero upstream gradient, graph kept), so that a backward that
    cannot compile or launch fails here, inside ``guarded``, rather than later in ``loss.backward()``."""
    needs_grad = [x for x in inputs if x.requires_grad]
    if key in _backward_checked or not (out.requires_grad and needs_grad):
        return
    torch.autograd.grad(out, needs_grad, torch.zeros_like(out), retain_graph=True)
    _backward_checked.add(key)
