import io
import json
import random
import re
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from torch.utils.data import DataLoader

from engine import data
from engine.codecs.tokenizers import HugTokenizer
from engine.data import (
    EMPTY_CAPTION,
    MISSING_PART,
    UNREADABLE_CAPTION,
    UNREADABLE_IMAGE,
    Batch,
    Skip,
    TextImageFolder,
    WebDatasetStream,
    collate,
    load_image,
    random_resized_crop,
    webdataset_source,
)

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "one", "two", "three", "four", "five"]
WORDS += [f"s{i}" for i in range(40)]  # unique sample ids, so a decoded caption names its sample


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    hf.save(str(path))
    return HugTokenizer(path)


def noise_image(width=20, height=24, seed=0, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# load_image


def _palette_image(transparency):
    img = Image.new("P", (4, 3), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    if transparency:
        img.info["transparency"] = 0
    return img


def _alpha_pixel_image(mode, color, alpha):
    return Image.new(mode, (4, 3), (*color, alpha) if mode == "RGBA" else (color, alpha))


MODE_CASES = {
    # name: (image, format, {xy: expected RGB})
    "L": (Image.new("L", (4, 3), 100), "PNG", {(0, 0): (100, 100, 100)}),
    "1": (Image.new("1", (4, 3), 1), "PNG", {(0, 0): (255, 255, 255)}),
    "LA opaque": (_alpha_pixel_image("LA", 100, 255), "PNG", {(0, 0): (100, 100, 100)}),
    "LA clear": (_alpha_pixel_image("LA", 100, 0), "PNG", {(0, 0): (255, 255, 255)}),
    "P": (_palette_image(False), "PNG", {(0, 0): (10, 20, 30), (1, 0): (200, 100, 50)}),
    "P transparent": (_palette_image(True), "PNG", {(0, 0): (255, 255, 255), (1, 0): (200, 100, 50)}),
    "RGBA clear": (_alpha_pixel_image("RGBA", (255, 0, 0), 0), "PNG", {(0, 0): (255, 255, 255)}),
    "RGBA half": (_alpha_pixel_image("RGBA", (255, 0, 0), 128), "PNG", {(0, 0): (255, 127, 127)}),
    "CMYK": (Image.new("CMYK", (4, 3), (0, 255, 0, 0)), "TIFF", {(0, 0): (255, 0, 255)}),
    "CMYK jpeg": (Image.new("CMYK", (4, 3), (0, 255, 0, 0)), "JPEG", {(0, 0): (255, 0, 255)}),
    "I;16": (
        Image.fromarray(np.array([[65535, 32768, 0, 257]], dtype=np.uint16)),
        "PNG",
        {(0, 0): (255, 255, 255), (1, 0): (128, 128, 128), (2, 0): (0, 0, 0), (3, 0): (1, 1, 1)},
    ),
    "I;16B": (
        Image.fromarray(np.array([[65535, 32768]], dtype=">u2")),
        "TIFF",
        {(0, 0): (255, 255, 255), (1, 0): (128, 128, 128)},
    ),
    "I": (
        Image.fromarray(np.array([[65535, 32768]], dtype=np.int32)),
        "TIFF",
        {(0, 0): (255, 255, 255), (1, 0): (128, 128, 128)},
    ),
    "F in [0, 1]": (
        Image.fromarray(np.array([[1.0, 0.5, 0.0]], dtype=np.float32)),
        "TIFF",
        {(0, 0): (255, 255, 255), (1, 0): (128, 128, 128), (2, 0): (0, 0, 0)},
    ),
    "F in [0, 255]": (
        Image.fromarray(np.array([[200.0, 300.0]], dtype=np.float32)),
        "TIFF",
        {(0, 0): (200, 200, 200), (1, 0): (255, 255, 255)},
    ),
}


@pytest.mark.parametrize("name", list(MODE_CASES))
def test_load_image_modes(name, tmp_path):
    img, fmt, expected = MODE_CASES[name]
    raw = encode(img, fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(raw)
    for source in (raw, path, str(path)):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == img.size
        for xy, rgb in expected.items():
            assert loaded.getpixel(xy) == pytest.approx(rgb, abs=2 if fmt == "JPEG" else 0), (name, xy)


def test_load_image_transparent_keeps_alpha():
    rgba = load_image(encode(_alpha_pixel_image("RGBA", (255, 0, 0), 128), "PNG"), transparent=True)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (255, 0, 0, 128)
    palette = load_image(encode(_palette_image(True), "PNG"), transparent=True)
    assert palette.getpixel((0, 0))[3] == 0 and palette.getpixel((1, 0)) == (200, 100, 50, 255)
    opaque = load_image(encode(Image.new("L", (2, 2), 7), "PNG"), transparent=True)
    assert opaque.mode == "RGBA" and opaque.getpixel((0, 0)) == (7, 7, 7, 255)


def test_load_image_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to view
    buf = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buf, "JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).size == (10, 20)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_load_image_rejects_corrupt_and_truncated(fmt):
    with pytest.raises(OSError):
        load_image(b"this is not an image")
    raw = encode(noise_image(64, 64), fmt)
    with pytest.raises(OSError, match="truncated"):
        load_image(raw[: len(raw) // 2])


# ---------------------------------------------------------------------------------------------------------------------
# random_resized_crop


def test_random_resized_crop_shape_range_determinism():
    img = noise_image(20, 24)
    out = random_resized_crop(img, 16, (0.75, 1.0), rng=random.Random(3))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert torch.equal(out, random_resized_crop(img, 16, (0.75, 1.0), rng=random.Random(3)))
    crops = {random_resized_crop(img, 16, (0.5, 1.0), rng=random.Random(s)).sum().item() for s in range(5)}
    assert len(crops) > 1
    rgba = random_resized_crop(noise_image(mode="RGBA"), 8, rng=random.Random(0))
    assert rgba.shape == (4, 8, 8)


def test_random_resized_crop_full_scale_is_plain_resize():
    img = noise_image(24, 24)
    out = random_resized_crop(img, 16, (1.0, 1.0), rng=random.Random(0))
    expected = np.array(img.resize((16, 16), Image.Resampling.BICUBIC))
    assert torch.equal((out * 255).round().byte(), torch.from_numpy(expected).permute(2, 0, 1))


def test_random_resized_crop_elongated_image_takes_centre_square():
    # Left third black, middle white, right third black: the centre square is all white.
    img = Image.new("RGB", (30, 10), 0)
    img.paste((255, 255, 255), (10, 0, 20, 10))
    out = random_resized_crop(img, 5, (0.75, 1.0), rng=random.Random(0))
    assert torch.allclose(out, torch.ones_like(out))


# ---------------------------------------------------------------------------------------------------------------------
# TextImageFolder


def truncated(raw):
    return raw[: len(raw) // 2]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    files = {
        "a/cat.png": encode(noise_image(20, 24, 1), "PNG"),
        "a/cat.txt": b"a red cat\n\none cat\n",
        "b/cat.jpg": encode(noise_image(24, 20, 2), "JPEG"),  # same stem as a/cat: a separate pair
        "b/cat.txt": b"a blue cat s1",
        "c/deep/dog.JPEG": encode(noise_image(30, 30, 3, "L"), "JPEG"),
        "c/deep/dog.txt": b"one\ntwo\nthree\nfour\nfive\n",
        "c/p.bmp": encode(noise_image(16, 16, 4, "P"), "BMP"),
        "c/p.txt": b"a dog",
        "c/w.webp": encode(noise_image(20, 20, 5, "RGBA"), "WEBP"),
        "c/w.txt": b"a photo",
        "bad/corrupt.png": b"not a png at all",
        "bad/corrupt.txt": b"a cat",
        "bad/short.jpg": truncated(encode(noise_image(64, 64, 6), "JPEG")),
        "bad/short.txt": b"a cat",
        "bad/short2.png": truncated(encode(noise_image(64, 64, 7), "PNG")),
        "bad/short2.txt": b"a cat",
        "bad/empty.png": encode(noise_image(seed=8), "PNG"),
        "bad/empty.txt": b"\n   \n\n",
        "bad/latin.png": encode(noise_image(seed=9), "PNG"),
        "bad/latin.txt": b"caf\xe9 cat",
        "orphan.png": encode(noise_image(seed=10), "PNG"),
        "a/lonely.txt": b"a cat",
        "notes.md": b"ignored",
    }
    for name, raw in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(raw)
    return root


GOOD = {"a/cat", "b/cat", "c/deep/dog", "c/p", "c/w"}
BAD = {"bad/corrupt", "bad/short", "bad/short2", "bad/empty", "bad/latin"}


def make_folder(root, tokenizer, **kw):
    return TextImageFolder(root, tokenizer=tokenizer, text_len=6, image_size=8, **kw)


def key_of(ds, i):
    image, _ = ds.pairs[i]
    return image.relative_to(ds.folder).with_suffix("").as_posix()


def test_folder_pairs_by_relative_path(folder, tokenizer):
    ds = make_folder(folder, tokenizer)
    keys = [key_of(ds, i) for i in range(len(ds))]
    assert keys == sorted(GOOD | BAD)
    assert ds.unpaired_images == 1 and ds.unpaired_captions == 1


def test_folder_samples_and_bad_samples(folder, tokenizer):
    ds = make_folder(folder, tokenizer)
    for i in range(len(ds)):
        sample = ds[i]
        if key_of(ds, i) in BAD:
            reason = EMPTY_CAPTION if key_of(ds, i) == "bad/empty" else \
                UNREADABLE_CAPTION if key_of(ds, i) == "bad/latin" else UNREADABLE_IMAGE
            assert sample.reason == reason and key_of(ds, i) in sample.where, key_of(ds, i)
            continue
        tokens, image = sample
        assert tokens.shape == (6,) and tokens.dtype == torch.long
        assert image.shape == (3, 8, 8) and 0 <= image.min() and image.max() <= 1
    assert tokenizer.decode(ds[keys_index(ds, "b/cat")][0]) == "a blue cat s1"

    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate))
    assert sum(b.skipped for b in batches) == len(BAD)
    assert sum(len(b.text) for b in batches) == len(GOOD)
    assert all(isinstance(b, Batch) for b in batches)


def keys_index(ds, key):
    return next(i for i in range(len(ds)) if key_of(ds, i) == key)


def test_folder_transparent_gives_four_channels(folder, tokenizer):
    ds = make_folder(folder, tokenizer, transparent=True)
    assert ds[keys_index(ds, "c/w")][1].shape == (4, 8, 8)


def test_folder_randomness_is_seeded_by_epoch_and_index(folder, tokenizer):
    ds = make_folder(folder, tokenizer)
    good = [i for i in range(len(ds)) if key_of(ds, i) in GOOD]
    first = [ds[i] for i in good]
    again = make_folder(folder, tokenizer)
    for i, (tokens, image) in zip(good, first):
        assert torch.equal(ds[i][1], image) and torch.equal(again[i][0], tokens) and torch.equal(again[i][1], image)
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][1], image) for i, (_, image) in zip(good, first, strict=True))
    dog = keys_index(ds, "c/deep/dog")
    lines = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        lines.add(tokenizer.decode(ds[dog][0]))
    assert len(lines) > 1 and lines <= {"one", "two", "three", "four", "five"}
    assert not torch.equal(make_folder(folder, tokenizer, seed=1)[good[0]][1], first[0][1])


