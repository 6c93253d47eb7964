import copy
import dataclasses
import json

import pytest
import torch
from conftest import tiny_config
from test_unpickle import save_lightning_ckpt

from engine.codecs.vqgan import VQGanConfig, VQGanVAE
from engine.io.checkpoint import CheckpointError, load_dalle, save_dalle
from engine.model.dalle import DALLE

# ch=32, not smaller: taming's GroupNorm always has 32 groups.
TINY = dict(embed_dim=4, n_embed=16, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)

YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.{target}
  params:
    embed_dim: 4
    n_embed: 16
    {extra}
    ddconfig:
      double_z: false
      z_channels: 4
      resolution: 16
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {{disc_start: 250001, disc_weight: 0.8, codebook_weight: 1.0}}
"""
GUMBEL_EXTRA = "kl_weight: 1.0e-08\n    temperature_scheduler_config: {target: main.LambdaWarmUpCosineScheduler}"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(gumbel: bool, **overrides) -> VQGanVAE:
    vae = VQGanVAE(VQGanConfig(**TINY, gumbel=gumbel), **overrides)
    with torch.no_grad():  # spread the codebook so nearest-code ties are out of the question
        vae.quantize.lookup(torch.arange(16)).normal_()
    return vae.eval()


def write_yaml(path, gumbel: bool):
    path.write_text(YAML.format(target="GumbelVQ" if gumbel else "VQModel", extra=GUMBEL_EXTRA if gumbel else ""))
    return path


def taming_keys(gumbel: bool) -> set[str]:
    """The tiny config's taming state-dict names, written out from the reference's grammar (§4.2)."""
    def wb(*modules):
        return {f"{m}.{p}" for m in modules for p in ("weight", "bias")}

    def resnet(prefix, shortcut=False):
        return wb(*(f"{prefix}.{m}" for m in ("norm1", "conv1", "norm2", "conv2", *["nin_shortcut"] * shortcut)))

    def attn(prefix):
        return wb(*(f"{prefix}.{m}" for m in ("norm", "q", "k", "v", "proj_out")))

    def mid(prefix):
        return resnet(f"{prefix}.mid.block_1") | attn(f"{prefix}.mid.attn_1") | resnet(f"{prefix}.mid.block_2")

    encoder = (wb("encoder.conv_in")
               | resnet("encoder.down.0.block.0") | wb("encoder.down.0.downsample.conv")  # 32 ch at 16 px
               | resnet("encoder.down.1.block.0", shortcut=True) | attn("encoder.down.1.attn.0")  # 32 -> 64 at 8 px
               | mid("encoder") | wb("encoder.norm_out", "encoder.conv_out"))
    decoder = (wb("decoder.conv_in") | mid("decoder")
               | resnet("decoder.up.1.block.0") | resnet("decoder.up.1.block.1")  # 64 ch at 8 px, B + 1 blocks
               | attn("decoder.up.1.attn.0") | attn("decoder.up.1.attn.1") | wb("decoder.up.1.upsample.conv")
               | resnet("decoder.up.0.block.0", shortcut=True) | resnet("decoder.up.0.block.1")  # 64 -> 32 at 16 px
               | wb("decoder.norm_out", "decoder.conv_out"))
    quantize = {"quantize.embed.weight", *wb("quantize.proj")} if gumbel else {"quantize.embedding.weight"}
    return encoder | decoder | wb("quant_conv", "post_quant_conv") | quantize


@pytest.mark.parametrize("gumbel", [False, True])
def test_state_dict_keys_are_taming_names(gumbel):
    assert set(tiny_vae(gumbel).state_dict()) == taming_keys(gumbel)


@pytest.mark.parametrize("gumbel", [False, True])
def test_from_taming_loads_a_lightning_ckpt(tmp_path, gumbel):
    source = tiny_vae(gumbel)
    state = {**source.state_dict(), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
             "loss.perceptual_loss.net.slice1.0.weight": torch.randn(8, 3, 3, 3)}
    save_lightning_ckpt(tmp_path / "last.ckpt", state, optimizer_states=[{"state": {}, "param_groups": []}])
    vae = VQGanVAE.from_taming(tmp_path / "last.ckpt", write_yaml(tmp_path / "model.yaml", gumbel))
    assert vae.config == source.config and not vae.training
    for name, t in source.state_dict().items():
        assert torch.equal(vae.state_dict()[name], t), name
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(vae.get_codebook_indices(images), source.get_codebook_indices(images))


def test_from_taming_refuses_mismatched_weights(tmp_path):
    state = tiny_vae(False).state_dict()
    del state["encoder.conv_in.bias"]
    torch.save({"state_dict": {**state, "extra.weight": torch.ones(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"missing \['encoder.conv_in.bias'\], unexpected \['extra.weight'\]"):
        VQGanVAE.from_taming(tmp_path / "bad.ckpt", write_yaml(tmp_path / "model.yaml", False))
    torch.save(tiny_vae(True).state_dict(), tmp_path / "gumbel.ckpt")  # a bare state dict of the other kind
    with pytest.raises(CheckpointError, match="quantize"):
        VQGanVAE.from_taming(tmp_path / "gumbel.ckpt", tmp_path / "model.yaml")


def test_from_yaml_reads_taming_configs(tmp_path):
    assert VQGanConfig.from_yaml(write_yaml(tmp_path / "vq.yaml", False)) == VQGanConfig(**TINY)
    gumbel = VQGanConfig.from_yaml(write_yaml(tmp_path / "g.yaml", True), image_size=32)
    assert gumbel == VQGanConfig(**TINY, gumbel=True, image_size=32)
    (tmp_path / "other.yaml").write_text("model:\n  target: taming.models.cond_transformer.Net2NetTransformer\n")
    with pytest.raises(ValueError, match="not a taming VQModel"):
        VQGanConfig.from_yaml(tmp_path / "other.yaml")


@pytest.mark.parametrize("gumbel", [False, True])
def test_encode_decode_shapes_range_and_determinism(gumbel):
    vae = tiny_vae(gumbel)
    assert (vae.num_tokens, vae.fmap_size, vae.image_size, vae.channels) == (16, 8, 16, 3)
    images = torch.rand(3, 3, 16, 16)
    codes = vae.get_codebook_indices(images)
    assert codes.shape == (3, 64) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16 and len(codes.unique()) > 1
    assert torch.equal(vae.get_codebook_indices(images), codes)
    out = vae.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and torch.equal(vae.decode(codes), out)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        vae.decode(torch.full((1, 64), 16))
    with pytest.raises(ValueError, match="expected images of shape"):
        vae.get_codebook_indices(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("gumbel", [False, True])
def test_indices_match_float64_reference(gumbel):
    vae = tiny_vae(gumbel)
    images = torch.rand(4, 3, 16, 16)
    ref = copy.deepcopy(vae).double()
    with torch.no_grad():
        z = ref.quant_conv(ref.encoder(images.double() * 2 - 1)).permute(0, 2, 3, 1)  # (b, h, w, d), row-major
        if gumbel:
            expected = torch.einsum("bhwd,nd->bhwn", z, ref.quantize.proj.weight[:, :, 0, 0]).add(
                ref.quantize.proj.bias).argmax(-1)
        else:
            expected = (z[..., None, :] - ref.quantize.embedding.weight).pow(2).sum(-1).argmin(-1)
    assert torch.equal(vae.get_codebook_indices(images), expected.flatten(1))


@pytest.mark.parametrize("gumbel", [False, True])
def test_bf16_autocast_gives_the_fp32_results(gumbel):
    vae = tiny_vae(gumbel)
    images = torch.rand(2, 3, 16, 16)
    codes = vae.get_codebook_indices(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vae.get_codebook_indices(images), codes)
        decoded = vae.decode(codes)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, vae.decode(codes))


@pytest.mark.parametrize("gumbel", [False, True])
def test_dalle_checkpoint_round_trip(tmp_path, gumbel):
    vae = tiny_vae(gumbel)
    model = DALLE(tiny_config(num_image_tokens=vae.num_tokens, image_fmap_size=vae.fmap_size), vae)
    save_dalle(tmp_path / "dalle.safetensors", model)
    loaded = load_dalle(tmp_path / "dalle.safetensors").model.vae
    assert isinstance(loaded, VQGanVAE) and loaded.config == vae.config
    images = torch.rand(2, 3, 16, 16)
    codes = vae.get_codebook_indices(images)
    assert torch.equal(loaded.get_codebook_indices(images), codes)
    assert torch.equal(loaded.decode(codes), vae.decode(codes))


def test_image_size_is_configurable():
    vae = tiny_vae(False, image_size=32)
    assert (vae.image_size, vae.fmap_size) == (32, 16)
    codes = vae.get_codebook_indices(torch.rand(1, 3, 32, 32))
    assert codes.shape == (1, 256) and vae.decode(codes).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
        VQGanConfig(**TINY, image_size=17)


def test_config_validation_and_json_round_trip():
    config = VQGanConfig(**TINY, gumbel=True, image_size=64)
    assert VQGanConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config  # lists back to tuples
    assert (config.num_tokens, config.fmap_size) == (16, 32)
    with pytest.raises(ValueError, match="GroupNorm"):
        VQGanConfig(**{**TINY, "ch": 8})
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        VQGanConfig(**{**TINY, "embed_dim": 8}, gumbel=True)
