"""engine.eval: the likelihood it ranks by, retrieval on known answers, the command line on a folder with bad samples,
bad input, and reproducibility. A tiny DALL-E (16x16 images, 16 image tokens) keeps every test well under a second."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import random_batch
from PIL import Image
from test_checkpoint import tiny_dalle
from test_clip import tiny_clip

import engine.eval as ev
from engine.codecs.tokenizers import HugTokenizer
from engine.data import EMPTY_CAPTION, UNREADABLE_IMAGE, Skip
from engine.io.checkpoint import load_clip, load_dalle, save_clip, save_dalle

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = {"a red square": (220, 30, 30), "a green circle": (30, 180, 40), "a blue triangle": (30, 60, 220),
            "a yellow circle": (230, 220, 40), "a black square": (10, 10, 10)}

pytestmark = pytest.mark.usefixtures("one_thread")


def png_bytes(colour, size=(20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A DALL-E checkpoint, a CLIP checkpoint with its own (different) tokenizer, a plain file, and a folder of five
    good pairs, then a corrupt image, an empty caption (both paired, so skipped) and an image without a caption."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = HugTokenizer.train(list(CAPTIONS) * 5, vocab_size=300, json_path=root / "bpe.json")
    clip_tokenizer = HugTokenizer.train(list(CAPTIONS) * 5, vocab_size=270, json_path=root / "clip_bpe.json")
    torch.manual_seed(0)
    save_dalle(root / "dalle.safetensors", tiny_dalle(num_text_tokens=tokenizer.vocab_size, text_seq_len=8),
               tokenizer)
    save_clip(root / "clip.safetensors", tiny_clip(num_text_tokens=clip_tokenizer.vocab_size), clip_tokenizer)
    (root / "notes.txt").write_text("not a checkpoint")
    data = root / "data"
    data.mkdir()
    for i, (caption, colour) in enumerate(CAPTIONS.items()):
        (data / f"{i}.png").write_bytes(png_bytes(colour))
        (data / f"{i}.txt").write_text(caption + "\n")
    (data / "bad.png").write_bytes(b"not an image at all")
    (data / "bad.txt").write_text("a red square")
    (data / "empty.png").write_bytes(png_bytes((0, 0, 0)))
    (data / "empty.txt").write_text("\n\n")
    (data / "lonely.png").write_bytes(png_bytes((9, 9, 9)))
    return root


def run(files, tmp_path, *flags) -> dict:
    out = tmp_path / "eval.json"
    ev.main(["--dalle_path", str(files / "dalle.safetensors"), "--image_text_folder", str(files / "data"),
             "--device", "cpu", "--candidates", "4", "--json", str(out), *flags])
    return json.loads(out.read_text())


# --- the likelihood -------------------------------------------------------------------------------------------------


def test_image_log_likelihood_is_the_image_term_of_the_loss():
    model = tiny_dalle(attn_types=("full", "axial_row")).double().eval()
    c = model.config
    text, codes = random_batch(c, batch=3, generator=torch.Generator().manual_seed(1))
    ll = model.image_log_likelihood(text, codes)
    assert ll.shape == (3,) and (ll < 0).all()

    # image_log_likelihood takes the log-softmax in float32 (its .float()), so a float64 model agrees to float32's
    # precision, ~1e-7 relative; a wrong position or vocabulary slice would be off by whole nats.
    # Against the full masked logits: position text_seq_len + k predicts image code k.
    logits = model(text, codes)[:, c.text_seq_len:]
    log_p = logits.log_softmax(-1)[..., c.num_text_tokens_internal:].gather(-1, codes[..., None])[..., 0]
    torch.testing.assert_close(ll.double(), log_p.sum(-1), rtol=1e-6, atol=0)

    # Against the training loss: (text + w * image) / (w + 1) at w = 0 and 1 isolates the mean image NLL.
    with torch.no_grad():
        c.loss_img_weight = 0.0
        loss_text = model(text, codes, return_loss=True)
        c.loss_img_weight = 1.0
        loss_img = 2 * model(text, codes, return_loss=True) - loss_text
    torch.testing.assert_close(-ll.double().sum() / ll.numel() / c.image_seq_len, loss_img, rtol=1e-6, atol=0)


# --- retrieval with a likelihood whose answer is known --------------------------------------------------------------


def coded_samples(model, n: int, caption_of=lambda i: i):
    """n samples: image i is solid grey i/10, and the patched VAE codes it as i everywhere; caption i is the one token
    caption_of(i) + 1."""
    c = model.config
    model.tokenize_images = lambda images: (images[:, 0, 0, 0] * 10).round().long()[:, None].repeat(1, c.image_seq_len)
    samples = []
    for i in range(n):
        tokens = torch.zeros(c.text_seq_len, dtype=torch.long)
        tokens[0] = caption_of(i) + 1
        samples.append((tokens, torch.full((3, 16, 16), i / 10)))
    return samples


def planted_likelihood(model, own: float, other: float, calls: list | None = None):
    """log p(image | caption) = own per token when the caption is the image's, else other per token."""
    seq = model.config.image_seq_len

    def likelihood(text, codes):
        if calls is not None:
            calls.extend(zip(codes[:, 0].tolist(), text[:, 0].tolist()))
        match = text[:, 0] - 1 == codes[:, 0]
        return torch.where(match, own * seq, other * seq).float()

    model.image_log_likelihood = likelihood


