"""train_clip.py on a folder, WebDataset shards and the built-in shapes: bad samples, held-out retrieval, exact
resumes, flag errors, and a 2-process DeepSpeed run."""

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from conftest import run_deepspeed
from test_training import COLOURS, png_bytes

import train_clip
from engine.demo import shapes as shape_data
from engine.eval_demo import analyse
from engine.io.checkpoint import load_clip

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim_text", "32", "--dim_image", "32", "--dim_latent", "16", "--text_enc_depth", "1", "--visual_enc_depth",
        "1", "--text_heads", "1", "--visual_heads", "1", "--text_seq_len", "12", "--visual_image_size", "16",
        "--visual_patch_size", "8", "--num_workers", "0", "--log_every_n_steps", "1", "--bpe_vocab_size", "300",
        "--truncate_captions"]
SHAPES = ["--num_samples", "64", "--batch_size", "16", "--eval_samples", "32", "--retrieval_candidates", "16",
          "--learning_rate", "1e-3", *TINY]


def rows(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_folder_skips_bad_samples_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (name, colour) in enumerate(list(COLOURS.items()) * 4):
        (folder / f"{i}.png").write_bytes(png_bytes(colour))
        (folder / f"{i}.txt").write_text(f"a {name} square\na picture of {name}\n")
    (folder / "bad.png").write_bytes(b"not an image")
    (folder / "bad.txt").write_text("a broken picture")
    (folder / "empty.png").write_bytes(png_bytes((0, 0, 0)))
    (folder / "empty.txt").write_text("\n")
    flags = ["--image_text_folder", str(folder), "--batch_size", "7", "--output_dir", "logs", *TINY]

    train_clip.main([*flags, "--epochs", "1"])
    ckpt = load_clip("clip.safetensors")
    assert ckpt.extra["progress"] == {"step": 2, "epoch": 1, "batch_in_epoch": 0, "samples_skipped": 2}
    assert ckpt.tokenizer.vocab_size == ckpt.model.config.num_text_tokens and "retrieval" not in ckpt.extra
    assert ckpt.aux["optim.0.step"].item() == 2

    train_clip.main([*flags, "--epochs", "2", "--clip_path", "clip.safetensors"])
    ckpt = load_clip("clip.safetensors")
    assert ckpt.extra["progress"]["step"] == 4 and ckpt.extra["progress"]["samples_skipped"] == 4
    assert ckpt.aux["optim.0.step"].item() == 4  # Adam went on from its saved state
    log = rows(tmp_path / "logs")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)


def test_webdataset_counts_missing_captions_and_bad_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"data-{s:06d}.tar")) as sink:
            for i, (name, colour) in enumerate(COLOURS.items()):
                sink.write({"__key__": f"{s}_{i}", "jpg": png_bytes(colour), "txt": f"a {name} square".encode()})
            sink.write({"__key__": f"{s}_bad", "jpg": b"garbage", "txt": b"a broken picture"})
            sink.write({"__key__": f"{s}_nocaption", "jpg": png_bytes((9, 9, 9))})
    train_clip.main(["--image_text_folder", str(tmp_path / "data-{000000..000002}.tar"), "--wds", "jpg,txt",
                     "--batch_size", "4", "--epochs", "1", *TINY])
    progress = load_clip("clip.safetensors").extra["progress"]
    assert progress["samples_skipped"] == 6 and progress["step"] == len(rows(tmp_path / "clip-logs")) >= 3


def test_shapes_retrieval_and_exact_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_clip.main(["--clip_output_file_name", "whole/clip", "--epochs", "2", *SHAPES])
    whole = load_clip("whole/clip.safetensors")
    retrieval = [r for r in rows(tmp_path / "whole" / "clip-logs") if "retrieval/text_to_image" in r]
    assert [r["step"] for r in retrieval] == [4, 8]  # 64 pairs / 16 per step, evaluated after each epoch
    assert whole.extra["retrieval"]["pairs"] == 32 and whole.extra["retrieval"]["epochs"] == 2
    assert whole.extra["retrieval"]["text_to_image"] == retrieval[-1]["retrieval/text_to_image"]
    near_miss = whole.extra["retrieval"]["near_miss"]
    assert set(near_miss) == {"colour", "shape", "size", "position"} and all(0 <= v <= 1 for v in near_miss.values())
    assert all(retrieval[-1][f"near_miss/{k}"] == v for k, v in near_miss.items())

    # A tokenizer trained afresh, the same as the whole run's: the byte-level BPE repeats in every process.
    train_clip.main(["--clip_output_file_name", "cut/clip", "--epochs", "1", *SHAPES])
    assert Path("cut/clip-bpe.json").read_bytes() == Path("whole/clip-bpe.json").read_bytes()
    assert load_clip("cut/clip.safetensors").extra["retrieval"]["epochs"] == 1
    train_clip.main(["--clip_output_file_name", "cut/clip", "--epochs", "2", "--clip_path", "cut/clip.safetensors",
                     *SHAPES])
    cut = load_clip("cut/clip.safetensors")
    losses = {r["step"]: r["loss"] for r in rows(tmp_path / "whole" / "clip-logs") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in rows(tmp_path / "cut" / "clip-logs") if "loss" in r}
    assert resumed == pytest.approx(losses, rel=1e-5)
    for scores in (cut.extra["retrieval"], whole.extra["retrieval"]):  # pytest.approx compares flat dicts only
        scores.update({f"near_miss/{k}": v for k, v in scores.pop("near_miss").items()})
    assert cut.extra["retrieval"] == pytest.approx(whole.extra["retrieval"], rel=1e-6)
    torch.testing.assert_close(cut.model.state_dict(), whole.model.state_dict(), rtol=1e-5, atol=1e-6)


