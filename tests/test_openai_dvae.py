import copy
import dataclasses
import json
import math
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import stand_in_modules, tiny_config
from test_unpickle import RunsShell
from torch import nn

from engine.codecs.openai_dvae import OpenAIDiscreteVAE, OpenAIDVAEConfig, map_pixels, unmap_pixels
from engine.io.checkpoint import CheckpointError, load_dalle, load_vae, save_dalle, save_vae
from engine.io.unpickle import UnsafePickleError
from engine.model.dalle import DALLE

# Widths 8, 16, 32, 64 over dall_e's 4 groups: a 16 px image gives a 2x2 token grid.
TINY = dict(n_hid=8, n_blk_per_group=1, vocab_size=16, input_channels=3, group_count=4, n_init=8, output_channels=3,
            image_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(**overrides) -> OpenAIDiscreteVAE:
    vae = OpenAIDiscreteVAE(OpenAIDVAEConfig(**TINY), **overrides)
    with torch.no_grad():  # dall_e initialises biases to zero; random ones make the comparisons below stricter
        for name, p in vae.named_parameters():
            if name.endswith(".b"):
                p.normal_(std=0.1)
    return vae.eval()


def dall_e_keys(n_blk: int, id_path_groups: set[int]) -> set[str]:
    """dall_e's names (reference §6.3): blocks.input, 4 groups of res_path conv_1..4 per block (plus block_1's id_path
    where the group changes width), blocks.output.conv; every conv has `w` and `b`."""
    convs = ["blocks.input", "blocks.output.conv"]
    for g in range(1, 5):
        convs += [f"blocks.group_{g}.block_{i}.res_path.conv_{j}" for i in range(1, n_blk + 1) for j in range(1, 5)]
        convs += [f"blocks.group_{g}.block_1.id_path"] if g in id_path_groups else []
    return {f"{c}.{p}" for c in convs for p in ("w", "b")}


# --- stand-ins for the dall_e classes, pickled the way OpenAI's encoder.pkl / decoder.pkl are ----------------------


class Conv2d(nn.Module):
    __module__ = "dall_e.utils"

    def __init__(self, n_in, n_out, kw, use_float16=True):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16, self.device, self.requires_grad = use_float16, torch.device("cpu"), False
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw**2), requires_grad=False)
        self.b = nn.Parameter(0.1 * torch.randn(n_out), requires_grad=False)

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class _Block(nn.Module):
    kernels: tuple[int, ...]

    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = None, False
        self.n_hid, self.post_gain = n_out // 4, 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        sizes = [n_in, self.n_hid, self.n_hid, self.n_hid, n_out]
        self.res_path = nn.Sequential(OrderedDict(
            (name, layer) for j, kw in enumerate(self.kernels)
            for name, layer in ((f"relu_{j + 1}", nn.ReLU()), (f"conv_{j + 1}", Conv2d(sizes[j], sizes[j + 1], kw)))))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_Block):
    __module__ = "dall_e.encoder"
    kernels = (3, 3, 3, 1)


class DecoderBlock(_Block):
    __module__ = "dall_e.decoder"
    kernels = (1, 3, 3, 3)


def _fake_groups(block, c_first, widths, n_blk, resample, name):
    groups = []
    for g, (c_in, c_out) in enumerate(zip([c_first, *widths], widths)):
        layers = [(f"block_{i + 1}", block(c_in if i == 0 else c_out, c_out, 4 * n_blk)) for i in range(n_blk)]
        groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers + [(name, resample())] * (g < 3)))))
    return groups


