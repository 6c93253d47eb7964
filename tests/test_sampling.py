"""The sampler: counter-based noise, per-row filters and guidance, and images that depend only on their seed, index,
caption and settings, never on the batch they were sampled in."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_batch, tiny_config

from engine.model.dalle import DALLE
from engine.sampling import Settings, noise, resolve, row_keys
from engine.sampling.continuous import ContinuousBatch, Image
from engine.sampling.rows import Rows, sample
from kernels import cpp


def test_noise_is_uniform_and_a_function_of_key_step_and_column():
    keys = row_keys(7, torch.arange(64))
    u = noise.uniform(keys, 3, 4096)
    n = u.numel()
    assert u.dtype == torch.float32 and 0 < u.min() and u.max() < 1
    # Kolmogorov-Smirnov distance to U(0, 1) below its 0.1% critical value.
    ordered = u.flatten().double().sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (grid - ordered).abs().max() < 1.95 / math.sqrt(n)
    # Neighbouring columns, steps and keys are uncorrelated.
    for other in (u[:, 1:], noise.uniform(keys, 4, 4096)[:, :-1], noise.uniform(keys.roll(1), 3, 4096)[:, :-1]):
        r = torch.corrcoef(torch.stack([u[:, :-1].flatten(), other.flatten()]).double())[0, 1]
        assert abs(r) < 4 / math.sqrt(other.numel())
    # A row's values are its own: alone or among others.
    assert torch.equal(noise.uniform(keys[5:6], 3, 4096)[0], u[5])
    assert torch.equal(row_keys(7, torch.tensor([5])), keys[5:6])
    assert len(set(keys.tolist()) | set(row_keys(8, torch.arange(64)).tolist())) == 128
    with pytest.raises(ValueError, match="seed"):
        row_keys(-1, torch.arange(2))


@pytest.mark.skipif(not cpp.available(), reason="C++ kernels unavailable")
@pytest.mark.parametrize("rows, columns", [(5, 4096), (3, 17), (1, 1), (4, 0)])
def test_cpp_noise_is_the_tensor_code_bit_for_bit(rows, columns):
    keys = torch.randint(0, 2**32, (rows,))
    for step in (0, 3, (1 << 20) + 77, torch.randint(0, 2**21, (rows,))):
        got = cpp.counter_uniform(keys, torch.as_tensor(step), columns)
        assert torch.equal(got, noise.tensor_uniform(keys, step, columns))
    with pytest.raises(RuntimeError, match="keys must lie in"):
        cpp.counter_uniform(keys - 2**32, torch.tensor(0), columns)
    with pytest.raises(RuntimeError, match="one per row"):
        cpp.counter_uniform(keys, torch.arange(rows + 1), columns)


def filtered_probs(logits: torch.Tensor, s: Settings, vocab_size: int) -> torch.Tensor:
    """The distribution `sample` should follow, in float64: top-k, then top-p on the temperature-scaled softmax."""
    logits = logits.double()
    k = s.keep(logits.numel(), vocab_size)
    order = logits.argsort(descending=True)
    kept = torch.zeros_like(logits, dtype=torch.bool)
    kept[order[:k]] = True
    probs = torch.where(kept, logits / s.temperature, -math.inf).softmax(-1)
    if s.top_p is not None:
        before = probs[order].cumsum(0) - probs[order]
        kept[order[before >= s.top_p]] = False
        probs = torch.where(kept, logits / s.temperature, -math.inf).softmax(-1)
    return probs


@pytest.mark.parametrize("settings", [
    Settings(filter_thres=None), Settings(filter_thres=None, temperature=0.6), Settings(filter_thres=0.7),
    Settings(filter_thres=None, top_k=3), Settings(filter_thres=None, top_p=0.8, temperature=1.5),
    Settings(filter_thres=0.4, top_p=0.6, temperature=0.8),
], ids=["plain", "temperature", "fraction", "top_k", "top_p", "all"])
def test_samples_follow_the_filtered_softmax(settings: Settings):
    vocab_size, n = 16, 40000  # the fraction counts a vocabulary of 16; 10 logits are sampled from
    logits = torch.randn(10, generator=torch.Generator().manual_seed(0)) * 1.5
    rows = Rows.build([settings] * n, row_keys(1, torch.arange(n)), 10, vocab_size)
    tokens = sample(logits.expand(n, 10), rows, 0)
    freq = torch.bincount(tokens, minlength=10).double() / n
    expected = filtered_probs(logits, settings, vocab_size)
    assert torch.all(freq[expected == 0] == 0)
    assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-12)


def test_settings_are_checked():
    for bad in (dict(temperature=0.0), dict(filter_thres=1.5), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.2)):
        with pytest.raises(ValueError):
            Settings(**bad)


def test_an_image_is_the_same_alone_or_in_any_batch():
    """Mixed prompts and settings (guided or not, filters, temperature, a primed start) in one batch: each image,
    its score included, equals the same image sampled alone, bit for bit, and a shuffled batch changes nothing."""
    torch.manual_seed(0)
    model = DALLE(tiny_config(null_cond_prob=0.1, attn_types=("full", "axial_row"), dim=48)).eval()
    text, codes = random_batch(model.config, batch=20)
    kinds = [Settings(), Settings(cond_scale=1.0), Settings(cond_scale=3.0, top_p=0.9), Settings(top_k=4),
             Settings(filter_thres=None, temperature=0.7)]
    settings = [kinds[i % len(kinds)] for i in range(20)]
    indices = torch.arange(20) % 7  # images of different prompts may share an index
    for prime in (None, codes[:, :3]):
        together, scores = model.sample_image_codes(text, seed=11, image_indices=indices, settings=settings,
                                                    prime=prime)
        for i in range(20):
            alone, score = model.sample_image_codes(text[i:i + 1], seed=11, image_indices=indices[i:i + 1],
                                                    settings=[settings[i]],
                                                    prime=None if prime is None else prime[i:i + 1])
            assert torch.equal(alone[0], together[i]) and torch.equal(score[0], scores[i]), i
        order = torch.randperm(20)
        shuffled, shuffled_scores = model.sample_image_codes(
            text[order], seed=11, image_indices=indices[order], settings=[settings[i] for i in order],
            prime=None if prime is None else prime[order])
        assert torch.equal(shuffled, together[order]) and torch.equal(shuffled_scores, scores[order])
    # The seed and the index choose the stream.
    base, other_seed, other_index = (
        model.sample_image_codes(text, seed=seed, image_indices=indices + shift, settings=settings)[0]
        for seed, shift in ((11, 0), (12, 0), (11, 7)))
    assert not torch.equal(other_seed, base) and not torch.equal(other_index, base)


@pytest.mark.parametrize("options", [dict(rotary_emb=True, shift_tokens=True), dict(rotary_emb=False,
                                                                                  shift_tokens=False)],
                         ids=["rotary_shift", "plain"])
def test_images_joining_and_leaving_a_running_batch_are_the_images_sampled_alone(options):
    """Continuous batching: images join at different steps (so their rows decode at different positions), some leave
    early (cancelled), the rest when done; every finished image and its score equal the image sampled alone, bit for
    bit, and the batch never holds more rows than its capacity."""
    torch.manual_seed(0)
    model = DALLE(tiny_config(null_cond_prob=0.1, attn_types=("full", "axial_row", "axial_col", "conv_like"),
                              image_fmap_size=4, dim=48, **options)).eval()
    text, _ = random_batch(model.config, batch=12)
    kinds = [Settings(cond_scale=1.5), Settings(cond_scale=1.0, top_p=0.8), Settings(cond_scale=3.0, top_p=0.9,
             filter_thres=0.2), Settings(top_k=4, cond_scale=1.0), Settings(filter_thres=None, temperature=0.7)]
    settings = resolve(model, [kinds[i % len(kinds)] for i in range(12)], 12)
    keys = row_keys(5, torch.arange(12) % 5)
    images = [Image(text[i], settings[i], keys[i], owner=i) for i in range(12)]
    batch = ContinuousBatch(model, capacity=9, device="cpu")
    waiting, done, cancelled, step = list(images), [], {images[4], images[9]}, 0
    while waiting or batch.images:
        joining = []
        while step % 3 == 0 and waiting and batch.used + sum(1 + i.guided for i in joining + waiting[:1]) <= 9:
            joining.append(waiting.pop(0))
        batch.admit(joining)
        assert batch.used <= 9
        if step == 7:  # image 4 is in the batch, image 9 still waits
            batch.cancel(list(cancelled))
            waiting = [i for i in waiting if i not in cancelled]
        done += batch.step()
        step += 1
    assert sorted(i.owner for i in done) == sorted(i for i in range(12) if images[i] not in cancelled)
    for image in done:
        i = image.owner
        alone, score = model.sample_image_codes(text[i:i + 1], seed=5, image_indices=torch.tensor([i % 5]),
                                                settings=[settings[i]])
        assert torch.equal(image.codes, alone[0]), i
        assert torch.equal(image.score, score[0]), i
