import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import random_batch, tiny_config

import engine.io.checkpoint as checkpoint
from engine.codecs.tokenizers import SimpleTokenizer
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.io.checkpoint import CheckpointError, load_dalle, load_vae, save_dalle, save_vae
from engine.io.unpickle import UnsafePickleError
from engine.model.dalle import DALLE


def tiny_vae() -> DiscreteVAE:
    return DiscreteVAE(DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=17, codebook_dim=8, hidden_dim=8,
                                         num_resnet_blocks=1))


def tiny_dalle(**overrides) -> DALLE:
    vae = tiny_vae()
    return DALLE(tiny_config(num_image_tokens=vae.num_tokens, image_fmap_size=vae.fmap_size, **overrides), vae)


ROUND_TRIP_OPTIONS = [
    {},
    dict(rotary_emb=False, shift_tokens=False),
    dict(depth=4, shared_attn_ids=(0, 1), shared_ff_ids=(0,), attn_types=("full", "axial_row")),
    dict(share_input_output_emb=True, reversible=True),
    dict(sandwich_norm=True, stable=True, attn_types=("conv_like",), conv_centered=True),
]


@pytest.mark.parametrize("options", ROUND_TRIP_OPTIONS)
def test_round_trip_gives_identical_logits(tmp_path, options):
    model = tiny_dalle(**options).eval()
    with torch.no_grad():  # make LayerScale and VAE weights non-default so a missed tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "dalle.safetensors"
    save_dalle(path, model, extra={"epoch": 3})
    loaded = load_dalle(path)
    assert loaded.model.config == model.config and loaded.extra == {"epoch": 3}
    text, codes = random_batch(model.config)
    torch.testing.assert_close(loaded.model.eval()(text, codes), model(text, codes), rtol=0, atol=0)
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.model.vae.get_codebook_indices(images), model.vae.get_codebook_indices(images))


def test_shared_weights_stay_shared_after_loading(tmp_path):
    model = tiny_dalle(depth=4, shared_attn_ids=(0, 1))
    save_dalle(tmp_path / "m.safetensors", model)
    layers = load_dalle(tmp_path / "m.safetensors").model.transformer.layers
    assert layers[0].attn.fn is layers[2].attn.fn


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    tokenizer = SimpleTokenizer()
    model = tiny_dalle(num_text_tokens=tokenizer.vocab_size)
    save_dalle(tmp_path / "m.safetensors", model, tokenizer)
    loaded = load_dalle(tmp_path / "m.safetensors")
    assert loaded.tokenizer.kind == "clip"
    assert torch.equal(loaded.tokenizer.tokenize(["a red cube"], 5), tokenizer.tokenize(["a red cube"], 5))


def test_vae_round_trip(tmp_path):
    vae = tiny_vae()
    save_vae(tmp_path / "vae.safetensors", vae, extra={"step": 7})
    loaded = load_vae(tmp_path / "vae.safetensors")
    codes = torch.randint(0, 17, (2, 16))
    assert loaded.extra == {"step": 7} and torch.equal(loaded.model.decode(codes), vae.decode(codes))
    with pytest.raises(CheckpointError, match="expected a 'dalle'"):
        load_dalle(tmp_path / "vae.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_executes_no_pickle(tmp_path, monkeypatch):
    """A pickle is never run: a torch.save file, whatever its name, is only read as a DALLE-pytorch checkpoint,
    through the restricted unpickler, which refuses code by name."""
    monkeypatch.chdir(tmp_path)
    torch.save({"hparams": {}, "weights": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        load_dalle(tmp_path / "evil.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DALLE-pytorch dalle.pt"):
        load_dalle(tmp_path / "other.pt")
    (tmp_path / "evil.safetensors").write_bytes((tmp_path / "evil.pt").read_bytes())
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        load_dalle(tmp_path / "evil.safetensors")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("keep", [0, 7, 100, -50])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, keep):
    path = tmp_path / "m.safetensors"
    save_dalle(path, tiny_dalle())
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="truncated or corrupt|not a dalle-engine"):
        load_dalle(path)


def test_foreign_files_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a dalle-engine checkpoint"):
        load_dalle(tmp_path / "other.safetensors")
    (tmp_path / "noise.bin").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_dalle(tmp_path / "noise.bin")
    with pytest.raises(FileNotFoundError):
        load_dalle(tmp_path / "missing.safetensors")


def test_config_mismatch_is_a_clear_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    save_dalle(path, tiny_dalle())
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    config["depth"] = 3
    metadata["config"] = json.dumps(config)
    save_file(load_file(path), path, metadata=metadata)
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load_dalle(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = tiny_dalle()
    save_dalle(path, model, extra={"epoch": 1})

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_dalle(path, model, extra={"epoch": 2})
    assert load_dalle(path).extra == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


def test_kill_9_while_saving_never_destroys_the_checkpoint(tmp_path):
    """A writer killed at a random moment leaves a loadable checkpoint behind."""
    path = tmp_path / "m.safetensors"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import tiny_config
        from engine.io.checkpoint import save_dalle
        from engine.model.dalle import DALLE
        model = DALLE(tiny_config(dim=256, depth=4))
        step = 0
        while True:
            save_dalle({str(path)!r}, model, extra={{"step": step}})
            step += 1
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert proc.stdout.readline(), "writer died"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load_dalle(path).extra["step"] >= 2
