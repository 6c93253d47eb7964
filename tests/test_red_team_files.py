"""Bad checkpoint, pickle and tokenizer files, as a corrupted download or an attacker would make them.

Each case ends in its documented outcome and nothing else: the file loads exactly, or loading raises CheckpointError
(a ValueError), FileNotFoundError or UnsafePickleError, tokenizer bytes ValueError, with a message that names the
problem; the command-line tools print one ``error:`` line. Never another exception type, never pickled code run,
never a crashed interpreter (cases that could abort it or exhaust memory if a check regressed run in a subprocess).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from engine.codecs.tokenizers import HugTokenizer, tokenizer_from_bytes
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.io.checkpoint import (
    CheckpointError,
    canonical_names,
    load_clip,
    load_dalle,
    load_vae,
    save_clip,
    save_dalle,
    save_vae,
)
from engine.io.dalle_pytorch import is_dalle_pytorch_checkpoint
from engine.io.formats import file_format
from engine.io.unpickle import UnsafePickleError, safe_load
from engine.model.clip import CLIP, CLIPConfig
from engine.model.dalle import DALLE

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "dalle_pytorch"
DALLE_PYTORCH = dict(bpe_path=FIXTURES / "tokenizer.json", hug=True)
LOADERS: dict[str, Callable] = {"dalle": load_dalle, "clip": load_clip, "vae": load_vae}
QKV = "transformer.layers.0.attn.fn.to_qkv.weight"
CORPUS = [f"a {c} {s} on the {p}" for c in ("red", "blue") for s in ("cube", "cone") for p in ("table", "floor")]


# --- good files and the surgery that spoils them -------------------------------------------------------------------


def tiny_vae() -> DiscreteVAE:
    return DiscreteVAE(DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=17, codebook_dim=8, hidden_dim=8))


def hug_tokenizer() -> HugTokenizer:
    words = sorted({w for caption in CORPUS for w in caption.split()})
    tokenizer = HFTokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                             unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return HugTokenizer.from_bytes(tokenizer.to_str().encode())


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A tiny DALLE (with its VAE and tokenizer), CLIP and VAE checkpoint, with non-default weights."""
    folder = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    vae, tokenizer = tiny_vae(), hug_tokenizer()
    dalle = DALLE(tiny_config(num_text_tokens=tokenizer.vocab_size, num_image_tokens=17, image_fmap_size=4), vae)
    clip = CLIP(CLIPConfig(dim_text=16, dim_image=16, dim_latent=8, num_text_tokens=23, text_enc_depth=1,
                           text_seq_len=5, text_heads=1, visual_enc_depth=1, visual_heads=1, visual_image_size=16,
                           visual_patch_size=8))
    for model in (dalle, clip):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    save_dalle(folder / "dalle.safetensors", dalle, tokenizer, extra={"epoch": 1})
    save_clip(folder / "clip.safetensors", clip, tokenizer)
    save_vae(folder / "vae.safetensors", vae)
    return {"dalle": folder / "dalle.safetensors", "clip": folder / "clip.safetensors",
            "vae": folder / "vae.safetensors"}


def edited(src: Path, dst: Path, metadata: dict[str, str | None] | None = None,
           tensors: dict[str, torch.Tensor | None] | None = None) -> Path:
    """A copy of checkpoint ``src`` with metadata entries and tensors replaced (None: removed)."""
    with safe_open(src, "pt") as f:
        meta = {**f.metadata(), **(metadata or {})}
    stored = {**load_file(src), **(tensors or {})}
    save_file({k: v for k, v in stored.items() if v is not None}, dst,
              metadata={k: v for k, v in meta.items() if v is not None})
    return dst


def with_config(src: Path, dst: Path, key: str = "config", **changes) -> Path:
    with safe_open(src, "pt") as f:
        config = json.loads(f.metadata()[key])
    return edited(src, dst, {key: json.dumps({**config, **changes})})


def poisoned(src: Path, dst: Path, name: str, value: float, count: int = 1) -> Path:
    t = load_file(src)[name].clone()
    t.view(-1)[:count] = value
    return edited(src, dst, tensors={name: t})