class Encoder(nn.Module):
    __module__ = "dall_e.encoder"
    group_count = 4  # a class attribute in dall_e as well, so it is not pickled

    def __init__(self, n_hid, n_blk_per_group, input_channels, vocab_size):
        super().__init__()
        self.n_hid, self.n_blk_per_group, self.input_channels, self.vocab_size = (n_hid, n_blk_per_group,
                                                                                  input_channels, vocab_size)
        self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
        widths = [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(input_channels, n_hid, 7)),
            *_fake_groups(EncoderBlock, n_hid, widths, n_blk_per_group, lambda: nn.MaxPool2d(kernel_size=2), "pool"),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                  ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))]))),
        ]))

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    __module__ = "dall_e.decoder"
    group_count = 4

    def __init__(self, n_init, n_hid, n_blk_per_group, output_channels, vocab_size):
        super().__init__()
        self.n_init, self.n_hid, self.n_blk_per_group, self.output_channels, self.vocab_size = (
            n_init, n_hid, n_blk_per_group, output_channels, vocab_size)
        self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
        widths = [8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(vocab_size, n_init, 1, use_float16=False)),
            *_fake_groups(DecoderBlock, n_init, widths, n_blk_per_group,
                          lambda: nn.Upsample(scale_factor=2, mode="nearest"), "upsample"),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                  ("conv", Conv2d(n_hid, 2 * output_channels, 1))]))),
        ]))

    def forward(self, x):
        return self.blocks(x)


class Sneaky(nn.Module):
    """A dall_e-named class that is not one of the modules OpenAI's files contain."""

    __module__ = "dall_e.encoder"


def fake_dall_e():
    """Register the stand-ins as the dall_e package, only while pickling."""
    return stand_in_modules({
        "dall_e": {}, "dall_e.utils": {"Conv2d": Conv2d},
        "dall_e.encoder": {cls.__name__: cls for cls in (EncoderBlock, Encoder, Sneaky)},
        "dall_e.decoder": {cls.__name__: cls for cls in (DecoderBlock, Decoder)},
    })


def write_openai_pickles(tmp_path, zip_format=True, enc_kwargs=None, dec_kwargs=None):
    enc = Encoder(**{"n_hid": 8, "n_blk_per_group": 1, "input_channels": 3, "vocab_size": 16, **(enc_kwargs or {})})
    dec = Decoder(**{"n_init": 8, "n_hid": 8, "n_blk_per_group": 1, "output_channels": 3, "vocab_size": 16,
                     **(dec_kwargs or {})})
    with fake_dall_e():
        for module, name in ((enc, "encoder.pkl"), (dec, "decoder.pkl")):
            torch.save(module, tmp_path / name, _use_new_zipfile_serialization=zip_format)
    return enc.eval(), dec.eval(), tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"


# --- tests ---------------------------------------------------------------------------------------------------------


def test_state_dict_keys_and_shapes_are_dall_e_names():
    vae = tiny_vae()
    state = vae.state_dict()
    # The decoder's first group widens n_init=8 to 64, so every decoder group has an id_path; the encoder's first not.
    assert set(state) == ({f"enc.{k}" for k in dall_e_keys(1, {2, 3, 4})}
                          | {f"dec.{k}" for k in dall_e_keys(1, {1, 2, 3, 4})})
    shapes = {"enc.blocks.input.w": (8, 3, 7, 7), "enc.blocks.group_2.block_1.id_path.w": (16, 8, 1, 1),
              "enc.blocks.group_2.block_1.res_path.conv_1.w": (4, 8, 3, 3),
              "enc.blocks.group_2.block_1.res_path.conv_4.w": (16, 4, 1, 1),
              "enc.blocks.output.conv.w": (16, 64, 1, 1), "enc.blocks.output.conv.b": (16,),
              "dec.blocks.input.w": (8, 16, 1, 1), "dec.blocks.group_1.block_1.id_path.w": (64, 8, 1, 1),
              "dec.blocks.group_1.block_1.res_path.conv_1.w": (16, 8, 1, 1),
              "dec.blocks.group_1.block_1.res_path.conv_4.w": (64, 16, 3, 3),
              "dec.blocks.output.conv.w": (6, 8, 1, 1)}
    assert {name: tuple(state[name].shape) for name in shapes} == shapes


