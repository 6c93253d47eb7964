import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, random_batch
from PIL import Image
from test_checkpoint import tiny_dalle
from test_clip import tiny_clip

import generate
from engine.codecs.tokenizers import YttmTokenizer
from engine.io.checkpoint import load_dalle, save_clip, save_dalle
from engine.model.clip import CLIP, CLIPConfig
from engine.model.config import GUIDED_COND_SCALE
from engine.model.dalle import DALLE

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


# --- generate.py ------------------------------------------------------------------------------------------------
# The tiny model: captions of 5 tokens, 16 image tokens on a 4x4 grid, 16x16 RGB images.


CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("cube", "ball", "cone")]


def tiny_checkpoint(folder: Path, **overrides) -> Path:
    """``folder``/dalle.safetensors: a tiny DALL-E with its VAE and a BPE trained on CAPTIONS, stored inside it."""
    tokenizer = YttmTokenizer.train(CAPTIONS * 20, vocab_size=60, model_path=folder / "bpe.model")
    torch.manual_seed(0)
    save_dalle(folder / "dalle.safetensors", tiny_dalle(num_text_tokens=tokenizer.vocab_size, **overrides), tokenizer)
    (folder / "bpe.model").unlink()  # the checkpoint alone must be enough
    return folder / "dalle.safetensors"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def gen(ckpt, out, *flags, text="a red cube", num_images=2, seed="0"):
    argv = ["--dalle_path", str(ckpt), *(["--text", text] if text is not None else []), "--num_images",
            str(num_images), "--outputs_dir", str(out),
            "--device", "cpu", *(["--seed", seed] if seed is not None else []), *flags]
    generate.main(argv)


def jpgs(folder: Path) -> list[bytes]:
    return [(folder / f"{i}.jpg").read_bytes() for i in range(len(list(folder.glob("[0-9]*.jpg"))))]


def settings(folder: Path) -> dict:
    return json.loads((folder / "settings.json").read_text())


def test_writes_images_grid_caption_and_settings(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    gen(ckpt, out, "--batch_size", "2", text="a red cube| a blue ball ", num_images=3)
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_blue_ball", "a_red_cube"]  # no temporary folder left
    for name, prompt in (("a_red_cube", "a red cube"), ("a_blue_ball", "a blue ball")):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "0.jpg", "1.jpg", "2.jpg", "caption.txt", "grid.jpg", "settings.json"]
        assert Image.open(folder / "0.jpg").size == (16, 16) and Image.open(folder / "0.jpg").mode == "RGB"
        assert Image.open(folder / "grid.jpg").size == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2))  # 2x2, 2-pixel gaps
        assert (folder / "caption.txt").read_text() == prompt + "\n"
        s = settings(folder)
        assert s["prompt"] == s["caption"] == prompt
        assert s["caption_tokens"] == len(load_dalle(ckpt).tokenizer.encode(prompt)) and s["caption_length"] == 5
        assert s["checkpoint"] == str(ckpt.resolve()) and s["device"] == "cpu" and s["seed"] == 0
        assert {k: s[k] for k in ("num_images", "batch_size", "filter_thres", "top_k", "top_p", "temperature",
                                  "cond_scale", "img", "use_cache", "rerank")} == dict(
            num_images=3, batch_size=2, filter_thres=0.9, top_k=None, top_p=None, temperature=1.0,
            cond_scale=GUIDED_COND_SCALE,  # the checkpoint's default: trained with null captions
            img=None, use_cache=True, rerank=False)
        assert s["images"] == ["0.jpg", "1.jpg", "2.jpg"]
        assert len(s["scores"]) == 3 and all(-math.inf < x < 0 for x in s["scores"])  # log-likelihoods
        assert s["elapsed_s"] >= 0 and s["images_per_s"] > 0
        assert str(folder) in printed


def test_same_seed_same_bytes_other_seed_other_images(ckpt, tmp_path):
    gen(ckpt, tmp_path / "a", "--batch_size", "2", num_images=3)
    first = jpgs(tmp_path / "a" / "a_red_cube")
    assert len(set(first)) == 3  # three different images
    gen(ckpt, tmp_path / "a", "--batch_size", "2", num_images=3)  # replaces the earlier folder
    assert jpgs(tmp_path / "a" / "a_red_cube") == first
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["a_red_cube"]
    gen(ckpt, tmp_path / "b", "--batch_size", "2", num_images=3, seed="1")
    assert jpgs(tmp_path / "b" / "a_red_cube") != first
    # Without --seed, one is drawn and recorded, so the run can be repeated.
    gen(ckpt, tmp_path / "c", seed=None)
    drawn = settings(tmp_path / "c" / "a_red_cube")["seed"]
    gen(ckpt, tmp_path / "d", seed=str(drawn))
    assert jpgs(tmp_path / "d" / "a_red_cube") == jpgs(tmp_path / "c" / "a_red_cube")


