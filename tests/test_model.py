import argparse
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch, tiny_config

import kernels
from engine.model.config import DALLEConfig, add_config_args, config_from_args
from engine.model.dalle import DALLE
from engine.model.rotary import rotary_table
from engine.model.transformer import Attention, layer_scale_init, run_coupled, shift_tokens

OPTIONS = {
    "defaults": {},
    "learned_positions": dict(rotary_emb=False),
    "no_shift": dict(shift_tokens=False),
    "sandwich_norm": dict(sandwich_norm=True),
    "stable": dict(stable=True),
    "reversible": dict(reversible=True),
    "reversible_dropout": dict(reversible=True, attn_dropout=0.2, ff_dropout=0.2),
    "dropout": dict(attn_dropout=0.1, ff_dropout=0.1),
    "shared_ids": dict(depth=4, shared_attn_ids=(0, 1), shared_ff_ids=(0, 0, 1, 1)),
    "share_input_output_emb": dict(share_input_output_emb=True),
    "null_cond_prob": dict(null_cond_prob=0.5),
    "all_patterns": dict(depth=4, attn_types=("full", "axial_row", "axial_col", "conv_like")),
    "conv_dilated": dict(attn_types=("conv_like",), conv_kernel_size=3, conv_dilation=2),
    "conv_centered": dict(attn_types=("conv_like",), conv_centered=True),
    "odd_dims": dict(dim=30, heads=3, dim_head=7),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_forward_backward_every_option(name):
    config = tiny_config(**OPTIONS[name])
    model = DALLE(config)
    text, codes = random_batch(config)
    logits = model(text, codes)
    assert logits.shape == (3, config.total_seq_len, config.total_tokens)
    loss = model(text, codes, return_loss=True)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} gets no gradient"


def test_worked_example_sequence_and_loss():
    """dalle-semantics §3.2: V_txt=10, T=4, 8 image codes on a 2x2 grid."""
    config = DALLEConfig(num_text_tokens=10, text_seq_len=4, num_image_tokens=8, image_fmap_size=2,
                         dim=16, depth=1, heads=2, dim_head=8, null_cond_prob=0.0)  # as DALLE-pytorch's
    model = DALLE(config)
    text = torch.tensor([[5, 7, 0, 0]])
    codes = torch.tensor([[3, 1, 4, 0]])
    assert model._text_with_pads(text).tolist() == [[5, 7, 12, 13]]
    logits = model(text, codes)
    assert logits.shape == (1, 8, 22)
    masked = logits <= -torch.finfo(logits.dtype).max
    assert masked[0, :4, 14:].all() and not masked[0, :4, :14].any()
    assert masked[0, 4:, :14].all() and not masked[0, 4:, 14:].any()
    labels = torch.tensor([5, 7, 12, 13, 17, 15, 18, 14])
    ce = F.cross_entropy(logits[0], labels, reduction="none")
    expected = (ce[:4].mean() + 7 * ce[4:].mean()) / 8
    torch.testing.assert_close(model(text, codes, return_loss=True), expected)


def test_caller_text_is_never_modified():
    config = tiny_config(null_cond_prob=1.0)
    model = DALLE(config).train()
    text, codes = random_batch(config)
    before = text.clone()
    model(text, codes, return_loss=True)
    assert torch.equal(text, before)


def test_null_cond_prob_replaces_caption_by_null_caption():
    config = tiny_config(null_cond_prob=1.0)
    model = DALLE(config).train()
    text, codes = random_batch(config)
    torch.testing.assert_close(model(text, codes), model(torch.zeros_like(text), codes))
    model.eval()  # the config's probability applies during training only
    assert not torch.allclose(model(text, codes), model(torch.zeros_like(text), codes))


@pytest.mark.parametrize("attn_type", ["full", "axial_row", "axial_col", "conv_like"])
@pytest.mark.parametrize("rotary,shift", [(False, False), (True, True)])
def test_model_is_causal(attn_type, rotary, shift):
    config = tiny_config(attn_types=(attn_type,), rotary_emb=rotary, shift_tokens=shift, depth=2)
    model = DALLE(config).eval()
    text, codes = random_batch(config, batch=1)
    logits = model(text, codes)
    for n in range(1, config.image_seq_len):  # a prefix of the image gives the same logits on that prefix
        prefix = model(text, codes[:, :n])
        torch.testing.assert_close(prefix, logits[:, : config.text_len + n], rtol=1e-5, atol=1e-5)
    other = codes.clone()
    other[:, 4:] = (other[:, 4:] + 1) % config.num_image_tokens
    torch.testing.assert_close(model(text, other)[:, : config.text_len + 4], logits[:, : config.text_len + 4])


