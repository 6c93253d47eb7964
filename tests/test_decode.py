"""Cached decoding (static KV cache, ``DALLE.prefill`` + ``DALLE.decode_step``) against full forward passes.

Tolerances: in float64 the cached logits must match the full forward pass to 1e-9 (both compute the same sums in a
different order). In float32, the cached logits' max error against the float64 forward may be at most twice the
error of the float32 full forward pass itself (plus a few float32 ulps of the logits), the project's rule for fast
paths.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_config
from test_checkpoint import tiny_dalle

import kernels
from engine.model.dalle import DALLE
from engine.model.transformer import ShiftState, ring_slots, shift_step, shift_tokens, shift_weights

ALL_PATTERNS = ("full", "axial_row", "axial_col", "conv_like")

OPTIONS = {
    "default": {},
    "no_shift": dict(shift_tokens=False),
    "learned_positions": dict(rotary_emb=False),
    "reversible": dict(reversible=True),
    "sandwich_stable": dict(sandwich_norm=True, stable=True),
    "conv_centered_k3_d2": dict(conv_centered=True, conv_kernel_size=3, conv_dilation=2),
    "conv_k3_d2": dict(conv_kernel_size=3, conv_dilation=2),
    "shared_weights": dict(shared_attn_ids=(0, 1, 2, 3, 0, 1, 2, 3), shared_ff_ids=(0, 1), share_input_output_emb=True),
    "odd_width": dict(dim=30, heads=3, dim_head=10),  # chunk(4) quarters overlap chunk(2) halves unevenly
    "one_cell_grid": dict(image_fmap_size=1),
    "everything": dict(reversible=True, sandwich_norm=True, stable=True, rotary_emb=False, conv_centered=True),
}


def decode_config(**overrides):
    base = dict(num_text_tokens=40, text_seq_len=6, num_image_tokens=20, image_fmap_size=4, depth=8,
                attn_types=ALL_PATTERNS, null_cond_prob=0.0)  # unguided: one cache row per caption
    base.update(overrides)
    return tiny_config(**base)


def cached_logits(model: DALLE, text: torch.Tensor, codes: torch.Tensor, prime: int = 0) -> torch.Tensor:
    """Image-vocabulary logits at every position from the last caption token on: a prefill of the caption (and
    ``prime`` image codes), then one decode step per remaining code."""
    c = model.config
    cache = model.new_cache(text.shape[0], text.device)
    positions = torch.arange(c.total_seq_len)
    outs = [model.prefill(model._text_with_pads(text), codes[:, :prime], cache)]
    for i in range(prime, c.image_seq_len - 1):
        outs.append(model.decode_step(codes[:, i], positions[c.text_len + i], cache))
    return torch.stack(outs, dim=1)


def full_logits(model: DALLE, text: torch.Tensor, codes: torch.Tensor, prime: int = 0) -> torch.Tensor:
    c = model.config
    logits = model(text, codes[:, : c.image_seq_len - 1])
    return logits[:, c.text_len - 1 + prime:, c.num_text_tokens_internal:]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("option", OPTIONS)
def test_cached_logits_equal_full_forward_float64(option, backend, monkeypatch):
    monkeypatch.setenv("DALLE_ENGINE_ATTENTION", backend)
    model = DALLE(decode_config(**OPTIONS[option])).double().eval()
    text, codes = random_batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(cached_logits(model, text, codes), full_logits(model, text, codes),
                                   rtol=0, atol=1e-9)


@pytest.mark.parametrize("prime", [1, 5, 15])
def test_prefill_with_image_prime(prime):
    model = DALLE(decode_config()).double().eval()
    text, codes = random_batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(cached_logits(model, text, codes, prime), full_logits(model, text, codes, prime),
                                   rtol=0, atol=1e-9)


@pytest.mark.parametrize("option", ["default", "everything"])
def test_cached_logits_float32_within_the_forward_pass_error(option):
    model = DALLE(decode_config(**OPTIONS[option])).eval()
    text, codes = random_batch(model.config, batch=2)
    with torch.no_grad():
        plain = full_logits(model, text, codes).double()
        ours = cached_logits(model, text, codes).double()
        exact = full_logits(model.double(), text, codes)
    floor = 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert (ours - exact).abs().max() <= 2 * (plain - exact).abs().max() + floor


def test_text_decoding_matches_full_forward():
    """generate_texts' cached caption steps give the full pass's text logits (its sampler sees the same logits)."""
    model = DALLE(decode_config(rotary_emb=False)).double().eval()
    c = model.config
    text, _ = random_batch(model.config)
    ids = model._text_with_pads(text)
    with torch.no_grad():
        cache = model.new_cache(text.shape[0], text.device)
        outs = [model.prefill(ids[:, :2], None, cache)]
        for i in range(2, c.text_seq_len - 1):
            outs.append(model.decode_step(ids[:, i], torch.tensor(i + 1), cache, image=False))
        full = model(text)[:, 2: c.text_seq_len, : c.num_text_tokens_internal]
    torch.testing.assert_close(torch.stack(outs, dim=1), full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dim", [32, 30, 6])
def test_shift_step_equals_shift_tokens(dim):
    text_len, fmap = 4, 3
    h = torch.randn(2, text_len + fmap * fmap, dim, dtype=torch.float64)
    ring = torch.zeros(2, fmap + 1, dim, dtype=torch.float64)
    weights = shift_weights(text_len, fmap, dim, h.shape[1])
    steps = [shift_step(h[:, p: p + 1], ShiftState(ring, torch.tensor(p), weights[p: p + 1]))
             for p in range(h.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), shift_tokens(h, text_len, fmap), rtol=0, atol=0)
    # Each row at its own position: row 1 runs 3 positions behind row 0.
    ring.zero_()
    lag = torch.tensor([0, 3])
    steps = []
    for p in range(h.shape[1] + 3):
        pos = (p - lag).clamp(0, h.shape[1] - 1)
        steps.append(shift_step(h[torch.arange(2), pos][:, None], ShiftState(ring, pos, weights[pos], ring_slots(pos, ring))))
    rows = torch.cat(steps, dim=1)
    expected = shift_tokens(h, text_len, fmap)
    torch.testing.assert_close(rows[0, : h.shape[1]], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(rows[1, 3:], expected[1], rtol=0, atol=0)


def test_decode_step_reads_only_the_pattern_keys():
    """Garbage in cache slots a pattern may not read (future positions, other rows) never reaches the logits."""
    model = DALLE(decode_config(attn_types=("axial_row",), depth=2)).double().eval()
    c = model.config
    text, codes = random_batch(model.config)
    with torch.no_grad():
        cache = model.new_cache(text.shape[0], text.device)
        model.prefill(model._text_with_pads(text), codes[:, :9], cache)
        for i in range(c.depth):
            k, v = cache.layer(i)
            k[:, :, c.text_len + 9:] = float("nan")  # the future
            k[:, :, c.text_len: c.text_len + 8] = float("nan")  # earlier rows: axial_row never reads them
            v[:, :, c.text_len: c.text_len + 8] = float("nan")
        logits = model.decode_step(codes[:, 9], torch.tensor(c.text_len + 9), cache)
        expected = full_logits(model, text, codes)[:, 10]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-9)


# --- sampling -----------------------------------------------------------------------------------------------------


@pytest.fixture
def model64():
    return tiny_dalle(attn_types=("full", "axial_row", "axial_col", "conv_like"), depth=4).double().eval()


def codes_of(model: DALLE, text, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return model.sample_image_codes(text, **kwargs)


@pytest.mark.parametrize("settings", [
    dict(seed=3),
    dict(seed=4, cond_scale=3.0),
    dict(seed=5, filter_thres=None, top_p=0.8, temperature=0.7),
    dict(seed=6, filter_thres=0.9, top_k=3),
])
def test_cached_sampling_equals_full_forward_sampling(model64, settings):
    """Same seed and settings: the cached sampler draws exactly the naive sampler's codes and scores."""
    text, codes = random_batch(model64.config, batch=2)
    cached, cached_scores = codes_of(model64, text, **settings)
    naive, naive_scores = codes_of(model64, text, use_cache=False, **settings)
    assert torch.equal(cached, naive)
    torch.testing.assert_close(cached_scores, naive_scores, rtol=0, atol=1e-8)
    again, _ = codes_of(model64, text, **settings)
    assert torch.equal(cached, again)