def repadded(src: Path, dst: Path, residue: int, modulus: int) -> Path:
    """``src`` with its JSON header padded with spaces (which safetensors allows) to a length = residue (mod
    modulus): the file's first bytes, the length, then become whatever the residue spells (0x80, "PK")."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].rstrip(b" ")
    length = len(header) + (residue - len(header)) % modulus
    dst.write_bytes(length.to_bytes(8, "little") + header.ljust(length) + raw[8 + n:])
    return dst


def raw_safetensors(dst: Path, header: bytes, length: int | None = None) -> Path:
    """A file of an 8-byte header length (default: the header's) and the header, and no tensor data."""
    dst.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header)
    return dst


def torch_zip(dst: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    """A benign torch.save archive with ``members`` (names under its folder) replaced or added."""
    torch.save({"w": torch.ones(2)}, dst)
    with zipfile.ZipFile(dst) as archive:
        folder = archive.namelist()[0].split("/")[0]
        contents = {name: archive.read(name) for name in archive.namelist()}
    contents.update({f"{folder}/{name}": data for name, data in members.items()})
    with zipfile.ZipFile(dst, "w", compression=compression) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return dst


def resaved_dalle_pytorch(dst: Path, edit: Callable[[dict], None]) -> Path:
    ckpt = safe_load(FIXTURES / "rotary_shift_mixed.pt")
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- the corpus -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path, dict[str, Path]], Path]  # (tmp folder, good files) -> the bad file
    error: type[Exception]
    match: str
    loader: str = "dalle"
    options: dict = field(default_factory=dict)  # keyword arguments of the loader


def _set(path: list[str], value) -> Callable[[dict], None]:
    def edit(ckpt: dict) -> None:
        target = ckpt
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _nan_weight(ckpt: dict) -> None:
    ckpt["weights"]["to_logits.1.weight"] = ckpt["weights"]["to_logits.1.weight"].clone()
    ckpt["weights"]["to_logits.1.weight"][0, :2] = float("nan")


