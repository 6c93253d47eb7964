"""Text tokenizers behind one interface, with the DALLE-pytorch padding rule.

Every tokenizer maps text to ids in ``[0, vocab_size)`` and reserves id 0 as padding: ``tokenize`` right-pads
with 0, and ``decode`` drops 0, the model's per-position pad ids (``>= vocab_size``) and any extra ``pad_tokens``.
``vocab_size`` is what the model uses as ``num_text_tokens``.

Each tokenizer is fully described by its model file, so ``to_bytes`` / ``tokenizer_from_bytes`` let a checkpoint
carry its tokenizer. Nothing here downloads: every file is local, and loading happens only when a tokenizer is built.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import io
import os
import re
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ftfy
import regex
import torch
from tokenizers import BertWordPieceTokenizer
from tokenizers import Tokenizer as HFTokenizer

from engine.io.files import write_atomically

PathLike = str | os.PathLike[str]
_T = TypeVar("_T", bound="Tokenizer")


def _read_file(path: PathLike, what: str, hint: str) -> bytes:
    """Read a tokenizer file, turning a missing file into an error that says which argument to pass."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {str(path)!r}; {hint}")
    return path.read_bytes()


def _is_rust_panic(error: BaseException) -> bool:
    """pyo3 turns a panic inside the Rust ``tokenizers`` library (crafted JSON can trigger some) into
    ``pyo3_runtime.PanicException``, a BaseException, so that it is no ordinary ``except Exception``."""
    return type(error).__module__ == "pyo3_runtime" and type(error).__name__ == "PanicException"


