"""Prompt fidelity of a trained DALL-E on held-out image-caption pairs of your own data.

    python -m engine.eval --dalle_path dalle.safetensors --image_text_folder held_out/ [--clip_path clip.safetensors]

Over the first --num_pairs readable pairs (bad samples are skipped and counted) it reports:

- caption retrieval by the model's own likelihood: each image's log p(image | caption) under its own caption and
  --candidates - 1 other captions of the set; top-1 accuracy (ties are misses), mean rank of the own caption
  (1 = best) and the chance level;
- image-token perplexity: exp of the mean negative log-likelihood per image token given the own caption;
- with --clip_path, the CLIP score of --samples_per_caption samples per caption, beside the real images' score.

``evaluate`` is the same measurement for training code (a periodic validation metric).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.cli import check_device, check_writable, number, positive_int, rng_seed
from engine.codecs.tokenizers import Tokenizer
from engine.data import Sample, Skip, TextImageFolder, WebDatasetStream, webdataset_source
from engine.io.checkpoint import load_clip, load_dalle
from engine.io.files import write_atomically
from engine.train.training import build_data, load_or_exit

at_least_two = number(int, lambda n: n >= 2, "an integer >= 2 (the own caption and at least one other)")


def evaluate(
    model: Any,
    tokenizer: Tokenizer,
    samples: Iterable[Sample | Skip],
    *,
    candidates: int = 16,
    clip: Any = None,
    clip_tokenizer: Tokenizer | None = None,
    samples_per_caption: int = 1,
    cond_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    num_pairs: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Caption retrieval, image-token perplexity and (with a ``clip``) CLIP scores over the first ``num_pairs`` (all
    by default) good pairs of ``samples``; the ``Skip``s met on the way are counted by reason.

    ``model`` is a DALLE with a VAE; ``tokenizer`` made the samples' tokens. Each image's ``candidates - 1`` rival
    captions are distinct captions of the set other than its own (fewer when the set has fewer: the report gives
    the number used), drawn from a ``torch.Generator`` seeded with ``seed``. With a ``clip``, caption i is sampled
    ``samples_per_caption`` times in one call seeded with ``seed + i``, so the figures do not depend on
    ``batch_size`` (which batches likelihoods, and CLIP images); its text is the caption decoded by ``tokenizer`` and
    re-encoded by ``clip_tokenizer``, or without one the caption's own ids cut to the CLIP's length.

    The model (and CLIP) run in eval mode under ``torch.inference_mode()`` and get their training mode back. Returns
    a JSON-ready dict: "pairs", "skipped" {reason: count}, "first_skipped" {reason: where}, "retrieval" {"top1",
    "mean_rank", "candidates", "chance"} (None with fewer than 2 distinct captions), "perplexity", "nll_per_token"
    and, with a clip, "clip" {"sample_score", "real_score", "ratio", "samples_per_caption", "cond_scale", "pairs",
    "captions_without_clip_tokens"} (means over the pairs whose caption has CLIP tokens).
    """
    if candidates < 2:
        raise ValueError(f"candidates must be >= 2 (the own caption and at least one other), got {candidates}")
    if samples_per_caption < 1 or batch_size < 1 or (num_pairs is not None and num_pairs < 1):
        raise ValueError("samples_per_caption, batch_size and num_pairs must be >= 1")
    modules = [m for m in (model, clip) if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.inference_mode():
            return _evaluate(model, tokenizer, samples, candidates, clip, clip_tokenizer, samples_per_caption,
                             cond_scale, seed, batch_size, torch.device(device), num_pairs, progress)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _evaluate(model, tokenizer, samples, candidates, clip, clip_tokenizer, samples_per_caption, cond_scale, seed,
              batch_size, device, num_pairs, progress) -> dict[str, Any]:
    texts, images, skipped, first_skipped = _take(samples, num_pairs)
    report: dict[str, Any] = {"pairs": len(texts), "skipped": dict(skipped), "first_skipped": first_skipped,
                              "retrieval": None, "perplexity": None, "nll_per_token": None}
    if not texts:
        return report
    n, seq_len = len(texts), model.config.image_seq_len
    dtype = next(model.parameters()).dtype  # a model cast to bf16 has its VAE cast too
    codes = torch.cat([model.tokenize_images(images[i:i + batch_size].to(device, dtype))
                       for i in range(0, n, batch_size)])

    # Rivals are other distinct captions: a duplicate of the own caption would tie with it and count as a miss.
    unique: dict[tuple[int, ...], int] = {}
    own = torch.tensor([unique.setdefault(tuple(t), len(unique)) for t in texts])
    captions = torch.stack([torch.tensor(t) for t in unique])
    k = min(candidates, len(unique))
    generator = torch.Generator().manual_seed(seed)
    columns = [own[:, None]]
    if k >= 2:
        rivals = torch.stack([torch.randperm(len(unique) - 1, generator=generator)[:k - 1] for _ in range(n)])
        columns.append(rivals + (rivals >= own[:, None]).long())  # skip the own caption's index
    choice = torch.cat(columns, dim=1)  # (n, k) caption indices, the own first

    # One row per (image, candidate caption), batch_size rows per forward pass.
    rows = choice.flatten()
    image_of_row = torch.arange(n).repeat_interleave(choice.shape[1])
    ll = []
    for start in tqdm(range(0, len(rows), batch_size), desc="likelihoods", unit="batch", disable=not progress):
        r = slice(start, start + batch_size)
        text = captions[rows[r]].to(device)
        ll.append(model.image_log_likelihood(text, codes[image_of_row[r].to(device)]).double().cpu())
    ll = torch.cat(ll).view(n, choice.shape[1])

    nll = -float(ll[:, 0].mean()) / seq_len
    report["nll_per_token"] = _finite(nll)
    report["perplexity"] = _finite(math.exp(nll) if nll < 700 else math.inf)
    if k >= 2:
        rank = 1 + (ll[:, 1:] >= ll[:, :1]).sum(dim=1)  # ties rank the own caption below its rivals
        report["retrieval"] = {"top1": float((rank == 1).double().mean()), "mean_rank": float(rank.double().mean()),
                               "candidates": k, "chance": 1 / k}
    if clip is not None:
        report["clip"] = _clip_scores(model, tokenizer, texts, images, clip, clip_tokenizer, samples_per_caption,
                                      cond_scale, seed, batch_size, device, progress)
    return report


def _take(samples: Iterable[Sample | Skip], num_pairs: int | None):
    """The first num_pairs good samples as (token lists, stacked images), and the skips met before them."""
    texts: list[list[int]] = []
    images: list[torch.Tensor] = []
    skipped: Counter[str] = Counter()
    first_skipped: dict[str, str] = {}
    for sample in samples:
        if isinstance(sample, Skip):
            skipped[sample.reason] += 1
            first_skipped.setdefault(sample.reason, sample.where)
            continue
        tokens, image = sample
        texts.append(tokens.tolist())
        images.append(image)
        if num_pairs is not None and len(texts) >= num_pairs:
            break
    return texts, (torch.stack(images) if images else None), skipped, first_skipped


def _clip_scores(model, tokenizer, texts, images, clip, clip_tokenizer, samples_per_caption, cond_scale, seed,
                 batch_size, device, progress) -> dict[str, Any]:
    length = clip.config.text_seq_len
    sample_scores, real_scores, untokenizable = [], [], 0
    for i, tokens in enumerate(tqdm(texts, desc="samples", unit="caption", disable=not progress)):
        ids = [t for t in tokens if t != 0]
        if clip_tokenizer is not None:
            ids = clip_tokenizer.encode(tokenizer.decode(ids))
        ids = ids[:length]
        if not ids:  # a CLIP cannot score a caption with no tokens
            untokenizable += 1
            continue
        text = torch.tensor(tokens, device=device)[None].expand(samples_per_caption, -1)
        # One call per caption, seeded by its index: the samples do not depend on which captions share a batch.
        samples = model.generate_images(text, cond_scale=cond_scale, seed=seed + i).float()
        clip_text = torch.zeros(1, length, dtype=torch.long)
        clip_text[0, :len(ids)] = torch.tensor(ids)
        scores = clip.score(clip_text, torch.cat([images[i:i + 1].to(samples.device), samples]), batch_size)
        real_scores.append(float(scores[0]))
        sample_scores += scores[1:].tolist()
    sample_mean = _finite(sum(sample_scores) / len(sample_scores)) if sample_scores else None
    real_mean = _finite(sum(real_scores) / len(real_scores)) if real_scores else None
    ratio = sample_mean / real_mean if sample_mean is not None and real_mean else None  # None for a 0 reference
    scale = model.config.default_cond_scale if cond_scale is None else cond_scale
    return {"sample_score": sample_mean, "real_score": real_mean, "ratio": ratio,
            "samples_per_caption": samples_per_caption, "cond_scale": scale, "pairs": len(real_scores),
            "captions_without_clip_tokens": untokenizable}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf


# --- data -----------------------------------------------------------------------------------------------------------


def eval_samples(image_text_folder: str, *, tokenizer: Tokenizer, text_len: int, image_size: int, wds: str = "",
                 truncate_captions: bool = False, seed: int = 0) -> tuple[Iterator[Sample | Skip], dict[str, int]]:
    """The pairs of a folder (or WebDataset shards with ``wds`` = "IMG_KEY,CAPTION_KEY") in the data's order, as
    train.py builds them but with whole (centre-square) images instead of random crops, and the folder's counts of
    images and captions left unpaired ({} for shards). ``seed`` picks a line of multi-line captions.

    Shards are read one after another in their listed order, without shuffling. Under torch.distributed each rank
    reads only its share of every shard (see WebDatasetStream). Raises SystemExit("error: ...") for a folder without
    pairs or missing shards, as train.py does."""
    args = argparse.Namespace(image_text_folder=image_text_folder, wds=wds, truncate_captions=truncate_captions,
                              resize_ratio=1.0, seed=seed)
    data = build_data(args, tokenizer, text_len, image_size)
    if isinstance(data, TextImageFolder):
        unpaired = {"images": data.unpaired_images, "captions": data.unpaired_captions}
        return (data[i] for i in range(len(data))), unpaired
    assert isinstance(data, WebDatasetStream)
    data.shuffle_buffer = 0
    return _in_order(data), {}


def _in_order(stream: WebDatasetStream) -> Iterator[Sample | Skip]:
    # The stream shuffles its shard list; one shard per pass keeps the listed order.
    for url in stream.urls:
        one = copy.copy(stream)
        one.urls = [url]
        yield from one


# --- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle_path", required=True, help="checkpoint written by train.py")
    p.add_argument("--image_text_folder", required=True,
                   help="held-out images with same-name .txt captions, or WebDataset shards (with --wds)")
    p.add_argument("--wds", default="", help="IMG_KEY,CAPTION_KEY: read --image_text_folder as WebDataset")
    p.add_argument("--clip_path", default=None, help="a CLIP checkpoint (train_clip.py): also score samples with it")
    p.add_argument("--num_pairs", type=positive_int, default=256, help="evaluate the first N readable pairs")
    p.add_argument("--candidates", type=at_least_two, default=16,
                   help="captions each image is ranked among, its own included")
    p.add_argument("--samples_per_caption", type=positive_int, default=1, help="images sampled per caption (CLIP)")
    p.add_argument("--cond_scale", type=number(float, math.isfinite, "a finite number"), default=None,
                   help="guidance scale of the samples CLIP scores, 1 = off (default: the model's, guided if it was "
                        "trained with null captions)")
    p.add_argument("--seed", type=rng_seed, default=0, help="draws the rival captions and the samples")
    p.add_argument("--batch_size", type=positive_int, default=16, help="rows per forward pass")
    p.add_argument("--truncate_captions", action="store_true", help="keep the first tokens of over-long captions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the figures and arguments to this file")
    args = p.parse_args(argv)
    check_device(p, args.device)
    if args.wds and len(args.wds.split(",")) != 2:
        p.error("--wds takes IMG_KEY,CAPTION_KEY, e.g. --wds jpg,txt")
    if not args.wds and not Path(args.image_text_folder).is_dir():
        p.error(f"--image_text_folder: {args.image_text_folder!r} does not exist or is not a folder")
    if args.wds:
        try:
            webdataset_source(args.image_text_folder)
        except FileNotFoundError as e:
            p.error(f"--image_text_folder: {e}")
    if args.json:
        check_writable(p, "--json", Path(args.json).parent)
    return args


def load_models(args: argparse.Namespace):
    """The DALL-E, its tokenizer, and the CLIP with the tokenizer of its captions (None: the DALL-E's ids)."""
    ckpt = load_or_exit("--dalle_path", args.dalle_path, load_dalle, device=args.device)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    if model.vae is None:
        raise SystemExit(f"error: {args.dalle_path} holds no VAE, so it cannot read images")
    if tokenizer is None:
        raise SystemExit(f"error: {args.dalle_path} stores no tokenizer")
    if tokenizer.vocab_size > model.config.num_text_tokens:
        raise SystemExit(f"error: the checkpoint's tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.num_text_tokens}")
    if args.clip_path is None:
        return model, tokenizer, None, None
    clip_ckpt = load_or_exit("--clip_path", args.clip_path, load_clip, device=args.device)
    clip, c = clip_ckpt.model, clip_ckpt.model.config
    vocab = (clip_ckpt.tokenizer or tokenizer).vocab_size
    if vocab > c.num_text_tokens:
        source = "its tokenizer" if clip_ckpt.tokenizer else "the DALL-E's tokenizer (the CLIP file stores none)"
        raise SystemExit(f"error: --clip_path {args.clip_path}: the CLIP has {c.num_text_tokens} text tokens but "
                         f"{source} has {vocab}")
    if c.channels != model.vae.channels:
        raise SystemExit(f"error: --clip_path {args.clip_path}: the CLIP takes {c.channels}-channel images, the VAE "
                         f"makes {model.vae.channels}-channel ones")
    return model, tokenizer, clip, clip_ckpt.tokenizer


def summary(report: dict[str, Any]) -> str:
    skipped = sum(report["skipped"].values())
    reasons = "".join(f"\n  {count} x {reason} (first: {report['first_skipped'][reason]})"
                      for reason, count in report["skipped"].items())
    unpaired = report.get("unpaired")
    lines = [f"pairs: {report['pairs']} evaluated, {skipped} skipped" + (
        f", {unpaired['images']} images and {unpaired['captions']} captions unpaired" if unpaired else "") + reasons]
    r = report["retrieval"]
    if r is None:
        lines.append("caption retrieval: needs at least 2 distinct captions")
    else:
        lines.append(f"caption retrieval among {r['candidates']}: top-1 {r['top1']:.3f} (chance {r['chance']:.3f}), "
                     f"mean rank {r['mean_rank']:.2f}")
    if report["perplexity"] is not None:
        lines.append(f"image-token perplexity: {report['perplexity']:.2f} ({report['nll_per_token']:.4f} nats/token)")
    if (c := report.get("clip")) is not None and c["sample_score"] is not None:
        lines.append(f"CLIP score: samples {c['sample_score']:.4f}, real images {c['real_score']:.4f}, ratio "
                     + ("n/a" if c["ratio"] is None else f"{c['ratio']:.3f}"))
    return "\n".join(lines)


def write_json(path: str | os.PathLike, report: dict[str, Any]) -> None:
    write_atomically(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, tokenizer, clip, clip_tokenizer = load_models(args)
    samples, unpaired = eval_samples(args.image_text_folder, tokenizer=tokenizer, text_len=model.config.text_seq_len,
                                     image_size=model.vae.image_size, wds=args.wds,
                                     truncate_captions=args.truncate_captions, seed=args.seed)
    try:
        report = evaluate(model, tokenizer, samples, candidates=args.candidates, clip=clip,
                          clip_tokenizer=clip_tokenizer, samples_per_caption=args.samples_per_caption,
                          cond_scale=args.cond_scale, seed=args.seed, batch_size=args.batch_size,
                          device=args.device, num_pairs=args.num_pairs, progress=True)
    except ValueError as e:  # e.g. a checkpoint whose VAE does not fit the images
        raise SystemExit(f"error: {e}") from None
    if unpaired:
        report["unpaired"] = unpaired
    if report["pairs"] == 0:
        raise SystemExit(f"error: no readable image-caption pairs in {args.image_text_folder} "
                         f"({sum(report['skipped'].values())} skipped: {', '.join(report['skipped'])})")
    report = {"args": vars(args), "checkpoint": str(Path(args.dalle_path).resolve()), **report}
    print(summary(report))
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