CASES = [
    # safetensors structure
    Case("truncated", lambda d, g: _write(d / "t.safetensors", g["dalle"].read_bytes()[:-100]),
         CheckpointError, "truncated or corrupt"),
    Case("header_longer_than_file", lambda d, g: raw_safetensors(d / "h.safetensors", b"{}", length=1 << 20),
         CheckpointError, "no valid safetensors header"),
    Case("header_not_json", lambda d, g: raw_safetensors(d / "h.safetensors", b"{not json   "),
         CheckpointError, "no valid safetensors header"),
    Case("header_json_array", lambda d, g: raw_safetensors(d / "h.safetensors", b"[1, 2, 3]   "),
         CheckpointError, "no valid safetensors header"),
    Case("header_object_not_safetensors", lambda d, g: raw_safetensors(d / "h.safetensors", b'{"w": 1}'),
         CheckpointError, "truncated or corrupt"),
    Case("foreign_safetensors", lambda d, g: _save_plain(d / "o.safetensors"),
         CheckpointError, "not a dalle-engine checkpoint"),
    Case("vae_checkpoint_as_dalle", lambda d, g: g["vae"], CheckpointError, "'vae' checkpoint, expected a 'dalle'"),
    Case("dalle_checkpoint_as_clip", lambda d, g: g["dalle"], CheckpointError, "expected a 'clip'", "clip"),
    # metadata
    Case("config_list", lambda d, g: edited(g["dalle"], d / "c.safetensors", {"config": "[1, 2]"}),
         CheckpointError, "'config' must be a JSON object, not a list"),
    Case("config_string", lambda d, g: edited(g["dalle"], d / "c.safetensors", {"config": '"dim=32"'}),
         CheckpointError, "'config' must be a JSON object, not a str"),
    Case("config_not_json", lambda d, g: edited(g["dalle"], d / "c.safetensors", {"config": "{dim: 32"}),
         CheckpointError, "'config' is not valid JSON"),
    Case("config_missing", lambda d, g: edited(g["dalle"], d / "c.safetensors", {"config": None}),
         CheckpointError, "lacks 'config'"),
    Case("config_unknown_field", lambda d, g: with_config(g["dalle"], d / "c.safetensors", ff_mult=4),
         CheckpointError, "unknown field 'ff_mult'"),
    Case("config_string_for_int", lambda d, g: with_config(g["dalle"], d / "c.safetensors", dim="wide"),
         CheckpointError, "field 'dim' must be an integer, got 'wide'"),
    Case("config_bool_for_int", lambda d, g: with_config(g["dalle"], d / "c.safetensors", depth=True),
         CheckpointError, "field 'depth' must be an integer"),
    Case("config_int_for_bool", lambda d, g: with_config(g["dalle"], d / "c.safetensors", rotary_emb=1),
         CheckpointError, "field 'rotary_emb' must be true or false"),
    Case("config_nan", lambda d, g: with_config(g["dalle"], d / "c.safetensors", loss_img_weight=float("nan")),
         CheckpointError, "field 'loss_img_weight' must be a finite number"),
    Case("config_bad_value", lambda d, g: with_config(g["dalle"], d / "c.safetensors", attn_types=["sparse"]),
         CheckpointError, "invalid config: unknown attention type"),
    Case("config_huge_int", lambda d, g: with_config(g["dalle"], d / "c.safetensors", text_seq_len=10**15),
         CheckpointError, "field 'text_seq_len' is 1000000000000000, beyond any model"),
    Case("vae_config_list", lambda d, g: edited(g["vae"], d / "v.safetensors", {"vae_config": "[]"}),
         CheckpointError, "'vae_config' must be a JSON object", "vae"),
    Case("vae_config_huge_layers", lambda d, g: with_config(g["vae"], d / "v.safetensors", "vae_config",
                                                            num_layers=10**12),
         CheckpointError, "'num_layers' is 1000000000000, beyond any model", "vae"),
    Case("vae_class_unknown", lambda d, g: edited(g["dalle"], d / "c.safetensors", {"vae_class": "os.system"}),
         CheckpointError, "VAE of unknown class 'os.system'"),
    Case("extra_list", lambda d, g: edited(g["dalle"], d / "c.safetensors", {"extra": "[]"}),
         CheckpointError, "'extra' must be a JSON object"),
    Case("clip_config_string", lambda d, g: edited(g["clip"], d / "c.safetensors", {"config": '"big"'}),
         CheckpointError, "'config' must be a JSON object", "clip"),
    # tensors
    Case("missing_tensor", lambda d, g: edited(g["dalle"], d / "c.safetensors", tensors={"to_logits.1.bias": None}),
         CheckpointError, r"missing \['to_logits.1.bias'\]"),
    Case("extra_tensor", lambda d, g: edited(g["dalle"], d / "c.safetensors", tensors={"evil": torch.ones(1)}),
         CheckpointError, r"unexpected \['evil'\]"),
    Case("wrong_shape", lambda d, g: edited(g["dalle"], d / "c.safetensors", tensors={QKV: torch.ones(3, 3)}),
         CheckpointError, rf"{QKV} has shape \(3, 3\), expected"),
    Case("nan_weight", lambda d, g: poisoned(g["dalle"], d / "c.safetensors", QKV, float("nan"), 3),
         CheckpointError, rf"tensor '{QKV}' holds 3 NaN/Inf values"),
    Case("inf_weight", lambda d, g: poisoned(g["dalle"], d / "c.safetensors", "vae.codebook.weight", float("inf")),
         CheckpointError, "tensor 'vae.codebook.weight' holds 1 NaN/Inf values"),
    Case("clip_inf_weight", lambda d, g: poisoned(g["clip"], d / "c.safetensors", "temperature", -float("inf")),
         CheckpointError, "tensor 'temperature' holds 1 NaN/Inf values", "clip"),
    Case("vae_nan_weight", lambda d, g: poisoned(g["vae"], d / "v.safetensors", "codebook.weight", float("nan"), 2),
         CheckpointError, "tensor 'codebook.weight' holds 2 NaN/Inf values", "vae"),
    # the tokenizer inside
    Case("tokenizer_bad_json", lambda d, g: edited(g["dalle"], d / "c.safetensors", tensors={
        "__tokenizer__": torch.frombuffer(bytearray(b'{"model": 3}'), dtype=torch.uint8)}),
         CheckpointError, "cannot load its 'hug' tokenizer: not a valid HuggingFace tokenizer JSON"),
    Case("tokenizer_kind_missing", lambda d, g: edited(g["dalle"], d / "c.safetensors", {"tokenizer_kind": None}),
         CheckpointError, "cannot load its None tokenizer: unknown tokenizer kind"),
    Case("tokenizer_not_bytes", lambda d, g: edited(g["dalle"], d / "c.safetensors",
                                                    tensors={"__tokenizer__": torch.ones(4)}),
         CheckpointError, "tokenizer must be stored as bytes"),
    # not safetensors at all
    Case("empty_file", lambda d, g: _write(d / "empty.safetensors", b""), CheckpointError, "no valid safetensors"),
    Case("random_1kb", lambda d, g: _write(d / "r.bin", b"\x00" + random.Random(0).randbytes(1023)),
         CheckpointError, "no valid safetensors header"),
    Case("random_1kb_pickle_opcode", lambda d, g: _write(d / "r.pt", b"\x80" + random.Random(1).randbytes(1023)),
         CheckpointError, "not a readable torch.save file"),
    Case("directory_without_auxiliary_pt", lambda d, g: _mkdir(d / "dalle-ds-cp"),
         FileNotFoundError, "no checkpoint at"),
    Case("fifo", lambda d, g: _mkfifo(d / "f.safetensors"), FileNotFoundError, "no checkpoint at"),
    Case("fifo_to_the_unpickler", lambda d, g: _mkfifo(d / "f.pt"), CheckpointError, "not a readable torch.save",
         "safe_load"),
    Case("zip_not_torch", lambda d, g: _zip(d / "z.pt", {"hello.txt": b"hi"}),
         CheckpointError, "not a torch.save archive"),
    Case("torch_zip_compressed", lambda d, g: torch_zip(d / "z.pt", {}, zipfile.ZIP_DEFLATED),
         CheckpointError, "compresses"),
    Case("torch_zip_truncated", lambda d, g: _truncated_torch(d / "z.pt", zip_format=True),
         CheckpointError, "not a readable torch.save file: File is not a zip file"),
    Case("torch_legacy_truncated", lambda d, g: _truncated_torch(d / "l.pt", zip_format=False),
         CheckpointError, "not a readable torch.save file"),
    Case("safetensors_to_the_unpickler", lambda d, g: g["vae"], CheckpointError, "is a safetensors file",
         "safe_load"),
    Case("torch_file_as_vae", lambda d, g: torch_zip(d / "z.pt", {}), CheckpointError, "PyTorch pickle", "vae"),
    # DALLE-pytorch imports
    Case("dalle_pytorch_nan", lambda d, g: resaved_dalle_pytorch(d / "dalle.pt", _nan_weight),
         CheckpointError, "tensor 'to_logits.1.weight' holds 2 NaN/Inf values", options=DALLE_PYTORCH),
    Case("dalle_pytorch_hparams_list", lambda d, g: resaved_dalle_pytorch(d / "dalle.pt", _set(["hparams"], [1])),
         CheckpointError, "lacks the hparams or weights dict", options=DALLE_PYTORCH),
    Case("dalle_pytorch_hparams_wrong_type",
         lambda d, g: resaved_dalle_pytorch(d / "dalle.pt", _set(["hparams", "shared_attn_ids"], 3)),
         CheckpointError, "hparams this engine cannot build", options=DALLE_PYTORCH),
    Case("dalle_pytorch_weights_not_tensors",
         lambda d, g: resaved_dalle_pytorch(d / "dalle.pt", _set(["weights", "to_logits.1.bias"], [0.0])),
         CheckpointError, "other than named tensors", options=DALLE_PYTORCH),
    Case("dalle_pytorch_huge_vae",
         lambda d, g: resaved_dalle_pytorch(d / "dalle.pt", _set(["vae_params", "num_layers"], 10**12)),
         CheckpointError, "'num_layers' is 1000000000000, beyond any model", options=DALLE_PYTORCH),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _mkfifo(path: Path) -> Path:
    os.mkfifo(path)  # reading it would block for ever
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _save_plain(path: Path) -> Path:
    save_file({"w": torch.zeros(2)}, path)
    return path


def _truncated_torch(path: Path, zip_format: bool) -> Path:
    torch.save({"w": torch.ones(64)}, path, _use_new_zipfile_serialization=zip_format)
    return _write(path, path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_file_is_a_clear_error(case: Case, good, tmp_path):
    path = case.make(tmp_path, good)
    load = safe_load if case.loader == "safe_load" else LOADERS[case.loader]
    with pytest.raises(case.error, match=case.match):
        load(path, **case.options)


@pytest.mark.parametrize("kind", ["dalle", "clip", "vae"])
@pytest.mark.parametrize(("residue", "modulus", "head"), [(0x80, 256, b"\x80"), (0x4B50, 1 << 16, b"PK")],
                         ids=["0x80", "PK"])
def test_safetensors_that_starts_like_a_pickle_or_zip_loads(good, tmp_path, kind, residue, modulus, head):
    path = repadded(good[kind], tmp_path / f"{kind}.safetensors", residue, modulus)
    assert path.read_bytes().startswith(head)
    assert file_format(path) == "safetensors" and not is_dalle_pytorch_checkpoint(path)
    loaded, original = LOADERS[kind](path), LOADERS[kind](good[kind])
    assert loaded.model.state_dict().keys() == original.model.state_dict().keys()
    for name, t in original.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], t), name
    assert loaded.extra == original.extra
    if original.tokenizer is not None:
        assert loaded.tokenizer.to_bytes() == original.tokenizer.to_bytes()