def test_retrieval_finds_each_own_caption_among_distinct_rivals():
    model = tiny_dalle().eval()
    samples = coded_samples(model, 6)
    calls = []
    planted_likelihood(model, math.log(1 / 2), math.log(1 / 8), calls)
    report = ev.evaluate(model, None, samples, candidates=4, batch_size=5)
    assert report["pairs"] == 6 and report["skipped"] == {}
    assert report["retrieval"] == {"top1": 1.0, "mean_rank": 1.0, "candidates": 4, "chance": 0.25}
    assert report["perplexity"] == pytest.approx(2.0, rel=1e-6)  # exp(mean NLL per image token) of the own caption
    assert len(calls) == 6 * 4
    for image in range(6):
        captions = [text - 1 for code, text in calls if code == image]
        assert len(set(captions)) == 4 and image in captions  # its own and 3 distinct others


def test_retrieval_counts_ties_as_misses_and_ranks_last_the_least_likely():
    model = tiny_dalle().eval()
    samples = coded_samples(model, 6)
    planted_likelihood(model, -1.0, -1.0)  # the caption changes nothing
    tied = ev.evaluate(model, None, samples, candidates=4)["retrieval"]
    assert tied["top1"] == 0.0 and tied["mean_rank"] == 4.0
    planted_likelihood(model, -3.0, -1.0)  # the own caption is the least likely
    worst = ev.evaluate(model, None, samples, candidates=4)["retrieval"]
    assert worst["top1"] == 0.0 and worst["mean_rank"] == 4.0


def test_rivals_are_other_distinct_captions_and_few_captions_shrink_the_candidates():
    model = tiny_dalle().eval()
    samples = coded_samples(model, 6, caption_of=lambda i: i % 3)  # 3 distinct captions, each twice
    calls = []
    planted_likelihood(model, -1.0, -2.0, calls)
    report = ev.evaluate(model, None, samples, candidates=16)
    assert report["retrieval"]["candidates"] == 3 and report["retrieval"]["chance"] == pytest.approx(1 / 3)
    for image in range(6):
        captions = [text - 1 for code, text in calls if code == image]
        assert sorted(captions) == [0, 1, 2]
    # Image 3 is not caption 3's (there is none): its own caption is 0, which it cannot match under this planting.
    assert report["retrieval"]["top1"] == pytest.approx(3 / 6)


def test_skips_are_counted_and_only_the_first_pairs_are_used():
    model = tiny_dalle().eval()
    good = coded_samples(model, 4)
    planted_likelihood(model, -1.0, -2.0)
    samples = [Skip(EMPTY_CAPTION, "a.txt"), good[0], Skip(UNREADABLE_IMAGE, "b.png"), Skip(EMPTY_CAPTION, "c.txt"),
               *good[1:3], Skip(UNREADABLE_IMAGE, "never read"), good[3]]
    report = ev.evaluate(model, None, iter(samples), candidates=2, num_pairs=3)
    assert report["pairs"] == 3
    assert report["skipped"] == {EMPTY_CAPTION: 2, UNREADABLE_IMAGE: 1}
    assert report["first_skipped"] == {EMPTY_CAPTION: "a.txt", UNREADABLE_IMAGE: "b.png"}
    with pytest.raises(ValueError, match="candidates"):
        ev.evaluate(model, None, samples, candidates=1)
    empty = ev.evaluate(model, None, [Skip(EMPTY_CAPTION, "a.txt")])
    assert empty["pairs"] == 0 and empty["retrieval"] is None and empty["perplexity"] is None


