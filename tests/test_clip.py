"""engine.CLIP: shapes, the contrastive loss, masked pooling, checkpoints, input checks, and DALLE-pytorch's outputs.

The known-answer test compares with tests/fixtures/clip/reference.safetensors (made by make_fixture.py there from
DALLE-pytorch 1.6.6's CLIP): 1e-5 relative and absolute on fp32 outputs of magnitude up to ~1 (measured: < 2e-7).
"""

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine import CLIP, CheckpointError, CLIPConfig, load_clip, load_dalle, save_clip, save_dalle
from engine.codecs.tokenizers import HugTokenizer
from engine.model.config import add_config_args, config_from_args
from engine.model.dalle import DALLE

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_clip(**overrides) -> CLIP:
    base = dict(dim_text=32, dim_image=32, dim_latent=16, num_text_tokens=32, text_enc_depth=2, text_seq_len=8,
                text_heads=2, visual_enc_depth=1, visual_heads=2, visual_image_size=16, visual_patch_size=8)
    return CLIP(CLIPConfig(**{**base, **overrides}))


def perturbed(clip: CLIP) -> CLIP:
    """``clip`` with every weight moved off its initialisation (norms, biases, LayerScale), so each one matters."""
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return clip


def batch(clip: CLIP, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    c = clip.config
    text = torch.randint(1, c.num_text_tokens, (n, c.text_seq_len))
    for row in range(1, n):  # trailing padding of different lengths, as the tokenizers produce
        text[row, c.text_seq_len - 2 * row:] = 0
    return text, torch.rand(n, c.channels, c.visual_image_size, c.visual_image_size)


def test_shapes_and_unit_norm_latents():
    clip = tiny_clip()
    text, images = batch(clip)
    assert clip.temperature.item() == 1.0
    for latents in (clip.encode_text(text), clip.encode_text(text, text != 0), clip.encode_image(images)):
        assert latents.shape == (3, 16)
        torch.testing.assert_close(latents.norm(dim=-1), torch.ones(3))
    assert clip(text, images).shape == (3,)
    assert clip(text, images, return_loss=True).shape == ()


def test_similarity_is_forward_per_pair_and_broadcasts_one_caption():
    clip = perturbed(tiny_clip()).eval()
    text, images = batch(clip, 4)
    with torch.no_grad():
        torch.testing.assert_close(clip.similarity(text, images), clip(text, images))
        torch.testing.assert_close(clip.similarity(text[:1], images), clip(text[:1].expand(4, -1), images))
        mask = text[:1] != 0
        torch.testing.assert_close(clip.similarity(text[:1], images, mask),
                                   clip(text[:1].expand(4, -1), images, mask.expand(4, -1)))


def test_score_takes_any_size_uint8_or_float_in_chunks():
    clip = perturbed(tiny_clip()).eval()
    text, images = batch(clip, 5)
    caption = text[2:3]  # ends in padding, which the score leaves out of the caption's mean, as training does
    pixels = (images * 255).round().to(torch.uint8)
    expected = clip.similarity(caption, pixels.float() / 255, caption != 0)
    assert not torch.allclose(expected, clip.similarity(caption, pixels.float() / 255), rtol=1e-3, atol=1e-3)
    for batch_size in (1, 2, 5, 64):  # chunks, ragged last chunk, one chunk
        torch.testing.assert_close(clip.score(caption, pixels, batch_size), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clip.score(caption, pixels.float() / 255, 2), expected, rtol=1e-6, atol=1e-6)
    large = torch.rand(5, 3, 40, 40)  # resized to the CLIP's 16 pixels, as F.interpolate with antialiasing does
    small = torch.nn.functional.interpolate(large, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(clip.score(caption, large, 3), clip.similarity(caption, small, caption != 0),
                               rtol=1e-6, atol=1e-6)
    assert clip.score(caption, pixels).dtype == torch.float32
    with pytest.raises(ValueError, match="batch_size"):
        clip.score(caption, pixels, 0)


@pytest.mark.parametrize("masked", [False, True])
def test_loss_is_symmetric_infonce(masked):
    clip = perturbed(tiny_clip())
    text, images = batch(clip, 4)
    mask = text != 0 if masked else None
    loss = clip(text, images, text_mask=mask, return_loss=True)
    with torch.no_grad():
        t, i = clip.encode_text(text, mask).double(), clip.encode_image(images).double()
        logits = t @ i.T * clip.temperature.double().exp()
    # Caption k's positive is image k: -log softmax of the diagonal, over rows (text -> image) and columns.
    expected = -(logits.log_softmax(dim=1).diag().mean() + logits.log_softmax(dim=0).diag().mean()) / 2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_both_towers_and_the_temperature():
    clip = perturbed(tiny_clip())
    text, images = batch(clip)
    clip(text, images, text_mask=text != 0, return_loss=True).backward()
    for name, p in clip.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_masked_mean_ignores_padding():
    clip = perturbed(tiny_clip()).eval()
    text, _ = batch(clip)
    mask = text != 0
    other = torch.where(mask, text, torch.randint_like(text, 1, clip.config.num_text_tokens))
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(other, mask), clip.encode_text(text, mask), rtol=1e-6, atol=1e-6)
        # Without a mask, padding is attended to and averaged like any token (DALLE-pytorch's plain mean).
        assert not torch.allclose(clip.encode_text(other)[1:], clip.encode_text(text)[1:], atol=1e-3)


def test_matches_dalle_pytorch():
    path = FIXTURES / "clip" / "reference.safetensors"
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        config = CLIPConfig.from_dict(json.loads(f.metadata()["config"]))
    clip = CLIP(config).eval()
    clip.load_state_dict({k[len("weights."):]: v.float() for k, v in tensors.items() if k.startswith("weights.")})
    text, mask, images = tensors["inputs.text"], tensors["inputs.text_mask"], tensors["inputs.images"]
    expected = {k[len("expected."):]: v for k, v in tensors.items() if k.startswith("expected.")}
    with torch.no_grad():
        actual = {
            "text_latents": clip.encode_text(text), "text_latents_masked": clip.encode_text(text, mask),
            "image_latents": clip.encode_image(images), "sim": clip(text, images),
            "sim_masked": clip(text, images, mask), "loss": clip(text, images, return_loss=True),
            "loss_masked": clip(text, images, mask, return_loss=True),
        }
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_checkpoint_round_trip_with_tokenizer(tmp_path):
    tokenizer = HugTokenizer(FIXTURES / "dalle_pytorch" / "tokenizer.json")
    clip = perturbed(tiny_clip(num_text_tokens=tokenizer.vocab_size)).eval()
    path = tmp_path / "clip.safetensors"
    save_clip(path, clip, tokenizer, extra={"epoch": 2}, aux={"step": torch.tensor(5)})
    loaded = load_clip(path)
    assert loaded.model.config == clip.config and loaded.extra == {"epoch": 2}
    assert torch.equal(loaded.aux["step"], torch.tensor(5))
    assert loaded.tokenizer.kind == "hug"
    text = tokenizer.tokenize(["a red cube", "green ball"], clip.config.text_seq_len)
    assert torch.equal(loaded.tokenizer.tokenize(["a red cube", "green ball"], clip.config.text_seq_len), text)
    _, images = batch(clip, 2)
    with torch.no_grad():
        for mask in (None, text != 0):
            assert torch.equal(loaded.model.eval()(text, images, mask), clip(text, images, mask))
        assert torch.equal(loaded.model(text, images, return_loss=True), clip(text, images, return_loss=True))


def test_load_errors(tmp_path):
    clip_path, dalle_path = tmp_path / "clip.safetensors", tmp_path / "dalle.safetensors"
    save_clip(clip_path, tiny_clip())
    save_dalle(dalle_path, DALLE(tiny_config()))
    with pytest.raises(CheckpointError, match="holds a 'dalle' checkpoint, expected a 'clip'"):
        load_clip(dalle_path)
    with pytest.raises(CheckpointError, match="holds a 'clip' checkpoint, expected a 'dalle'"):
        load_dalle(clip_path)

    torch.save({"weights": {}}, tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_clip(tmp_path / "clip.pt")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a dalle-engine checkpoint"):
        load_clip(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_clip(tmp_path / "missing.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(clip_path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_clip(truncated)

    with safe_open(clip_path, "pt") as f:
        metadata = f.metadata()
    metadata["config"] = json.dumps({**json.loads(metadata["config"]), "visual_enc_depth": 2})
    save_file(load_file(clip_path), clip_path, metadata=metadata)
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load_clip(clip_path)


def test_bad_inputs_are_clear_errors():
    clip = tiny_clip()
    text, images = batch(clip)
    mask = text != 0
    cases = [
        ((text.float(), images), "long tensor of token ids"),
        ((text[:, :5], images), r"\(batch, 8\) long tensor"),
        ((text[0], images), r"\(batch, 8\) long tensor"),
        ((torch.where(mask, text, 32), images), r"ids must lie in \[0, 32\), got ids in \[1, 32\]"),
        ((text - 1, images), r"must lie in \[0, 32\)"),
        ((text, images, mask.long()), "text_mask must be a bool tensor"),
        ((text, images, mask[:, :4]), "text_mask must be a bool tensor"),
        ((text, images, mask & (torch.arange(3) != 1)[:, None]), "keeps no position"),
        ((text, images[:, :, :8]), r"images must be a float \(batch, 3, 16, 16\)"),
        ((text, images[:, :1]), r"images must be a float \(batch, 3, 16, 16\)"),
        ((text, (images * 255).to(torch.uint8)), "images must be a float"),
        ((text, images[:2]), "batches differ: 3 captions, 2 images"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            clip(*args)
    with pytest.raises(ValueError, match="one caption or one per image: got 2 captions for 3 images"):
        clip.similarity(text[:2], images)


def test_config_validation_and_command_line():
    with pytest.raises(ValueError, match="must divide"):
        CLIPConfig(visual_image_size=20, visual_patch_size=8)
    for bad in (dict(text_enc_depth=0), dict(dim_text=32.0), dict(channels=True)):
        with pytest.raises(ValueError, match="positive integer"):
            CLIPConfig(**bad)
    with pytest.raises(ValueError, match="unknown CLIPConfig field"):
        CLIPConfig.from_dict({"dim": 32})
    config = CLIPConfig(dim_text=64, visual_patch_size=16)
    assert CLIPConfig.from_dict(config.to_dict()) == config and config.num_patches == 256 and config.patch_dim == 768

    parser = argparse.ArgumentParser()
    add_config_args(parser, CLIPConfig)
    assert config_from_args(CLIPConfig, parser.parse_args(["--dim_text", "64", "--visual_patch_size", "16"])) == config


def test_latents_do_not_depend_on_the_batch():
    clip = perturbed(tiny_clip()).eval()
    text, images = batch(clip)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(text[1:2], text[1:2] != 0), clip.encode_text(text, text != 0)[1:2])
        torch.testing.assert_close(clip.encode_image(images[2:]), clip.encode_image(images)[2:])
