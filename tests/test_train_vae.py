import json
from pathlib import Path

import pytest
from PIL import Image

import train_vae
from engine.io.checkpoint import load_vae

TINY = ["--image_size", "16", "--num_tokens", "16", "--num_layers", "2", "--num_resnet_blocks", "1",
        "--emb_dim", "8", "--hidden_dim", "8", "--batch_size", "4", "--num_workers", "0",
        "--log_every_n_steps", "1", "--sample_every_n_steps", "2", "--kl_loss_weight", "0.01"]


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    for i in range(10):
        sub = root / f"nested{i % 3}" / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        mode = ("RGB", "L", "RGBA", "P", "CMYK")[i % 5]
        Image.new("RGB", (24 + i, 20), (25 * i, 255 - 20 * i, 90)).convert(mode).save(
            sub / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "notes.txt").write_text("not an image")
    return root


def losses(log: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


def test_train_vae_skips_bad_images_and_resumes_exactly(tmp_path, images, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_vae.main(["--image_folder", str(images), "--epochs", "2", "--vae_output_file_name", "whole/vae", *TINY])
    reference = losses(tmp_path / "whole" / "vae-logs" / "metrics.jsonl")
    assert len(reference) == 4  # 11 files, 10 images + 1 broken: 2 full batches of 4 per epoch

    train_vae.main(["--image_folder", str(images), "--epochs", "1", "--vae_output_file_name", "cut/vae", *TINY])
    train_vae.main(["--image_folder", str(images), "--epochs", "2", "--vae_output_file_name", "cut/vae",
                    "--vae_path", "cut/vae.safetensors", *TINY])
    resumed = losses(tmp_path / "cut" / "vae-logs" / "metrics.jsonl")
    assert resumed[3] == pytest.approx(reference[3]) and resumed[4] == pytest.approx(reference[4])

    ckpt = load_vae(tmp_path / "whole" / "vae.safetensors")
    assert ckpt.extra["progress"]["step"] == 4 and ckpt.model.fmap_size == 4
    assert ckpt.extra["progress"]["samples_skipped"] >= 1  # the broken file, when it fell in a full batch
    assert sorted(p.name for p in (tmp_path / "whole" / "vae-logs" / "samples").glob("*.jpg")) == [
        "step000000002.jpg", "step000000004.jpg"]


def test_train_vae_rejects_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        train_vae.main(["--image_folder", str(tmp_path / "empty"), *TINY])