def test_priming_and_guidance_with_the_cache(model64):
    text, codes = random_batch(model64.config, batch=2)
    prime = codes[:, :5]
    cached, _ = codes_of(model64, text, prime=prime, cond_scale=2.0, seed=9)
    naive, _ = codes_of(model64, text, prime=prime, cond_scale=2.0, seed=9, use_cache=False)
    assert torch.equal(cached[:, :5], prime) and torch.equal(cached, naive)


def test_scores_are_the_model_log_likelihood(model64):
    c = model64.config
    text, _ = random_batch(c, batch=2)
    codes, scores = codes_of(model64, text, seed=1, temperature=2.0)
    with torch.no_grad():
        logits = model64(text, codes[:, :-1])[:, c.text_len - 1:, c.num_text_tokens_internal:]
    expected = logits.log_softmax(-1).gather(-1, codes[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(scores, expected.float(), rtol=0, atol=1e-5)


def test_generate_texts_completes_prefixes(model64):
    c = model64.config
    prefix = torch.randint(1, c.num_text_tokens, (3, 2))
    texts = model64.generate_texts(prefix, seed=0)
    assert texts.shape == (3, c.text_seq_len) and torch.equal(texts[:, :2], prefix)
    assert texts.min() >= 0 and texts.max() < c.num_text_tokens
    assert torch.equal(texts, model64.generate_texts(prefix, seed=0))
    # Greedy decoding equals a greedy loop of full forward passes over the sampled internal ids (a sampled pad id is
    # fed back as it is, as DALLE-pytorch does; the returned captions show any pad id as 0).
    ids = model64._text_with_pads(prefix)
    with torch.no_grad():
        for _ in range(2, c.text_seq_len):
            x = model64._transform(model64._embed_prefix(ids, None))[:, -1]
            ids = torch.cat([ids, model64._vocab_logits(x, image=False).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model64.generate_texts(prefix, filter_thres=1.0), ids.masked_fill(ids >= c.num_text_tokens, 0))
    assert model64.generate_texts(batch_size=2, seed=1).shape == (2, c.text_seq_len)


def test_decode_attention_backend_follows_dispatch():
    q = torch.randn(1, 1, 16)
    assert kernels.choose_decode_backend(q, "reference") == "reference"
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.choose_decode_backend(q, "bogus")


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)],
                         ids=str)
