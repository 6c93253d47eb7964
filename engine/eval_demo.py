"""Score a DALL-E trained on the built-in shapes: does each image show what its prompt asked for?

    python -m engine.eval_demo --dalle_path dalle.safetensors --json eval.json --save_dir eval_images

Every sampled image is read back by `analyse`, an analytic checker (pixel statistics, no learning), and compared
with the prompt's colour, shape, size and position. The prompts come in two groups: combinations seen in training
and the HELD_OUT (colour, position) pairs, so the two accuracies show whether the model composes attributes it has only
seen apart.

It also measures reranking at a fixed sample budget: each prompt's samples are cut into groups of n, the image a
ranker scores highest in each group is kept, and the accuracy of the kept images is reported for every n up to
--images_per_prompt (n = 1 is plain sampling). The rankers are the DALL-E's own likelihood of each image given its
caption and, with ``--clip_path``, a CLIP.

On a GPU the DALL-E samples in bf16 by default, as in generate.py (``--precision``); the JSON report records it.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.cli import check_device, check_writable, number, positive_float, positive_int, rng_seed
from engine.demo.shapes import BACKGROUNDS, COLOURS, HELD_OUT, POSITIONS, RADII, SHAPES, SIZES, ShapeSpec
from engine.io.checkpoint import load_clip, load_dalle
from engine.model.precision import add_sampling_precision_arg, prepare_sampling
from engine.model.quantize import add_weights_arg

ATTRIBUTES = ("colour", "shape", "size", "position")
SCORES = ("found", *ATTRIBUTES, "all")  # the per-image checks that evaluate averages
_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255  # (colours, 3)
_POSITIONS = torch.tensor(list(POSITIONS.values()))  # (positions, 2) as (x, y)
# A pixel is foreground only if it lies at least halfway from the background to the least contrasting palette
# colour; below that, noise (JPEG ringing, a flat but imperfect background) would count as shape.
_MIN_CONTRAST = 0.5 * float(torch.cdist(_PALETTE, torch.tensor(BACKGROUNDS, dtype=torch.float32) / 255).min())
# Area over r^2 of each rendered shape (r: half its width); a triangle's centroid also lies r/3 below its box centre.
_SHAPE_AREAS = {"square": 4.0, "circle": math.pi, "triangle": 2.0}
# Size compares the fitted r, which unlike the raw area does not depend on the shape (a small square covers
# 4r^2 = 0.058 of the image, a large triangle 2r^2 = 0.08), halfway between the two radii.
_SIZE_SPLIT = (RADII["small"] + RADII["large"]) / 2
# Fewer pixels than a quarter of the smallest shape (a small triangle, 2r^2) are specks, not a shape.
_MIN_AREA = 0.25 * 2 * RADII["small"] ** 2


@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str
    size: str
    position: str


def analyse(image: torch.Tensor) -> Detected | None:
    """Read the shape in a (3, h, w) image in [0, 1], or None if there is none.

    Background: the median border colour. Foreground: the largest 8-connected region of pixels far from it. Colour:
    the palette colour nearest the foreground's median. Shape: the square, circle or triangle with the region's area
    and centroid that overlaps it best; its half-width gives the size and its centre the position.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, h, w) image, got shape {tuple(image.shape)}")
    pixels = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0)  # (h, w, 3)
    h, w, _ = pixels.shape
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = (pixels - border.median(0).values).norm(dim=-1)  # (h, w)
    # Halfway between background and shape puts the cut on the true edge of a blurred (JPEG, VAE) shape; the 99th
    # percentile is the shape's own contrast as long as the shape covers over 1% of the image and specks do not.
    threshold = max(_MIN_CONTRAST, 0.5 * float(distance.flatten().quantile(0.99)))
    mask = _largest_component(distance > threshold)
    area = int(mask.sum())
    if area < _MIN_AREA * h * w:
        return None

    # Fit each shape to the region's area and centroid (moments hardly move for a stray pixel or a blurred edge,
    # unlike a bounding box) and keep the one that overlaps the region best.
    ys, xs = mask.nonzero(as_tuple=True)
    cx, cy = float(xs.float().mean()), float(ys.float().mean())
    fits = []
    for shape, k in _SHAPE_AREAS.items():
        r = math.sqrt(area / k)
        centre_y = cy - r / 3 if shape == "triangle" else cy
        template = _shape_mask(shape, cx, centre_y, r, h, w)
        iou = float((mask & template).sum() / (mask | template).sum())
        fits.append((iou, shape, r, centre_y))
    _, shape, r, centre_y = max(fits, key=lambda fit: fit[0])
    centre = torch.tensor([(cx + 0.5) / w, (centre_y + 0.5) / h])
    colour = pixels[mask].median(0).values
    return Detected(
        colour=list(COLOURS)[int((_PALETTE - colour).norm(dim=-1).argmin())],
        shape=shape,
        size="large" if r / math.sqrt(h * w) >= _SIZE_SPLIT else "small",
        position=list(POSITIONS)[int((_POSITIONS - centre).norm(dim=-1).argmin())],
    )


