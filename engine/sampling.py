"""Token sampling with DALLE-pytorch's semantics: top-k as a vocabulary fraction, then gumbel-max."""

import torch


def top_k(logits: torch.Tensor, thres: float) -> torch.Tensor:
    """Keep the k = max(int((1 - thres) * vocab), 1) largest logits; the rest become -inf.

    The fraction is of the whole vocabulary (text, pads and image), as in DALLE-pytorch, so trained models sample
    as their authors saw them.
    """
    if not 0.0 <= thres <= 1.0:
        raise ValueError(f"top-k threshold must lie in [0, 1], got {thres}")
    k = max(int((1 - thres) * logits.shape[-1]), 1)
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def gumbel_sample(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None):
    """Sample from softmax(logits / temperature) by the gumbel-max trick."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = torch.rand(logits.shape, device=logits.device, generator=generator)
    gumbel = -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))
    return (logits / temperature + gumbel).argmax(dim=-1)
