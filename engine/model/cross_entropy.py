"""The output projection and its cross-entropy in one pass over row chunks, for the training loss.

``F.cross_entropy(F.linear(x, weight, bias), target)`` writes the (rows, vocabulary) logits, their log-softmax and,
backward, a zeroed gradient of the log-softmax and the logits' gradient: four tensors of that size (21 MB each for
the 10,000-token caption vocabulary at 512 rows), each written and read back through memory. Here a chunk of rows at
a time goes from x to its logits, their loss and the logits' gradient in one buffer (on a CPU in one visit of each
row, ``kernels.cpp.cross_entropy_rows``), and that gradient goes straight into x's, the weight's and the bias's: the
backward only scales what the forward left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpp

CHUNK_BYTES = 32 << 20  # the logits buffer's bound: what the loss holds stays flat as batches grow
# The chunk is the inner dim of the weight gradient's product: at 512 rows of a 10k vocabulary, chunks of 256 rows
# took 7 % longer than one chunk, of 128 rows 20 %.
MIN_CHUNK_ROWS = 512


def chunk_rows(rows: int, vocabulary: int, element_size: int) -> int:
    """Rows per chunk: its logits within ``CHUNK_BYTES``, but never under ``MIN_CHUNK_ROWS`` (or all rows)."""
    return max(1, min(rows, max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, vocabulary * element_size))))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), target)`` (mean over rows), differentiable in x, weight and bias.

    x: ``(rows, dim)``; weight: ``(vocabulary, dim)``; target: ``(rows,)`` int64 ids in ``[0, vocabulary)``.
    ``chunk``: rows per chunk (default ``chunk_rows``). When a gradient is wanted the forward also computes x's, the
    weight's and the bias's gradients for a unit loss (a forward and a backward's work) and the backward scales them;
    not twice differentiable. Under autocast, and for half-precision x (a DeepSpeed fp16 or bf16 engine's), it is
    the two PyTorch calls, which keep their softmax's sums in float32."""
    if x.dim() != 2 or target.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy: x must be (rows, dim) and target (rows,), got {tuple(x.shape)} and "
                         f"{tuple(target.shape)}")
    if torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.float32, torch.float64):
        return F.cross_entropy(F.linear(x, weight, bias), target)
    chunk = chunk or chunk_rows(x.shape[0], weight.shape[0], x.element_size())
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _LinearCrossEntropy.apply(x, weight, bias, target, chunk)
    return _chunked(x, weight, bias, target, chunk, None)


def rows_loss(logits: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, grad: bool) -> torch.Tensor:
    """Each row's loss, ``logsumexp(row) - row[target]`` of the row plus ``bias`` (or None); with ``grad``, each row of
    ``logits`` becomes its loss's gradient (softmax minus the one-hot target), else it is left unspecified. The C++
    kernel on a CPU, one visit of each row; ATen's operations elsewhere."""
    if logits.is_cpu and logits.dtype in (torch.float32, torch.float64) and cpp.available():
        return cpp.cross_entropy_rows(logits, bias, target, grad)
    if bias is not None:
        logits += bias
    top = logits.amax(1, keepdim=True)
    picked = logits.gather(1, target[:, None])
    torch.sub(logits, top, out=logits).exp_()
    sums = logits.sum(1, keepdim=True)
    if grad:
        logits.div_(sums).scatter_add_(1, target[:, None], logits.new_full((logits.shape[0], 1), -1.0))
    return (top + sums.log() - picked)[:, 0]


def _chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, chunk: int,
             grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None) -> torch.Tensor:
    """The mean loss; with ``grads`` = (dx, dweight, dbias) buffers (None where not wanted), fills them with the
    gradients of the summed loss."""
    rows = x.shape[0]
    dx, dweight, dbias = grads or (None, None, None)
    if rows == 0:  # F.cross_entropy's mean over no rows, whose gradients are zero
        for g in (dweight, dbias):
            if g is not None:
                g.zero_()
        return x.new_full((), float("nan"))
    buffer = x.new_empty(min(chunk, rows), weight.shape[0])
    total = x.new_zeros(())
    for start in range(0, rows, chunk):
        xs, ts = x[start:start + chunk], target[start:start + chunk]
        logits = buffer[: xs.shape[0]]
        torch.mm(xs, weight.t(), out=logits)
        total += rows_loss(logits, bias, ts, grad=grads is not None).sum()
        first = 0.0 if start == 0 else 1.0  # beta 0: the buffers' first chunk overwrites them, never read
        if dx is not None:
            torch.mm(logits, weight, out=dx[start:start + chunk])
        if dweight is not None:
            torch.addmm(dweight, logits.t(), xs, beta=first, out=dweight)
        if dbias is not None:
            torch.addmv(dbias, logits.t(), torch.ones_like(ts, dtype=x.dtype), beta=first, out=dbias)
    return total / rows


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, chunk):
        wants = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        grads = tuple(t.new_empty(t.shape) if want else None for t, want in zip((x, weight, bias), wants))
        loss = _chunked(x.detach(), weight.detach(), None if bias is None else bias.detach(), target, chunk, grads)
        ctx.grads, ctx.rows = grads, x.shape[0]  # the summed loss's gradients
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        scale = grad / max(ctx.rows, 1)  # no rows: zero gradients stay zero
        return (*(None if g is None else g * scale for g in ctx.grads), None, None)