def test_full_size_matches_the_reference_counts():
    with torch.device("meta"):  # shapes only: no 97M-parameter initialisation
        vae = OpenAIDiscreteVAE()
    for module, keys, tensors, millions in ((vae.enc, dall_e_keys(2, {2, 3, 4}), 74, 53.79),
                                            (vae.dec, dall_e_keys(2, {1, 2, 3, 4}), 76, 43.83)):
        state = module.state_dict()
        assert set(state) == keys and len(state) == tensors
        assert round(sum(t.numel() for t in state.values()) / 1e6, 2) == millions
    assert vae.enc.blocks.input.w.shape == (256, 3, 7, 7) and vae.enc.blocks.output.conv.w.shape == (8192, 2048, 1, 1)
    assert vae.dec.blocks.input.w.shape == (128, 8192, 1, 1) and vae.dec.blocks.output.conv.w.shape == (6, 256, 1, 1)
    assert (vae.num_tokens, vae.fmap_size, vae.image_size, vae.channels) == (8192, 32, 256, 3)


# The legacy format records each module class with its source, which torch.save warns it cannot find for these.
@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("zip_format", [True, False])
def test_from_openai_matches_the_pickled_modules(tmp_path, zip_format):
    enc, dec, enc_path, dec_path = write_openai_pickles(tmp_path, zip_format)
    vae = OpenAIDiscreteVAE.from_openai(enc_path, dec_path, image_size=16)  # image_size is not in the pickles
    assert "dall_e" not in sys.modules  # nothing was imported
    assert vae.config == OpenAIDVAEConfig(**TINY) and not vae.training
    images, codes = torch.rand(4, 3, 16, 16), torch.randint(0, 16, (4, 4))
    with torch.no_grad():  # what DALLE-pytorch's OpenAIDiscreteVAE does with dall_e's modules
        logits = enc((1 - 2 * 0.1) * images + 0.1)
        one_hot = F.one_hot(codes.view(4, 2, 2), 16).permute(0, 3, 1, 2).float()
        expected_images = torch.clamp((torch.sigmoid(dec(one_hot)[:, :3]) - 0.1) / (1 - 2 * 0.1), 0, 1)
        # Logits too: a random tiny encoder gives few distinct codes.
        assert torch.equal(vae.enc(map_pixels(images)), logits)
    assert torch.equal(vae.get_codebook_indices(images), logits.argmax(1).flatten(1))
    assert torch.equal(vae.decode(codes), expected_images)


def test_from_openai_refuses_mismatched_or_swapped_files(tmp_path):
    _, _, enc_path, dec_path = write_openai_pickles(tmp_path, dec_kwargs={"vocab_size": 32})
    with pytest.raises(CheckpointError, match="vocab_size is 16 in the encoder but 32 in the decoder"):
        OpenAIDiscreteVAE.from_openai(enc_path, dec_path)
    with pytest.raises(CheckpointError, match=r"decoder\.pkl is not a pickled dall_e\.encoder\.Encoder"):
        OpenAIDiscreteVAE.from_openai(dec_path, enc_path)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize(("payload", "culprit"),
                         [("shell", r"\bposix\.system\b"), ("class", r"dall_e\.encoder\.Sneaky")])