@pytest.mark.parametrize("mode, size", [("CMYK", (40, 30)), ("LA", (12, 50))])  # any mode and aspect ratio
def test_priming_with_an_image(ckpt, tmp_path, mode, size):
    prime = tmp_path / ("prime.jpg" if mode == "CMYK" else "prime.png")
    Image.new(mode, size, (0, 255, 255, 0) if mode == "CMYK" else (80, 128)).save(prime)
    gen(ckpt, tmp_path / "out", "--img", str(prime), "--num_init_img_tokens", "8", num_images=1)
    s = settings(tmp_path / "out" / "a_red_cube")
    assert s["img"] == str(prime.resolve()) and s["num_init_img_tokens"] == 8
    gen(ckpt, tmp_path / "default", "--img", str(prime), num_images=1)
    assert settings(tmp_path / "default" / "a_red_cube")["num_init_img_tokens"] == 7  # int(0.4375 * 16)


@pytest.mark.parametrize("flags, expected", [
    (["--cond_scale", "3"], dict(cond_scale=3.0)),
    (["--top_p", "0.5", "--temperature", "0.7"], dict(top_p=0.5, temperature=0.7)),
    (["--top_k", "5"], dict(top_k=5, filter_thres=None)),  # a count of image tokens
    (["--top_k", "0.9"], dict(top_k=None, filter_thres=0.9)),  # DALLE-pytorch's fraction threshold
    (["--compile"], dict(compile=True)),
    (["--compile", "--no_cache"], dict(compile=False, use_cache=False)),  # nothing to compile: ignored, with a note
])
def test_sampling_options(ckpt, tmp_path, capsys, flags, expected):
    gen(ckpt, tmp_path, *flags, num_images=1)
    s = settings(tmp_path / "a_red_cube")
    assert {k: s[k] for k in expected} == expected
    if "--no_cache" in flags:
        assert "ignored with --no_cache" in capsys.readouterr().err


def test_top_k_one_is_greedy_either_way(ckpt, tmp_path):
    gen(ckpt, tmp_path / "count", "--top_k", "1")
    gen(ckpt, tmp_path / "fraction", "--top_k", "1.0", seed="1")  # greedy: the seed does not matter
    assert jpgs(tmp_path / "count" / "a_red_cube") == jpgs(tmp_path / "fraction" / "a_red_cube")


def test_rerank_writes_the_most_likely_first(ckpt, tmp_path):
    gen(ckpt, tmp_path / "plain", num_images=3)
    gen(ckpt, tmp_path / "ranked", "--rerank", num_images=3)
    plain, ranked = settings(tmp_path / "plain" / "a_red_cube"), settings(tmp_path / "ranked" / "a_red_cube")
    assert ranked["scores"] == sorted(plain["scores"], reverse=True) and ranked["scores"][0] == max(plain["scores"])
    order = sorted(range(3), key=lambda i: -plain["scores"][i])
    images = jpgs(tmp_path / "plain" / "a_red_cube")
    assert jpgs(tmp_path / "ranked" / "a_red_cube") == [images[i] for i in order]
    # --keep without --clip_path keeps the most likely.
    gen(ckpt, tmp_path / "kept", "--keep", "2", num_images=3)
    kept = settings(tmp_path / "kept" / "a_red_cube")
    assert kept["rerank"] and kept["keep"] == 2 and kept["clip"] is None and kept["clip_scores"] is None
    assert kept["scores"] == ranked["scores"][:2] and kept["images"] == ["0.jpg", "1.jpg"]
    assert jpgs(tmp_path / "kept" / "a_red_cube") == jpgs(tmp_path / "ranked" / "a_red_cube")[:2]


