"""DALLE-pytorch checkpoints load into this engine with DALLE-pytorch's logits.

The fixtures (tests/fixtures/dalle_pytorch, built by its make_fixtures.py) are tiny DALLE-pytorch 1.6.6 models (one
with 1.4.2's conv_like; two with a tiny VQGanVAE or OpenAIDiscreteVAE instead of a DiscreteVAE, with the codes those
give fixed images) saved as train_dalle.py saves them, with DALLE-pytorch's own logits for fixed captions and image
codes. Tolerance: 1e-5 relative and absolute on fp32 logits of magnitude ~1-10 (measured: < 5e-7); checkpoints
stored in fp16 are compared with DALLE-pytorch's logits of the same fp16 weights up-cast to fp32, so the same
tolerance holds.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.io.checkpoint import CheckpointError, save_dalle
from engine.io.dalle_pytorch import is_dalle_pytorch_checkpoint, load_dalle_pytorch
from engine.io.unpickle import UnsafePickleError, safe_load

FIXTURES = Path(__file__).parent / "fixtures" / "dalle_pytorch"
TOKENIZER = dict(bpe_path=FIXTURES / "tokenizer.json", hug=True)
NAMES = ["rotary_shift_mixed", "fp16_shared", "v142_reversible_conv"]
REFERENCE = load_file(FIXTURES / "reference.safetensors")
VQGAN_YAML = FIXTURES / "vqgan.yaml"


def load(path, **kwargs):
    return load_dalle_pytorch(path, **TOKENIZER, **kwargs)


def resave(tmp_path: Path, name: str, edit) -> Path:
    """A copy of fixture ``name`` after ``edit(checkpoint_dict)``."""
    ckpt = safe_load(FIXTURES / f"{name}.pt")
    edit(ckpt)
    path = tmp_path / f"{name}.pt"
    torch.save(ckpt, path)
    return path


def assert_reference_logits(model, name: str) -> None:
    text, codes = REFERENCE[f"{name}.text"], REFERENCE[f"{name}.codes"]
    model.eval()
    with torch.no_grad():
        for logits, expected in ((model(text, codes), REFERENCE[f"{name}.logits"]),
                                 (model(text, codes[:, :7]), REFERENCE[f"{name}.logits_partial"])):
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_same_logits_as_dalle_pytorch(name):
    ckpt = load(FIXTURES / f"{name}.pt")
    assert_reference_logits(ckpt.model, name)
    images = REFERENCE[f"{name}.images"]
    assert torch.equal(ckpt.model.vae.get_codebook_indices(images), REFERENCE[f"{name}.codes"])
    assert all(p.dtype == torch.float32 for p in ckpt.model.state_dict().values())


@pytest.mark.parametrize("name", NAMES)
def test_config_follows_hparams(name):
    stored = safe_load(FIXTURES / f"{name}.pt")
    ckpt = load(FIXTURES / f"{name}.pt")
    config, hparams = ckpt.model.config, stored["hparams"]
    for key in ("num_text_tokens", "text_seq_len", "dim", "depth", "heads", "dim_head", "reversible", "stable",
                "attn_types", "shift_tokens", "rotary_emb", "share_input_output_emb", "loss_img_weight"):
        assert getattr(config, key) == hparams[key], key
    for key in ("shared_attn_ids", "shared_ff_ids"):  # the same grouping of layers, as ints
        ids = hparams[key]
        if ids is None:
            assert getattr(config, key) is None
        else:
            ours = getattr(config, key)
            assert [ours.index(i) for i in ours] == [ids.index(i) for i in ids]
    assert config.sandwich_norm == hparams.get("sandwich_norm", False)
    assert (config.num_image_tokens, config.image_fmap_size) == (16, 4)
    assert config.conv_centered == (stored["version"] == "1.4.2")
    assert ckpt.extra == {"dalle_pytorch_version": stored["version"], "epoch": 0, "vae_class_name": "DiscreteVAE"}
    captions = [ckpt.tokenizer.decode(row) for row in REFERENCE[f"{name}.text"]]
    assert [ckpt.tokenizer.tokenize([c], config.text_seq_len)[0].tolist() for c in captions] == \
        REFERENCE[f"{name}.text"].tolist()


def test_older_layouts_and_missing_metadata(tmp_path):
    """Before 1.1.6 no version or VAE class; before August 2021 no rotary/shift hparams; before 1.1.2 the rotary
    table is (1, 1, seq, rot) without its last row; axial_positional_embedding 0.2 names its tables weights_0/1."""

    def strip(ckpt):
        for key in ("version", "vae_class_name"):
            del ckpt[key]
        for key in ("shift_tokens", "rotary_emb"):
            del ckpt["hparams"][key]
        weights = ckpt["weights"]
        if "transformer.pos_emb" in weights:
            weights["transformer.pos_emb"] = weights["transformer.pos_emb"][:, None, :-1]
        for i in (0, 1):
            if f"image_pos_emb.weights.{i}" in weights:
                weights[f"image_pos_emb.weights_{i}"] = weights.pop(f"image_pos_emb.weights.{i}")

    path = resave(tmp_path, "rotary_shift_mixed", strip)
    assert load(path).model.config.conv_centered  # no version: older than 1.5.0
    ckpt = load(path, conv_centered=False)
    assert (ckpt.model.config.rotary_emb, ckpt.model.config.shift_tokens) == (True, True)
    assert_reference_logits(ckpt.model, "rotary_shift_mixed")

    ckpt = load(resave(tmp_path, "fp16_shared", strip))
    assert (ckpt.model.config.rotary_emb, ckpt.model.config.shift_tokens) == (False, False)
    assert_reference_logits(ckpt.model, "fp16_shared")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    gone = "transformer.layers.layers.2.1.fn.norm.bias"
    path = resave(tmp_path, "rotary_shift_mixed", lambda c: c["weights"].pop(gone))
    with pytest.raises(CheckpointError, match=r"missing \['transformer\.layers\.2\.ff\.norm\.bias'\]"):
        load(path)
    extra = "transformer.layers.layers.0.0.fn.fn.fn.fn.fn.to_k.weight"
    path = resave(tmp_path, "rotary_shift_mixed", lambda c: c["weights"].update({extra: torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=rf"unexpected \['{extra}'\]"):
        load(path)


def test_shared_weights_must_be_shared(tmp_path):
    def unshare(ckpt):  # layers 0 and 2 share attention id "0"
        key = "transformer.layers.layers.2.0.fn.fn.fn.to_qkv.weight"
        ckpt["weights"][key] = ckpt["weights"][key] + 1

    with pytest.raises(CheckpointError, match="should be one shared tensor"):
        load(resave(tmp_path, "fp16_shared", unshare))


def test_hparams_the_engine_cannot_build(tmp_path):
    path = resave(tmp_path, "fp16_shared", lambda c: c["hparams"].update(attn_types=("sparse",)))
    with pytest.raises(CheckpointError, match="sparse"):
        load(path)
    path = resave(tmp_path, "fp16_shared", lambda c: c["hparams"].update(ff_mult=4))
    with pytest.raises(CheckpointError, match="ff_mult"):
        load(path)


def test_tokenizer_must_match_the_vocabulary():
    # The default is CLIP's 49,408-token BPE (or, where it is not installed, an error naming --bpe_path).
    with pytest.raises((CheckpointError, FileNotFoundError), match="--bpe_path"):
        load_dalle_pytorch(FIXTURES / "fp16_shared.pt")


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def test_code_in_the_pickle_is_refused(tmp_path):
    path = resave(tmp_path, "fp16_shared", lambda c: c.update(opt_state=_RunsCode()))
    with pytest.raises(UnsafePickleError, match="os.system|posix.system"):
        load(path)
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()


def make_deepspeed_dir(tmp_path: Path, name: str, zero_stage: int) -> Path:
    """train_dalle.py's DeepSpeed output for ``<tmp_path>/dalle.pt``: auxiliary.pt with the metadata, a `latest` tag
    and the tag's model states (the module's state dict under "module", plus the client state), laid out as
    DeepSpeed 0.19.8 writes them."""
    ckpt = safe_load(FIXTURES / f"{name}.pt")
    folder = tmp_path / "dalle-ds-cp"
    (folder / "global_step3").mkdir(parents=True)
    meta = {k: ckpt[k] for k in ("hparams", "vae_params", "epoch", "version", "vae_class_name")}
    torch.save({**meta, "weights": "To get a working standard checkpoint, look into consolidating DeepSpeed "
                                   "checkpoints."}, folder / "auxiliary.pt")
    (folder / "latest").write_text("global_step3")
    states = {"module": ckpt["weights"], "buffer_names": ["transformer.pos_emb"], "optimizer": None,
              "param_shapes": [{k: v.shape for k, v in ckpt["weights"].items()}], "frozen_param_shapes": None,
              "shared_params": {}, "lr_scheduler": None, "skipped_steps": 0, "global_steps": 3, "global_samples": 12,
              "dp_world_size": 1, "mp_world_size": 1,
              "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
              "ds_config": {"train_batch_size": 4, "fp16": {"enabled": True},
                            "zero_optimization": {"stage": zero_stage}},
              "ds_version": "0.19.8", **meta}
    torch.save(states, folder / "global_step3" / "mp_rank_00_model_states.pt")
    return folder


def test_deepspeed_folder(tmp_path):
    folder = make_deepspeed_dir(tmp_path, "rotary_shift_mixed", zero_stage=1)
    for path in (folder, tmp_path / "dalle.pt", folder / "auxiliary.pt"):  # dalle.pt itself does not exist
        assert is_dalle_pytorch_checkpoint(path)
        ckpt = load(path)
        assert ckpt.extra["deepspeed_tag"] == "global_step3"
        assert_reference_logits(ckpt.model, "rotary_shift_mixed")


def test_deepspeed_zero_2_and_3_point_to_zero_to_fp32(tmp_path):
    folder = make_deepspeed_dir(tmp_path, "rotary_shift_mixed", zero_stage=2)
    with pytest.raises(CheckpointError, match="ZeRO stage 2.*zero_to_fp32"):
        load(folder)
    step = folder / "global_step3"
    (step / "mp_rank_00_model_states.pt").rename(step / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="ZeRO stage 3.*zero_to_fp32"):
        load(folder)


def test_dispatch_and_conversion(tmp_path):
    ckpt = load(FIXTURES / "fp16_shared.pt")
    out = tmp_path / "dalle.safetensors"
    save_dalle(out, ckpt.model, ckpt.tokenizer, extra=ckpt.extra)  # what `python -m engine.convert` writes
    assert is_dalle_pytorch_checkpoint(FIXTURES / "fp16_shared.pt")
    assert not is_dalle_pytorch_checkpoint(out)
    assert not is_dalle_pytorch_checkpoint(tmp_path / "absent.pt")


def enlarge(images: torch.Tensor) -> torch.Tensor:
    """A reference's [0, 255] 32x32 images -> the 256 px images its codes are for, as make_fixtures.py enlarges them."""
    return images.float().div(255).repeat_interleave(8, 2).repeat_interleave(8, 3)