class CaptionTokenizer:
    """Encodes each caption as its index in a growing list, so a stub CLIP can read the words back."""

    def __init__(self):
        self.captions = []

    def tokenize(self, captions, length, truncate=False):
        self.captions += captions
        ids = torch.zeros(len(captions), length, dtype=torch.long)
        ids[:, 0] = torch.arange(len(self.captions) - len(captions), len(self.captions)) + 1
        return ids


class ColourCLIP:
    """Stands in for CLIP: latents are one-hot colours, read from the caption's words and from the image's pixels,
    so it tells colours apart perfectly and every other attribute not at all."""

    config = SimpleNamespace(text_seq_len=4)

    def __init__(self, tokenizer: CaptionTokenizer):
        self.tokenizer = tokenizer

    def one_hot(self, colours: list[str]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([list(shape_data.COLOURS).index(c) for c in colours]),
                                           len(shape_data.COLOURS)).float()

    def encode_text(self, text, mask):
        words = [self.tokenizer.captions[int(i) - 1].replace(",", " ").split() for i in text[:, 0]]
        return self.one_hot([next(w for w in caption if w in shape_data.COLOURS) for caption in words])

    def encode_image(self, images):
        return self.one_hot([analyse(image).colour for image in images])


def test_near_miss_accuracy_counts_each_attribute_apart():
    shapes = shape_data.ShapesDataset(num_samples=150, image_size=32, seed=3)
    scores = train_clip.near_miss_accuracy(ColourCLIP(tokenizer := CaptionTokenizer()), shapes, 20, tokenizer, False,
                                           contextlib.nullcontext, "cpu", chunk=16)  # a ragged last chunk
    specs = [shapes.sample(i)[0] for i in range(20, 150)]
    # Colours are always told apart; for the rest every caption ties, and a tie goes to the first value.
    assert scores == pytest.approx({"colour": 1.0, **{
        attribute: sum(getattr(spec, attribute) == values[0] for spec in specs) / len(specs)
        for attribute, values in (("shape", shape_data.SHAPES), ("size", shape_data.SIZES),
                                   ("position", list(shape_data.POSITIONS)))}})
    assert len(tokenizer.captions) == 130 * (len(shape_data.COLOURS) + len(shape_data.SHAPES) + len(shape_data.SIZES)
                                    + len(shape_data.POSITIONS))


@pytest.mark.parametrize("flags, message", [
    (["--image_size", "16", "--visual_image_size", "32"], "differ"),
    (["--visual_patch_size", "7"], "visual_patch_size 7 must divide visual_image_size 32"),
    (["--wds", "jpg"], "--wds takes IMG_KEY,CAPTION_KEY"),
    (["--fp16", "--bf16"], "choose one of --fp16 and --bf16"),
    (["--eval_samples", "8"], "--eval_samples 8 must be 0 or at least --retrieval_candidates 32"),
])
def test_bad_flags_are_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_clip.parse_args(flags)
    assert message in capsys.readouterr().err


def test_deepspeed_two_processes_zero3(tmp_path):
    """2 CPU processes (gloo), ZeRO-3 + bf16: the gathered weights and the held-out retrieval reach the checkpoint."""
    run_deepspeed(ROOT / "train_clip.py", ["--zero_stage", "3", "--bf16", "--epochs", "1", *SHAPES], tmp_path)
    ckpt = load_clip(tmp_path / "clip.safetensors")  # ZeRO-3's empty local shards would not load
    assert ckpt.extra["progress"]["step"] == 4 and ckpt.extra["retrieval"]["pairs"] == 32
    assert (tmp_path / "clip-ds-cp" / "step000000004").is_dir()