# --- pickles that would run code -----------------------------------------------------------------------------------


def _evil_pickles(marker: Path) -> dict[str, Path]:
    folder = marker.parent
    evil = pickle.dumps(RunsShell(marker), protocol=2)
    command = f"touch {marker}".encode()
    torch.save({"hparams": {}, "weights": RunsShell(marker)}, folder / "global.pt")
    torch.save({"hparams": {}, "weights": RunsShell(marker)}, folder / "legacy.pt",
               _use_new_zipfile_serialization=False)
    return {
        "global_in_torch_zip": folder / "global.pt",
        "global_in_legacy_file": folder / "legacy.pt",
        "inst_opcode": _write(folder / "inst.pt", b"\x80\x02(S'" + command + b"'\nios\nsystem\n."),
        "stack_global_protocol_4": _write(folder / "proto4.pt", pickle.dumps(RunsShell(marker), protocol=4)),
        "nested_in_zip_data_pkl": torch_zip(folder / "nested.pt", {"data.pkl": evil}),
        "zip_data_pkl_and_DATA_PKL": torch_zip(folder / "case.pt", {"DATA.PKL": evil}),
    }


EVIL_MATCH = {
    "global_in_torch_zip": "posix.system", "global_in_legacy_file": "posix.system", "inst_opcode": "os.system",
    "stack_global_protocol_4": "STACK_GLOBAL", "nested_in_zip_data_pkl": "posix.system",
    "zip_data_pkl_and_DATA_PKL": r"same name ignoring case",
}