def assert_vae_is_the_source(ckpt, name: str, prefix: str) -> None:
    """The loaded VAE holds exactly the fixture's VAE weights (under ``prefix``, less taming's training losses) and
    gives the codes the source VAE gave the reference images."""
    stored = safe_load(FIXTURES / f"{name}.pt")["weights"]
    expected = {k[len(prefix):]: v for k, v in stored.items()
                if k.startswith(prefix) and not k.startswith(f"{prefix}loss.")}
    loaded = ckpt.model.vae.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    codes = ckpt.model.vae.get_codebook_indices(enlarge(REFERENCE[f"{name}.images"]))
    assert torch.equal(codes, REFERENCE[f"{name}.codes"])


def test_vqgan_model(tmp_path):
    """A VQGanVAE model: the taming module under vae.model. (with some of its training losses' tensors), its config
    from --vqgan_config_path at DALLE-pytorch's 256 px: a 64x downsampling gives a 4x4 grid."""
    from engine.codecs.vqgan import VQGanConfig

    ckpt = load(FIXTURES / "vqgan_f64.pt", vqgan_config_path=VQGAN_YAML)
    assert ckpt.model.vae.config == VQGanConfig.from_yaml(VQGAN_YAML, image_size=256)
    assert (ckpt.model.config.num_image_tokens, ckpt.model.config.image_fmap_size) == (16, 4)
    assert ckpt.extra["vae_class_name"] == "VQGanVAE"
    assert_reference_logits(ckpt.model, "vqgan_f64")  # given codes, the logits do not depend on the VAE
    assert_vae_is_the_source(ckpt, "vqgan_f64", "vae.model.")
    # Without the yaml: DALLE-pytorch's default f16-1024 VQGAN, which the tiny weights do not fit.
    with pytest.raises(CheckpointError, match="--vqgan_config_path"):
        load(FIXTURES / "vqgan_f64.pt")
    # Before 1.1.6 the class is not named; vae.model. keys tell it.
    ckpt = load(resave(tmp_path, "vqgan_f64", lambda c: c.pop("vae_class_name")), vqgan_config_path=VQGAN_YAML)
    assert ckpt.extra["vae_class_name"] == "VQGanVAE"
    assert_reference_logits(ckpt.model, "vqgan_f64")