def test_compiled_decode_step_samples_like_the_full_forward(device, dtype):
    """``compiled_decode_step`` (inductor's kernels around the C++ decode kernels on a CPU; the Triton ones in a CUDA
    graph on a GPU) gives the full forward pass's logits (within the dtype's forward error) and, in float32, the
    naive sampler's codes; sampling again reuses its cache without recompiling, and nothing the last sampling left in
    the cache reaches the next."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # A grid row longer than the caption: the prefill leaves token-shift ring slots unwritten.
    model = DALLE(decode_config(depth=4, image_fmap_size=8)).to(device, dtype).eval()
    text, codes = (x.to(device) for x in random_batch(model.config, batch=4))
    step = model.compiled_decode_step()
    c = model.config
    with torch.no_grad():
        cache = step.cache(text.shape[0], text.device)
        positions = torch.arange(c.total_seq_len, device=text.device)
        outs = [model.prefill(model._text_with_pads(text), codes[:, :0], cache)]
        for i in range(c.image_seq_len - 1):
            # contiguous tokens, as the sampler's: a compiled step specialises on strides
            outs.append(step(codes[:, i].clone(memory_format=torch.contiguous_format), positions[c.text_len + i],
                             cache).clone())
        ours = torch.stack(outs, dim=1).double()
        plain = full_logits(model, text, codes).double()
        exact = full_logits(model.double(), text, codes)
    floor = 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert (ours - exact).abs().max() <= 2 * (plain - exact).abs().max() + floor
    if dtype == torch.float32:
        model.float()
        cached, _ = model.sample_image_codes(text, seed=0, step_fn=step)
        assert step.cache(text.shape[0], text.device) is cache
        for buffer in cache.buffers():
            buffer.fill_(float("nan"))
        with torch._dynamo.config.patch(error_on_recompile=True):
            again, _ = model.sample_image_codes(text, seed=0, step_fn=step)
        naive, _ = model.sample_image_codes(text, seed=0, use_cache=False)
        assert torch.equal(cached, naive) and torch.equal(again, naive)