def test_gentxt_completes_a_prefix_or_samples_from_scratch(ckpt, tmp_path):
    gen(ckpt, tmp_path, "--gentxt", text="a red|", num_images=1)
    folders = sorted(tmp_path.iterdir(), key=lambda p: settings(p)["prompt"])
    assert [settings(p)["prompt"] for p in folders] == ["", "a red"]
    for folder in folders:
        s = settings(folder)
        assert s["gentxt"] and (folder / "caption.txt").read_text() == s["caption"] + "\n"
        assert folder.name in (generate.prompt_dir_name(s["caption"]), generate.prompt_dir_name(s["caption"]) + "_2")
        assert s["caption"].startswith(s["prompt"]) and s["caption_tokens"] <= 5
        assert (folder / "0.jpg").is_file()


def test_no_cache_gives_the_cached_images(ckpt, tmp_path):
    gen(ckpt, tmp_path / "cached", "--cond_scale", "3")
    gen(ckpt, tmp_path / "full", "--cond_scale", "3", "--no_cache")
    assert settings(tmp_path / "full" / "a_red_cube")["use_cache"] is False
    assert jpgs(tmp_path / "full" / "a_red_cube") == jpgs(tmp_path / "cached" / "a_red_cube")


@pytest.mark.parametrize("prompt, name", [
    ("../etc/passwd", "etcpasswd"), ("a/b", "ab"), ("con:*?", "_con"), ("nul.txt", "_nul.txt"),
    ("  a \t b\n", "a_b"), ("ein Bär 🐻", "ein_Bär_🐻"), ("a\x00b\x1fc\x85", "abc"),
    (".", "_"), ("..", "_"), ("???", "_"), ("", "_"),
    ("é" * 80, "é" * 50), ("a" * 99 + "é", "a" * 99),  # at most 100 bytes, cut at a character boundary
])
def test_prompt_dir_name_is_safe(prompt, name):
    assert generate.prompt_dir_name(prompt) == name


