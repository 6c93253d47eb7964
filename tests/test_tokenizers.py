"""Tokenizers: round trips, the 0-padding rule, truncation, serialisation and CLI flag selection."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.codecs import tokenizers as tk
from engine.codecs.tokenizers import (
    ChineseTokenizer,
    HugTokenizer,
    SimpleTokenizer,
    Tokenizer,
    YttmTokenizer,
    build_tokenizer,
    tokenizer_from_bytes,
)

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["cube", "sphere", "cone", "cylinder"]
PLACES = ["table", "floor", "shelf"]
CORPUS = [f"a {c} {s} on the {p}" for c in COLOURS for s in SHAPES for p in PLACES]
CAPTIONS = ["a red cube on the table", "a blue sphere on the floor", "a yellow cone"]

CHINESE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"一只红色蓝的猫狗在桌子上，。"]
CHINESE_VOCAB += ["a", "red", "blue", "cat", "dog", "##s", "on", "the", "table", ",", "."]
CHINESE_CAPTIONS = ["一只红色的猫在桌子上。", "蓝色的狗", "a red cat on the table."]

# Tiny CLIP-style merges file: "cube</w>" and "red</w>" are built in 3 and 2 merges.
TINY_MERGES = ["#version: 0.2", "c u", "cu b", "cub e</w>", "r e", "re d</w>"]


@pytest.fixture(scope="module")
def yttm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("yttm") / "bpe.model"
    YttmTokenizer.train(CORPUS, vocab_size=120, model_path=path)
    return path


@pytest.fixture(scope="module")
def hug_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[SEP]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    assert tokenizer.token_to_id("[PAD]") == 0
    path = tmp_path_factory.mktemp("hug") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def chinese_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chinese") / "vocab.txt"
    path.write_text("\n".join(CHINESE_VOCAB) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def clip() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def trained_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trained") / "bpe.json"
    HugTokenizer.train(CORPUS, vocab_size=300, json_path=path)
    return path


@pytest.fixture(params=["yttm", "hug", "trained", "clip", "chinese"])
def case(request: pytest.FixtureRequest) -> tuple[Tokenizer, list[str]]:
    """Each tokenizer with captions that it round-trips exactly."""
    if request.param == "yttm":
        return YttmTokenizer(request.getfixturevalue("yttm_path")), CAPTIONS
    if request.param == "trained":
        return HugTokenizer(request.getfixturevalue("trained_bpe")), CAPTIONS
    if request.param == "hug":
        return HugTokenizer(request.getfixturevalue("hug_path")), CAPTIONS
    if request.param == "clip":
        return request.getfixturevalue("clip"), CAPTIONS
    return ChineseTokenizer(request.getfixturevalue("chinese_path")), CHINESE_CAPTIONS


def test_round_trip(case: tuple[Tokenizer, list[str]]) -> None:
    tokenizer, captions = case
    for caption in captions:
        ids = tokenizer.encode(caption)
        assert ids and all(0 < i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == caption
        assert tokenizer.decode(torch.tensor(ids)) == caption


def test_tokenize_pads_with_zero(case: tuple[Tokenizer, list[str]]) -> None:
    tokenizer, captions = case
    out = tokenizer.tokenize(captions, context_length=32)
    assert out.shape == (len(captions), 32) and out.dtype == torch.long
    for row, caption in zip(out, captions):
        ids = tokenizer.encode(caption)
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids) :] == 0).all()
    single = tokenizer.tokenize(captions[0], context_length=32)
    assert torch.equal(single, out[:1])


def test_truncation_and_overlong_error(case: tuple[Tokenizer, list[str]]) -> None:
    tokenizer, captions = case
    text = " ".join(captions)
    ids = tokenizer.encode(text)
    n = len(tokenizer.encode(captions[0]))  # fits exactly, while the joined text does not
    assert len(ids) > n
    assert tokenizer.tokenize(text, context_length=n, truncate_text=True)[0].tolist() == ids[:n]
    with pytest.raises(ValueError) as info:
        tokenizer.tokenize([captions[0], text], context_length=n)
    message = str(info.value)
    for part in (text[:20], f"{len(ids)} tokens", f"context length {n}", "truncate_text=True", "--truncate_captions"):
        assert part in message


def test_bytes_round_trip(case: tuple[Tokenizer, list[str]]) -> None:
    tokenizer, captions = case
    restored = tokenizer_from_bytes(tokenizer.kind, tokenizer.to_bytes())
    assert type(restored) is type(tokenizer) and restored.vocab_size == tokenizer.vocab_size
    assert restored.to_bytes() == tokenizer.to_bytes()
    assert torch.equal(restored.tokenize(captions), tokenizer.tokenize(captions))


def test_decode_drops_padding(case: tuple[Tokenizer, list[str]]) -> None:
    tokenizer, captions = case
    ids = tokenizer.encode(captions[0])
    # DALL-E's per-position pad ids lie past the vocabulary; 0 is the tokenize padding.
    padded = [0, *ids, tokenizer.vocab_size, tokenizer.vocab_size + 7, 0, 0]
    assert tokenizer.decode(torch.tensor(padded)) == captions[0]
    extra = ids[-1]
    assert tokenizer.decode(ids + [extra], pad_tokens={extra}) == tokenizer.decode(ids[:-1])
    with pytest.raises(ValueError):
        tokenizer.decode(torch.tensor([ids]))


def test_yttm_trains_from_file(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    tokenizer = YttmTokenizer.train(corpus, vocab_size=80, model_path=tmp_path / "bpe.model")
    assert (tmp_path / "bpe.model").is_file() and 0 < tokenizer.vocab_size <= 80
    assert tokenizer.decode(tokenizer.encode(CAPTIONS[1])) == CAPTIONS[1]


def test_hug_skips_special_tokens(hug_path: Path) -> None:
    tokenizer = HugTokenizer(hug_path)
    sep = HFTokenizer.from_file(str(hug_path)).token_to_id("[SEP]")
    assert tokenizer.decode([sep, *tokenizer.encode("a green cone"), sep]) == "a green cone"


def test_clip_real_vocab(clip: SimpleTokenizer) -> None:
    assert clip.vocab_size == 49408
    # The 256 byte symbols come first in bytes_to_unicode order ("!" = 0, then ASCII), their "</w>" variants next:
    # a lone letter or digit has no merge to apply, so it is 256 + (byte - ord("!")).
    assert clip.encode("a") == [256 + ord("a") - ord("!")] == [320]
    assert clip.encode("2024") == [256 + ord(d) - ord("!") for d in "2024"]  # digits are split one by one
    assert clip.encode("A RED Cube") == clip.encode("a red cube")
    assert all(len(clip.encode(word)) == 1 for word in ("red", "cube", "photo"))  # common words are one token
    assert clip.encode("a &amp;amp; b") == clip.encode("a & b")
    assert clip.encode("  a\tred \n cube ") == clip.encode("a red cube")
    assert clip.decode(clip.encode("A Red Cube, on a TABLE!")) == "a red cube , on a table !"
    assert clip.decode([49406, *clip.encode("a red cube"), 49407]) == "a red cube"
    assert clip.decode(clip.encode("naïve café 🐱")) == "naïve café 🐱"


@pytest.mark.parametrize("compress", [False, True])
def test_clip_explicit_merges_file(tmp_path: Path, compress: bool) -> None:
    data = ("\n".join(TINY_MERGES) + "\n").encode("utf-8")
    path = tmp_path / ("merges.txt.gz" if compress else "merges.txt")
    path.write_bytes(gzip.compress(data) if compress else data)
    tokenizer = SimpleTokenizer(path)
    assert tokenizer.vocab_size == 512 + 5 + 2
    assert tokenizer.encode("Red cube") == [512 + 4, 512 + 2]
    # "cu b" merges only a non-final "b": a word-final b is "b</w>", so "cub" stops at "cu" + "b</w>".
    assert tokenizer.encode("cub") == [512, 256 + ord("b") - ord("!")]
    assert tokenizer.decode([517, 516, 514, 518]) == "red cube"
    restored = tokenizer_from_bytes("clip", tokenizer.to_bytes())
    assert tokenizer.to_bytes() == path.read_bytes()
    assert restored.encode("red cube red") == [516, 514, 516]


def test_chinese_specifics(chinese_path: Path) -> None:
    tokenizer = ChineseTokenizer(chinese_path)
    assert tokenizer.vocab_size == len(CHINESE_VOCAB)
    ids = tokenizer.encode("一只猫")
    assert ids == [CHINESE_VOCAB.index(c) for c in "一只猫"]  # no [CLS]/[SEP], one token per character
    assert tokenizer.encode("A RED Cats") == [CHINESE_VOCAB.index(t) for t in ("a", "red", "cat", "##s")]
    assert tokenizer.decode([2, *ids, 3]) == "一只猫"
    assert tokenizer.decode(tokenizer.encode("一只red猫")) == "一只 red 猫"


def test_build_tokenizer_selects_by_flags(yttm_path: Path, hug_path: Path, chinese_path: Path) -> None:
    assert isinstance(build_tokenizer(bpe_path=yttm_path), YttmTokenizer)
    assert isinstance(build_tokenizer(bpe_path=hug_path, hug=True), HugTokenizer)
    assert isinstance(build_tokenizer(chinese=True, chinese_vocab_path=chinese_path), ChineseTokenizer)
    assert isinstance(build_tokenizer(bpe_path=chinese_path, chinese=True), ChineseTokenizer)
    default = build_tokenizer()
    assert isinstance(default, SimpleTokenizer) and default.vocab_size == 49408


def test_missing_files_name_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing"
    cases = [
        (dict(bpe_path=missing), "--bpe_path"),
        (dict(bpe_path=missing, hug=True), "--bpe_path <tokenizer.json> --hug"),
        (dict(hug=True), "--bpe_path"),
        (dict(chinese=True), "chinese_vocab_path"),
        (dict(chinese=True, chinese_vocab_path=missing), "chinese_vocab_path"),
    ]
    for kwargs, flag in cases:
        with pytest.raises(FileNotFoundError, match=flag):
            build_tokenizer(**kwargs)
    with pytest.raises(FileNotFoundError, match="--bpe_path"):
        SimpleTokenizer(missing)
    monkeypatch.setattr(tk, "_CLIP_VOCAB_PACKAGES", ("no_such_package_for_clip_vocab",))
    with pytest.raises(FileNotFoundError, match="clip-anytorch"):
        build_tokenizer()


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_bytes("sentencepiece", b"")


TRAIN_IN_A_PROCESS = """
import sys
from engine.codecs.tokenizers import HugTokenizer
colours, shapes, places = ["red", "green", "blue", "yellow"], ["cube", "sphere", "cone"], ["table", "floor", "shelf"]
captions = [f"A {c} {s} on the {p}, next to a {d} {t}" for c in colours for s in shapes for p in places
            for d in colours for t in shapes]
