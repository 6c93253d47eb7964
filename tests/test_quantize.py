"""Weight-only quantisation for sampling (``engine.model.quantize``): int8 with a scale per output feature, bf16.

Error bounds, derived from the stored weight rather than fitted: int8 rounds each weight to the nearest multiple of
its feature's scale s, so a weight moves by at most s / 2 and an output by at most (s / 2) * sum |x_i|; bfloat16
rounds each weight to 8 significant bits, moving it by at most 2^-9 |w| (half its ulp), an output by at most
2^-9 * sum |x_i w_i|. A layer's result must lie within that bound of the float64 product with the original weight,
plus the float32 accumulation budget of the C++ kernel's own tests. Through a whole model the errors pass through
norms, softmaxes and GELUs, where no such bound holds: there the tests check what sampling relies on (the cached
decode equals the model's own full forward pass, and every image is the same alone and batched), and
``bench/quantize.py`` measures the logits' error against float32 on real checkpoints.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint import tiny_dalle
from test_generate import gen, settings, tiny_checkpoint
from test_small_linear import EPS32, exact_and_scale, float32_error

from engine.model.linear import Linear, row_invariant
from engine.model.quantize import StoredLinear, int8_per_feature, quantize_weights
from engine.sampling import Settings, image_codes, resolve, row_keys
from kernels import cpp

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}")


def test_int8_per_feature_rounds_to_the_nearest_step() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(33, 70, generator=gen) * torch.logspace(-3, 2, 33)[:, None]
    w[5] = 0  # an all-zero feature
    q, scale = int8_per_feature(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (33,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[torch.arange(33) != 5] == 127).all()
    assert scale[5] == 1 and (q[5] == 0).all()
    step_error = (w.double() - q.double() * scale.double()[:, None]).abs() / scale.double()[:, None]
    assert step_error.max() <= 0.5 + 1e-6


@pytest.mark.parametrize("weights", ["int8", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 16, 200])
def test_stored_layer_within_its_derived_bound(weights: str, rows: int) -> None:
    """Against the float64 product with the original weight: the weight's own rounding bound plus float32's
    accumulation budget. 1 to 16 rows take the C++ kernel, 200 the converted product (both inside and outside
    row_invariant for 200)."""
    gen = torch.Generator().manual_seed(1)
    layer = Linear(300, 70)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(70, 300, generator=gen) * torch.logspace(-2, 1, 70)[:, None])
        layer.bias.copy_(torch.randn(70, generator=gen))
    stored = StoredLinear(layer, weights)
    x = torch.randn(rows, 300, generator=gen)
    exact, products = exact_and_scale(x, layer.weight.detach(), layer.bias.detach())
    if weights == "int8":
        bound = stored.scale.double() / 2 * x.double().abs().sum(dim=1, keepdim=True)
    else:
        bound = 2.0**-9 * (x.double().abs() @ layer.weight.detach().double().abs().T)
    budget = bound + 2 * float32_error(rows, 300) * EPS32 * products * 1.01 + EPS32 * exact.abs()
    with torch.no_grad():
        outs = [stored(x)]
        with row_invariant():
            outs.append(stored(x))
    for out in outs:
        assert out.dtype == torch.float32 and out.shape == (rows, 70)
        assert ((out.double() - exact).abs() <= budget).all()


def test_quantize_weights_swaps_the_transformer_and_logits_layers_only() -> None:
    model = tiny_dalle()
    linears = [name for name, m in model.named_modules() if isinstance(m, Linear)]
    assert linears and not any(name.startswith("vae.") for name in linears)
    for weights in ("int8", "bf16"):
        stored = quantize_weights(copy.deepcopy(model), weights)
        assert not any(isinstance(m, Linear) for m in stored.modules())
        kinds = {name: m for name, m in stored.named_modules() if isinstance(m, StoredLinear)}
        assert sorted(kinds) == sorted(linears)
        assert all(m.weight.dtype == (torch.int8 if weights == "int8" else torch.bfloat16) for m in kinds.values())
        assert stored.vae.state_dict().keys() == model.vae.state_dict().keys()
    assert quantize_weights(model, "fp32") is model and any(isinstance(m, Linear) for m in model.modules())
    shared = quantize_weights(tiny_dalle(share_input_output_emb=True), "int8")
    assert isinstance(shared.to_logits[1], Linear)  # its weight is the token embeddings too
    with pytest.raises(ValueError, match="weights must be one of fp32, bf16, int8"):
        quantize_weights(model, "int4")


@pytest.mark.parametrize("weights", ["int8", "bf16"])
@pytest.mark.parametrize("overrides", [{}, dict(shift_tokens=True, rotary_emb=True)], ids=["plain", "shift-rotary"])
def test_cached_decode_equals_the_stored_models_full_pass(weights: str, overrides: dict) -> None:
    """In float64 the decode step (the C++ kernel on the stored weights) and the full forward pass (the weights
    converted) compute the same products: the same logits to 1e-9."""
    model = quantize_weights(tiny_dalle(**overrides).double().eval(), weights)
    c = model.config
    text = torch.randint(1, c.num_text_tokens, (3, c.text_seq_len))
    codes = torch.randint(0, c.num_image_tokens, (3, c.image_seq_len))
    with torch.no_grad():
        cache = model.new_cache(3, "cpu")
        logits = [model.prefill(model._text_with_pads(text), None, cache)]
        for i in range(c.image_seq_len - 1):
            logits.append(model.decode_step(codes[:, i], torch.tensor(c.text_len + i), cache))
        full = model.full_pass_logits(text, codes[:, :0])
        torch.testing.assert_close(logits[0], full, rtol=0, atol=1e-9)
        for i in (1, c.image_seq_len // 2, c.image_seq_len - 1):
            torch.testing.assert_close(logits[i], model.full_pass_logits(text, codes[:, :i]), rtol=0, atol=1e-9)


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_images_are_the_same_alone_and_batched(weights: str) -> None:
    torch.manual_seed(0)
    model = quantize_weights(tiny_dalle(rotary_emb=True).eval(), weights)
    c = model.config
    text = torch.randint(1, c.num_text_tokens, (5, c.text_seq_len))
    rows, keys = resolve(model, Settings(filter_thres=0.5), 5), row_keys(3, torch.arange(5))
    together = image_codes(model, text, rows, keys)[0]
    alone = torch.cat([image_codes(model, text[i:i + 1], rows[i:i + 1], keys[i:i + 1])[0] for i in range(5)])
    assert torch.equal(together, alone)


def test_generate_with_stored_weights(tmp_path) -> None:
    ckpt = tiny_checkpoint(tmp_path)
    for weights in ("fp32", "int8", "bf16"):
        gen(ckpt, tmp_path / weights, "--weights", weights, "--batch_size", "2")
        s = settings(tmp_path / weights / "a_red_cube")
        assert s["weights"] == weights and len(s["scores"]) == 2
    with pytest.raises(SystemExit):
        gen(ckpt, tmp_path / "bad", "--weights", "int4")
    assert not (tmp_path / "bad").exists()
    assert json.loads((tmp_path / "int8" / "a_red_cube" / "settings.json").read_text())["precision"] == "fp32"


def test_bench_quantize_cpu(tmp_path) -> None:
    out = tmp_path / "quantize.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quantize.py"), "--config", "tiny", "--prompts", "2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["weights"] for r in rows] == ["bf16", "int8"]
    bf16, int8 = rows
    assert 0.5 <= bf16["bytes_ratio"] < 0.55 and 0.25 <= int8["bytes_ratio"] < 0.35  # biases and scales stay float32
    for r in rows:
        assert 0 < r["max_logit_error_over_spread"] < 0.5 and 0 <= r["mean_kl_nats"] <= r["max_kl_nats"] < 0.01
        assert 0 <= r["top1_agreement"] <= 1 and 0 <= r["same_codes"] <= 1 and 0 <= r["same_images"] <= 2
    assert "| int8 |" in proc.stdout
