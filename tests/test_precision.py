"""The run's precision: the decision (flags x device), its flags, and where CPU runs print and record it."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_checkpoint import tiny_dalle

import generate
import train
import train_clip
import train_vae
from engine.codecs.tokenizers import YttmTokenizer
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.io.checkpoint import load_dalle, load_vae, save_dalle, save_vae
from engine.model.precision import (
    describe,
    gpu_bf16_supported,
    requested_precision,
    sampling_precision,
    training_precision,
)
from engine.train.training import deepspeed_config

TINY_DALLE = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim_head", "16", "--text_seq_len", "8",
              "--num_workers", "0", "--log_every_n_steps", "1", "--sample_every_n_steps", "0", "--bpe_vocab_size", "300",
              "--truncate_captions", "--batch_size", "4", "--epochs", "1", "--output_dir", "logs"]
TINY_VAE = ["--image_size", "16", "--num_tokens", "16", "--num_layers", "2", "--num_resnet_blocks", "0",
            "--emb_dim", "8", "--hidden_dim", "8", "--batch_size", "4", "--num_workers", "0", "--epochs", "1",
            "--log_every_n_steps", "1", "--sample_every_n_steps", "0"]

# (requested, device type, native bf16) -> precision
TRAINING = {
    ("auto", "cuda", True): "bf16", ("auto", "cuda", False): "fp16", ("auto", "cpu", False): "fp32",
    ("auto", "mps", False): "fp32",
    **{(flag, device, bf16): flag for flag in ("fp32", "bf16", "fp16")
       for device, bf16 in (("cuda", True), ("cuda", False), ("cpu", False))},
}


@pytest.mark.parametrize("requested, device_type, bf16", list(TRAINING))
def test_training_precision(requested, device_type, bf16):
    assert training_precision(requested, device_type, bf16) == TRAINING[requested, device_type, bf16]


@pytest.mark.parametrize("trained", [None, "fp32", "bf16", "fp16", "garbage"])
@pytest.mark.parametrize("bf16", [True, False])
def test_sampling_precision(trained, bf16):
    expected = "fp16" if trained == "fp16" else "bf16" if bf16 else "fp32"  # fp16 only for a model trained in it
    assert sampling_precision("auto", "cuda", bf16, trained) == expected
    assert sampling_precision("auto", "cpu", False, trained) == "fp32"  # CPU sampling unchanged
    for explicit in ("fp32", "bf16", "fp16"):
        assert sampling_precision(explicit, "cuda", bf16, trained) == explicit
        assert sampling_precision(explicit, "cpu", False, trained) == explicit


def test_no_bf16_off_a_gpu():
    assert not gpu_bf16_supported("cpu")


def test_describe_says_why():
    assert describe("bf16", "auto", "cuda") == "precision: bf16 autocast (default on this GPU; --fp32 to train in fp32)"
    assert describe("fp16", "auto", "cuda").startswith("precision: fp16 autocast with loss scaling (default on this "
                                                       "GPU, which lacks bf16")
    assert describe("fp32", "auto", "cpu") == "precision: fp32 (default on CPU)"
    assert describe("fp32", "fp32", "cuda") == "precision: fp32 (--fp32)"
    assert describe("bf16", "bf16", "cuda", deepspeed=True) == "precision: bf16 via DeepSpeed (--bf16)"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_config_takes_the_precision(precision):
    args = argparse.Namespace(batch_size=8, ga_steps=2, clip_grad_norm=0.5, zero_stage=2, deepspeed_overrides={})
    config = deepspeed_config(args, 4, precision)
    assert config["bf16"] == {"enabled": precision == "bf16"} and config["fp16"] == {"enabled": precision == "fp16"}


def test_requested_precision():
    p = argparse.ArgumentParser()
    for flag in ("--fp16", "--bf16", "--fp32"):
        p.add_argument(flag, action="store_true")
    assert requested_precision(p, p.parse_args([])) == "auto"
    assert requested_precision(p, p.parse_args(["--fp32"])) == "fp32"


CONFLICTS = [["--fp16", "--bf16"], ["--fp32", "--bf16"], ["--fp32", "--fp16"], ["--fp32", "--bf16", "--fp16"]]


@pytest.mark.parametrize("flags", CONFLICTS, ids=" ".join)
@pytest.mark.parametrize("script", [train, train_clip, train_vae])
def test_conflicting_precision_flags_are_an_argparse_error(script, flags, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    argv = ["--image_folder", "images", *flags] if script is train_vae else flags
    with pytest.raises(SystemExit) as e:
        script.parse_args(argv)
    assert e.value.code == 2
    named = [f for f in ("--fp16", "--bf16", "--fp32") if f in flags]
    assert "choose one of " + " and ".join(named) in capsys.readouterr().err


@pytest.mark.parametrize("script", [train, train_clip])
def test_each_flag_alone_parses(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert script.parse_args([]).precision == "auto"
    for name in ("fp32", "bf16", "fp16"):
        assert script.parse_args([f"--{name}"]).precision == name


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def pairs(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 60, 220))] * 2):
        Image.new("RGB", (16, 16), colour).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {name} square\n")
    return root


def test_cpu_training_prints_and_records_fp32(tmp_path, pairs, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_vae(tmp_path / "vae.safetensors", DiscreteVAE(DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=16,
                                                                         codebook_dim=8, hidden_dim=8)))
    train.main(["--image_text_folder", str(pairs), "--vae_path", "vae.safetensors", *TINY_DALLE])
    assert "precision: fp32 (default on CPU)" in capsys.readouterr().out
    rows = metrics(tmp_path / "logs" / "metrics.jsonl")
    assert rows and all(r["precision"] == "fp32" for r in rows)
    assert load_dalle(tmp_path / "dalle.safetensors").extra["precision"] == "fp32"


@pytest.mark.parametrize("flags, precision", [([], "fp32"), (["--fp16"], "fp16")])
def test_train_vae_prints_and_records_its_precision(tmp_path, pairs, monkeypatch, capsys, flags, precision):
    """--fp16 on a CPU too: autocast and a GradScaler whose state the checkpoint keeps."""
    monkeypatch.chdir(tmp_path)
    train_vae.main(["--image_folder", str(pairs), *TINY_VAE, *flags])
    assert f"precision: {'fp32 (default on CPU)' if not flags else 'fp16 autocast with loss scaling (--fp16)'}" in (
        capsys.readouterr().out)
    rows = metrics(tmp_path / "vae-logs" / "metrics.jsonl")
    assert rows and all(r["precision"] == precision and r["loss"] > 0 for r in rows)
    extra = load_vae(tmp_path / "vae.safetensors").extra
    assert extra["precision"] == precision and (extra["scaler"] is not None) == (precision == "fp16")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tokenizer = YttmTokenizer.train(["a red cube", "a blue ball"] * 20, vocab_size=30, model_path=folder / "bpe.model")
    torch.manual_seed(0)
    save_dalle(folder / "dalle.safetensors", tiny_dalle(num_text_tokens=tokenizer.vocab_size), tokenizer,
               extra={"precision": "fp16"})  # a GPU's default would follow it; a CPU's stays fp32
    return folder / "dalle.safetensors"


@pytest.mark.parametrize("flags, precision", [([], "fp32"), (["--precision", "bf16"], "bf16")])
def test_generate_records_its_precision(ckpt, tmp_path, flags, precision):
    generate.main(["--dalle_path", str(ckpt), "--text", "a red cube", "--num_images", "2", "--seed", "0",
                   "--device", "cpu", "--outputs_dir", str(tmp_path), *flags])
    settings = json.loads((tmp_path / "a_red_cube" / "settings.json").read_text())
    assert settings["precision"] == precision and len(settings["scores"]) == 2


def test_generate_refuses_an_unknown_precision(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--dalle_path", str(ckpt), "--text", "x", "--outputs_dir", str(tmp_path),
                             "--precision", "fp8"])
    assert "--precision" in capsys.readouterr().err


def test_eval_demo_records_its_precision(ckpt, tmp_path):
    from engine import eval_demo

    eval_demo.main(["--dalle_path", str(ckpt), "--images_per_prompt", "1", "--batch_size", "32", "--truncate_captions",
                    "--device", "cpu", "--precision", "bf16", "--json", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["precision"] == "bf16" and report["trained"]["accuracy"]["n"] == 12