@pytest.mark.parametrize("pattern", ["full", "axial_row", "axial_col", "conv_like"])
def test_attention_layer_sees_exactly_its_pattern(pattern):
    """The gradient of one attention layer's output at query q is non-zero exactly at the allowed keys."""
    config = tiny_config(attn_types=(pattern,), conv_kernel_size=2, image_fmap_size=4)
    attn = Attention(config, pattern).double()
    n = config.total_seq_len
    x = torch.randn(1, n, config.dim, dtype=torch.float64, requires_grad=True)
    allowed = kernels.dense_mask(pattern, n, text_len=config.text_len, fmap_size=4, kernel_size=2)
    for q in range(n):
        (grad,) = torch.autograd.grad(attn(x)[0, q].sum(), x)
        assert torch.equal(grad[0].abs().sum(-1) > 0, allowed[q]), q


def test_shift_tokens_semantics():
    text_len, fmap = 2, 3
    x = torch.arange(1, 1 + (text_len + 8) * 8, dtype=torch.float).reshape(1, text_len + 8, 8)
    y = shift_tokens(x, text_len, fmap)
    assert torch.equal(y[0, 0, :4], torch.zeros(4)) and torch.equal(y[0, 1, :4], x[0, 0, :4])
    assert torch.equal(y[:, :text_len, 4:], x[:, :text_len, 4:])
    img, out = x[0, text_len:], y[0, text_len:]
    for t in range(8):
        r, c = divmod(t, fmap)
        above = img[t - fmap, 0:2] if r > 0 else torch.zeros(2)
        left = img[t - 1, 2:4] if c > 0 else torch.zeros(2)
        assert torch.equal(out[t, 0:2], above) and torch.equal(out[t, 2:4], left)
        assert torch.equal(out[t, 4:], img[t, 4:])


def test_rotary_table_layout():
    text_len, fmap, dim_head = 4, 3, 64
    table = rotary_table(text_len, fmap, dim_head)
    assert table.shape == (text_len + fmap**2, 60)  # 3 parts x 2 x (64 // 3 // 2)
    lang = 1 / 10000 ** (torch.arange(0, 21, 2, dtype=torch.float64)[:10] / 21)
    pixel = torch.linspace(1, 5, 10, dtype=torch.float64) * math.pi
    torch.testing.assert_close(table[2, 0:20:2], (2 * lang).float())
    torch.testing.assert_close(table[text_len, 0:20:2], (8192 * lang).float())
    torch.testing.assert_close(table[1, 20:40:2], (-10 * pixel).float())
    t = 5  # row 1, col 2 of a 3x3 grid
    torch.testing.assert_close(table[text_len + t, 20:40:2], (0.0 * pixel).float())
    torch.testing.assert_close(table[text_len + t, 40:60:2], (1.0 * pixel).float())
    assert torch.equal(table[:, 0::2], table[:, 1::2])  # interleaved pairs share a frequency


def test_layer_scale_schedule():
    assert [layer_scale_init(i) for i in (1, 18, 19, 24, 25, 64)] == [0.1, 0.1, 1e-5, 1e-5, 1e-6, 1e-6]
    model = DALLE(tiny_config(depth=3))
    assert all(torch.all(layer.attn.scale == 0.1) for layer in model.transformer.layers)


def test_shared_ids_share_inner_modules_only():
    model = DALLE(tiny_config(depth=4, shared_attn_ids=(0, 1), shared_ff_ids=(7,)))
    layers = model.transformer.layers
    assert layers[0].attn.fn is layers[2].attn.fn and layers[0].attn.fn is not layers[1].attn.fn
    assert all(layer.ff.fn is layers[0].ff.fn for layer in layers)
    assert layers[0].attn.norm is not layers[2].attn.norm