def test_openai_dvae_model(tmp_path):
    """An OpenAIDiscreteVAE model: dall_e's modules under vae.enc. / vae.dec., the dVAE's sizes read from them, its
    image size DALLE-pytorch's 256 px: a 32x32 grid, 1,032 positions, of which the reference keeps 48 + 16."""
    from engine.codecs.openai_dvae import OpenAIDVAEConfig

    def assert_logits(model):
        model.eval()
        with torch.no_grad():
            logits = model(REFERENCE["openai_dvae.text"], REFERENCE["openai_dvae.codes"])
        assert logits.shape[1] == 1032
        head, tail = REFERENCE["openai_dvae.logits_head"], REFERENCE["openai_dvae.logits_tail"]
        torch.testing.assert_close(logits[:, :head.shape[1]], head, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[:, -tail.shape[1]:], tail, rtol=1e-5, atol=1e-5)

    ckpt = load(FIXTURES / "openai_dvae.pt")
    assert ckpt.model.vae.config == OpenAIDVAEConfig(n_hid=4, n_blk_per_group=2, vocab_size=32, n_init=8,
                                                     group_count=4, image_size=256)
    assert (ckpt.model.config.num_image_tokens, ckpt.model.config.image_fmap_size) == (32, 32)
    assert ckpt.extra["vae_class_name"] == "OpenAIDiscreteVAE"
    assert_logits(ckpt.model)
    assert_vae_is_the_source(ckpt, "openai_dvae", "vae.")
    # Before 1.1.6 the class is not named; no vae_params and no vae.model. keys tell it.
    ckpt = load(resave(tmp_path, "openai_dvae", lambda c: c.pop("vae_class_name")))
    assert ckpt.extra["vae_class_name"] == "OpenAIDiscreteVAE"
    assert_logits(ckpt.model)


