"""Training data: image-caption folders and WebDataset shards, decoded into ``(tokens, image)`` samples.

Both datasets yield ``(tokens (text_len,) long, image (C, image_size, image_size) float in [0, 1])``, or a `Skip`
saying why a sample is unusable and where it is (unreadable image or caption file, empty, undecodable or over-long
caption, missing key); ``collate`` drops the skips and keeps them in the batch, so a few broken files never stop a
run and the trainer can count them and name the first of each kind.

All randomness (caption line, crop, shard order, shuffle buffer) comes from ``random.Random`` instances seeded by
``(seed, epoch, sample)``, never from global RNG state, so a run is reproducible and can resume at any epoch.
"""
from __future__ import annotations

import io
import json
import os
import random
import shlex
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from engine.codecs.tokenizers import Tokenizer

PathLike = str | os.PathLike[str]
Sample = tuple[torch.Tensor, torch.Tensor]  # (tokens (text_len,) long, image (C, H, W) float in [0, 1])


class Skip(NamedTuple):
    """A sample left out: why (one message per kind of fault) and where (its file, or shard and key)."""

    reason: str
    where: str


UNREADABLE_IMAGE = "unreadable image"
UNREADABLE_CAPTION = "unreadable caption (not a readable UTF-8 file, or not valid JSON with a \"caption\" string)"
EMPTY_CAPTION = "empty caption"
MISSING_PART = "image or caption missing"

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


# ---------------------------------------------------------------------------------------------------------------------
# Images


def _to_8bit(img: Image.Image) -> Image.Image:
    """An "L" image from a 16-bit, 32-bit integer or float one; Pillow's own conversion clips at 255 instead."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        values = np.nan_to_num(values)
        # Float images have no fixed range: take [0, 1] when they fit it, else Pillow's [0, 255].
        if values.size and values.max() <= 1.0:
            values = values * 255.0
    else:
        values = values / 257.0  # 65535 -> 255; "I" is how older Pillow loads 16-bit PNGs, so same range
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _convert(img: Image.Image, transparent: bool) -> Image.Image:
    """A new RGB (or RGBA) image; transparency is composited onto white unless kept."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = _to_8bit(img)
    # "transparency" covers palette and single-colour (tRNS) transparency of P, L and RGB images.
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if transparent:
            return rgba
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGBA" if transparent else "RGB")  # also CMYK, YCbCr, 1, L, P without transparency


def load_image(source: PathLike | bytes, transparent: bool = False) -> Image.Image:
    """Decode an image file (path or bytes) into RGB, or RGBA when ``transparent``, upright per its EXIF tag.

    Raises whatever Pillow raises on corrupt or truncated data (mostly ``OSError``), at this call.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as img:
        img.load()  # decode now: Pillow decodes lazily, and a truncated file would only fail later, in the crop
        return _convert(ImageOps.exif_transpose(img), transparent)


def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float] = (0.75, 1.0), *, rng: random.Random
) -> torch.Tensor:
    """A random square crop covering a fraction ``scale`` of the area, resized to ``(C, size, size)`` in [0, 1].

    torchvision's ``RandomResizedCrop(size, scale, ratio=(1, 1))`` without its rejection loop: the area fraction is
    drawn from ``scale`` clipped to what a square inside the image can cover, and an image too elongated for any
    square of the lowest fraction gets its centre square, as torchvision falls back to.
    """
    width, height = img.size
    short = min(width, height)
    largest = short * short / (width * height)  # the fraction covered by the largest square that fits
    if largest < scale[0]:
        side = short
        left, top = (width - side) // 2, (height - side) // 2
    else:
        fraction = rng.uniform(scale[0], min(scale[1], largest))
        side = min(short, max(1, round((fraction * width * height) ** 0.5)))
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    # crop() first: resize(box=...) would let the filter read pixels outside the box.
    crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div_(255.0)


# ---------------------------------------------------------------------------------------------------------------------
# Samples and batches


def caption_tokens(tokenizer: Tokenizer, caption: str, text_len: int, truncate: bool) -> torch.Tensor | None:
    """The caption's (text_len,) token ids padded with 0, or None when it has more tokens and `truncate` is off."""
    ids = tokenizer.encode(caption)
    if len(ids) > text_len and not truncate:
        return None
    tokens = torch.zeros(text_len, dtype=torch.long)
    tokens[: min(len(ids), text_len)] = torch.tensor(ids[:text_len], dtype=torch.long)
    return tokens