def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, payload, culprit, zip_format):
    marker = tmp_path / "pwned"
    enc = Encoder(n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=16)
    if payload == "shell":
        enc.note = RunsShell(marker)
    else:
        enc.blocks.group_1.add_module("extra", Sneaky())
    with fake_dall_e():
        torch.save(enc, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=zip_format)
    torch.save({}, tmp_path / "decoder.pkl")
    with pytest.raises(UnsafePickleError, match=rf"refusing to unpickle .*encoder\.pkl.*{culprit}"):
        OpenAIDiscreteVAE.from_openai(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")
    assert not marker.exists()


def test_missing_files_say_where_they_come_from(tmp_path):
    torch.save({}, tmp_path / "encoder.pkl")
    with pytest.raises(FileNotFoundError, match=r"decoder\.pkl\. Download them from "
                       r"https://cdn\.openai\.com/dall-e/encoder\.pkl and https://cdn\.openai\.com/dall-e/decoder\.pkl"):
        OpenAIDiscreteVAE.from_openai(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")


def test_pixel_mapping_matches_float64():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    mapped = map_pixels(x.float())
    assert mapped.dtype == torch.float32
    torch.testing.assert_close(mapped.double(), 0.8 * x + 0.1, rtol=0, atol=1e-7)
    assert mapped.min() >= 0.1 - 1e-7 and mapped.max() <= 0.9 + 1e-7
    y = torch.linspace(-0.5, 1.5, 101, dtype=torch.float64)
    torch.testing.assert_close(unmap_pixels(y.float()).double(), ((y - 0.1) / 0.8).clamp(0, 1), rtol=0, atol=1e-7)
    torch.testing.assert_close(unmap_pixels(mapped).double(), x, rtol=0, atol=1e-6)


def test_codes_are_the_argmax_of_the_encoder_logits():
    vae = tiny_vae()
    images = torch.rand(4, 3, 16, 16)
    ref = copy.deepcopy(vae).double()
    with torch.no_grad():
        logits = ref.enc(images.double() * 0.8 + 0.1)  # (b, vocab, 2, 2)
    assert torch.equal(vae.get_codebook_indices(images), logits.argmax(1).flatten(1))  # row-major
    with torch.no_grad():
        vae.enc.blocks.output.conv.w.zero_()
        vae.enc.blocks.output.conv.b.zero_()
        assert torch.equal(vae.get_codebook_indices(images), torch.zeros(4, 4, dtype=torch.long))  # ties: first
        vae.enc.blocks.output.conv.b[11] = 1
        assert torch.equal(vae.get_codebook_indices(images), torch.full((4, 4), 11))


def test_decode_is_the_one_hot_decoder_of_the_first_channels():
    vae = tiny_vae()
    codes = torch.randint(0, 16, (3, 4))
    with torch.no_grad():
        stats = vae.dec.blocks(F.one_hot(codes.view(3, 2, 2), 16).permute(0, 3, 1, 2).float())
    assert stats.shape == (3, 6, 16, 16)
    out = vae.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, unmap_pixels(torch.sigmoid(stats[:, :3])))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        vae.decode(torch.full((1, 4), 16))
    with pytest.raises(ValueError, match="expected images of shape"):
        vae.get_codebook_indices(torch.rand(1, 3, 32, 32))


def test_bf16_autocast_gives_the_fp32_results():
    vae = tiny_vae()
    images = torch.rand(2, 3, 16, 16)
    codes = vae.get_codebook_indices(images)
    decoded = vae.decode(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vae.get_codebook_indices(images), codes)
        assert torch.equal(vae.decode(codes), decoded)


def test_vae_checkpoint_round_trip(tmp_path):
    vae = tiny_vae(image_size=32)
    save_vae(tmp_path / "dvae.safetensors", vae)
    loaded = load_vae(tmp_path / "dvae.safetensors").model
    assert isinstance(loaded, OpenAIDiscreteVAE) and loaded.config == vae.config and loaded.fmap_size == 4
    images = torch.rand(2, 3, 32, 32)
    codes = vae.get_codebook_indices(images)
    assert torch.equal(loaded.get_codebook_indices(images), codes)
    assert torch.equal(loaded.decode(codes), vae.decode(codes))


def test_dalle_checkpoint_round_trip(tmp_path):
    vae = tiny_vae()
    model = DALLE(tiny_config(num_image_tokens=vae.num_tokens, image_fmap_size=vae.fmap_size), vae)
    save_dalle(tmp_path / "dalle.safetensors", model)
    loaded = load_dalle(tmp_path / "dalle.safetensors").model.vae
    assert isinstance(loaded, OpenAIDiscreteVAE) and loaded.config == vae.config
    for name, t in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_config_validation_and_json_round_trip():
    config = OpenAIDVAEConfig(**{**TINY, "image_size": 64})
    assert OpenAIDVAEConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    assert (config.num_tokens, config.fmap_size) == (16, 8)
    with pytest.raises(ValueError, match="divisible by the downsampling factor 8"):
        OpenAIDVAEConfig(**{**TINY, "image_size": 20})
    with pytest.raises(ValueError, match="multiple of 4"):
        OpenAIDVAEConfig(**{**TINY, "n_hid": 6})