HugTokenizer.train(captions, vocab_size=int(sys.argv[2]), json_path=sys.argv[1])
"""


def test_the_default_bpe_is_the_same_in_every_process(tmp_path: Path) -> None:
    """train.py's tokenizer: the same captions give the same file, whatever the hash seed or thread count."""
    root = Path(__file__).resolve().parents[1]
    for i, (hash_seed, threads) in enumerate([("0", "1"), ("12345", "2"), ("random", "2")]):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "RAYON_NUM_THREADS": threads, "PYTHONPATH": str(root)}
        subprocess.run([sys.executable, "-c", TRAIN_IN_A_PROCESS, str(tmp_path / f"{i}.json"), "320"], env=env,
                       check=True, cwd=root, timeout=120)
    files = [(tmp_path / f"{i}.json").read_bytes() for i in range(3)]
    assert files[0] == files[1] == files[2]
    tokenizer = HugTokenizer(tmp_path / "0.json")
    assert 257 < tokenizer.vocab_size <= 320  # 256 bytes, the pad and the merges these few words allow
    ids = tokenizer.encode("A RED Cube on the table")
    assert 0 not in ids and len(ids) < len("a red cube on the table") / 2  # merged words, never the pad
    assert tokenizer.decode(ids) == "a red cube on the table"  # NFKC-normalised and lowercased
    # any text: unseen characters fall back to their bytes
    assert tokenizer.decode(tokenizer.encode("ünïcödé ＡＢＣ 🙂")) == "ünïcödé abc 🙂"


def test_the_default_bpe_needs_room_for_the_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 257"):
        HugTokenizer.train(CORPUS, vocab_size=100, json_path=tmp_path / "bpe.json")
    assert not (tmp_path / "bpe.json").exists()
