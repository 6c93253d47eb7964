"""``python -m engine.convert``: pretrained files in, this engine's safetensors checkpoints out."""

from __future__ import annotations

import pytest
import torch
from test_unpickle import save_lightning_ckpt
from test_vqgan import tiny_vae, write_yaml

from engine import convert
from engine.io.checkpoint import load_vae


def test_vqgan_converts_to_a_checkpoint_that_loads_without_pickles(tmp_path):
    source = tiny_vae(gumbel=False)
    save_lightning_ckpt(tmp_path / "last.ckpt", source.state_dict())
    out = tmp_path / "vqgan.safetensors"
    convert.main(["vqgan", "--model_path", str(tmp_path / "last.ckpt"),
                  "--config_path", str(write_yaml(tmp_path / "model.yaml", False)), "--out", str(out)])
    vae = load_vae(out).model
    assert vae.config == source.config
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(vae.get_codebook_indices(images), source.get_codebook_indices(images))


def test_bad_input_is_a_one_line_error(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="^error: cannot convert"):
        convert.main(["vqgan", "--model_path", str(tmp_path / "last.ckpt"),
                      "--config_path", str(write_yaml(tmp_path / "model.yaml", False)),
                      "--out", str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()


def test_openai_dvae_converts(tmp_path):
    from test_openai_dvae import write_openai_pickles

    enc, _, enc_path, dec_path = write_openai_pickles(tmp_path)
    out = tmp_path / "dvae.safetensors"
    convert.main(["openai", "--encoder", str(enc_path), "--decoder", str(dec_path), "--image_size", "16",
                  "--out", str(out)])
    vae = load_vae(out).model
    assert vae.image_size == 16 and vae.num_tokens == 16
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vae.get_codebook_indices(images), enc(0.8 * images + 0.1).argmax(1).flatten(1))
