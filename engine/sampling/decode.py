"""The decode loops: image codes for captions and captions from prefixes, one token per step over a model's KV cache
(or, as the reference, a full forward pass per token). Every row brings its own settings and random key, so rows of
different prompts and requests share a batch."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.model.linear import row_invariant
from engine.sampling.rows import Rows, Settings, sample

if TYPE_CHECKING:
    from engine.model.dalle import DALLE

TEXT_STEPS = 1 << 20  # noise steps of caption tokens start here, apart from those of image codes


def resolve(model: DALLE, settings: Settings | Sequence[Settings], batch: int) -> list[Settings]:
    """One settings per row (a single one serves every row), with the model's default guidance where ``cond_scale``
    is None."""
    per_row = [settings] * batch if isinstance(settings, Settings) else list(settings)
    default = model.config.default_cond_scale
    return [s if s.cond_scale is not None else dataclasses.replace(s, cond_scale=default) for s in per_row]


def guide(cond: torch.Tensor, null: torch.Tensor, guided: torch.Tensor, scales: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided logits, conditional logits): rows ``guided`` of the conditional logits ``cond`` mixed with their
    null-caption logits ``null`` (one row each, in that order) by classifier-free guidance, null + (cond - null) *
    scale, ``scales`` (len(guided), 1)."""
    if not len(guided):
        return cond, cond
    mixed = null + (cond[guided] - null) * scales.to(cond.dtype)
    return cond.index_copy(0, guided, mixed), cond


@contextlib.contextmanager
def decoding(model: DALLE) -> Iterator[None]:
    """Eval mode (restored after), and CPU products that never depend on the other rows of the batch. A model already
    in eval mode is left alone: switching walks every module, a cost per decode step of a continuous batch."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with row_invariant():
            yield
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def image_codes(model: DALLE, text: torch.Tensor, settings: Sequence[Settings], keys: torch.Tensor, *,
                prime: torch.Tensor | None = None, use_cache: bool = True, step_fn=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image codes (batch, image_seq_len) for tokenised captions ``text`` and their log-likelihood scores (batch,)
    (conditional, unfiltered, temperature 1; sampled codes only). ``settings``: one per row, resolved (see
    ``resolve``); ``keys``: each row's random key (``noise.row_keys``); ``prime``: the first codes of every image.
    Guided rows (cond_scale != 1) bring a null-caption row each, in the same batch."""
    c = model.config
    text = text[:, : c.text_seq_len]
    model._check_text(text)
    batch = text.shape[0]
    device = text.device
    codes = text.new_zeros(batch, c.image_seq_len)
    start = 0
    if prime is not None:
        model._check_codes(prime, batch)
        start = prime.shape[1]
        codes[:, :start] = prime
    rows = Rows.build(settings, keys, c.num_image_tokens, c.total_tokens)
    guided = torch.tensor([i for i, s in enumerate(settings) if s.cond_scale != 1.0], dtype=torch.long,
                          device=device)
    scales = torch.tensor([[s.cond_scale] for s in settings if s.cond_scale != 1.0], device=device)
    model_rows = torch.cat([text, torch.zeros_like(text[guided])])  # a null caption for each guided row
    with_null = torch.cat([torch.arange(batch, device=device), guided])  # the image row each model row decodes

    scores = text.new_zeros(batch, dtype=torch.float32)
    steps = torch.arange(c.image_seq_len, device=device)
    with decoding(model):
        if use_cache:
            # A compiled step brings the cache it was compiled for (see CompiledDecodeStep).
            cache = getattr(step_fn, "cache", model.new_cache)(model_rows.shape[0], device)
            step = step_fn or model.decode_step
            positions = torch.arange(c.total_seq_len, device=device)  # indexed, never copied from the host
            logits = model.prefill(model._text_with_pads(model_rows), codes[with_null, :start], cache)
        for i in range(start, c.image_seq_len):
            if not use_cache:
                logits = model.full_pass_logits(model_rows, codes[with_null, :i])
            logits, cond = guide(logits[:batch], logits[batch:], guided, scales)
            token = sample(logits, rows, steps[i])
            scores += cond.float().log_softmax(dim=-1).gather(-1, token[:, None])[:, 0]
            codes[:, i] = token
            if use_cache and i + 1 < c.image_seq_len:
                logits = step(token[with_null], positions[c.text_len + i], cache)
    return codes, scores


@torch.no_grad()
def captions(model: DALLE, prefixes: torch.Tensor, settings: Sequence[Settings], keys: torch.Tensor) -> torch.Tensor:
    """Captions (batch, text_seq_len) of token ids in [0, num_text_tokens), 0 for padding, completing ``prefixes``
    (batch, n <= text_seq_len); ``settings`` and ``keys`` as for ``image_codes`` (guidance does not apply)."""
    c = model.config
    device = prefixes.device
    if prefixes.dtype != torch.long or prefixes.ndim != 2 or prefixes.shape[1] > c.text_seq_len:
        raise ValueError(f"text prefixes must be a (batch, <= {c.text_seq_len}) long tensor, "
                         f"got {tuple(prefixes.shape)} {prefixes.dtype}")
    if prefixes.numel() and (prefixes.min() < 0 or prefixes.max() >= c.num_text_tokens):
        raise ValueError(f"text token ids must lie in [0, {c.num_text_tokens})")
    rows = Rows.build(settings, keys, c.num_text_tokens_internal, c.total_tokens)
    ids = model._text_with_pads(F.pad(prefixes, (0, c.text_seq_len - prefixes.shape[1])))
    steps = torch.arange(c.text_seq_len, device=device) + TEXT_STEPS
    with decoding(model):
        cache = model.new_cache(prefixes.shape[0], device)
        positions = torch.arange(c.text_len, device=device)
        logits = model.prefill(ids[:, : prefixes.shape[1]], None, cache)
        for i in range(prefixes.shape[1], c.text_seq_len):
            token = sample(logits, rows, steps[i])
            ids[:, i] = token
            if i + 1 < c.text_seq_len:
                logits = model.decode_step(token, positions[i + 1], cache, image=False)
    return ids.masked_fill(ids >= c.num_text_tokens, 0)  # any pad id means padding
