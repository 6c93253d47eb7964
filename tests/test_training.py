import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import run_deepspeed
from PIL import Image

import train
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.io.checkpoint import load_dalle, save_vae
from engine.model.config import GUIDED_COND_SCALE, NULL_COND_PROB
from engine.train.training import adam, scheduled_lr

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim_head", "16", "--text_seq_len", "12",
              "--attn_types", "full,axial_row", "--num_workers", "0", "--log_every_n_steps", "1",
              "--sample_every_n_steps", "0", "--bpe_vocab_size", "300", "--truncate_captions"]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


def png_bytes(colour, size=(20, 24), mode="RGB") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def vae_path(tmp_path):
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8))
    path = tmp_path / "vae.safetensors"
    save_vae(path, vae)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for i, (name, colour) in enumerate(list(COLOURS.items()) * 4):
        sub = root / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i}.png").write_bytes(png_bytes(colour, mode=("RGB", "L", "P", "RGBA")[i % 4]))
        (sub / f"{i}.txt").write_text(f"a {name} square\na picture of {name}\n")
    (root / "part0" / "bad.png").write_bytes(b"not an image at all")
    (root / "part0" / "bad.txt").write_text("a broken picture")
    (root / "part1" / "empty.png").write_bytes(png_bytes((0, 0, 0)))
    (root / "part1" / "empty.txt").write_text("\n\n")
    (root / "part1" / "lonely.png").write_bytes(png_bytes((9, 9, 9)))  # no caption: not paired
    return root


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_folder_training_skips_bad_samples(tmp_path, folder, vae_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--image_text_folder", str(folder), "--vae_path", str(vae_path), "--batch_size", "7",
                "--epochs", "2", "--output_dir", "logs", *TINY_MODEL])
    rows = metrics(tmp_path / "logs")
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows)  # 14 pairs, batches of 7, 2 epochs
    assert rows[-1]["samples_skipped"] == 6  # the corrupt image, the empty caption and the lonely image, twice
    ckpt = load_dalle(tmp_path / "dalle.safetensors")
    assert ckpt.extra["progress"]["step"] == 4 and ckpt.tokenizer is not None
    # trained with null captions by default, so sampling it is guided unless told otherwise
    assert ckpt.model.config.null_cond_prob == NULL_COND_PROB > 0
    assert ckpt.model.config.default_cond_scale == GUIDED_COND_SCALE > 1


def test_validation_on_held_out_pairs_is_logged(tmp_path, folder, vae_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--image_text_folder", str(folder), "--vae_path", str(vae_path), "--batch_size", "7",
                "--epochs", "3", "--output_dir", "logs", "--val_folder", str(folder), "--val_every_n_steps", "4",
                "--val_candidates", "3", *TINY_MODEL])
    val = [r for r in metrics(tmp_path / "logs") if "val/perplexity" in r]
    assert [r["step"] for r in val] == [4, 6]  # every 4 steps, and after the last (6)
    for r in val:
        assert r["val/pairs"] == 12 and 1 <= r["val/retrieval_mean_rank"] <= 3 and r["val/perplexity"] > 1
        assert 0 <= r["val/retrieval_top1"] <= 1
    with pytest.raises(SystemExit):
        train.parse_args(["--image_text_folder", str(folder), "--val_folder", str(tmp_path / "missing")])


