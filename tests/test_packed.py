"""Packed copies of weights (``engine.model.packed``): made once, shared by the products that read a weight, and never
served after the weight changed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from engine.model import packed
from engine.model.dalle import DALLE
from engine.model.linear import Linear, linear, row_invariant
from engine.model.transformer import KVCache
from engine.train.training import adam
from kernels import cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}")


def test_a_copy_is_made_once_and_follows_every_change():
    layer = Linear(24, 48)
    first = packed.pack(layer.weight)
    assert first.shape == (3, 24, 16) and packed.pack(layer.weight) is first
    torch.testing.assert_close(first, cpp.pack_weight(layer.weight), rtol=0, atol=0)
    changes = {
        "in place": lambda: layer.weight.detach().mul_(2),
        "through .data, then changed()": lambda: (layer.weight.data.mul_(2), packed.changed()),
        "load_state_dict": lambda: layer.load_state_dict({"weight": torch.randn(48, 24), "bias": torch.zeros(48)}),
        "cast": lambda: layer.double(),
        "module registered": lambda: layer.register_module("extra", nn.Identity()),
    }
    optimizer = adam(list(layer.parameters()), lr=0.1)

    def step():
        layer.weight.grad = torch.ones_like(layer.weight)
        optimizer.step()

    for name, change in [*changes.items(), ("fused optimizer step", step)]:
        if name == "fused optimizer step":
            layer.float()
            optimizer = adam(list(layer.parameters()), lr=0.1)
        before = packed.pack(layer.weight)
        change()
        after = packed.pack(layer.weight)
        assert after is not before, name
        torch.testing.assert_close(after, cpp.pack_weight(layer.weight), rtol=0, atol=0, msg=name)


def test_a_dalle_switching_to_training_or_eval_repacks():
    """Weights changed through .data (EMA, hand-written updates) bump no version: a model sampled between training
    steps goes through .train() / .eval(), which make every copy stale."""
    model = DALLE(tiny_config())
    weight = model.transformer.layers[0].ff.fn.proj_out.weight
    before = packed.pack(weight)
    model.eval()
    assert packed.pack(weight) is not before


def test_a_kv_cache_leaves_copies_current():
    weight = torch.randn(32, 8)
    copy = packed.pack(weight)
    KVCache(tiny_config(), 2)
    assert packed.pack(weight) is copy


def test_a_row_slice_on_group_boundaries_reads_the_whole_weights_copy():
    weight = torch.randn(80, 24)
    whole = packed.pack(weight)
    part = packed.pack(weight[32:64])
    assert part.data_ptr() == whole[2:4].data_ptr() and part.shape == (2, 24, 16)
    for view in (weight[8:40], weight[32:60], weight[:, :16], weight.t()):  # off the groups, or not rows
        assert packed.pack(view) is view
    assert packed.pack(torch.randn(40, 24)).shape == (40, 24)  # not a multiple of 16


@pytest.mark.parametrize("rows", [1, 4, 40])
def test_products_read_the_copy_and_agree_with_f_linear(rows):
    layer = Linear(24, 48)
    x = torch.randn(rows, 24)
    with torch.no_grad(), row_invariant():
        got = linear(x, layer.weight, layer.bias)
        part = layer.part(x, slice(16, 48))
    assert packed._copies.get(layer.weight) is not None
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(part, got[:, 16:48], rtol=0, atol=0)  # the same sums, whole or in part
