"""The fused C++ decode layer (``kernels.cpp.decode_layer`` through ``engine.model.fused_decode``) against the
layer-by-layer decode step, for every pattern and option, with a position per row and with stored weights.

Tolerances: in float64 the two compute the same sums, their norms and GELU by other formulas (libm's erf, two-pass
moments), so they agree to 1e-12 of the logits' size. In float32 the fused step's error against the float64 unfused
step may be at most twice the float32 unfused step's own, plus a few float32 ulps (its GELU's erf is within 1.5e-7,
as ATen's vectorised one): the project's rule for fast paths. test_decode.py checks the cached step, fused where it
applies, against the full forward pass.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import random_batch
from test_decode import OPTIONS, decode_config

from engine.model import fused_decode
from engine.model.dalle import DALLE
from engine.model.quantize import quantize_weights
from engine.sampling.decode import decoding
from engine.train.training import adam
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


def steps(model: DALLE, text: torch.Tensor, codes: torch.Tensor, pos: list) -> list[torch.Tensor]:
    """Logits of decode steps at image positions ``pos`` (ints for all rows, or a tensor per row) after a prefill of
    the caption, then the cache's buffers."""
    c = model.config
    cache = model.new_cache(text.shape[0], "cpu")
    with decoding(model), torch.no_grad():
        logits = [model.prefill(model._text_with_pads(text), codes[:, :0], cache)]
        for i in pos:
            i = torch.as_tensor(i)
            token = codes.gather(1, i.expand(codes.shape[0])[:, None])[:, 0]
            logits.append(model.decode_step(token, c.text_len + i, cache))
    return logits + list(cache.buffers())


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Counts the fused layers run (each stack step runs all its layers): a test must see the fused path taken, not
    assume it."""
    calls = []
    real = cpp.decode_stack

    class Counted:
        def __init__(self, stack, depth: int):
            self.stack, self.depth = stack, depth

        def step(self, *args):
            calls.extend([1] * self.depth)
            return self.stack.step(*args)

        def logits(self, *args):
            calls.extend([1] * self.depth)
            return self.stack.logits(*args)

        def set_head(self, *args):
            return self.stack.set_head(*args)

    monkeypatch.setattr(fused_decode.cpp, "decode_stack",
                        lambda tensors, patterns, *args, **kwargs: Counted(real(tensors, patterns, *args, **kwargs),
                                                                           len(patterns)))
    return calls


def assert_fused_is_unfused(model: DALLE, text: torch.Tensor, codes: torch.Tensor, pos: list, calls: list) -> None:
    fused = steps(model, text, codes, pos)
    assert len(calls) == len(pos) * model.config.depth
    with fused_decode.unfused():
        unfused = steps(model, text, codes, pos)
    assert len(calls) == len(pos) * model.config.depth
    if model.transformer.layers[0].attn.scale.dtype == torch.float64:
        for got, want in zip(fused, unfused):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * max(want.abs().max().item(), 1.0))
        return
    with fused_decode.unfused():
        exact = steps(model.double(), text, codes, pos)
    model.float()
    # Over all steps' logits, then over all the cache's buffers: single steps' errors scatter both ways.
    split = len(pos) + 1
    for got, plain, want in ((fused[:split], unfused[:split], exact[:split]), (fused[split:], unfused[split:],
                                                                            exact[split:])):
        got, plain, want = (torch.cat([t.double().flatten() for t in ts]) for ts in (got, plain, want))
        floor = 4 * torch.finfo(torch.float32).eps * max(want.abs().max().item(), 1.0)
        assert (got - want).abs().max() <= 2 * (plain - want).abs().max() + floor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("option", OPTIONS)
def test_fused_step_is_the_unfused_step(option, dtype, fused_calls):
    model = random_model(dtype, **OPTIONS[option])
    text, codes = random_batch(model.config)
    assert_fused_is_unfused(model, text, codes, list(range(model.config.image_seq_len - 1)), fused_calls)


def test_fused_step_on_both_instruction_sets(cpu_isa, fused_calls):
    model = random_model(torch.float32, **OPTIONS["everything"])
    text, codes = random_batch(model.config)
    assert_fused_is_unfused(model, text, codes, list(range(model.config.image_seq_len - 1)), fused_calls)


@pytest.mark.parametrize("option", ["default", "everything"])
def test_fused_step_at_a_position_per_row(option, fused_calls):
    """Continuous batching: each row at its own position, a row's rows of the cache beyond it never read."""
    model = random_model(torch.float64, **OPTIONS[option])
    text, codes = random_batch(model.config, batch=4)
    n = model.config.image_seq_len - 1
    pos = [torch.tensor([i, (i + 5) % n, n - 1 - i, i // 2]) for i in range(n)]
    assert_fused_is_unfused(model, text, codes, pos, fused_calls)


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_fused_step_with_stored_weights(weights, fused_calls):
    """int8 and bf16 weights, in float32 as sampling runs them: against the unfused step on the same stored weights
    (each converted exactly, the products are float32's on the converted weights)."""
    model = quantize_weights(random_model(torch.float32, **OPTIONS["default"]), weights)
    text, codes = random_batch(model.config)
    pos = list(range(model.config.image_seq_len - 1))
    fused = steps(model, text, codes, pos)
    assert len(fused_calls) == len(pos) * model.config.depth
    with fused_decode.unfused():
        unfused = steps(model, text, codes, pos)
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(want.abs().max().item(), 1.0))


def test_fused_layer_runs_only_where_it_applies(monkeypatch):
    model = random_model(torch.float32)

    def fused(x: torch.Tensor, cache=None) -> bool:
        cache = cache or model.new_cache(2, "cpu")
        return fused_decode.try_decode(model.transformer, x, cache, torch.tensor(model.config.text_len)) is not None

    x = torch.zeros(2, 1, model.config.dim)
    with torch.no_grad():
        assert fused(x)
        assert not fused(x.bfloat16())  # bf16 rows: layer by layer
        assert not fused(x, model.new_cache(2, "cpu").bfloat16())
        assert not fused(x) if model.transformer.train() else False  # dropout
        model.eval()
        with fused_decode.unfused():
            assert not fused(x)
        monkeypatch.setenv("DALLE_ENGINE_ATTENTION", "reference")
        assert not fused(x)
    monkeypatch.delenv("DALLE_ENGINE_ATTENTION")
    assert not fused(x)  # gradients wanted


def test_plan_follows_module_surgery_and_casts(fused_calls):
    """The tensors a fused step passes are gathered once per model: replacing layers (quantize_weights) or casting
    the model must be seen, not served from the old plan."""
    model = random_model(torch.float32)
    text, codes = random_batch(model.config)
    pos = [0, 1, 2]
    before = steps(model, text, codes, pos)
    quantize_weights(model, "int8")
    with fused_decode.unfused():
        int8 = steps(model, text, codes, pos)
    assert not torch.equal(int8[1], before[1])
    torch.testing.assert_close(steps(model, text, codes, pos)[1], int8[1], rtol=0, atol=1e-5)
    model = random_model(torch.float32)
    steps(model, text, codes, pos)
    model.double()
    with fused_decode.unfused():
        want = steps(model, text, codes, pos)[1]
    torch.testing.assert_close(steps(model, text, codes, pos)[1], want, rtol=0, atol=1e-12)
    assert len(fused_calls) == 4 * len(pos) * model.config.depth


def test_plan_follows_weights_changed_in_place(fused_calls):
    """The plan keeps packed copies of the weights: weights changed in place (load_state_dict, an optimizer step)
    must be packed again, not served from the old copies."""
    model, other = random_model(torch.float32), random_model(torch.float32).state_dict()
    optimizer = adam(list(model.parameters()), lr=0.05)
    text, codes = random_batch(model.config)
    pos = [0, 1, 2]
    before = steps(model, text, codes, pos)[1]
    model.load_state_dict(other)
    for changed_by in ("load_state_dict", "optimizer"):
        if changed_by == "optimizer":
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()
        got = steps(model, text, codes, pos)[1]
        with fused_decode.unfused():
            want = steps(model, text, codes, pos)[1]
        assert not torch.allclose(want, before, atol=1e-3), changed_by
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(want.abs().max().item(), 1.0), msg=changed_by)
        before = want
    assert len(fused_calls) == 3 * len(pos) * model.config.depth


def test_plan_is_kept_while_nothing_changes():
    """Packing every weight at every sampling call would cost a copy of the model: a new KV cache keeps the plan,
    an in-place change or an optimizer step drops it."""
    model = random_model(torch.float32)
    optimizer = adam(list(model.parameters()), lr=0.05)
    plan = fused_decode._plan(model.transformer)
    model.new_cache(2, "cpu")
    assert fused_decode._plan(model.transformer) is plan
    with torch.no_grad():
        model.transformer.layers[0].ff.fn.proj_out.weight.mul_(2)
    assert not plan.current()
    plan = fused_decode._plan(model.transformer)
    assert plan.current()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert not plan.current()


def test_plan_packs_each_shared_weight_once():
    model = random_model(torch.float32, **OPTIONS["shared_weights"])
    plan = fused_decode._plan(model.transformer)
    packed = [branch[i] for layer in plan.layers for branch in layer[:2] for i in fused_decode._WEIGHTS]
    assert all(w.dim() == 3 for w in packed)  # every projection of this model has a multiple of 16 outputs
    assert len({id(w) for w in packed}) == len({id(w) for w in plan.weights}) < len(packed)


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


def _replaced(branch: list, name: str, tensor: torch.Tensor) -> list:
    return [tensor if i == cpp.BRANCH_TENSORS.index(name) else t for i, t in enumerate(branch)]


@pytest.mark.parametrize("change, message", [
    (lambda a, k: (a[:1] + (a[1][:-1],) + a[2:], k), "needs 11 tensors"),
    (lambda a, k: (a[:5] + (torch.tensor(10**6),), k), "pos must lie in"),
    (lambda a, k: (a, {**k, "rings": None}), "token shift needs both rings"),
    (lambda a, k: ((a[0].bfloat16(),) + a[1:], k), "float32 or float64"),
    (lambda a, k: ((a[0][:, :-1],) + a[1:], k), "attn's output weight must have 31 output features, got 32"),
    (lambda a, k: (a[:2] + (_replaced(a[2], "out_weight", a[2][5][:-1]),) + a[3:], k),
     "ff's output weight must have 32 output features, got 31"),
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


def test_a_model_with_a_plan_copies_and_pickles():
    """The plan holds a C++ object: deepcopy and pickling leave it out, and the copy gathers its own."""
    model = random_model(torch.float32)
    text, codes = random_batch(model.config)
    want = steps(model, text, codes, [0, 1])[1]
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "_fused_plan" not in other.transformer.__dict__
        torch.testing.assert_close(steps(other, text, codes, [0, 1])[1], want, rtol=0, atol=0)


def test_stack_head_checks_its_arguments():
    model = random_model(torch.float32)
    stack = fused_decode._plan(model.transformer).stack  # gathered by the transformer alone: no head
    c = model.config
    cache = model.new_cache(2, "cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match="has no head"):
        stack.logits(torch.zeros(2, c.dim), *cache.flat(), torch.tensor(c.text_len))
    with pytest.raises(RuntimeError, match=rf"contiguous \({c.dim},\) CPU tensors, got \[3\]"):
        stack.set_head(torch.ones(3), torch.zeros(3), 1e-5, torch.zeros(16, c.dim), None, None, False)
    with pytest.raises(RuntimeError, match=f"must take {c.dim} features"):
        stack.set_head(torch.ones(c.dim), torch.zeros(c.dim), 1e-5, torch.zeros(16, 3), None, None, False)