def test_colliding_prompts_get_their_own_folders(ckpt, tmp_path):
    # "x\udcff": an undecodable byte in the command line, as Python hands it over.
    gen(ckpt, tmp_path, "--truncate_captions", text="a/b|ab|A/B|../etc/passwd|con:*?|ünï 🐻|x\udcff", num_images=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ab", "ab_2", "AB_3", "etcpasswd", "_con", "ünï_🐻", "x\ufffd"])
    assert (tmp_path / "AB_3" / "caption.txt").read_text() == "A/B\n"
    assert generate.unique_name("x" * 100, {"x" * 100}) == "x" * 98 + "_2"


def test_interrupt_leaves_no_partial_folder(ckpt, tmp_path, monkeypatch):
    gen(ckpt, tmp_path, text="a red cube|a blue ball")
    before = jpgs(tmp_path / "a_blue_ball")
    save_jpg, calls = generate.save_jpg, []

    def interrupted(image, path):
        calls.append(path)
        if len(calls) == 4:  # the first image of the second prompt (after 0.jpg, 1.jpg and grid.jpg)
            raise KeyboardInterrupt
        save_jpg(image, path)

    monkeypatch.setattr(generate, "save_jpg", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gen(ckpt, tmp_path, text="a red cube|a blue ball", seed="1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_blue_ball", "a_red_cube"]
    assert settings(tmp_path / "a_red_cube")["seed"] == 1  # complete, so in place
    assert jpgs(tmp_path / "a_blue_ball") == before and settings(tmp_path / "a_blue_ball")["seed"] == 0


def colour_clip(tokenizer, **overrides) -> CLIP:
    """A CLIP set by hand, its transformers off (all weights 0, LayerScale included): an image's latent is
    (mean red - mean blue, 1), a caption's (the count of its tokens only in "a red cube" - those only in "a blue
    ball", 0). So "a red cube" scores a solid red image above any other, "a blue ball" below any other."""
    c = CLIPConfig(**{**dict(dim_text=8, dim_image=8, dim_latent=8, num_text_tokens=tokenizer.vocab_size,
                             text_enc_depth=1, text_seq_len=5, text_heads=1, visual_enc_depth=1, visual_heads=1,
                             visual_image_size=16, visual_patch_size=8), **overrides})
    clip = CLIP(c)
    red, blue = (set(tokenizer.encode(caption)) for caption in ("a red cube", "a blue ball"))
    with torch.no_grad():
        for p in clip.parameters():
            p.zero_()
        clip.text_emb.weight[sorted(red - blue), 0] = 1
        clip.text_emb.weight[sorted(blue - red), 0] = -1
        clip.to_text_latent.weight[0, 0] = 1
        pixels = c.visual_patch_size**2
        clip.to_visual_embedding.weight[0, 0::c.channels] = 1 / pixels  # patches are (p1 p2 c): channel fastest
        clip.to_visual_embedding.weight[0, 2::c.channels] = -1 / pixels
        clip.to_visual_embedding.bias[1] = 1
        clip.to_visual_latent.weight[:2, :2] = torch.eye(2)
    return clip


@pytest.fixture
def planted(monkeypatch):
    """Candidate 2 of every prompt is a solid red image, among the model's own."""
    generate_images = DALLE.generate_images

    def planting(self, text, *, image_indices, **options):
        images, scores = generate_images(self, text, image_indices=image_indices, **options)
        images[image_indices == 2] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
        return images, scores

    monkeypatch.setattr(DALLE, "generate_images", planting)


def is_red(path: Path) -> bool:
    r, g, b = np.asarray(Image.open(path).convert("RGB"), dtype=float).mean(axis=(0, 1))
    return r > 250 and g < 5 and b < 5


def test_clip_writes_the_best_match_first(ckpt, tmp_path, planted, monkeypatch):
    clip_path = tmp_path / "clip.safetensors"
    save_clip(clip_path, colour_clip(load_dalle(ckpt).tokenizer))  # no tokenizer stored: the DALL-E's is used
    similarity, batches = CLIP.similarity, []

    def counting(self, text, images, text_mask=None):
        batches.append(len(images))
        return similarity(self, text, images, text_mask)

    monkeypatch.setattr(CLIP, "similarity", counting)
    both = dict(text="a red cube|a blue ball", num_images=4)
    gen(ckpt, tmp_path / "plain", "--batch_size", "2", **both)
    gen(ckpt, tmp_path / "clip", "--batch_size", "2", "--clip_path", str(clip_path), **both)
    assert batches == [2, 2, 2, 2]  # --batch_size candidates at a time, each prompt
    for name, planted_at in (("a_red_cube", 0), ("a_blue_ball", 3)):
        plain, ranked = settings(tmp_path / "plain" / name), settings(tmp_path / "clip" / name)
        assert ranked["clip"] == str(clip_path.resolve()) and ranked["keep"] == 4 and not ranked["rerank"]
        assert len(ranked["clip_scores"]) == 4 and ranked["clip_scores"] == sorted(ranked["clip_scores"], reverse=True)
        images = jpgs(tmp_path / "plain" / name)
        order = [images.index(image) for image in jpgs(tmp_path / "clip" / name)]
        assert sorted(order) == [0, 1, 2, 3] and order[planted_at] == 2
        assert ranked["scores"] == [plain["scores"][i] for i in order]  # the likelihoods follow their images
        assert is_red(tmp_path / "clip" / name / f"{planted_at}.jpg")
    gen(ckpt, tmp_path / "best", "--batch_size", "2", "--clip_path", str(clip_path), "--keep", "1", **both)
    folder = tmp_path / "best" / "a_red_cube"
    assert sorted(p.name for p in folder.iterdir()) == ["0.jpg", "caption.txt", "grid.jpg", "settings.json"]
    assert is_red(folder / "0.jpg") and Image.open(folder / "grid.jpg").size == (20, 20)
    best, ranked = settings(folder), settings(tmp_path / "clip" / "a_red_cube")
    assert best["keep"] == 1 and best["images"] == ["0.jpg"]
    assert best["clip_scores"] == ranked["clip_scores"][:1] and best["scores"] == ranked["scores"][:1]


@pytest.mark.parametrize("own_tokenizer, size, flags", [
    (True, 8, []),  # its tokenizer makes 6 tokens of "a red cube", more than the DALL-E's caption length 5
    (False, 32, ["--truncate_captions"]),  # with the DALL-E's tokenizer, cut to "a red"
])
def test_clip_with_its_own_tokenizer_caption_length_and_image_size(ckpt, tmp_path, planted, own_tokenizer, size,
                                                                    flags):
    if own_tokenizer:
        tokenizer = YttmTokenizer.train(CAPTIONS * 20, vocab_size=30, model_path=tmp_path / "bpe.model")
        clip = colour_clip(tokenizer, visual_image_size=size, text_seq_len=8)
    else:
        tokenizer, clip = None, colour_clip(load_dalle(ckpt).tokenizer, visual_image_size=size, text_seq_len=2)
    save_clip(tmp_path / "clip.safetensors", clip, tokenizer)
    gen(ckpt, tmp_path / "out", "--batch_size", "2", "--clip_path", str(tmp_path / "clip.safetensors"),
        "--keep", "2", *flags, num_images=4)
    folder = tmp_path / "out" / "a_red_cube"
    assert is_red(folder / "0.jpg") and not is_red(folder / "1.jpg") and not (folder / "2.jpg").exists()
    scores = settings(folder)["clip_scores"]
    assert len(scores) == 2 and scores[0] > scores[1]


@pytest.fixture
def bad_files(ckpt, tmp_path):
    (tmp_path / "text.txt").write_text("not an image, not a checkpoint")
    (tmp_path / "dalle.safetensors").write_bytes(ckpt.read_bytes())
    save_clip(tmp_path / "clip_small_vocab.safetensors", tiny_clip())  # 32 tokens, the DALL-E's tokenizer 38
    save_clip(tmp_path / "clip_grey.safetensors", tiny_clip(num_text_tokens=60, channels=1))
    save_clip(tmp_path / "clip_short.safetensors", tiny_clip(num_text_tokens=60, text_seq_len=2))
    Image.new("RGB", (16, 16)).save(tmp_path / "prime.png")
    buf = tmp_path / "prime.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf)
    (tmp_path / "corrupt.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    (tmp_path / "corrupt.safetensors").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return tmp_path


TOO_LONG = "a red cube " * 3


@pytest.mark.parametrize("flags, message", [
    (["--text", ""], "empty prompt"),
    (["--text", "a||b"], "empty prompt"),
    (["--text", f"a red cube|{TOO_LONG}"], "--truncate_captions"),  # a later prompt: still nothing written
    (["--img", "missing.png"], "--img"),
    (["--img", "text.txt"], "--img"),
    (["--img", "corrupt.jpg"], "--img"),
    (["--img", "prime.png", "--num_init_img_tokens", "16"], "--num_init_img_tokens"),
    (["--num_init_img_tokens", "3"], "--num_init_img_tokens needs --img"),
    (["--num_init_img_tokens", "-1"], "--num_init_img_tokens"),
    (["--dalle_path", "missing.safetensors"], "--dalle_path"),
    (["--dalle_path", "text.txt"], "--dalle_path"),
    (["--dalle_path", "corrupt.safetensors"], "--dalle_path"),
    (["--bpe_path", "missing.model"], "tokenizer"),
    (["--outputs_dir", "text.txt"], "--outputs_dir"),
    (["--top_k", "2.5"], "--top_k"),
    (["--top_k", "-1"], "--top_k"),
    (["--top_p", "0"], "--top_p"),
    (["--top_p", "1.5"], "--top_p"),
    (["--temperature", "0"], "--temperature"),
    (["--cond_scale", "nan"], "--cond_scale"),
    (["--num_images", "0"], "--num_images"),
    (["--batch_size", "0"], "--batch_size"),
    (["--device", "nonsense"], "--device"),
    (["--clip_path", "missing.safetensors"], "--clip_path"),
    (["--clip_path", "text.txt"], "--clip_path"),
    (["--clip_path", "corrupt.safetensors"], "--clip_path"),
    (["--clip_path", "dalle.safetensors"], "--clip_path"),  # a DALL-E checkpoint, not a CLIP
    (["--clip_path", "clip_small_vocab.safetensors"], "the DALL-E's tokenizer (the CLIP file stores none) has 38"),
    (["--clip_path", "clip_grey.safetensors"], "1-channel"),
    (["--clip_path", "clip_short.safetensors"], "the CLIP's caption length 2"),
    (["--clip_path", "clip_short.safetensors", "--rerank"], "--rerank"),
    (["--keep", "0"], "--keep"),
    (["--keep", "3"], "--keep"),  # more than the 2 candidates
    (["--keep", "x"], "--keep"),
])
def test_bad_input_exits_with_a_message_and_writes_nothing(ckpt, bad_files, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(bad_files)
    with pytest.raises(SystemExit) as exit:
        gen(ckpt, bad_files / "out", *flags)
    code = exit.value.code
    if isinstance(code, str):  # our own errors; argparse's exit with 2 after printing usage and the error
        assert code.startswith("error: ") and "\n" not in code and message in code
    else:
        assert code == 2 and message in capsys.readouterr().err.splitlines()[-1]
    assert not (bad_files / "out").exists()


def test_prompts_from_a_file_equal_the_same_prompts_given_by_text(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa red cube\r\n\n   \n a blue ball | a green cube \na red cube\n".encode())
    gen(ckpt, tmp_path / "file", "--text_file", str(prompts), "--truncate_captions", text=None)
    gen(ckpt, tmp_path / "text", "--truncate_captions", text="a red cube|a blue ball|a red cube")
    folders = ["a_red_cube", "a_blue_ball_a_green_cube", "a_red_cube_2"]
    assert sorted(p.name for p in (tmp_path / "file").iterdir()) == sorted(folders)
    for folder in ("a_red_cube", "a_red_cube_2"):  # | splits --text only, so the middle prompts differ
        assert jpgs(tmp_path / "file" / folder) == jpgs(tmp_path / "text" / folder)
    assert settings(tmp_path / "file" / folders[1])["prompt"] == "a blue ball | a green cube"


def test_batches_filled_across_prompts_give_the_same_images(ckpt, tmp_path):
    """Batches of 4 mix the 3 images of 3 prompts (and split them unevenly); every image and score equals the one
    sampled one at a time, whatever the batch held."""
    prompts = "a red cube|a blue ball|a green cube"
    gen(ckpt, tmp_path / "mixed", "--batch_size", "4", text=prompts, num_images=3)
    gen(ckpt, tmp_path / "single", "--batch_size", "1", text=prompts, num_images=3)
    gen(ckpt, tmp_path / "reordered", "--batch_size", "4", text="a green cube|a red cube", num_images=3)
    for folder in ("a_red_cube", "a_blue_ball", "a_green_cube"):
        mixed, single = tmp_path / "mixed" / folder, tmp_path / "single" / folder
        assert jpgs(mixed) == jpgs(single) and settings(mixed)["scores"] == settings(single)["scores"]
        if folder != "a_blue_ball":
            assert jpgs(tmp_path / "reordered" / folder) == jpgs(mixed)


def test_torchrun_splits_the_work_and_writes_what_one_process_writes(ckpt, tmp_path):
    """torchrun with 2 CPU processes (gloo): each prompt's folder is written once, by one process, and holds the same
    bytes (images, grid, scores) as a single process's run; with no --seed both processes share rank 0's seed."""
    port = free_port()  # the default may still be held by an earlier run
    prompts = "a red cube|a blue ball|a green cube"
    flags = ["--dalle_path", str(ckpt), "--text", prompts, "--num_images", "3", "--batch_size", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    for out, seed in (("dist", ["--seed", "0"]), ("unseeded", [])):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(port), str(ROOT / "generate.py"), *flags, *seed, "--outputs_dir",
                              str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert run.stdout.count("wrote 3 images") == 3  # each folder once
    gen(ckpt, tmp_path / "single", "--batch_size", "2", text=prompts, num_images=3)
    folders = ["a_blue_ball", "a_green_cube", "a_red_cube"]
    for out in ("dist", "unseeded", "single"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == folders  # no temporary folder left
    for folder in folders:
        dist, single = tmp_path / "dist" / folder, tmp_path / "single" / folder
        assert jpgs(dist) == jpgs(single) and (dist / "grid.jpg").read_bytes() == (single / "grid.jpg").read_bytes()
        assert settings(dist)["scores"] == settings(single)["scores"]
    seeds = {settings(tmp_path / "unseeded" / folder)["seed"] for folder in folders}
    assert len(seeds) == 1


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "missing.txt: cannot be read (No such file"),
    (b"a red cube\n\xff\xfe cube\n", [], "not UTF-8 text (invalid byte at offset 11)"),
    (b"\n  \n\r\n", [], "holds no prompt"),
    (b"a red cube\n", ["--text", "a blue ball"], "not allowed with argument"),
])
def test_bad_prompt_files_exit_with_a_message_and_write_nothing(ckpt, tmp_path, capsys, content, flags, message):
    if content is not None:
        (tmp_path / "missing.txt").write_bytes(content)
    with pytest.raises(SystemExit) as exit:
        gen(ckpt, tmp_path / "out", "--text_file", str(tmp_path / "missing.txt"), *flags, text=None)
    assert exit.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_command_line(ckpt, tmp_path):
    cmd = [sys.executable, str(ROOT / "generate.py"), "--dalle_path", str(ckpt), "--num_images", "1",
           "--outputs_dir", "out", "--device", "cpu"]
    ok = subprocess.run(cmd + ["--text", "a red cube"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0 and "out/a_red_cube" in ok.stdout
    assert (tmp_path / "out" / "a_red_cube" / "0.jpg").is_file()
    bad = subprocess.run(cmd + ["--text", TOO_LONG], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "--truncate_captions" in bad.stderr and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_red_cube"]