def test_webdataset_training(tmp_path, vae_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        with wds.TarWriter(str(shards / f"data-{s:06d}.tar")) as sink:
            for i, (name, colour) in enumerate(COLOURS.items()):
                sink.write({"__key__": f"{s}_{i}", "jpg": png_bytes(colour), "json": json.dumps({"caption": name})})
            sink.write({"__key__": f"{s}_bad", "jpg": b"garbage", "json": json.dumps({"caption": "x"})})
    train.main(["--image_text_folder", str(shards / "data-{000000..000002}.tar"), "--wds", "jpg,json",
                "--vae_path", str(vae_path), "--batch_size", "4", "--epochs", "1", "--output_dir", "logs",
                *TINY_MODEL])
    rows = metrics(tmp_path / "logs")
    assert len(rows) == 3 and rows[-1]["samples_skipped"] == 3


def test_a_cosine_schedule_needs_data_of_known_length(tmp_path, vae_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with wds.TarWriter(str(tmp_path / "data.tar")) as sink:
        sink.write({"__key__": "0", "jpg": png_bytes((1, 2, 3)), "txt": b"a square"})
    with pytest.raises(SystemExit, match="--lr_schedule cosine needs the number of steps"):
        train.main(["--image_text_folder", "data.tar", "--wds", "jpg,txt", "--vae_path", str(vae_path),
                    "--batch_size", "1", "--lr_schedule", "cosine", *TINY_MODEL])


@pytest.mark.parametrize("warmup", [0, 5])
def test_learning_rate_schedules(warmup):
    total, base = 20, 1e-3
    for schedule in ("constant", "cosine"):
        rates = [scheduled_lr(base, s, total, warmup, schedule) for s in range(total)]
        assert rates[:warmup] == pytest.approx([base * (s + 1) / warmup for s in range(warmup)])
        after = rates[warmup:]
        if schedule == "constant":
            assert after == [base] * (total - warmup)
        else:  # from the full rate down to a tenth at the last step, never rising
            assert after[0] == pytest.approx(base) and after[-1] == pytest.approx(base / 10)
            assert all(a > b for a, b in zip(after, after[1:]))


def test_taming_vqgan_training_in_bf16(tmp_path, folder, monkeypatch):
    from test_unpickle import save_lightning_ckpt
    from test_vqgan import tiny_vae, write_yaml

    monkeypatch.chdir(tmp_path)
    save_lightning_ckpt(tmp_path / "last.ckpt", tiny_vae(gumbel=False).state_dict())
    train.main(["--image_text_folder", str(folder), "--taming", "--vqgan_model_path", str(tmp_path / "last.ckpt"),
                "--vqgan_config_path", str(write_yaml(tmp_path / "model.yaml", gumbel=False)), "--bf16",
                "--batch_size", "7", "--epochs", "1", "--output_dir", "logs", *TINY_MODEL])
    ckpt = load_dalle(tmp_path / "dalle.safetensors")
    assert type(ckpt.model.vae).__name__ == "VQGanVAE" and ckpt.model.config.image_fmap_size == 8
    assert len(metrics(tmp_path / "logs")) == 2


def test_taming_without_files_names_them(tmp_path, folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit, match=r"vqgan\.1024\.model\.ckpt.*--vqgan_model_path"):
        train.main(["--image_text_folder", str(folder), "--taming", *TINY_MODEL])


def test_empty_dataset_is_a_clear_error(tmp_path, vae_path, monkeypatch):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "lonely.png").write_bytes(png_bytes((1, 2, 3)))
    with pytest.raises(SystemExit, match="no captions found"):  # nothing to train a tokenizer on
        train.main(["--image_text_folder", str(tmp_path / "nothing"), "--vae_path", str(vae_path), *TINY_MODEL])
    tokenizer = Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1, "red": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tok.json"))
    with pytest.raises(SystemExit, match="no image.caption pairs"):
        train.main(["--image_text_folder", str(tmp_path / "nothing"), "--vae_path", str(vae_path),
                    "--bpe_path", str(tmp_path / "tok.json"), "--hug", *TINY_MODEL])


def test_keep_n_checkpoints_and_gradient_accumulation(tmp_path, folder, vae_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--image_text_folder", str(folder), "--vae_path", str(vae_path), "--batch_size", "6",
                "--ga_steps", "2", "--epochs", "3", "--save_every_n_steps", "1", "--keep_n_checkpoints", "2",
                "--bf16", "--lr_decay", "--output_dir", "logs", *TINY_MODEL])
    assert sorted(p.name for p in tmp_path.glob("dalle-step*.safetensors")) == [
        "dalle-step000000005.safetensors", "dalle-step000000006.safetensors"]
    assert load_dalle(tmp_path / "dalle.safetensors").extra["progress"]["step"] == 6  # 14 pairs // 6 x 3 epochs