def too_long(text_len: int) -> str:
    return (f"caption longer than text_seq_len={text_len} tokens (pass --truncate_captions to keep its first tokens "
            "instead)")


@dataclass(frozen=True)
class _Preprocess:
    """The caption and image path shared by both datasets."""

    tokenizer: Tokenizer
    text_len: int
    image_size: int
    truncate_captions: bool
    resize_ratio: float
    transparent: bool

    def __call__(self, image: PathLike | bytes, caption: str, rng: random.Random, where: str) -> Sample | Skip:
        # Each non-blank line of a caption is an alternative description; one is picked per draw.
        lines = [line.strip() for line in caption.splitlines() if line.strip()]
        if not lines:
            return Skip(EMPTY_CAPTION, where)
        tokens = caption_tokens(self.tokenizer, rng.choice(lines), self.text_len, self.truncate_captions)
        if tokens is None:
            return Skip(too_long(self.text_len), where)
        try:
            img = load_image(image, self.transparent)
        except Exception:  # noqa: BLE001 - Pillow signals corrupt data with many types (OSError, SyntaxError, ...)
            return Skip(UNREADABLE_IMAGE, where if isinstance(image, bytes) else str(image))
        return tokens, random_resized_crop(img, self.image_size, (self.resize_ratio, 1.0), rng=rng)


class Batch(NamedTuple):
    """A collated batch; a NamedTuple so that DataLoader's ``pin_memory`` handles it."""

    text: torch.Tensor  # (b, text_len) long
    images: torch.Tensor  # (b, C, H, W) float in [0, 1]
    skips: tuple[Skip, ...]  # the bad samples dropped from this batch

    @property
    def skipped(self) -> int:
        return len(self.skips)


def collate(samples: Sequence[Sample | Skip]) -> Batch:
    """Stack the good samples and keep the `Skip`s of the bad ones.

    Always returns a Batch: when every sample was bad, ``text`` and ``images`` are empty (``len(batch.text) == 0``,
    shapes ``(0, 0)`` and ``(0, 0, 0, 0)``) and the caller should skip the step but still count ``skips``.
    """
    skips = tuple(s for s in samples if isinstance(s, Skip))
    good = [s for s in samples if not isinstance(s, Skip)]
    if not good:
        return Batch(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, 0, 0), skips)
    return Batch(torch.stack([t for t, _ in good]), torch.stack([i for _, i in good]), skips)


class TokenizedShapes(Dataset):
    """The built-in shapes (engine.demo.shapes) as Samples, like the other datasets."""

    def __init__(self, shapes: Dataset, tokenizer: Tokenizer, text_len: int, truncate: bool) -> None:
        self.shapes, self.tokenizer, self.text_len, self.truncate = shapes, tokenizer, text_len, truncate

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> Sample | Skip:
        caption, image = self.shapes[index]
        tokens = caption_tokens(self.tokenizer, caption, self.text_len, self.truncate)
        if tokens is None:
            return Skip(too_long(self.text_len), f"built-in sample {index} ({caption!r})")
        return tokens, image


# ---------------------------------------------------------------------------------------------------------------------
# Folder of images and captions


