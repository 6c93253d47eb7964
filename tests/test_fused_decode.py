"""The fused C++ decode layer (``kernels.cpp.decode_layer`` through ``engine.model.fused_decode``) against the
layer-by-layer decode step.

The fused layer runs the unfused step's operations in the same order (the same C++ products and attention, ATen's
norms and GELU, plain loops for the rest with separate multiplies and adds), so the two must agree bit for bit, in
float32 as in float64, for every pattern and option; test_decode.py checks the cached step, fused since, against the
full forward pass.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch
from test_decode import OPTIONS, decode_config

from engine.model import fused_decode
from engine.model.dalle import DALLE
from engine.model.quantize import quantize_weights
from engine.sampling.decode import decoding
from kernels import cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}")


def random_model(dtype: torch.dtype = torch.float64, **overrides) -> DALLE:
    """A DALL-E whose every parameter is perturbed: norms, biases and LayerScale away from 1, 0 and 0.1, so that a
    swapped or dropped tensor shows."""
    model = DALLE(decode_config(**overrides)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def steps(model: DALLE, text: torch.Tensor, codes: torch.Tensor, pos: list[int], fused: bool
          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of decode steps at image positions ``pos`` (one list per row, or an int for all rows) after a prefill
    of the caption, and the cache's buffers at the end."""
    c = model.config
    cache = model.new_cache(text.shape[0], "cpu")
    with decoding(model), torch.no_grad():
        logits = [model.prefill(model._text_with_pads(text), codes[:, :0], cache)]
        assert fused_decode.applies(model.transformer, torch.zeros(1, dtype=cache.k0.dtype), cache.k0) == fused
        for i in pos:
            i = torch.as_tensor(i)
            token = codes.gather(1, i.expand(codes.shape[0])[:, None])[:, 0]
            logits.append(model.decode_step(token, c.text_len + i, cache))
    return logits, list(cache.buffers())


def assert_same(model: DALLE, text: torch.Tensor, codes: torch.Tensor, pos: list) -> None:
    fused = steps(model, text, codes, pos, fused=True)
    with fused_decode.unfused():
        unfused = steps(model, text, codes, pos, fused=False)
    for got, want in zip(sum(fused, []), sum(unfused, [])):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("option", OPTIONS)
def test_fused_step_is_the_unfused_step(option, dtype):
    model = random_model(dtype, **OPTIONS[option])
    text, codes = random_batch(model.config)
    assert_same(model, text, codes, list(range(model.config.image_seq_len - 1)))


def test_fused_step_on_both_instruction_sets(cpu_isa):
    model = random_model(torch.float32, **OPTIONS["everything"])
    text, codes = random_batch(model.config)
    assert_same(model, text, codes, list(range(model.config.image_seq_len - 1)))


@pytest.mark.parametrize("option", ["default", "everything"])
def test_fused_step_at_a_position_per_row(option):
    """Continuous batching: each row at its own position, a row's rows of the cache beyond it never read."""
    model = random_model(torch.float32, **OPTIONS[option])
    text, codes = random_batch(model.config, batch=4)
    n = model.config.image_seq_len - 1
    assert_same(model, text, codes, [torch.tensor([i, (i + 5) % n, n - 1 - i, i // 2]) for i in range(n)])


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_fused_step_with_stored_weights(weights):
    model = quantize_weights(random_model(torch.float32, **OPTIONS["default"]), weights)
    text, codes = random_batch(model.config)
    assert_same(model, text, codes, list(range(model.config.image_seq_len - 1)))


def test_fused_layer_runs_only_where_it_applies(monkeypatch):
    model = random_model(torch.float32)
    x, cache = torch.zeros(2, 1, model.config.dim), model.new_cache(2, "cpu")
    with torch.no_grad():
        assert fused_decode.applies(model.transformer, x, cache.k0)
        assert not fused_decode.applies(model.transformer, x.bfloat16(), cache.k0)  # bf16 rows: layer by layer
        assert not fused_decode.applies(model.transformer.train(), x, cache.k0)  # dropout
        model.eval()
        with fused_decode.unfused():
            assert not fused_decode.applies(model.transformer, x, cache.k0)
        monkeypatch.setenv("DALLE_ENGINE_ATTENTION", "reference")
        assert not fused_decode.applies(model.transformer, x, cache.k0)
    monkeypatch.delenv("DALLE_ENGINE_ATTENTION")
    assert not fused_decode.applies(model.transformer, x, cache.k0)  # gradients wanted


def layer_args(model: DALLE, batch: int = 2):
    """A valid decode_layer call on layer 0 at the first image position, as (args, kwargs)."""
    tr, c = model.transformer, model.config
    cache = model.new_cache(batch, "cpu")
    layer = tr.layers[0]
    pos = torch.tensor(c.text_len)
    angles = tr.rotary.index_select(0, pos.view(1))
    args = (torch.randn(batch, c.dim, dtype=cache.k0.dtype), fused_decode._branch(layer.attn),
            fused_decode._branch(layer.ff), *cache.layer(0), pos)
    kwargs = dict(rotary=(angles.cos(), angles.sin()), rings=cache.rings(0),
                  shift_weights=tr.shift_weights.index_select(0, pos.view(1)), pattern=layer.attn.fn.pattern,
                  **layer.attn.fn.geometry, eps=1e-5, reversible=False)
    return args, kwargs


@pytest.mark.parametrize("change, message", [
    (lambda a, k: (a[:1] + (a[1][:-1],) + a[2:], k), "needs 11 tensors"),
    (lambda a, k: (a[:5] + (torch.tensor(10**6),), k), "pos must lie in"),
    (lambda a, k: (a, {**k, "rings": None}), "token shift needs both rings"),
    (lambda a, k: ((a[0].bfloat16(),) + a[1:], k), "float32 or float64"),
    (lambda a, k: ((a[0][:, :-1],) + a[1:], k), "must be"),
    (lambda a, k: (a[:3] + (a[3][:, :, :, :-1],) + a[4:], k), "v_cache must be"),
])
def test_bad_arguments_raise(change, message):
    model = random_model(torch.float32, shift_tokens=True)
    args, kwargs = change(*layer_args(model))
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        cpp.decode_layer(*args, **kwargs)


def test_op_passes_opcheck():
    model = random_model(torch.float32, shift_tokens=True)
    args, kwargs = layer_args(model)
    cos, sin = kwargs["rotary"]
    ring_attn, ring_ff = kwargs["rings"]
    op_args = (*args, cos, sin, ring_attn, ring_ff, kwargs["shift_weights"], kwargs["pattern"], kwargs["text_len"],
               kwargs["fmap_size"], kwargs["kernel_size"], kwargs["dilation"], 1e-5, False)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.dalle_engine_cpu.decode_layer.default, op_args)
