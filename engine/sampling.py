"""Token sampling: DALLE-pytorch's top-k (a fraction of the whole vocabulary) and gumbel-max, plus absolute top-k,
top-p (nucleus) and temperature. Everything stays on the device: no host synchronisation per token."""

from __future__ import annotations

import torch


def keep_top_fraction(logits: torch.Tensor, thres: float, vocab_size: int | None = None) -> torch.Tensor:
    """Keep the k = max(int((1 - thres) * vocab_size), 1) largest logits; the rest become -inf.

    ``vocab_size`` defaults to the last dim. DALLE-pytorch takes the fraction of the whole vocabulary (text, pads and
    image) even when only image tokens are allowed, so trained models sample as their authors saw them: pass that
    size when ``logits`` hold only the allowed slice (k is then capped at the slice's size, which changes nothing,
    as the other logits are masked and never sampled).
    """
    if not 0.0 <= thres <= 1.0:
        raise ValueError(f"top-k threshold must lie in [0, 1], got {thres}")
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    return keep_top_k(logits, max(int((1 - thres) * vocab_size), 1))


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (all of them if ``k`` exceeds the vocabulary); the rest become -inf."""
    if k < 1:
        raise ValueError(f"top-k count must be >= 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens whose probabilities sum to at least ``p`` (always the most
    likely one); the rest become -inf."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top-p must lie in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    # Drop a token when the tokens before it already reach p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_sample(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None):
    """Sample from softmax(logits / temperature) by the gumbel-max trick."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = torch.rand(logits.shape, device=logits.device, generator=generator)
    gumbel = -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))
    return (logits / temperature + gumbel).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    filter_thres: float | None = None,
    vocab_size: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits``: the top-k filters (``filter_thres``: DALLE-pytorch's fraction of
    ``vocab_size``; ``top_k``: a count), then top-p on the temperature-scaled distribution, then gumbel-max."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if filter_thres is not None:
        logits = keep_top_fraction(logits, filter_thres, vocab_size)
    if top_k is not None:
        logits = keep_top_k(logits, top_k)
    logits = logits / temperature
    if top_p is not None:
        logits = keep_top_p(logits, top_p)
    return gumbel_sample(logits, 1.0, generator)