@pytest.mark.parametrize("name", EVIL_MATCH)
def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    path = _evil_pickles(marker)[name]
    for load in (safe_load, load_dalle):
        with pytest.raises(UnsafePickleError, match=EVIL_MATCH[name]):
            load(path)
    assert not marker.exists()


# --- tokenizer bytes ------------------------------------------------------------------------------------------------

# A BPE merge of a special token makes tokenizers 0.23 panic while loading (pyo3's PanicException, a BaseException).
PANICKING_JSON = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"[PAD]": 0, "u": 1},
                                                        "merges": [["u", "[PAD]"]]}}).encode()
BAD_TOKENIZERS = {
    "hug-not-utf8": ("hug", b"\xff\xfe{}"),
    "hug-not-json": ("hug", b"{"),
    "hug-json-list": ("hug", b"[]"),
    "hug-wrong-structure": ("hug", b'{"model": 3}'),
    "hug-panics-the-library": ("hug", PANICKING_JSON),
    "clip-bad-gzip": ("clip", b"\x1f\x8b not gzip"),
    "clip-gzip-bomb": ("clip", gzip.compress(bytes(65 << 20))),
    "clip-not-utf8": ("clip", b"#version\n\xff \xfe\n"),
    "clip-three-symbol-merge": ("clip", gzip.compress(b"#version\na b c\n")),
    "clip-not-byte-level": ("clip", "#version\n\u2603 x\n".encode()),
    "chinese-not-utf8": ("chinese", b"[PAD]\n\xff\n"),
    "chinese-repeated-token": ("chinese", b"[PAD]\n[UNK]\n[PAD]\n"),
    "chinese-no-sep": ("chinese", b"[PAD]\n[UNK]\n"),
    "yttm-empty": ("yttm", b""),
    "yttm-id-used-twice": ("yttm", b"1 0\n9601 0\n0 -1 -1 -1\n"),
    "unknown-kind": ("sentencepiece", b"x"),
}