# --- the real model: reproducibility, training mode, CLIP ---------------------------------------------------------


def test_same_seed_same_figures_any_batch_size_and_training_mode_restored(files):
    ckpt, clip_ckpt = load_dalle(files / "dalle.safetensors"), load_clip(files / "clip.safetensors")
    model, clip = ckpt.model.train(), clip_ckpt.model.train()

    def figures(batch_size: int, seed: int = 3) -> dict:
        samples, _ = ev.eval_samples(str(files / "data"), tokenizer=ckpt.tokenizer, text_len=model.config.text_seq_len,
                                     image_size=model.vae.image_size)
        return ev.evaluate(model, ckpt.tokenizer, samples, candidates=3, clip=clip, clip_tokenizer=clip_ckpt.tokenizer,
                           samples_per_caption=2, seed=seed, batch_size=batch_size)

    first = figures(4)
    assert model.training and model.transformer.training and not model.vae.training and clip.training
    assert figures(4) == first
    other = figures(7)
    assert other["retrieval"] == first["retrieval"]
    assert other["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
    assert other["clip"] == pytest.approx(first["clip"], rel=1e-6)  # samples are seeded per caption, not per batch
    assert figures(4, seed=4)["clip"]["sample_score"] != first["clip"]["sample_score"]

    # Nothing made under inference_mode leaks into training: a step still back-propagates.
    text, codes = random_batch(model.config, batch=2)
    model(text, codes, return_loss=True).backward()
    assert model.to_logits[1].weight.grad is not None


def test_clip_text_is_the_caption_in_the_clips_own_tokens(files, monkeypatch):
    ckpt, clip_ckpt = load_dalle(files / "dalle.safetensors"), load_clip(files / "clip.safetensors")
    model, clip = ckpt.model, clip_ckpt.model
    seen, seeds = [], []
    score, generate = type(clip).score, type(model).generate_images

    def spy_score(self, text, images, batch_size=64):
        seen.append((text.clone(), images.shape[0]))
        return score(self, text, images, batch_size)

    def spy_generate(self, text, **options):
        seeds.append(options["seed"])
        return generate(self, text, **options)

    monkeypatch.setattr(type(clip), "score", spy_score)
    monkeypatch.setattr(type(model), "generate_images", spy_generate)
    samples, _ = ev.eval_samples(str(files / "data"), tokenizer=ckpt.tokenizer, text_len=model.config.text_seq_len,
                                 image_size=model.vae.image_size)
    report = ev.evaluate(model, ckpt.tokenizer, samples, clip=clip, clip_tokenizer=clip_ckpt.tokenizer,
                         samples_per_caption=3, seed=10, num_pairs=3)
    captions = list(CAPTIONS)[:3]
    expected = clip_ckpt.tokenizer.tokenize(captions, clip.config.text_seq_len, truncate_text=True)
    assert len(seen) == 3 and all(torch.equal(t, row[None]) for (t, _), row in zip(seen, expected))
    assert [n for _, n in seen] == [4, 4, 4]  # the real image and 3 samples
    assert seeds == [10, 11, 12]
    assert report["clip"]["pairs"] == 3 and report["clip"]["samples_per_caption"] == 3


# --- the command line -----------------------------------------------------------------------------------------------


def test_command_line_on_a_folder_with_bad_samples(files, tmp_path, capsys):
    report = run(files, tmp_path, "--clip_path", str(files / "clip.safetensors"), "--samples_per_caption", "2")
    assert report["pairs"] == 5
    assert report["skipped"] == {UNREADABLE_IMAGE: 1, EMPTY_CAPTION: 1}
    assert report["unpaired"] == {"images": 1, "captions": 0}
    r = report["retrieval"]
    assert r["candidates"] == 4 and r["chance"] == 0.25 and 0 <= r["top1"] <= 1 and 1 <= r["mean_rank"] <= 4
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1
    c = report["clip"]
    assert all(math.isfinite(c[k]) for k in ("sample_score", "real_score", "ratio"))
    assert c["pairs"] == 5 and c["samples_per_caption"] == 2
    assert report["args"]["candidates"] == 4 and report["args"]["seed"] == 0
    out = capsys.readouterr().out
    assert "5 evaluated, 2 skipped" in out and "CLIP score" in out and "perplexity" in out
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary behind
    again = run(files, tmp_path, "--clip_path", str(files / "clip.safetensors"), "--samples_per_caption", "2")
    assert again == report  # the same seed, the same figures

    plain = run(files, tmp_path, "--num_pairs", "2")
    assert plain["pairs"] == 2 and plain["skipped"] == {} and "clip" not in plain  # the bad pairs come later
    assert plain["retrieval"]["candidates"] == 2


def test_webdataset_shards_are_read_in_their_order(files, tmp_path):
    ckpt = load_dalle(files / "dalle.safetensors")
    captions = list(CAPTIONS)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"data-{s}.tar")) as sink:
            for i in range(3):
                caption = captions[(3 * s + i) % len(captions)]
                sink.write({"__key__": f"{s}_{i}", "jpg": png_bytes(CAPTIONS[caption]), "txt": caption})
            sink.write({"__key__": f"{s}_bad", "jpg": b"garbage", "txt": "a red square"})
    samples, unpaired = ev.eval_samples(str(tmp_path), tokenizer=ckpt.tokenizer, text_len=8, image_size=16,
                                        wds="jpg,txt")
    read = [s.reason if isinstance(s, Skip) else ckpt.tokenizer.decode(s[0]) for s in samples]
    assert unpaired == {}
    assert read == [*captions[:3], UNREADABLE_IMAGE, captions[3], captions[4], captions[0], UNREADABLE_IMAGE]