def _abbreviate(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_caption_ids(text: torch.Tensor, text_seq_len: int, num_text_tokens: int) -> None:
    """Raise ValueError unless ``text`` is a (batch, text_seq_len) long tensor of ids in [0, num_text_tokens), as
    ``Tokenizer.tokenize`` makes them."""
    if text.dtype != torch.long or text.ndim != 2 or text.shape[1] != text_seq_len:
        raise ValueError(
            f"text must be a (batch, {text_seq_len}) long tensor of token ids (tokenize with "
            f"context_length={text_seq_len}), got {tuple(text.shape)} {text.dtype}"
        )
    if text.numel() and (text.min() < 0 or text.max() >= num_text_tokens):
        raise ValueError(f"text token ids must lie in [0, {num_text_tokens}), "
                         f"got ids in [{int(text.min())}, {int(text.max())}]")


def caption_ids(prompt: str, tokenizer: Tokenizer, length: int, truncate: bool = False, whose: str = "the model's",
                too_long: str = "shorten it") -> torch.Tensor:
    """A prompt's token ids (n <= ``length``,), unpadded; ValueError if it has more than ``length`` tokens (unless
    ``truncate``: the first ``length``; ``too_long`` says what to do) or a non-empty prompt has none."""
    ids = tokenizer.encode(prompt) if prompt else []
    if len(ids) > length and not truncate:
        raise ValueError(f"prompt {_abbreviate(prompt)!r} has {len(ids)} tokens, more than {whose} caption length "
                         f"{length}; {too_long}")
    if prompt and not ids:
        raise ValueError(f"prompt {_abbreviate(prompt)!r} has no tokens with {whose} tokenizer")
    return torch.tensor(ids[:length], dtype=torch.long)


class Tokenizer(ABC):
    """Common interface; subclasses implement ``encode``, ``_decode`` and ``_load``."""

    kind: str  # key for tokenizer_from_bytes
    vocab_size: int  # the model's num_text_tokens; id 0 is padding
    _data: bytes  # the model file contents, returned by to_bytes

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any start/end tokens."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ``ids``, which are already free of padding and out-of-range ids."""

    @abstractmethod
    def _load(self, data: bytes) -> None:
        """Initialise from the model file contents (the inverse of to_bytes)."""

    def decode(self, tokens: Sequence[int] | torch.Tensor, pad_tokens: Iterable[int] = ()) -> str:
        """Text of ``tokens`` (a list or 1-D tensor), dropping 0, ``pad_tokens`` and ids >= vocab_size."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(tokens.shape)}")
            tokens = tokens.tolist()
        skip = set(pad_tokens) | {0}
        return self._decode([t for t in tokens if t not in skip and t < self.vocab_size])

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = 256, truncate_text: bool = False
    ) -> torch.Tensor:
        """Encode ``texts`` into a ``(len(texts), context_length)`` LongTensor right-padded with 0."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > context_length:
                if not truncate_text:
                    raise ValueError(
                        f"Text {_abbreviate(text)!r} has {len(ids)} tokens, more than the context length "
                        f"{context_length}; pass truncate_text=True (CLI: --truncate_captions) to truncate it."
                    )
                ids = ids[:context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def to_bytes(self) -> bytes:
        """The tokenizer's model file contents; rebuild with ``tokenizer_from_bytes(self.kind, data)``."""
        return self._data

    @classmethod
    def from_bytes(cls: type[_T], data: bytes) -> _T:
        """Raises ValueError for bytes that are not a valid model file of this kind."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(data)
        return tokenizer

    def _load_file(self, path: PathLike, what: str, hint: str) -> None:
        data = _read_file(path, what, hint)
        try:
            self._load(data)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _youtokentome() -> Any:
    try:
        import youtokentome
    except ImportError as err:  # an optional extra: it only builds with Cython and --no-build-isolation
        raise ImportError(
            "YttmTokenizer needs youtokentome: pip install Cython && "
            "pip install --no-build-isolation youtokentome"
        ) from err
    return youtokentome


_YTTM_SPACE = 0x2581  # "▁", which yttm's encoder looks up at the start of every word
_YTTM_MAX_SYMBOLS = 1 << 24  # characters over all tokens, which yttm's loader materialises (4 bytes each, twice)
_YTTM_NUMBER = re.compile(rb"-?[0-9]{1,10}")


def _check_yttm_model(data: bytes) -> None:
    """Raise ValueError unless ``data`` is a YouTokenToMe model that youtokentome (1.0.6) loads and uses safely.

    Its C++ loader (``BPEState::load``, ``BaseEncoder::fill_from_state``) checks nothing: a count beyond the data
    makes it allocate without bound, and an id used before it is defined or a missing "▁" makes a map lookup throw;
    both abort the interpreter. The format: "n m", then n lines "codepoint id", then m merge rules "x y z" (tokens x
    and y make token z; earlier rules first), then the special ids "unk pad bos eos" (-1: unused), all decimal
    integers separated by whitespace. Every model that yttm trains passes.
    """
    fields = data.split()  # ASCII whitespace, as C++'s >> skips it
    if not all(_YTTM_NUMBER.fullmatch(f) for f in fields):
        raise ValueError("not a YouTokenToMe model: it holds something other than whitespace-separated integers")
    numbers = [int(f) for f in fields]
    if len(numbers) < 6:
        raise ValueError(f"not a YouTokenToMe model: it holds only {len(numbers)} numbers")
    n_chars, n_rules = numbers[:2]
    if n_chars < 1 or n_rules < 0 or len(numbers) != 2 + 2 * n_chars + 3 * n_rules + 4:
        raise ValueError(f"truncated or corrupt YouTokenToMe model: it declares {n_chars} characters and {n_rules} "
                         f"rules but holds {len(numbers)} numbers")
    chars, rules, specials = numbers[2:2 + 2 * n_chars], numbers[2 + 2 * n_chars:-4], numbers[-4:]
    codepoints, char_ids = chars[0::2], chars[1::2]
    if any(not 0 <= c <= 0x10FFFF or 0xD800 <= c <= 0xDFFF for c in codepoints):
        raise ValueError("YouTokenToMe model: a character is not a Unicode code point")
    if len(set(codepoints)) != n_chars or _YTTM_SPACE not in codepoints:
        raise ValueError("YouTokenToMe model: its characters repeat or lack the word start '▁'")
    unk = specials[0]
    if unk < 0 or any(s < -1 for s in specials):
        raise ValueError(f"YouTokenToMe model: invalid special ids (unk, pad, bos, eos) {specials}; unk must be set")
    ids = [*char_ids, *rules[2::3], *(s for s in specials if s != -1)]
    if sorted(ids) != list(range(len(ids))):
        raise ValueError(f"YouTokenToMe model: its {len(ids)} token ids repeat or leave gaps")
    if 0 not in specials:  # DALL-E pads with id 0; yttm's encoder also marks merged-away positions with 0
        raise ValueError("YouTokenToMe model: id 0 must be a special token (pad)")
    _check_yttm_rules(char_ids, rules)


def _check_yttm_rules(char_ids: list[int], rules: list[int]) -> None:
    """Every rule merges two tokens defined before it (by a character or an earlier rule), no pair twice, and all
    tokens together spell at most _YTTM_MAX_SYMBOLS characters."""
    lengths = dict.fromkeys(char_ids, 1)  # token id -> characters it spells
    pairs: set[tuple[int, int]] = set()
    total = len(char_ids)
    for i in range(0, len(rules), 3):
        x, y, z = rules[i:i + 3]
        if x not in lengths or y not in lengths:
            raise ValueError(f"YouTokenToMe model: rule {i // 3} merges {x} and {y}, not both defined before it")
        if (x, y) in pairs:
            raise ValueError(f"YouTokenToMe model: rule {i // 3} merges {x} and {y} again")
        pairs.add((x, y))
        lengths[z] = lengths[x] + lengths[y]
        total += lengths[z]
        if total > _YTTM_MAX_SYMBOLS:
            raise ValueError(f"YouTokenToMe model: its tokens spell more than {_YTTM_MAX_SYMBOLS} characters")


class YttmTokenizer(Tokenizer):
    """YouTokenToMe BPE model (``--bpe_path X``). yttm reserves PAD=0, so the padding rule holds."""

    kind = "yttm"

    def __init__(self, model_path: PathLike) -> None:
        self._load_file(model_path, "YouTokenToMe BPE model", "pass --bpe_path <model file>")

    def _load(self, data: bytes) -> None:
        _check_yttm_model(data)  # before yttm sees it: its loader aborts the interpreter on bad input
        # yttm only loads from a path; the model is read into memory, so the temporary file can go right away.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bpe.model"
            path.write_bytes(data)
            self._bpe = _youtokentome().BPE(model=str(path))
        self._data = data
        self.vocab_size = self._bpe.vocab_size()

    @classmethod
    def train(cls, texts_or_path: Sequence[str] | PathLike, vocab_size: int, model_path: PathLike) -> YttmTokenizer:
        """Train a BPE model on captions (one per line) or an existing text file, save it and load it."""
        yttm = _youtokentome()
        if isinstance(texts_or_path, (str, os.PathLike)):
            yttm.BPE.train(data=str(texts_or_path), model=str(model_path), vocab_size=vocab_size, pad_id=0)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                corpus = Path(tmp) / "corpus.txt"
                corpus.write_text("\n".join(texts_or_path) + "\n", encoding="utf-8")
                yttm.BPE.train(data=str(corpus), model=str(model_path), vocab_size=vocab_size, pad_id=0)
        return cls(model_path)

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode([text], output_type=_youtokentome().OutputType.ID)[0]

    def _decode(self, ids: list[int]) -> str:
        return self._bpe.decode([ids])[0]


class HugTokenizer(Tokenizer):
    """HuggingFace ``tokenizers`` JSON (``--bpe_path X --hug``).

    The tokenizer must reserve id 0 for padding (e.g. make "[PAD]" its first special token): DALL-E pads with 0.
    """

    kind = "hug"

    def __init__(self, json_path: PathLike) -> None:
        self._load_file(json_path, "HuggingFace tokenizer JSON", "pass --bpe_path <tokenizer.json> --hug")

    def _load(self, data: bytes) -> None:
        try:
            self._tokenizer = HFTokenizer.from_str(data.decode("utf-8"))
        except BaseException as e:  # the bindings raise bare Exception for any JSON they cannot build, or a panic
            if not isinstance(e, Exception) and not _is_rust_panic(e):
                raise
            raise ValueError(f"not a valid HuggingFace tokenizer JSON: {e}") from e
        self._data = data
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, json_path: PathLike) -> HugTokenizer:
        """A byte-level BPE trained on ``texts``, saved to ``json_path`` and loaded: what ``train.py`` trains when
        no tokenizer is given. Captions are NFKC-normalised and lowercased, as DALL-E's were; "<pad>" is id 0.

        The same texts give the same merges, and the same file byte for byte, in every process (the trainer breaks
        ties between equally frequent pairs by their ids); ``vocab_size`` counts the 256 byte symbols and the pad.
        """
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"a byte-level BPE needs a vocabulary of at least 257 (256 bytes + padding), "
                             f"got {vocab_size}")
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        data = tokenizer.to_str().encode("utf-8")
        write_atomically(json_path, data)
        return cls.from_bytes(data)


_CLIP_VOCAB_NAMES = ("bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.txt")
_CLIP_VOCAB_PACKAGES = ("clip", "open_clip", "dalle_pytorch")
_CLIP_NUM_MERGES = 49152 - 256 - 2  # OpenAI's CLIP uses only the first 48,894 merges of the file
_CLIP_MAX_BYTES = 64 << 20  # CLIP's merges file is 1.4 MB unpacked
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _find_clip_vocab() -> Path:
    """Locate CLIP's merges file inside an installed package, without importing the package."""
    for package in _CLIP_VOCAB_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        roots = list(spec.submodule_search_locations or [])
        if spec.origin:
            roots.append(os.path.dirname(spec.origin))
        for root in roots:
            for folder in (Path(root), Path(root) / "data"):
                for name in _CLIP_VOCAB_NAMES:
                    if (folder / name).is_file():
                        return folder / name
    raise FileNotFoundError(
        f"CLIP BPE vocabulary ({_CLIP_VOCAB_NAMES[0]}) not found in any of the packages {_CLIP_VOCAB_PACKAGES}; "
        "pass --bpe_path <merges file>, or install it with `pip install --no-deps clip-anytorch`"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of byte-level BPE, so no merge symbol is whitespace or a control char.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + n) in byte order.
    The dict's order (printable bytes first) fixes the ids of the 256 byte symbols, so id 0 is "!".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def _gunzip(data: bytes) -> bytes:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        text = f.read(_CLIP_MAX_BYTES + 1)
    if len(text) > _CLIP_MAX_BYTES:  # a gzip bomb, not a merges file
        raise ValueError(f"not a valid CLIP BPE merges file: it unpacks to more than {_CLIP_MAX_BYTES} bytes")
    return text


def _check_merges(merges: list[tuple[str, ...]], symbols: set[str]) -> None:
    """Each merge joins two strings of byte-level symbols ("</w>" is made of some), so that every token decodes."""
    for merge in merges:
        if len(merge) != 2 or not set("".join(merge)) <= symbols:
            raise ValueError(f"not a valid CLIP BPE merges file: bad merge line {_abbreviate(' '.join(merge))!r}")


class SimpleTokenizer(Tokenizer):
    """OpenAI CLIP byte-level BPE with DALLE-pytorch semantics (the default tokenizer).

    Text is cleaned (ftfy, double HTML unescape, whitespace collapse) and lower-cased; no start/end-of-text
    tokens are inserted. ``bpe_path`` is a plain or gzipped merges file; None finds the one shipped in an
    installed CLIP package. Note that id 0 is the byte "!" here, which DALL-E gives up as padding.
    """

    kind = "clip"

    def __init__(self, bpe_path: PathLike | None = None) -> None:
        path = _find_clip_vocab() if bpe_path is None else bpe_path
        self._load_file(path, "CLIP BPE merges file", "pass --bpe_path <bpe_simple_vocab_16e6.txt[.gz]>")

    def _load(self, data: bytes) -> None:
        try:
            text = (_gunzip(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # gzip's errors, then UTF-8's
            raise ValueError(f"not a valid CLIP BPE merges file: {e}") from e
        lines = text.split("\n")[1 : _CLIP_NUM_MERGES + 1]  # line 0 is a "#version" header
        merges = [tuple(line.split()) for line in lines if line.strip()]

        self._byte_encoder = _bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        _check_merges(merges, set(self._byte_decoder))
        symbols = list(self._byte_encoder.values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = dict(enumerate(vocab))
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._special = {self._encoder["<|startoftext|>"], self._encoder["<|endoftext|>"]}
        self._cache = {"<|startoftext|>": ("<|startoftext|>",), "<|endoftext|>": ("<|endoftext|>",)}
        self._data = data
        self.vocab_size = len(vocab)

    def _bpe(self, token: str) -> tuple[str, ...]:
        """Merge the byte symbols of one pre-token, lowest merge rank first; the last symbol carries </w>."""
        if token in self._cache:
            return self._cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self._ranks.get(pair, len(self._ranks)))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = tuple(word)
        return self._cache[token]

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in _CLIP_PATTERN.findall(text):
            symbols = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self._encoder[s] for s in self._bpe(symbols))
        return ids

    def _decode(self, ids: list[int]) -> str:
        # DALLE-pytorch drops 40407 here, a typo for the end-of-text id; we drop the real one.
        symbols = "".join(self._decoder[i] for i in ids if i not in self._special)
        raw = bytearray(self._byte_decoder[c] for c in symbols)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").rstrip()


# CJK ideographs and punctuation, fullwidth forms and supplementary ideographs: written without spaces.
_CJK = r"\u2e80-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0002fa1f"
_CJK_GAP = regex.compile(rf"(?<=[{_CJK}]) (?=[{_CJK}])")


class ChineseTokenizer(Tokenizer):
    """bert-base-chinese WordPiece from a local ``vocab.txt`` (``--chinese``), with no transformers dependency.

    Chinese characters become single tokens; text is lower-cased. In a BERT vocabulary id 0 is [PAD], so the
    padding rule holds. Encoding adds no [CLS]/[SEP].
    """

    kind = "chinese"

    def __init__(self, vocab_path: PathLike) -> None:
        hint = "pass chinese_vocab_path (CLI: --chinese --bpe_path <vocab.txt>)"
        self._load_file(vocab_path, "bert-base-chinese vocab.txt", hint)

    def _load(self, data: bytes) -> None:
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"not a valid vocab.txt (UTF-8, one token a line): {e}") from e
        if lines[-1] == "":
            lines.pop()
        vocab = {token.rstrip("\r"): i for i, token in enumerate(lines)}
        if len(vocab) != len(lines):  # a repeated token would leave its first id unused
            raise ValueError("not a valid vocab.txt: a token appears twice")
        try:
            self._tokenizer = BertWordPieceTokenizer(vocab, handle_chinese_chars=True, lowercase=True)
        except BaseException as e:  # e.g. TypeError for a vocabulary without [SEP]; or a panic, as HugTokenizer's
            if not isinstance(e, Exception) and not _is_rust_panic(e):
                raise
            raise ValueError(f"not a valid bert vocab.txt: {e}") from e
        self._data = data
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        # WordPiece decoding puts a space between every Chinese character; Chinese is written without them.
        return _CJK_GAP.sub("", self._tokenizer.decode(ids, skip_special_tokens=True))


_KINDS: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (YttmTokenizer, HugTokenizer, SimpleTokenizer, ChineseTokenizer)
}


def tokenizer_from_bytes(kind: str, data: bytes) -> Tokenizer:
    """Rebuild a tokenizer from ``tokenizer.kind`` and ``tokenizer.to_bytes()`` (e.g. stored in a checkpoint)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind].from_bytes(data)


def build_tokenizer(
    bpe_path: PathLike | None = None,
    hug: bool = False,
    chinese: bool = False,
    chinese_vocab_path: PathLike | None = None,
) -> Tokenizer:
    """The tokenizer chosen by DALLE-pytorch's CLI flags.

    ``--chinese``: ChineseTokenizer from chinese_vocab_path (or bpe_path); ``--bpe_path X --hug``: HugTokenizer;
    ``--bpe_path X``: YttmTokenizer; no flags: CLIP's SimpleTokenizer from an installed package.
    """
    if chinese:
        vocab_path = chinese_vocab_path if chinese_vocab_path is not None else bpe_path
        if vocab_path is None:
            raise FileNotFoundError(
                "--chinese needs a local bert-base-chinese vocab.txt (nothing is downloaded); "
                "pass chinese_vocab_path (CLI: --bpe_path <vocab.txt>)"
            )
        return ChineseTokenizer(vocab_path)
    if hug:
        if bpe_path is None:
            raise FileNotFoundError("--hug needs a HuggingFace tokenizer JSON; pass --bpe_path <tokenizer.json>")
        return HugTokenizer(bpe_path)
    if bpe_path is not None:
        return YttmTokenizer(bpe_path)
    return SimpleTokenizer()