@pytest.mark.parametrize("case", BAD_TOKENIZERS)
def test_bad_tokenizer_bytes_are_a_value_error(case):
    kind, data = BAD_TOKENIZERS[case]
    with pytest.raises(ValueError, match="not a valid|YouTokenToMe model|unknown tokenizer kind"):
        tokenizer_from_bytes(kind, data)


# --- YouTokenToMe model bytes, which could abort the interpreter: checked in a child process -----------------------

YTTM_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from engine.io.checkpoint import CheckpointError, load_dalle
    from engine.codecs.tokenizers import tokenizer_from_bytes

    outcomes = {}
    for case in sorted(Path(sys.argv[1]).iterdir()):
        try:
            tokenizer = tokenizer_from_bytes("yttm", case.read_bytes())
            tokenizer.decode(tokenizer.encode("a red cube on the table \\u2603") + list(range(tokenizer.vocab_size)))
            outcomes[case.name] = "loaded"
        except ValueError:
            outcomes[case.name] = "rejected"
    for path in sys.argv[2:]:
        try:
            load_dalle(path)
            outcomes[path] = "loaded"
        except CheckpointError as e:
            outcomes[path] = str(e)
    print(json.dumps(outcomes))
""")
YTTM_NUMBERS = [-1, 0, 1, 9601, 55296, 1114112, 2**31 - 1, 2**32 - 1, 2**32, 10**10]


def yttm_mutations(base: bytes, per_kind: int = 40) -> dict[str, bytes]:
    """Deterministic variants of a real model: truncations, byte flips, changed numbers (huge, negative, out of
    range), copied numbers (repeated ids and characters, rules using later tokens), changed counts, dropped,
    repeated and swapped lines, random bytes, and a model whose tokens spell 2**48 characters."""
    rng = random.Random(0)
    numbers, lines = base.split(), base.split(b"\n")
    cases = {"original": base, "doubling": _doubling_yttm(48)}
    for i in range(per_kind):
        cases[f"truncated-{i}"] = base[:rng.randrange(len(base))]
        flipped = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            flipped[rng.randrange(len(flipped))] = rng.choice(b"0123456789- \n+x\x00\xff")
        cases[f"flipped-{i}"] = bytes(flipped)
        changed = list(numbers)
        changed[rng.randrange(len(changed))] = str(rng.choice([*YTTM_NUMBERS, len(numbers)])).encode()
        cases[f"number-{i}"] = b" ".join(changed)
        copied = list(numbers)
        copied[rng.randrange(len(copied))] = rng.choice(copied)
        cases[f"copied-{i}"] = b" ".join(copied)
        edited = list(lines)
        j, k = rng.randrange(len(edited)), rng.randrange(len(edited))
        edited[j:j + 1] = rng.choice([[], [edited[j], edited[k]], [edited[k]]])
        cases[f"lines-{i}"] = b"\n".join(edited)
    for value in YTTM_NUMBERS:
        for index in (0, 1):
            cases[f"count{index}={value}"] = b" ".join([*numbers[:index], str(value).encode(), *numbers[index + 1:]])
    for i, size in enumerate((0, 1, 8, 100, 1000)):
        cases[f"random-{i}"] = rng.randbytes(size)
    return cases


def _doubling_yttm(rules: int) -> bytes:
    """Valid in every other respect, but rule k's token spells 2**(k + 1) characters, all of which yttm builds."""
    merges = [f"{4 + k} {4 + k} {5 + k}" for k in range(rules)]
    return "\n".join([f"1 {rules}", "9601 4", *merges, "1 0 2 3", ""]).encode()