def _shape_mask(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> torch.Tensor:
    """(h, w) mask of the pixel centres inside a shape drawn like `render` does: centre (cx, cy), half-width r."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    dx, dy = (x - cx).abs(), y - cy
    if shape == "square":
        return (dx <= r) & (dy.abs() <= r)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    return (dy <= r) & (dx <= (dy + r) / 2)  # apex up, base at cy + r


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected region of a (h, w) bool mask.

    Every pixel starts with its own label and repeatedly takes the largest label around it, so each region ends up
    labelled by its largest member. float32 labels are exact up to 2^24 pixels.
    """
    if not mask.any():
        return mask
    keep = mask.float()
    labels = torch.arange(1, mask.numel() + 1, dtype=torch.float32).view(mask.shape) * keep
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * keep
        if torch.equal(grown, labels):
            break
        labels = grown
    counts = torch.bincount(labels.long().flatten())
    counts[0] = 0  # background
    return labels == counts.argmax()


def matches(detected: Detected | None, spec: ShapeSpec) -> dict[str, bool]:
    """The checks of one image against its prompt: "found" (a shape was detected), each attribute, and "all" (colour,
    shape and position together; size is reported on its own)."""
    agree = {a: detected is not None and getattr(detected, a) == getattr(spec, a) for a in ATTRIBUTES}
    return {"found": detected is not None, **agree, "all": agree["colour"] and agree["shape"] and agree["position"]}


def demo_prompts(seed: int = 0) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """12 trained prompts (each colour twice, each shape four times) and each HELD_OUT pair small and large.

    Sizes and trained positions are drawn from `seed`; every held-out pair appears as two different shapes.
    """
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    trained = []
    for i in range(12):
        colour = colours[i % len(colours)]
        # Offsetting the shape on the second pass gives each colour two different shapes.
        shape = SHAPES[(i + i // len(colours)) % len(SHAPES)]
        positions = [p for p in POSITIONS if (colour, p) not in HELD_OUT]
        trained.append(ShapeSpec(colour, shape, str(rng.choice(SIZES)), str(rng.choice(positions))))
    held_out = []
    for colour, position in sorted(HELD_OUT):
        shapes = rng.choice(SHAPES, size=len(SIZES), replace=False)
        held_out += [ShapeSpec(colour, str(shape), size, position) for size, shape in zip(SIZES, shapes)]
    return trained, held_out


def best_of(correct: torch.Tensor, scores: torch.Tensor, n: int) -> float:
    """Accuracy when only the top-scoring of n samples is kept: `correct` and `scores` (prompts, samples) are cut into
    consecutive groups of n samples per prompt (a remainder is dropped) and the share of groups whose best-scoring
    sample is correct is returned. Ties go to the earlier sample; n = 1 is the plain accuracy."""
    if correct.shape != scores.shape or correct.dim() != 2:
        raise ValueError(f"correct and scores must be (prompts, samples), got {tuple(correct.shape)} and "
                         f"{tuple(scores.shape)}")
    groups = correct.shape[1] // n if n >= 1 else 0
    if groups == 0:
        raise ValueError(f"n must be between 1 and the {correct.shape[1]} samples per prompt, got {n}")
    grouped = correct[:, :groups * n].unflatten(1, (groups, n))
    best = scores[:, :groups * n].unflatten(1, (groups, n)).argmax(dim=-1, keepdim=True)
    return grouped.gather(-1, best).float().mean().item()


def budgets(samples: int) -> list[int]:
    """Group sizes for `best_of`: the powers of two below `samples`, then `samples`."""
    return [1 << i for i in range(samples.bit_length()) if 1 << i < samples] + [samples]


def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[ShapeSpec],
    *,
    clip: Any = None,
    clip_tokenizer: Any = None,
    images_per_prompt: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    filter_thres: float = 0.9,
    temperature: float = 1.0,
    cond_scale: float | None = None,
    truncate_text: bool = False,
    device: str | torch.device = "cpu",
    save_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Sample `images_per_prompt` images per prompt (caption template 0) and score them with `analyse`.

    `model` needs `.config.text_seq_len` and DALLE's `generate_images`; `tokenizer` needs `tokenize`. Batches mix
    prompts, and batch i is sampled with seed `seed + i * batch_size`, so results depend on `batch_size` too.
    Returns {"prompts": [per-prompt spec, scores, detections and ranker scores], "accuracy": scores over all images,
    "rerank": {ranker: {n: `best_of` accuracy}}}; a score is the fraction of images that pass each check of `matches`.
    The rankers are "likelihood" (the model's) and, with a `clip` (a CLIP; `clip_tokenizer` tokenises for it, by
    default `tokenizer`), "clip". With `save_dir`, writes one PNG grid of each prompt's images there.
    """
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError("images_per_prompt and batch_size must be >= 1")
    captions = [spec.caption(0) for spec in prompts]
    text = tokenizer.tokenize(captions, model.config.text_seq_len, truncate_text=truncate_text)
    text = text.repeat_interleave(images_per_prompt, dim=0)  # (prompts * images_per_prompt, text_seq_len)
    batches, likelihoods = [], []
    for start in range(0, text.shape[0], batch_size):
        images, likelihood = model.generate_images(
            text[start:start + batch_size].to(device), filter_thres=filter_thres, temperature=temperature,
            cond_scale=cond_scale, seed=seed + start, return_scores=True,
        )
        batches.append(images.float().cpu())  # a model cast to bf16/fp16 decodes in its dtype
        likelihoods.append(likelihood.float().cpu())
    images = torch.cat(batches).view(len(prompts), images_per_prompt, *batches[0].shape[1:])
    rankers = {"likelihood": torch.cat(likelihoods).view(len(prompts), images_per_prompt)}
    if clip is not None:
        clip_text = (clip_tokenizer or tokenizer).tokenize(captions, clip.config.text_seq_len,
                                                           truncate_text=truncate_text)
        rankers["clip"] = torch.stack([clip.score(ids[None], group, batch_size)
                                       for ids, group in zip(clip_text, images)])

    results, scores = [], []
    for i, (spec, caption, group) in enumerate(zip(prompts, captions, images)):
        detections = [analyse(image[:3]) for image in group]
        prompt_scores = [matches(d, spec) for d in detections]
        scores += prompt_scores
        results.append({
            "caption": caption, "spec": asdict(spec), "n": images_per_prompt, **_accuracy(prompt_scores),
            "detections": [None if d is None else asdict(d) for d in detections],
            **{f"{name}_scores": ranked[i].tolist() for name, ranked in rankers.items()},
        })
    correct = torch.tensor([s["all"] for s in scores]).view(len(prompts), images_per_prompt)
    rerank = {name: {n: best_of(correct, ranked, n) for n in budgets(images_per_prompt)}
              for name, ranked in rankers.items()}
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for i, (caption, group) in enumerate(zip(captions, images)):
            save_grid(group, save_dir / f"{i:02d}_{caption.replace(' ', '_')}.png")
    return {"prompts": results, "accuracy": {"n": len(scores), **_accuracy(scores)}, "rerank": rerank}


def _accuracy(scores: list[dict[str, bool]]) -> dict[str, float]:
    return {key: sum(s[key] for s in scores) / len(scores) for key in SCORES}


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Save (n, c, h, w) images in [0, 1] side by side, `columns` per row, as a lossless PNG."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    cols = min(n, columns)
    grid = torch.ones(3, rows * h, cols * w)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image[:3].clamp(0, 1)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle_path", required=True, help="checkpoint written by train.py")
    p.add_argument("--clip_path", default=None,
                   help="a CLIP checkpoint (train_clip.py): also report accuracy after reranking by its scores")
    p.add_argument("--images_per_prompt", type=positive_int, default=8,
                   help="samples per prompt: the reranking budget")
    p.add_argument("--seed", type=rng_seed, default=0, help="picks the prompts' sizes and positions and the samples")
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--top_k", type=number(float, lambda x: 0 <= x < 1, "a fraction in [0, 1)"), default=0.9,
                   help="top-k threshold, as a fraction of the vocabulary")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--cond_scale", type=number(float, math.isfinite, "a finite number"), default=None,
                   help="classifier-free guidance scale, 1 = off (default: the model's, guided if it was trained "
                        "with null captions)")
    p.add_argument("--truncate_captions", action="store_true", help="truncate prompts longer than the model's text")
    p.add_argument("--json", default=None, help="write the figures and arguments to this file")
    p.add_argument("--save_dir", default=None, help="write a PNG grid of each prompt's images here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_sampling_precision_arg(p)
    add_weights_arg(p)
    args = p.parse_args(argv)
    check_device(p, args.device)
    if args.json:
        check_writable(p, "--json", Path(args.json).parent)
    if args.save_dir:
        check_writable(p, "--save_dir", args.save_dir)
    return args


def format_table(groups: dict[str, dict[str, Any]]) -> str:
    header = f"{'group':9} {'prompt':46} {'n':>3} " + " ".join(f"{k:>8}" for k in SCORES)
    lines = [header, "-" * len(header)]
    for group, result in groups.items():
        for r in result["prompts"]:
            lines.append(f"{group:9} {r['caption']:46} {r['n']:>3} "
                         + " ".join(f"{r[k]:>8.2f}" for k in SCORES))
    return "\n".join(lines)


def format_rerank_table(groups: dict[str, dict[str, Any]]) -> str:
    """Accuracy (colour, shape and position) of the image each ranker keeps from n samples, per group."""
    ns = list(next(iter(groups.values()))["rerank"]["likelihood"])
    header = f"{'group':9} {'kept by':11} " + " ".join(f"{f'1 of {n}':>7}" for n in ns)
    lines = [header, "-" * len(header)]
    for group, result in groups.items():
        for ranker, accuracy in result["rerank"].items():
            lines.append(f"{group:9} {ranker:11} " + " ".join(f"{accuracy[n]:>7.3f}" for n in ns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        ckpt = load_dalle(args.dalle_path, device=args.device)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None
    if ckpt.tokenizer is None:
        raise SystemExit("error: the checkpoint stores no tokenizer")
    model = ckpt.model.eval()
    precision = prepare_sampling(model, args.precision, args.device, ckpt.extra.get("precision"), args.weights)
    clip = clip_tokenizer = None
    if args.clip_path is not None:
        try:
            clip_ckpt = load_clip(args.clip_path, device=args.device)
        except (OSError, ValueError, RuntimeError) as e:
            raise SystemExit(f"error: {e}") from None
        clip, clip_tokenizer = clip_ckpt.model.eval(), clip_ckpt.tokenizer  # None: the DALL-E's
    if args.cond_scale is None:  # resolved here, so that the report says which scale was used
        args.cond_scale = model.config.default_cond_scale
    trained, held_out = demo_prompts(args.seed)
    groups = {}
    for name, prompts in (("trained", trained), ("held_out", held_out)):
        try:
            groups[name] = evaluate(
                model, ckpt.tokenizer, prompts, clip=clip, clip_tokenizer=clip_tokenizer,
                images_per_prompt=args.images_per_prompt, seed=args.seed,
                batch_size=args.batch_size, filter_thres=args.top_k, temperature=args.temperature,
                cond_scale=args.cond_scale, truncate_text=args.truncate_captions, device=args.device,
                save_dir=None if args.save_dir is None else Path(args.save_dir) / name,
            )
        except ValueError as e:  # e.g. a caption longer than the model's text_seq_len
            raise SystemExit(f"error: {e}") from None
    print(format_table(groups))
    print()
    print(format_rerank_table(groups))
    headline = {name: result["accuracy"]["all"] for name, result in groups.items()}
    for name, result in groups.items():
        line = (f"{name} accuracy (colour, shape and position right): {headline[name]:.3f} "
                f"over {result['accuracy']['n']} images")
        if "clip" in result["rerank"]:
            n = args.images_per_prompt
            line += f"; best 1 of {n} by CLIP: {result['rerank']['clip'][n]:.3f}"
        print(line)
    if args.json:
        report = {"args": vars(args), "precision": precision, "weights": args.weights, "held_out_combinations": sorted(HELD_OUT),
                  "trained_accuracy": headline["trained"], "held_out_accuracy": headline["held_out"], **groups}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