def run_shapes(tmp_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), "--num_samples", "48", "--batch_size", "8", "--vae_steps", "2",
           "--epochs", "2", "--save_every_n_steps", "2", "--ff_dropout", "0.2", "--warmup_steps", "3",
           "--lr_schedule", "cosine", *TINY_MODEL, *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def test_resume_after_kill_9_continues_with_the_same_losses(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    assert run_shapes(whole).wait() == 0
    reference = losses(whole / "dalle-logs")
    assert len(reference) == 12  # 48 pairs / 8 = 6 steps per epoch
    rates = [r["lr"] for r in metrics(whole / "dalle-logs")]  # logged after each step, so step s ran at rates[s]
    assert rates == pytest.approx([scheduled_lr(3e-4, s, 12, 3, "cosine") for s in range(12)])

    proc = run_shapes(cut)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = cut / "dalle-logs" / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_dalle(cut / "dalle.safetensors").extra["progress"]["step"]
    assert 2 <= saved < 12

    # Resuming takes the VAE and tokenizer from the checkpoint, and continues mid-epoch where it stopped.
    assert run_shapes(cut, "--dalle_path", "dalle.safetensors").wait() == 0
    assert [r["step"] for r in metrics(cut / "dalle-logs")] == list(range(1, 13))  # no step logged twice
    resumed = losses(cut / "dalle-logs")
    for step in range(saved + 1, 13):  # the same losses, so the learning rates went on along the same curve
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert torch.equal(
        load_dalle(cut / "dalle.safetensors").model.to_logits[1].weight,
        load_dalle(whole / "dalle.safetensors").model.to_logits[1].weight,
    )


def test_deepspeed_two_processes_zero3_then_generate(tmp_path):
    """2 CPU processes (gloo), ZeRO-3 + bf16; the consolidated checkpoint feeds generate.py and a resume."""
    args = ["--zero_stage", "3", "--bf16", "--num_samples", "32", "--batch_size", "8", "--vae_steps", "2",
            "--epochs", "1", "--save_every_n_steps", "2", *TINY_MODEL]
    run_deepspeed(ROOT / "train.py", args, tmp_path)
    ckpt = load_dalle(tmp_path / "dalle.safetensors")
    assert ckpt.extra["progress"]["step"] == 4  # 32 pairs, 4 per rank per step
    assert sorted(p.name for p in (tmp_path / "dalle-ds-cp").glob("step*"))[-1] == "step000000004"
    subprocess.run([sys.executable, str(ROOT / "generate.py"), "--dalle_path", "dalle.safetensors", "--text",
                    "a red square", "--num_images", "2", "--outputs_dir", "out"], cwd=tmp_path, check=True,
                   capture_output=True)
    assert len(list((tmp_path / "out" / "a_red_square").glob("[0-9]*.jpg"))) == 2

    run_deepspeed(ROOT / "train.py", args + ["--epochs", "2", "--dalle_path", "dalle.safetensors"], tmp_path)
    assert load_dalle(tmp_path / "dalle.safetensors").extra["progress"]["step"] == 8


def test_adam_is_fused_on_a_cpu_and_steps_as_the_default():
    """Runs' Adam (torch's fused implementation on a CPU) against torch's default, float64: the same parameters."""
    torch.manual_seed(0)
    params = [torch.randn(5, 7, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                        requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    fused, default = adam(params, 1e-2), torch.optim.Adam(copies, lr=1e-2)
    assert fused.param_groups[0]["fused"] and not default.param_groups[0]["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for opt, group in ((fused, params), (default, copies)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    for got, want in zip(params, copies):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
