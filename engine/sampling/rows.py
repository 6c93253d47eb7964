"""Per-row sampling: every row of a batch brings its own settings and its own random stream, so a row's token is a
function of its logits, its settings and its key alone, whatever else shares the batch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from engine.sampling.noise import gumbel


@dataclasses.dataclass(frozen=True)
class Settings:
    """How one image (or caption) is sampled.

    ``filter_thres``: DALLE-pytorch's top-k, the share of the whole vocabulary to drop (None: off); ``top_k``: a count
    of tokens to keep; ``top_p``: nucleus sampling on the temperature-scaled distribution; ``cond_scale`` != 1:
    classifier-free guidance against the null caption (None: the model's default).
    """

    temperature: float = 1.0
    filter_thres: float | None = 0.5
    top_k: int | None = None
    top_p: float | None = None
    cond_scale: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.filter_thres is not None and not 0.0 <= self.filter_thres <= 1.0:
            raise ValueError(f"top-k threshold must lie in [0, 1], got {self.filter_thres}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top-k count must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must lie in (0, 1], got {self.top_p}")

    def keep(self, columns: int, vocab_size: int) -> int:
        """How many of ``columns`` allowed logits the top-k filters keep (``vocab_size``: what the fraction counts)."""
        k = columns
        if self.filter_thres is not None:
            k = min(k, max(int((1 - self.filter_thres) * vocab_size), 1))
        if self.top_k is not None:
            k = min(k, self.top_k)
        return k


@dataclasses.dataclass(frozen=True)
class Rows:
    """A batch's settings as tensors, one entry per row, and each row's random key (``noise.row_keys``)."""

    temperature: torch.Tensor  # (rows,) float32
    keep: torch.Tensor  # (rows,) long: how many logits top-k keeps
    top_p: torch.Tensor  # (rows,) float32
    keys: torch.Tensor  # (rows,) long
    most_kept: int  # the largest keep, or 0 when no row filters by top-k or top-p
    # The top-p rows grouped by their keep: (keep, row indices). A group's nucleus is computed over exactly its rows'
    # kept logits, so a row's sums never depend on how many logits the rows beside it keep.
    nucleus: tuple[tuple[int, torch.Tensor], ...]

    @classmethod
    def build(cls, settings: Sequence[Settings], keys: torch.Tensor, columns: int, vocab_size: int) -> Rows:
        """``columns``: the logits sampled from (e.g. the image codes); ``vocab_size``: what ``filter_thres`` counts."""
        if len(settings) != keys.shape[0]:
            raise ValueError(f"{len(settings)} settings for {keys.shape[0]} rows")
        device = keys.device
        keep = [s.keep(columns, vocab_size) for s in settings]
        top_p = [s.top_p if s.top_p is not None and s.top_p < 1 else math.inf for s in settings]
        groups: dict[int, list[int]] = {}
        for row, (k, p) in enumerate(zip(keep, top_p)):
            if p < math.inf:
                groups.setdefault(k, []).append(row)
        return cls(
            temperature=torch.tensor([s.temperature for s in settings], dtype=torch.float32, device=device),
            keep=torch.tensor(keep, device=device),
            top_p=torch.tensor(top_p, device=device),
            keys=keys,
            most_kept=max(keep) if groups or min(keep) < columns else 0,
            nucleus=tuple((k, torch.tensor(group, device=device)) for k, group in groups.items()))


def sample(logits: torch.Tensor, rows: Rows, step: torch.Tensor | int) -> torch.Tensor:
    """One token per row of ``logits`` (rows, columns): top-k, then top-p on the temperature-scaled distribution,
    then gumbel-max with the row's counter-based noise at ``step`` (one for all rows, or one per row). Row-wise
    throughout, in float32; a filter keeps the logits equal to its last kept one too (no tie is broken by
    position)."""
    logits = logits.float()
    temperature = rows.temperature[:, None]
    if rows.most_kept:
        ordered = logits.topk(rows.most_kept, dim=-1).values  # descending
        last = ordered.gather(-1, (rows.keep - 1)[:, None])
        for k, index in rows.nucleus:
            # Keep the most likely tokens until they reach p: those whose predecessors hold less than p.
            top = ordered[index, :k]
            probs = (top / temperature[index]).softmax(dim=-1)
            kept = probs.cumsum(dim=-1) - probs < rows.top_p[index, None]
            last[index] = top.masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < last, float("-inf"))
    return (logits / temperature + gumbel(rows.keys, step, logits.shape[-1])).argmax(dim=-1)