def test_mutated_yttm_models_are_rejected_or_load_never_abort(good, tmp_path):
    from engine.codecs.tokenizers import YttmTokenizer

    pytest.importorskip("youtokentome")
    base = YttmTokenizer.train(CORPUS, vocab_size=40, model_path=tmp_path / "bpe.model").to_bytes()
    cases = yttm_mutations(base)
    folder = tmp_path / "cases"
    folder.mkdir()
    for name, data in cases.items():
        (folder / name).write_bytes(data)
    embedded = [edited(good["dalle"], tmp_path / f"{name}.safetensors", {"tokenizer_kind": "yttm"},
                       {"__tokenizer__": torch.frombuffer(bytearray(cases[name]), dtype=torch.uint8)})
                for name in ("truncated-0", "count1=2147483647", "doubling")]
    child = subprocess.run([sys.executable, "-c", YTTM_CHILD, str(folder), *map(str, embedded)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"the child died (signal {-child.returncode}):\n{child.stderr[-2000:]}"
    outcomes = json.loads(child.stdout)
    assert len(cases) >= 200 and set(outcomes) == set(cases) | set(map(str, embedded))
    assert outcomes["original"] == "loaded" and outcomes["doubling"] == "rejected"
    assert {outcomes[name] for name in cases} == {"loaded", "rejected"}
    for path in embedded:
        assert "cannot load its 'yttm' tokenizer" in outcomes[str(path)]


# --- files that declare a far larger model than they hold: refused before allocating it (in a child process) -------

SIZE_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import engine.io.dalle_pytorch
    from engine.io.checkpoint import CheckpointError, load_dalle

    results = []
    for path, options in json.loads(sys.argv[1]):
        peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        try:
            load_dalle(path, **options)
            outcome = "loaded"
        except CheckpointError as e:
            outcome = str(e)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024  # MiB (ru_maxrss is in KiB)
        results.append([outcome, time.perf_counter() - start, grown])
    print(json.dumps(results))
""")


def crafted_dalle(dst: Path, good: Path, **config) -> Path:
    """A checkpoint whose tensors (zeros) all fit a DALLE of ``config`` with the good file's VAE."""
    config = tiny_config(num_image_tokens=17, image_fmap_size=4, **config)
    with torch.device("meta"):
        model = DALLE(config, tiny_vae())
    names = canonical_names(model)
    tensors = {n: torch.zeros(t.shape, dtype=t.dtype) for n, t in model.state_dict().items() if names[n] == n}
    with safe_open(good, "pt") as f:
        metadata = {**f.metadata(), "config": json.dumps(config.to_dict()), "tokenizer_kind": None}
    save_file(tensors, dst, metadata={k: v for k, v in metadata.items() if v is not None})
    return dst


def test_declared_model_far_larger_than_the_file_fails_fast_without_allocating(good, tmp_path):
    hparams = safe_load(FIXTURES / "rotary_shift_mixed.pt")["hparams"]
    dalle_pytorch = {k: str(v) for k, v in DALLE_PYTORCH.items()}
    cases = [  # (file, loader options, expected error)
        (with_config(good["dalle"], tmp_path / "big.safetensors", dim=4096, depth=64), {},
         "more than .* modules, but the file holds only"),
        (with_config(good["dalle"], tmp_path / "wide.safetensors", dim=4096), {}, "has shape .*, expected"),
        (with_config(good["dalle"], tmp_path / "deep.safetensors", depth=10**6, shared_attn_ids=[0],
                     shared_ff_ids=[0]), {}, "more than .* modules, but the file holds only"),
        # every tensor fits, but the logits mask (total_seq_len x total_tokens) would take 764 MiB
        (crafted_dalle(tmp_path / "mask.safetensors", good["dalle"], text_seq_len=20000, num_text_tokens=20000,
                       dim=2, heads=1, dim_head=2, depth=1), {}, "needs 7.. MiB, far more than the 0.. MiB"),
        (resaved_dalle_pytorch(tmp_path / "big.pt", _set(["hparams"], {**hparams, "dim": 4096, "depth": 64})),
         dalle_pytorch, "more than .* modules, but the file holds only"),
        (resaved_dalle_pytorch(tmp_path / "wide.pt", _set(["hparams"], {**hparams, "dim": 4096})), dalle_pytorch,
         "does not match the model its hparams describe"),
    ]
    child = subprocess.run([sys.executable, "-c", SIZE_CHILD, json.dumps([[str(p), o] for p, o, _ in cases])],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    for (path, _, expected), (outcome, seconds, grown) in zip(cases, json.loads(child.stdout)):
        assert re.search(expected, outcome), (path.name, outcome)
        assert seconds < 10 and grown < 300, (path.name, seconds, grown)


# --- the command-line tools: one error line, never a traceback -----------------------------------------------------


def test_command_line_tools_report_bad_files_in_one_line(good, tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_pickles(marker)
    random_pickle = _write(tmp_path / "r.pt", b"\x80" + random.Random(1).randbytes(1023))
    not_a_config = _write(tmp_path / "model.yaml", b"- a list\n- not a mapping\n")
    runs = [
        ["-m", "engine.convert", "dalle_pytorch", "--dalle_path", random_pickle],
        ["-m", "engine.convert", "dalle_pytorch", "--dalle_path", evil["zip_data_pkl_and_DATA_PKL"]],
        ["-m", "engine.convert", "vqgan", "--model_path", evil["global_in_torch_zip"], "--config_path", not_a_config],
        ["-m", "engine.convert", "openai", "--encoder", _truncated_torch(tmp_path / "e.pkl", True), "--decoder",
         random_pickle],
        [ROOT / "generate.py", "--text", "x", "--dalle_path", random_pickle],
        [ROOT / "generate.py", "--text", "x", "--dalle_path",
         edited(good["dalle"], tmp_path / "c.safetensors", {"config": "[1, 2]"})],
        [ROOT / "generate.py", "--text", "x", "--dalle_path",
         poisoned(good["dalle"], tmp_path / "n.safetensors", QKV, float("nan"))],
    ]
    for args in runs:
        if args[0] == "-m":
            args = [*args, "--out", tmp_path / "out.safetensors"]
        run = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode != 0 and "error:" in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_converters_refuse_non_finite_weights(tmp_path):
    from test_openai_dvae import fake_dall_e, write_openai_pickles
    from test_unpickle import save_lightning_ckpt
    from test_vqgan import tiny_vae as tiny_vqgan
    from test_vqgan import write_yaml

    from engine.codecs.openai_dvae import OpenAIDiscreteVAE
    from engine.codecs.vqgan import VQGanVAE

    state = tiny_vqgan(gumbel=False).state_dict()
    state["quant_conv.weight"][0, 0] = float("nan")
    save_lightning_ckpt(tmp_path / "last.ckpt", state)
    with pytest.raises(CheckpointError, match="tensor 'quant_conv.weight' holds 1 NaN/Inf values"):
        VQGanVAE.from_taming(tmp_path / "last.ckpt", write_yaml(tmp_path / "model.yaml", False))
    enc, _, enc_path, dec_path = write_openai_pickles(tmp_path)
    with torch.no_grad():
        enc.blocks.input.w[0, 0, 0, 0] = float("inf")
    with fake_dall_e():
        torch.save(enc, enc_path)
    with pytest.raises(CheckpointError, match="tensor 'blocks.input.w' holds 1 NaN/Inf values"):
        OpenAIDiscreteVAE.from_openai(enc_path, dec_path)
