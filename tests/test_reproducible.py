"""Seeded runs repeat: the same seed, data and machine give the same tokenizer, VAE, DALL-E and CLIP weights, bit
for bit, and the same images (one process, CPU).

Each script runs twice in fresh processes, with different hash seeds, as two users' runs would; a third run with
another seed must differ, so that the comparisons can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DALLE = ["--epochs", "1", "--num_samples", "64", "--batch_size", "16", "--vae_steps", "10", "--dim", "32", "--depth",
         "2", "--heads", "2", "--dim_head", "16", "--text_seq_len", "12", "--attn_types", "full,axial_row",
         "--num_workers", "0", "--sample_every_n_steps", "0", "--bpe_vocab_size", "400", "--null_cond_prob", "0.2",
         "--attn_dropout", "0.1", "--ff_dropout", "0.1", "--warmup_steps", "2", "--lr_schedule", "cosine"]
CLIP = ["--epochs", "1", "--num_samples", "64", "--batch_size", "16", "--eval_samples", "32",
        "--retrieval_candidates", "16", "--dim_text", "32", "--dim_image", "32", "--dim_latent", "16",
        "--text_enc_depth", "1", "--visual_enc_depth", "1", "--text_heads", "1", "--visual_heads", "1",
        "--text_seq_len", "12", "--visual_image_size", "16", "--visual_patch_size", "8", "--image_size", "16",
        "--num_workers", "0", "--bpe_vocab_size", "400"]
VAE = ["--epochs", "1", "--image_size", "16", "--num_tokens", "16", "--num_layers", "2", "--num_resnet_blocks", "1",
       "--emb_dim", "8", "--hidden_dim", "8", "--batch_size", "4", "--num_workers", "0", "--sample_every_n_steps", "0"]
GENERATE = ["--text", "a large red circle on the top left|a small blue square", "--num_images", "3", "--batch_size",
            "2", "--cond_scale", "2"]


def run(script: str, args: list[str], cwd: Path, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def train_all(root: Path, seed: int, hash_seed: str) -> None:
    root.mkdir()
    seeded = ["--seed", str(seed)]
    run("train.py", ["--dalle_output_file_name", "dalle", *DALLE, *seeded], root, hash_seed)
    run("train_clip.py", ["--clip_output_file_name", "clip", *CLIP, *seeded], root, hash_seed)
    images = root / "images"
    images.mkdir()
    for i in range(8):  # a VAE of its own, on a folder
        Image.new("RGB", (20, 20), (30 * i, 200 - 20 * i, 90)).save(images / f"{i}.png")
    run("train_vae.py", ["--image_folder", "images", "--vae_output_file_name", "vae", *VAE, *seeded], root, hash_seed)
    run("generate.py", ["--dalle_path", "dalle.safetensors", "--clip_path", "clip.safetensors", "--outputs_dir", "out",
                        *GENERATE, *seeded], root, hash_seed)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def images(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "out").rglob("*.jpg"))}


def scores(root: Path) -> list:
    return [json.loads(p.read_text())["scores"] for p in sorted((root / "out").rglob("settings.json"))]


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_seeded_runs_repeat_bit_for_bit(tmp_path: Path) -> None:
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    train_all(first, 7, "1")
    train_all(again, 7, "2")
    train_all(other, 8, "1")

    for name in ("dalle", "clip", "vae"):
        path = f"{name}.safetensors"
        assert bitwise_equal(tensors(first / path), tensors(again / path)), name
        assert metadata(first / path) == metadata(again / path), name  # configs, tokenizer, training state
        assert not bitwise_equal(tensors(first / path), tensors(other / path)), name
    assert (first / "dalle-bpe.json").read_bytes() == (again / "dalle-bpe.json").read_bytes()
    assert len(images(first)) == 2 * (3 + 1)  # 3 images and a grid per prompt
    assert images(first) == images(again) and scores(first) == scores(again)
    assert images(first) != images(other)


def test_the_first_vector_math_call_gives_the_same_bits_in_every_process() -> None:
    """torch.log and its kin run MKL's vector math on CPU tensors, which sets itself up on first use; a first call
    split across threads could compute a part another way (one process in seven, which made two seeded runs differ).
    Importing engine sets it up first: in fresh processes, the first log of a large tensor equals the second."""
    code = ("import hashlib, torch, engine\n"
            "torch.manual_seed(7)\n"
            "x = torch.empty(32, 128, 8, 8).exponential_()\n"  # a parallel op first, as in training: threads awake
            "print(*(hashlib.sha256(x.log().numpy().tobytes()).hexdigest() for _ in range(2)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(16)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-2000:]
    firsts, seconds = zip(*(run.stdout.split() for run in runs))
    assert set(firsts) == set(seconds) and len(set(seconds)) == 1