def test_folder_over_long_caption_is_skipped_and_named(folder, tokenizer):
    (folder / "a/cat.txt").write_text("a red cat of one photo two three\n")
    ds = TextImageFolder(folder, tokenizer=tokenizer, text_len=4, image_size=8)
    skip = ds[keys_index(ds, "a/cat")]
    assert "--truncate_captions" in skip.reason and skip.where.endswith("a/cat.txt")
    ds = TextImageFolder(folder, tokenizer=tokenizer, text_len=4, image_size=8, truncate_captions=True)
    assert tokenizer.decode(ds[keys_index(ds, "a/cat")][0]) == "a red cat of"


def test_folder_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="missing"):
        make_folder(tmp_path / "missing", tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found 0 images and 0 caption files"):
        make_folder(tmp_path / "empty", tokenizer)
    (tmp_path / "half").mkdir()
    (tmp_path / "half/x.png").write_bytes(encode(noise_image(), "PNG"))
    (tmp_path / "half/sub").mkdir()
    (tmp_path / "half/sub/x.txt").write_bytes(b"a cat")
    with pytest.raises(ValueError, match=r"no image–caption pairs in .*half: found 1 images and 1 caption files"):
        make_folder(tmp_path / "half", tokenizer)


def test_collate_all_bad():
    batch = collate([Skip("x", "a"), Skip("y", "b")])
    assert batch.skipped == 2 and len(batch.text) == 0 and len(batch.images) == 0


# ---------------------------------------------------------------------------------------------------------------------
# WebDataset


NUM_SHARDS, PER_SHARD = 4, 5
CORRUPT, NO_CAPTION = 7, 16  # sample ids


@pytest.fixture
def shards(tmp_path):
    """img2dataset layout: every sample has jpg + txt + json, except one without captions; one image is corrupt."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(NUM_SHARDS):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for index in range(PER_SHARD):
                sid = shard * PER_SHARD + index
                sample = {"__key__": f"{shard:05d}{index:04d}", "jpg": encode(noise_image(seed=sid), "JPEG")}
                if sid == CORRUPT:
                    sample["jpg"] = b"garbage"
                if sid != NO_CAPTION:
                    sample["txt"] = f"a photo s{sid}"
                    sample["json"] = {"caption": f"a photo s{sid}", "width": 20, "height": 24}
                sink.write(sample)
    return folder


GOOD_IDS = sorted(set(range(NUM_SHARDS * PER_SHARD)) - {CORRUPT, NO_CAPTION})


def make_stream(urls, tokenizer, **kw):
    kw = {"img_key": "jpg", "caption_key": "txt", "shuffle_buffer": 8, **kw}
    return WebDatasetStream(urls, tokenizer=tokenizer, text_len=4, image_size=8, **kw)


def sample_ids(tokenizer, samples):
    """Sample ids of the good samples, and the count of bad ones."""
    good = [s for s in samples if not isinstance(s, Skip)]
    return [int(tokenizer.decode(t).split()[-1][1:]) for t, _ in good], len(samples) - len(good)


def test_webdataset_source(shards, tmp_path):
    assert webdataset_source(str(shards)) == [str(shards / f"{i:05d}.tar") for i in range(NUM_SHARDS)]
    pattern = str(shards / "{00000..00003}.tar")
    assert webdataset_source(pattern) == pattern
    assert webdataset_source(str(shards / "00001.tar")) == str(shards / "00001.tar")
    assert webdataset_source("pipe:cat x.tar") == "pipe:cat x.tar"
    assert webdataset_source("https://host/d/00001.tar") == "pipe:curl -L -s https://host/d/00001.tar || true"
    assert webdataset_source("gs://bucket/d.tar") == "pipe:gsutil cat gs://bucket/d.tar || true"
    # Braces survive shell quoting and are expanded per shard by webdataset.
    url = webdataset_source("https://host/d-{0..1}.tar?sig=a&b=c")
    assert wds.shardlists.expand_urls(url) == [
        f"pipe:curl -L -s 'https://host/d-{i}.tar?sig=a&b=c' || true" for i in range(2)
    ]
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        webdataset_source(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError):
        webdataset_source(str(tmp_path / "missing.tar"))


@pytest.mark.parametrize("caption_key", ["txt", "json"])
def test_stream_in_process_is_deterministic(shards, tokenizer, caption_key):
    stream = make_stream(str(shards / "{00000..00003}.tar"), tokenizer, caption_key=caption_key)
    first = list(stream)
    ids, bad = sample_ids(tokenizer, first)
    assert sorted(ids) == GOOD_IDS and bad == 2
    tokens, image = next(s for s in first if not isinstance(s, Skip))
    assert tokens.shape == (4,) and image.shape == (3, 8, 8)
    again = list(stream)
    assert all(a == b if isinstance(a, Skip) else torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    stream.set_epoch(1)
    ids_next, _ = sample_ids(tokenizer, list(stream))
    assert sorted(ids_next) == GOOD_IDS and ids_next != ids


def test_stream_workers_see_every_sample_once(shards, tokenizer):
    stream = make_stream(webdataset_source(str(shards)), tokenizer)
    loader = DataLoader(stream, batch_size=3, num_workers=2, collate_fn=collate)
    for epoch in range(2):
        stream.set_epoch(epoch)
        batches = list(loader)
        ids = [int(tokenizer.decode(t).split()[-1][1:]) for b in batches for t in b.text]
        assert sorted(ids) == GOOD_IDS
        assert sum(b.skipped for b in batches) == 2


@pytest.mark.parametrize("world_size", [2, 8])  # 8 readers > 4 shards: split by sample instead
def test_stream_ranks_are_disjoint(shards, tokenizer, monkeypatch, world_size):
    seen, bad = [], 0
    for rank in range(world_size):
        monkeypatch.setattr(data, "_rank_and_world_size", lambda rank=rank: (rank, world_size))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, skipped = sample_ids(tokenizer, list(make_stream(webdataset_source(str(shards)), tokenizer)))
        assert any("every reader reads every shard" in str(w.message) for w in caught) == (world_size > NUM_SHARDS)
        assert ids, f"rank {rank} got no samples"
        seen += ids
        bad += skipped
    assert sorted(seen) == GOOD_IDS and bad == 2


def test_stream_over_long_caption_is_skipped_and_named(shards, tokenizer):
    stream = make_stream(str(shards / "00000.tar"), tokenizer, caption_key="json")
    stream._preprocess = data._Preprocess(tokenizer, 2, 8, False, 0.75, False)
    skips = [s for s in stream if isinstance(s, Skip) and "--truncate_captions" in s.reason]
    assert len(skips) == PER_SHARD and all(re.search(r"'00000000\d' of .*00000\.tar", s.where) for s in skips)


def test_stream_bad_json_and_missing_image(tmp_path, tokenizer):
    path = tmp_path / "odd.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "k0", "jpg": encode(noise_image(), "JPEG"), "json": json.dumps([1, 2])})
        sink.write({"__key__": "k1", "jpg": encode(noise_image(), "JPEG"), "json": b"{not json"})
        sink.write({"__key__": "k2", "jpg": encode(noise_image(), "JPEG"), "json": {"caption": None}})
        sink.write({"__key__": "k3", "png": encode(noise_image(), "PNG"), "json": {"caption": "a s3"}})
    skips = list(make_stream(str(path), tokenizer, caption_key="json"))
    assert sorted((s.reason, s.where.split("'")[1]) for s in skips) == [
        (MISSING_PART, "k3"), (UNREADABLE_CAPTION, "k0"), (UNREADABLE_CAPTION, "k1"), (UNREADABLE_CAPTION, "k2")]
    png_ok = list(make_stream(str(path), tokenizer, img_key="jpg;png", caption_key="json"))
    assert sample_ids(tokenizer, png_ok) == ([3], 3)