def test_openai_dvae_config_is_read_from_the_weights():
    from engine.codecs.openai_dvae import OpenAIDiscreteVAE, OpenAIDVAEConfig
    from engine.io.dalle_pytorch import openai_config

    config = OpenAIDVAEConfig(n_hid=8, n_blk_per_group=3, vocab_size=16, n_init=12, group_count=3, image_size=256)
    weights = {f"vae.{k}": t for k, t in OpenAIDiscreteVAE(config).state_dict().items()}
    assert openai_config(weights, OpenAIDVAEConfig, "dalle.pt") == config
    del weights["vae.dec.blocks.input.w"]
    with pytest.raises(CheckpointError, match="vae.dec.blocks.input.w"):
        openai_config(weights, OpenAIDVAEConfig, "dalle.pt")


def test_generate_and_train_accept_a_dalle_pt(tmp_path):
    """The command-line tools take a DALLE-pytorch dalle.pt wherever they take a checkpoint: generate.py samples it,
    train.py fine-tunes it into this engine's format, and engine.convert converts it once."""
    import generate
    import train
    from engine import convert
    from engine.io.checkpoint import load_dalle

    source = FIXTURES / "rotary_shift_mixed.pt"
    tokenizer = ["--bpe_path", str(FIXTURES / "tokenizer.json"), "--hug"]
    generate.main(["--dalle_path", str(source), "--text", "a red cube", "--num_images", "2", "--seed", "0",
                   "--outputs_dir", str(tmp_path / "out"), *tokenizer])
    assert sorted(p.name for p in (tmp_path / "out" / "a_red_cube").glob("[0-9]*.jpg")) == ["0.jpg", "1.jpg"]

    convert.main(["dalle_pytorch", "--dalle_path", str(source), *tokenizer, "--out", str(tmp_path / "c.safetensors")])
    converted = load_dalle(tmp_path / "c.safetensors")
    assert converted.extra["converted_from"] == str(source.resolve())
    assert_reference_logits(converted.model, "rotary_shift_mixed")

    train.main(["--dalle_path", str(source), *tokenizer, "--num_samples", "8", "--batch_size", "4", "--epochs", "1",
                "--dalle_output_file_name", str(tmp_path / "tuned"), "--num_workers", "0", "--truncate_captions"])
    tuned = load_dalle(tmp_path / "tuned.safetensors")
    assert tuned.extra["progress"]["step"] == 2 and tuned.model.config == converted.model.config
