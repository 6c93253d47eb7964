"""Bad input to the command-line scripts, as a new user or an attacker would give it: every case ends in a one-line
error before work starts, a counted skip, or a success; never a traceback, never a false success, never lost work.

A script's top level prints a traceback for any exception but SystemExit, so calling `main` in process and accepting
only SystemExit is the same check; a few cases also run as real processes, with stderr checked for a traceback.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from test_training import COLOURS, TINY_MODEL, png_bytes

import generate
import train
import train_clip
import train_vae
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.io.checkpoint import load_dalle, save_dalle, save_vae
from engine.train.run_lock import RunLock

ROOT = Path(__file__).resolve().parents[1]
READ_ONLY = "/proc/outputs"  # no process can create files in /proc, root included (a chmod would not stop root)
TINY_VAE = ["--image_size", "16", "--num_tokens", "16", "--num_layers", "2", "--emb_dim", "8", "--hidden_dim", "8",
            "--batch_size", "4", "--num_workers", "0", "--sample_every_n_steps", "0"]
TINY_CLIP = ["--dim_text", "32", "--dim_image", "32", "--dim_latent", "16", "--text_enc_depth", "1",
             "--visual_enc_depth", "1", "--text_heads", "1", "--visual_heads", "1", "--text_seq_len", "12",
             "--visual_image_size", "16", "--visual_patch_size", "8", "--num_workers", "0", "--bpe_vocab_size", "300"]


def refused(main, argv: list[str], capsys) -> str:
    """Run a script's main, which must stop with a one-line message: ours (SystemExit("error: ...")) or argparse's
    (exit 2, the message on stderr's last line). Any other exception fails the test: it would be a traceback."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    code = stop.value.code
    if isinstance(code, str):
        assert code.startswith("error: ") and "\n" not in code, code
        return code
    assert code == 2, code
    return capsys.readouterr().err.strip().splitlines()[-1]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current folder holding a tiny VAE and a folder of 12 captioned images."""
    monkeypatch.chdir(tmp_path)
    save_vae(tmp_path / "vae.safetensors", DiscreteVAE(DiscreteVAEConfig(
        image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8)))
    data = tmp_path / "data"
    data.mkdir()
    for i, (name, colour) in enumerate(list(COLOURS.items()) * 4):
        (data / f"{i}.png").write_bytes(png_bytes(colour))
        (data / f"{i}.txt").write_text(f"a {name} square\n")
    return tmp_path


def folder_run(*flags: str) -> list[str]:
    return ["--image_text_folder", "data", "--vae_path", "vae.safetensors", "--batch_size", "4", "--epochs", "1",
            *TINY_MODEL, *flags]


# --- flags: an argparse error before anything is read or written --------------------------------------------------

TRAIN_FLAGS = [
    (["--batch_size", "0"], "--batch_size"),
    (["--ga_steps", "0"], "--ga_steps"),
    (["--batch_size", "6", "--ga_steps", "4"], "divisible"),
    (["--save_every_n_steps", "0"], "--save_every_n_steps"),
    (["--log_every_n_steps", "0"], "--log_every_n_steps"),
    (["--keep_n_checkpoints", "0"], "--keep_n_checkpoints"),
    (["--random_resize_crop_lower_ratio", "-1"], "--random_resize_crop_lower_ratio"),
    (["--random_resize_crop_lower_ratio", "1.5"], "--random_resize_crop_lower_ratio"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--learning_rate", "-1e-3"], "--learning_rate"),
    (["--clip_grad_norm", "inf"], "--clip_grad_norm"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--device", "meta"], "--device"),
    (["--device", "nonsense"], "--device"),
    (["--device", "cuda:7"], "--device"),
    (["--num_workers", "-1"], "--num_workers"),
    (["--bpe_vocab_size", "0"], "--bpe_vocab_size"),
    (["--dim", "0"], "dim"),
    (["--attn_types", "full,bogus"], "bogus"),
    (["--ff_dropout", "2"], "ff_dropout"),
    (["--fp16", "--bf16"], "--fp16"),
    (["--warmup_steps", "-1"], "--warmup_steps"),
    (["--lr_schedule", "linear"], "--lr_schedule"),
    (["--lr_decay", "--lr_schedule", "cosine"], "--lr_decay"),
    (["--lr_decay", "--warmup_steps", "10"], "--lr_decay"),
    (["--wds", "jpg"], "--wds"),
    (["--dalle_output_file_name", f"{READ_ONLY}/dalle"], "--dalle_output_file_name"),
    (["--dalle_output_file_name", "vae.safetensors/dalle"], "not a folder"),
    (["--output_dir", READ_ONLY], "--output_dir"),
    (["--image_text_folder", "missing"], "--image_text_folder"),
    (["--image_text_folder", "vae.safetensors"], "not a folder"),
    (["--image_text_folder", "missing.tar", "--wds", "jpg,txt"], "does not exist"),
    (["--deepspeed_config", "vae.safetensors"], "not a readable JSON file"),
    (["--deepspeed_config", "data/0.txt"], "not a readable JSON file"),
]


@pytest.mark.parametrize("flags, message", TRAIN_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_FLAGS])
def test_train_flags(workdir, capsys, flags, message):
    before = files_under(workdir)
    assert message in refused(train.main, folder_run(*flags), capsys)
    assert files_under(workdir) == before


@pytest.mark.parametrize("flags, message", [
    (["--image_size", "33"], "power of two"),  # the built-in shapes' VAE
    (["--vae_steps", "0"], "--vae_steps"),
    (["--num_samples", "0"], "--num_samples"),
    (["--sample_every_n_steps", "-1"], "--sample_every_n_steps"),
])
def test_train_shapes_flags(workdir, capsys, flags, message):
    assert message in refused(train.main, [*TINY_MODEL, *flags], capsys)
    assert not (workdir / "dalle.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size"),
    (["--epochs", "0"], "--epochs"),
    (["--image_size", "24"], "power of two"),
    (["--num_layers", "5"], "too small"),
    (["--lr_decay_rate", "0"], "--lr_decay_rate"),
    (["--starting_temp", "0.1"], "--temp_min"),
    (["--anneal_rate", "-1"], "--anneal_rate"),
    (["--save_every_n_steps", "0"], "--save_every_n_steps"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--device", "meta"], "--device"),
    (["--vae_output_file_name", f"{READ_ONLY}/vae"], "--vae_output_file_name"),
    (["--image_folder", "missing"], "--image_folder"),
])
def test_train_vae_flags(workdir, capsys, flags, message):
    before = files_under(workdir)
    assert message in refused(train_vae.main, ["--image_folder", "data", "--vae_output_file_name", "v",
                                               *TINY_VAE, *flags], capsys)
    assert files_under(workdir) == before


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size"),
    (["--ga_steps", "0"], "--ga_steps"),
    (["--epochs", "-1"], "--epochs"),
    (["--eval_samples", "-1"], "--eval_samples"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--device", "meta"], "--device"),
    (["--clip_output_file_name", f"{READ_ONLY}/clip"], "--clip_output_file_name"),
])
def test_train_clip_flags(workdir, capsys, flags, message):
    before = files_under(workdir)
    assert message in refused(train_clip.main, [*TINY_CLIP, *flags], capsys)
    assert files_under(workdir) == before


@pytest.fixture
def dalle_ckpt(workdir):
    """A tiny trained DALL-E, 1 epoch of 3 steps, with its training state."""
    train.main(folder_run("--output_dir", "first-logs"))
    return workdir / "dalle.safetensors"


@pytest.mark.parametrize("flags, message", [
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--device", "meta"], "--device"),
    (["--outputs_dir", READ_ONLY], "--outputs_dir"),
])
def test_generate_flags(dalle_ckpt, capsys, flags, message):
    out = dalle_ckpt.parent / "out"
    argv = ["--dalle_path", str(dalle_ckpt), "--text", "a red square", "--num_images", "1", "--outputs_dir", str(out)]
    assert message in refused(generate.main, [*argv, *flags], capsys)
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--images_per_prompt", "0"], "--images_per_prompt"),
    (["--top_k", "1.5"], "--top_k"),
    (["--temperature", "0"], "--temperature"),
    (["--seed", "-1"], "--seed"),
    (["--device", "meta"], "--device"),
    (["--json", f"{READ_ONLY}/eval.json"], "--json"),
    (["--dalle_path", "data/0.png"], "0.png"),
    (["--clip_path", "vae.safetensors"], "'vae'"),
])
def test_eval_demo_flags(dalle_ckpt, capsys, flags, message):
    from engine import eval_demo

    assert message in refused(eval_demo.main, ["--dalle_path", str(dalle_ckpt), *flags], capsys)


# --- runs that would train nothing, or lie about it ---------------------------------------------------------------


def test_more_batch_than_data_is_an_error_before_training(workdir, capsys):
    message = refused(train.main, folder_run("--batch_size", "64"), capsys)
    assert "--batch_size 64" in message and "only 12" in message
    assert not (workdir / "dalle.safetensors").exists() and "wrote" not in capsys.readouterr().out
    assert "only 12" in refused(train_vae.main, ["--image_folder", "data", *TINY_VAE, "--batch_size", "64"], capsys)
    assert not (workdir / "vae-logs" / "metrics.jsonl").exists()


def test_resuming_a_finished_run_is_an_error_not_a_false_success(dalle_ckpt, capsys):
    capsys.readouterr()
    saved = dalle_ckpt.read_bytes()
    message = refused(train.main, folder_run("--dalle_path", str(dalle_ckpt)), capsys)
    assert "already trained 1 epochs" in message and "--epochs" in message
    assert "wrote" not in capsys.readouterr().out and dalle_ckpt.read_bytes() == saved


def test_a_run_with_no_good_sample_is_an_error(workdir, capsys):
    for image in (workdir / "data").glob("*.png"):
        image.write_bytes(b"not an image")
    message = refused(train.main, folder_run(), capsys)
    assert "no optimizer step" in message and "12 bad samples" in message
    assert not (workdir / "dalle.safetensors").exists()
    message = refused(train_vae.main, ["--image_folder", "data", "--vae_output_file_name", "v", *TINY_VAE], capsys)
    assert "12 unreadable images" in message and not (workdir / "v.safetensors").exists()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, capsys):
    # Adam's steps are about the learning rate in size: 1e30 overflows the logits from the second step on.
    message = refused(train.main, folder_run("--learning_rate", "1e30", "--epochs", "3", "--save_every_n_steps", "1",
                                             "--batch_size", "2"), capsys)
    assert "loss became" in message and ("nan" in message or "inf" in message)
    step = int(message.split("keeps step ")[1].split(".")[0])
    ckpt = load_dalle(workdir / "dalle.safetensors")  # loads: its weights are all finite
    assert ckpt.extra["progress"]["step"] == step
    assert all(math.isfinite(r["loss"]) for r in map(json.loads, (workdir / "dalle-logs" / "metrics.jsonl")
                                                     .read_text().splitlines()))


def test_damaged_training_progress_is_an_error(dalle_ckpt, capsys):
    ckpt = load_dalle(dalle_ckpt)
    save_dalle(dalle_ckpt, ckpt.model, ckpt.tokenizer, extra={**ckpt.extra, "progress": {"step": "x"}}, aux=ckpt.aux)
    message = refused(train.main, folder_run("--dalle_path", str(dalle_ckpt), "--epochs", "2"), capsys)
    assert "progress is damaged" in message


@pytest.mark.parametrize("content", ["[1, 2]", '"text"'])
def test_checkpoint_whose_config_is_not_a_mapping(dalle_ckpt, capsys, content):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(dalle_ckpt, "pt") as f:
        metadata = f.metadata()
    save_file(load_file(dalle_ckpt), dalle_ckpt, metadata={**metadata, "config": content})
    assert "--dalle_path" in refused(train.main, folder_run("--dalle_path", str(dalle_ckpt), "--epochs", "2"), capsys)
    assert "--dalle_path" in refused(generate.main, ["--dalle_path", str(dalle_ckpt), "--text", "a red square",
                                                     "--outputs_dir", "out"], capsys)


def test_nan_weights_are_refused_by_generate_and_train(dalle_ckpt, capsys):
    ckpt = load_dalle(dalle_ckpt)
    with torch.no_grad():
        ckpt.model.to_logits[1].weight[0, 0] = math.nan
    save_dalle(dalle_ckpt, ckpt.model, ckpt.tokenizer, extra=ckpt.extra, aux=ckpt.aux)
    for main, argv in ((generate.main, ["--text", "a red square", "--outputs_dir", "out"]),
                       (train.main, folder_run("--epochs", "2"))):
        assert "to_logits.1.weight" in refused(main, ["--dalle_path", str(dalle_ckpt), *argv], capsys)
    assert not Path("out").exists()


# --- concurrent and killed runs -------------------------------------------------------------------------------------


def test_a_second_run_with_the_same_name_is_refused(workdir, capsys):
    lock = RunLock(workdir / ".dalle.safetensors.lock").acquire()  # as a live run holds it
    try:
        message = refused(train.main, folder_run(), capsys)
    finally:
        lock.release()
    assert "another run" in message and f"process {os.getpid()}" in message
    assert not (workdir / "dalle.safetensors").exists() and not (workdir / "dalle-logs" / "metrics.jsonl").exists()
    lock = RunLock(workdir / "shared-logs" / ".lock").acquire()  # another name, but the same --output_dir
    try:
        assert "another run" in refused(train.main, folder_run("--output_dir", "shared-logs"), capsys)
    finally:
        lock.release()


def test_stale_temporaries_go_and_resumed_metrics_do_not_repeat(dalle_ckpt, capsys):
    stale = dalle_ckpt.parent / ".dalle.safetensors.k1ll3d.tmp"  # what a kill -9 mid-save leaves
    stale.write_bytes(b"partial")
    log = dalle_ckpt.parent / "first-logs" / "metrics.jsonl"
    records = log.read_text().splitlines()
    # Steps logged after the last save, by a run killed before its next one, and a half-written line.
    log.write_text("\n".join(records) + "\n" + json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    train.main(folder_run("--dalle_path", str(dalle_ckpt), "--epochs", "2", "--output_dir", "first-logs"))
    assert not stale.exists()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_get_the_usual_file_mode(dalle_ckpt):
    umask = os.umask(0)
    os.umask(umask)
    assert dalle_ckpt.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (dalle_ckpt.parent / "vae.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# --- bad data: counted skips, never a crash -------------------------------------------------------------------------


def test_unreadable_caption_files_are_skipped_everywhere(workdir, capsys):
    data = workdir / "data"
    for name in ("0", "1", "2", "3"):
        (data / f"{name}.txt").unlink()
    (data / "0.txt").symlink_to("0.txt")  # a link loop
    (data / "1.txt").symlink_to("missing.txt")  # a dangling link
    (data / "2.txt").mkdir()  # a folder
    (data / "3.txt").write_bytes(b"\xff\xfe caf\xe9")  # not UTF-8
    (data / "4.txt").unlink()
    os.mkfifo(data / "4.txt")  # reading it would block for ever
    train.main(folder_run("--epochs", "2"))
    err = capsys.readouterr().err
    assert "skipped 5 unreadable captions while training the tokenizer" in err
    ckpt = load_dalle(workdir / "dalle.safetensors")
    assert ckpt.extra["progress"]["samples_skipped"] == 10  # 5 per epoch, counted by the training loop


def test_over_long_captions_are_skipped_counted_and_named(workdir, capsys):
    (workdir / "data" / "5.txt").write_text("a " * 40 + "square\n")
    train.main([flag for flag in folder_run("--epochs", "2") if flag != "--truncate_captions"])
    out = capsys.readouterr().out
    assert "caption longer than text_seq_len=12 tokens" in out and "5.txt" in out and "--truncate_captions" in out
    assert load_dalle(workdir / "dalle.safetensors").extra["progress"]["samples_skipped"] == 2


def test_webdataset_bad_json_captions_are_skipped_in_the_tokenizer_pass(workdir, capsys):
    with wds.TarWriter(str(workdir / "data.tar")) as sink:
        for i, (name, colour) in enumerate(list(COLOURS.items()) * 3):
            sink.write({"__key__": f"s{i}", "jpg": png_bytes(colour), "json": json.dumps({"caption": f"a {name}"})})
        sink.write({"__key__": "bad1", "jpg": png_bytes((1, 2, 3)), "json": b"{not json"})
        sink.write({"__key__": "bad2", "jpg": png_bytes((1, 2, 3)), "json": json.dumps(["a list"])})
        sink.write({"__key__": "bad3", "jpg": png_bytes((1, 2, 3))})
    train.main(["--image_text_folder", "data.tar", "--wds", "jpg,json", "--vae_path", "vae.safetensors",
                "--batch_size", "3", "--epochs", "1", *TINY_MODEL])
    captured = capsys.readouterr()
    assert "skipped 2 unreadable captions while training the tokenizer" in captured.err
    assert "image or caption missing" in captured.out and "unreadable caption" in captured.out
    assert load_dalle(workdir / "dalle.safetensors").extra["progress"]["samples_skipped"] == 3


def test_too_small_bpe_vocabulary(workdir, capsys):
    assert "--bpe_vocab_size" in refused(train.main, folder_run("--bpe_vocab_size", "5"), capsys)


# --- as real processes: no traceback on stderr ----------------------------------------------------------------------


@pytest.mark.parametrize("script, flags", [
    ("train.py", ["--seed", "99999999999999999999999"]),
    ("train.py", ["--batch_size", "64"]),
    ("train_vae.py", ["--image_folder", "data", "--batch_size", "0"]),
    ("train_clip.py", ["--device", "meta"]),
    ("generate.py", ["--dalle_path", "vae.safetensors", "--text", "a red square"]),
])
def test_no_traceback_from_a_real_process(workdir, script, flags):
    argv = folder_run(*flags) if script == "train.py" else flags
    run = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=workdir, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "error: " in run.stderr.strip().splitlines()[-1], run.stderr[-500:]
