import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_batch
from PIL import Image
from test_checkpoint import tiny_dalle

from engine.checkpoint import save_dalle
from engine.tokenizers import YttmTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model():
    return tiny_dalle(attn_types=("full", "axial_col")).eval()


def returning_codes(model):
    """Make the VAE decode return the sampled codes, so tests can look at them."""
    model.vae.decode = lambda codes: codes
    return model


def test_generate_images_shape_range_and_seed(model):
    text, _ = random_batch(model.config, batch=2)
    images = model.generate_images(text, seed=5)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, model.generate_images(text, seed=5))
    codes = returning_codes(model).generate_images(text, seed=5)
    assert codes.shape == (2, model.config.image_seq_len)
    assert codes.min() >= 0 and codes.max() < model.config.num_image_tokens
    assert not torch.equal(codes, model.generate_images(text, seed=6))


def test_sampling_follows_the_model(model):
    """With top-k 1 every sampled code is the argmax of the model's next-token logits."""
    text, _ = random_batch(model.config, batch=2)
    codes = returning_codes(model).generate_images(text, filter_thres=1.0, seed=0)
    for n in range(model.config.image_seq_len):
        logits = model(text, codes[:, :n])[:, -1]
        assert torch.equal(logits.argmax(-1) - model.config.num_text_tokens_internal, codes[:, n])


def test_priming_keeps_the_image_prefix(model):
    text, _ = random_batch(model.config, batch=2)
    img = torch.rand(2, 3, 16, 16)
    prefix = model.vae.get_codebook_indices(img)[:, :5]
    codes = returning_codes(model).generate_images(text, img=img, num_init_img_tokens=5, seed=1)
    assert torch.equal(codes[:, :5], prefix)
    with pytest.raises(ValueError, match="num_init_img_tokens"):
        model.generate_images(text, img=img, num_init_img_tokens=model.config.image_seq_len)


def test_classifier_free_guidance_uses_a_separate_null_caption(model):
    text, codes = random_batch(model.config, batch=2)
    before = text.clone()
    guided = model.next_token_logits(text, codes[:, :4], cond_scale=3.0)
    cond = model(text, codes[:, :4])[:, -1]
    null = model(torch.zeros_like(text), codes[:, :4])[:, -1]
    allowed = cond > -1e30
    torch.testing.assert_close(guided[allowed], (null + (cond - null) * 3.0)[allowed])
    assert torch.equal(text, before)


def test_generate_cli_writes_jpgs(tmp_path):
    captions = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("cube", "ball", "cone")]
    tokenizer = YttmTokenizer.train(captions * 20, vocab_size=60, model_path=tmp_path / "bpe.model")
    model = tiny_dalle(num_text_tokens=tokenizer.vocab_size)
    ckpt = tmp_path / "dalle.safetensors"
    save_dalle(ckpt, model, tokenizer)
    (tmp_path / "bpe.model").unlink()  # the checkpoint alone must be enough
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "generate.py"), "--dalle_path", str(ckpt), "--text", "a red cube|a blue ball",
           "--num_images", "3", "--batch_size", "2", "--outputs_dir", str(out), "--seed", "0"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    for prompt in ("a_red_cube", "a_blue_ball"):
        files = sorted(p.name for p in (out / prompt).iterdir())
        assert files == ["0.jpg", "1.jpg", "2.jpg", "caption.txt"]
        assert Image.open(out / prompt / "0.jpg").size == (16, 16)
    first = (out / "a_red_cube" / "0.jpg").read_bytes()
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    assert (out / "a_red_cube" / "0.jpg").read_bytes() == first  # --seed makes runs reproducible

    too_long = subprocess.run(cmd[:5] + ["--text", "a red cube " * 10] + cmd[7:], cwd=tmp_path,
                              capture_output=True, text=True)
    assert too_long.returncode != 0 and "truncate" in too_long.stderr


def test_generate_cli_primes_with_an_image(tmp_path):
    captions = ["a red cube", "a blue ball"] * 20
    tokenizer = YttmTokenizer.train(captions, vocab_size=30, model_path=tmp_path / "bpe.model")
    save_dalle(tmp_path / "dalle.safetensors", tiny_dalle(num_text_tokens=tokenizer.vocab_size), tokenizer)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "prime.jpg")  # any mode and aspect ratio
    cmd = [sys.executable, str(ROOT / "generate.py"), "--dalle_path", "dalle.safetensors", "--text", "a red cube",
           "--num_images", "1", "--img", "prime.jpg", "--num_init_img_tokens", "8", "--outputs_dir", "out"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    assert (tmp_path / "out" / "a_red_cube" / "0.jpg").is_file()