class TextImageFolder(Dataset):
    """Images with ``.txt`` captions anywhere under ``folder``, paired by relative path without suffix.

    ``a/cat.png`` pairs with ``a/cat.txt`` only, so equal stems in different sub-folders stay distinct samples.
    Files that found no partner (including a second image with the same name, e.g. ``x.png`` beside ``x.jpg``, of
    which the first in sorted order is kept) are counted in ``unpaired_images`` and ``unpaired_captions``; the first
    image without a caption is ``first_unpaired_image``. A caption path that is no readable file (a folder, a dangling
    link, a link loop) still pairs, so its image is skipped and counted as one with an unreadable caption.
    ``self[i]`` is a Sample, or a Skip when the image or caption is unusable.
    """

    def __init__(
        self,
        folder: PathLike,
        *,
        tokenizer: Tokenizer,
        text_len: int,
        image_size: int,
        truncate_captions: bool = False,
        resize_ratio: float = 0.75,
        transparent: bool = False,
        seed: int = 0,
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image-text folder {str(self.folder)!r} does not exist or is not a directory")
        images: dict[str, Path] = {}
        captions: dict[str, Path] = {}
        num_images = num_captions = 0
        for path in sorted(self.folder.rglob("*")):
            suffix = path.suffix.lower()
            if suffix not in IMAGE_SUFFIXES and suffix != ".txt":
                continue
            key = path.relative_to(self.folder).with_suffix("").as_posix()
            if suffix in IMAGE_SUFFIXES:
                images.setdefault(key, path)
                num_images += 1
            else:
                captions.setdefault(key, path)
                num_captions += 1
        keys = sorted(images.keys() & captions.keys())
        if not keys:
            raise ValueError(
                f"no image–caption pairs in {self.folder}: found {num_images} images and {num_captions} caption files"
            )
        self.pairs: list[tuple[Path, Path]] = [(images[k], captions[k]) for k in keys]  # (image, caption)
        self.unpaired_images = num_images - len(keys)
        self.unpaired_captions = num_captions - len(keys)
        paired = set(keys)
        self.first_unpaired_image = next((str(p) for k, p in sorted(images.items()) if k not in paired), None)
        self._preprocess = _Preprocess(tokenizer, text_len, image_size, truncate_captions, resize_ratio, transparent)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new captions and crops. DataLoader workers see it only if they are not persistent."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample | Skip:
        image_path, caption_path = self.pairs[index]
        caption = read_caption(caption_path)
        if caption is None:
            return Skip(UNREADABLE_CAPTION, str(caption_path))
        if not image_path.is_file():  # a folder, a dangling link, or a FIFO that would block the read
            return Skip(UNREADABLE_IMAGE, str(image_path))
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")  # str seeds hash with SHA-512: same in every process
        return self._preprocess(image_path, caption, rng, str(caption_path))


class ImageFolder(Dataset):
    """Every image under ``folder`` (nested folders fine, no class sub-folders needed), centre-cropped to a square.

    ``self[i]`` is an image ``(C, image_size, image_size)`` in [0, 1], or None when the file is unusable;
    ``collate_images`` drops and counts those.
    """

    def __init__(self, folder: PathLike, *, image_size: int, transparent: bool = False) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {str(self.folder)!r} does not exist or is not a directory")
        self.paths = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.folder}")
        self.image_size, self.transparent = image_size, transparent

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        try:
            img = load_image(self.paths[index], self.transparent)
        except Exception:  # noqa: BLE001 - Pillow signals corrupt data with many types
            return None
        # A full-area "random" crop is the centre square: Resize + CenterCrop, as DALLE-pytorch's train_vae.py.
        return random_resized_crop(img, self.image_size, (1.0, 1.0), rng=random.Random(0))


def collate_images(samples: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, int]:
    """Stacked good images (possibly none) and the number of bad samples dropped."""
    good = [s for s in samples if s is not None]
    images = torch.stack(good) if good else torch.zeros(0, 0, 0, 0)
    return images, len(samples) - len(good)


# ---------------------------------------------------------------------------------------------------------------------
# WebDataset shards


def webdataset_source(spec: str) -> list[str] | str:
    """The shard urls for ``--image_text_folder`` in WebDataset mode.

    A directory gives its ``.tar`` files (recursively, sorted); ``http(s)://`` and ``gs://`` urls are streamed through
    ``curl`` / ``gsutil`` (``|| true`` lets a failed download end that shard instead of the run); a ``.tar`` path,
    brace pattern (``data-{000000..000554}.tar``) or ``pipe:`` command is returned as it is.
    """
    if spec.startswith(("http://", "https://")):
        return f"pipe:curl -L -s {shlex.quote(spec)} || true"
    if spec.startswith("gs://"):
        return f"pipe:gsutil cat {shlex.quote(spec)} || true"
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.rglob("*.tar") if p.is_file())
        if not shards:
            raise FileNotFoundError(f"no .tar shards under {spec!r}")
        return shards
    if not spec.startswith("pipe:") and "{" not in spec and not path.exists():
        raise FileNotFoundError(f"WebDataset shard {spec!r} does not exist")
    return spec