@pytest.mark.parametrize("flags, message", [
    (["--image_text_folder", "missing"], "--image_text_folder"),
    (["--candidates", "1"], "--candidates"),
    (["--candidates", "0"], "--candidates"),
    (["--num_pairs", "0"], "--num_pairs"),
    (["--wds", "jpg"], "--wds"),
    (["--dalle_path", "notes.txt"], "error: cannot load --dalle_path"),
    (["--clip_path", "notes.txt"], "error: cannot load --clip_path"),
    (["--image_text_folder", "unpaired"], "error: --image_text_folder: no image–caption pairs"),
    (["--image_text_folder", "all_bad"], "error: no readable image-caption pairs"),
])
def test_bad_input_is_a_one_line_error(files, tmp_path, monkeypatch, capsys, flags, message):
    (tmp_path / "unpaired").mkdir()
    (tmp_path / "unpaired" / "lonely.png").write_bytes(png_bytes((1, 2, 3)))
    (tmp_path / "all_bad").mkdir()
    (tmp_path / "all_bad" / "x.png").write_bytes(b"garbage")
    (tmp_path / "all_bad" / "x.txt").write_text("a red square")
    monkeypatch.chdir(tmp_path)
    argv = {"--dalle_path": str(files / "dalle.safetensors"), "--image_text_folder": str(files / "data")}
    argv.update(zip(flags[::2], flags[1::2]))
    argv = [x for kv in argv.items() for x in kv]
    if "notes.txt" in argv:
        argv[argv.index("notes.txt")] = str(files / "notes.txt")
    with pytest.raises(SystemExit) as exit:
        ev.main([*argv, "--device", "cpu", "--json", "out.json"])
    err = capsys.readouterr().err
    text = err if exit.value.code == 2 else str(exit.value.code)
    assert message in text and "Traceback" not in err
    assert exit.value.code == 2 or (text.startswith("error:") and "\n" not in text)
    assert not (tmp_path / "out.json").exists()


def test_python_m_with_a_bad_checkpoint_prints_one_line(files):
    run_ = subprocess.run([sys.executable, "-m", "engine.eval", "--dalle_path", str(files / "notes.txt"),
                           "--image_text_folder", str(files / "data"), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True)
    assert run_.returncode == 1
    assert run_.stderr.startswith("error: cannot load --dalle_path") and run_.stderr.count("\n") == 1