def test_reversible_gradients_match_plain_autograd():
    config = tiny_config(reversible=True, attn_types=("full", "axial_row"), attn_dropout=0.3, ff_dropout=0.3)
    model = DALLE(config).double().train()
    x = torch.randn(2, config.total_seq_len, config.dim, dtype=torch.float64)
    up = torch.randn_like(x)

    def grads(fn):
        model.zero_grad()
        inp = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        (fn(inp) * up).sum().backward()
        return [inp.grad] + [p.grad.clone() for p in model.transformer.parameters()]

    def plain(inp):
        angles = model.transformer.rotary[: inp.shape[1]]
        rotary = (angles.cos(), angles.sin())
        calls = [({"rotary": rotary}, {})] * len(model.transformer.layers)
        y = run_coupled(torch.cat([inp, inp], dim=-1), model.transformer.layers, calls)
        return torch.stack(y.chunk(2, dim=-1)).mean(0)

    for a, b in zip(grads(model.transformer), grads(plain)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_share_input_output_emb_ties_weights():
    config = tiny_config(share_input_output_emb=True)
    model = DALLE(config)
    assert not hasattr(model, "text_emb")
    with torch.no_grad():
        model.to_logits[1].weight[3].fill_(1.5)
    assert torch.all(model._embed_text(torch.tensor([3])) == 1.5)


def test_tiny_model_overfits_a_handful_of_pairs():
    config = tiny_config(dim=64, depth=2, heads=4, attn_types=("full", "axial_row"))
    model = DALLE(config)
    text, codes = random_batch(config, batch=4, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(text, codes, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Uniform guessing over the 17 image codes costs ln 17 = 2.83 nats; memorising the pairs drives it near zero.
    assert loss.item() < 0.1


def test_bad_inputs_give_clear_errors(tiny_model):
    config = tiny_model.config
    text, codes = random_batch(config)
    with pytest.raises(ValueError, match="unknown attention type"):
        tiny_config(attn_types=("full", "sparse_nonsense"))
    with pytest.raises(ValueError, match="text must be"):
        tiny_model(text[:, :3], codes)
    with pytest.raises(ValueError, match="token ids must lie"):
        tiny_model(text + config.num_text_tokens, codes)
    with pytest.raises(ValueError, match="image codes must lie"):
        tiny_model(text, codes + config.num_image_tokens)
    with pytest.raises(ValueError, match="full image"):
        tiny_model(text, codes[:, :4], return_loss=True)
    with pytest.raises(ValueError, match="no VAE"):
        tiny_model(text, torch.rand(3, 3, 24, 24))
    with pytest.raises(ValueError, match="different types"):
        tiny_config(depth=2, attn_types=("full", "axial_row"), shared_attn_ids=(0,))


def test_config_cli_round_trip():
    parser = argparse.ArgumentParser()
    add_config_args(parser, DALLEConfig)
    args = parser.parse_args(["--dim", "64", "--attn_types", "full,axial_row", "--no-rotary_emb",
                              "--shared_attn_ids", "0,1", "--stable"])
    config = config_from_args(DALLEConfig, args)
    assert config.dim == 64 and config.attn_types == ("full", "axial_row") and not config.rotary_emb
    assert config.shared_attn_ids == (0, 1) and config.stable and config.shift_tokens
    defaults = config_from_args(DALLEConfig, parser.parse_args([]))
    assert defaults == DALLEConfig()
    assert DALLEConfig.from_dict(dataclasses.asdict(config)) == config
    assert parser.parse_args(["--stable_softmax"]).stable  # DALLE-pytorch's name for the flag
    with pytest.raises(ValueError, match="unknown DALLEConfig field"):
        DALLEConfig.from_dict({"dim": 8, "bogus": 1})


def test_images_of_the_wrong_size_are_rejected():
    from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig

    vae = DiscreteVAE(DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=17, codebook_dim=8, hidden_dim=8))
    model = DALLE(tiny_config(num_image_tokens=17, image_fmap_size=4), vae)
    text, _ = random_batch(model.config, batch=2)
    assert model(text, torch.rand(2, 3, 16, 16), return_loss=True).isfinite()
    with pytest.raises(ValueError, match="16"):
        model(text, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="VAE has 17 tokens on a 4x4 grid"):
        DALLE(tiny_config(num_image_tokens=17, image_fmap_size=8), vae)


def test_guidance_follows_the_training_by_default():
    """A model trained with null captions samples with guidance unless told (one batched forward: the null rows
    ride along), one trained without them does not; an explicit cond_scale always wins."""
    from engine.model.config import GUIDED_COND_SCALE

    assert GUIDED_COND_SCALE > 1
    text, _ = random_batch(tiny_config(), batch=2)
    for p, expected in ((0.1, GUIDED_COND_SCALE), (0.0, 1.0)):
        model = DALLE(tiny_config(null_cond_prob=p)).eval()
        assert model.config.default_cond_scale == expected
        default, _ = model.sample_image_codes(text, seed=3)
        explicit, _ = model.sample_image_codes(text, seed=3, cond_scale=expected)
        other, _ = model.sample_image_codes(text, seed=3, cond_scale=expected + 100)
        assert torch.equal(default, explicit) and not torch.equal(default, other)


def test_torch_compile_wraps_a_model():
    """Wrapping registers the model as a submodule of torch.compile's module, before that module can answer getattr:
    the registration hooks the model's packed weights use must not ask it anything."""
    model = DALLE(tiny_config())
    compiled = torch.compile(model)
    assert compiled._orig_mod is model