def read_caption(path: Path) -> str | None:
    """A caption file's text, or None when it is no regular file (a folder, a dangling link, a link loop, a FIFO
    that would block) or not UTF-8."""
    try:
        if not path.is_file():
            return None
        return path.read_bytes().decode("utf-8-sig")  # -sig: drop a BOM left by Windows editors
    except (OSError, UnicodeDecodeError):
        return None


def decode_caption(raw: bytes, caption_key: str) -> str | None:
    """A WebDataset caption: UTF-8 text, or a JSON object's "caption" string; None when it is neither."""
    try:
        if caption_key.endswith("json"):
            caption = json.loads(raw).get("caption")
            return caption if isinstance(caption, str) else None
        return raw.decode("utf-8-sig")
    except (ValueError, AttributeError):  # bad UTF-8 or JSON (both ValueError), or JSON that is not an object
        return None


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class WebDatasetStream(IterableDataset):
    """Samples streamed from WebDataset tar shards (img2dataset's ``.jpg/.txt/.json`` layout works as is).

    Each epoch the shard list is shuffled with ``(seed, epoch)``, identically on every process, and dealt out to
    (rank, DataLoader worker) readers, so no two readers see the same sample; each reader then shuffles its samples
    in a ``shuffle_buffer``. Readers can get unequal numbers of samples, so a distributed trainer should count steps
    rather than wait for every rank's stream to end. With fewer shards than readers, every reader reads every shard
    and keeps every n-th sample instead (with a warning): correct, but each shard is read n times.

    ``img_key`` is a tar suffix such as ``jpg`` (or alternatives ``jpg;png``); ``caption_key`` is ``txt`` (UTF-8
    text, one alternative caption per line) or ``json`` (its ``"caption"`` field). A sample missing either, with an
    undecodable image or an empty caption is yielded as a Skip; unreadable shards are skipped with a warning.
    ``set_epoch`` reaches DataLoader workers only if they are not persistent.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        img_key: str,
        caption_key: str,
        tokenizer: Tokenizer,
        text_len: int,
        image_size: int,
        truncate_captions: bool = False,
        resize_ratio: float = 0.75,
        transparent: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("WebDatasetStream needs at least one shard url")
        self.img_keys = img_key.lower().split(";")  # webdataset lower-cases the suffixes it reads
        self.caption_key = caption_key.lower()
        self._preprocess = _Preprocess(tokenizer, text_len, image_size, truncate_captions, resize_ratio, transparent)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample | Skip]:
        rank, world_size = _rank_and_world_size()
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        reader, num_readers = rank * num_workers + worker_id, world_size * num_workers

        urls = list(self.urls)
        random.Random(f"{self.seed}:{self.epoch}").shuffle(urls)
        by_shard = len(urls) >= num_readers
        if by_shard:
            urls = urls[reader::num_readers]
        else:
            warnings.warn(
                f"{len(urls)} shards for {num_readers} readers (ranks x workers): every reader reads every shard "
                "and keeps every n-th sample; use more shards than readers to avoid reading them repeatedly"
            )
        # Splitting is done above, so webdataset's node and worker splitters are turned off.
        pipeline = wds.WebDataset(
            urls,
            handler=wds.warn_and_continue,  # an unreadable shard is skipped with a warning
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
            seed=self.seed,  # unused without shardshuffle, but None would make webdataset draw from the global RNG
        )
        samples: Iterator[dict[str, Any]] = iter(pipeline)
        if not by_shard:
            samples = (s for i, s in enumerate(samples) if i % num_readers == reader)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{self.epoch}:reader{reader}")
            samples = wds.filters.shuffle(self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            yield self._decode(sample)

    def _decode(self, sample: dict[str, Any]) -> Sample | Skip:
        where = f"sample {sample['__key__']!r} of {sample['__url__']}"
        image = next((sample[k] for k in self.img_keys if k in sample), None)
        raw = sample.get(self.caption_key)
        if image is None or raw is None:
            return Skip(MISSING_PART, where)
        caption = decode_caption(raw, self.caption_key)
        if caption is None:
            return Skip(UNREADABLE_CAPTION, where)
        # Seeded by the sample's identity, not its position, so it does not depend on which reader gets it.
        rng = random.Random(f"{self.seed}:{self.epoch}:{sample['__url__']}:{sample['__key__']}")
        return self._preprocess(image, caption, rng, where)
