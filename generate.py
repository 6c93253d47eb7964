"""Sample images from a trained DALL-E checkpoint.

    python generate.py --dalle_path dalle.safetensors --text 'a red cube|a blue ball' --num_images 8 --seed 0
    python generate.py --dalle_path dalle.safetensors --text_file prompts.txt --num_images 8 --seed 0
    torchrun --nproc_per_node 8 generate.py --dalle_path dalle.safetensors --text_file prompts.txt --seed 0

For every prompt, writes OUTPUTS_DIR/<prompt>/ holding <i>.jpg, grid.jpg (all the images), caption.txt and
settings.json (every setting, each image's log-likelihood score, the speed). Everything is checked before anything is
generated, and each folder is written under a temporary name and renamed into place, so it appears complete or not at
all. With --rerank, 0.jpg is the image the model finds most likely given its caption. With --clip_path, every image is
scored by that CLIP and they are written best first (0.jpg: the highest CLIP score); --keep K writes only the best K
of the --num_images candidates (by the model's likelihood when there is no CLIP).

On a GPU the model samples in bf16 by default (in fp16 if it was trained in fp16; fp32 where the GPU lacks bf16), on
a CPU in fp32; --precision chooses, and settings.json records it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import random
import re
import secrets
import shutil
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from engine.cli import (
    check_device,
    check_writable,
    fraction,
    leave_process_group,
    non_negative_int,
    number,
    positive_float,
    positive_int,
    rng_seed,
    top_k_arg,
)
from engine.codecs import tokenizers
from engine.codecs.tokenizers import build_tokenizer
from engine.data import load_image, random_resized_crop
from engine.io.checkpoint import load_clip, load_dalle
from engine.model.precision import add_sampling_precision_arg, prepare_sampling
from engine.model.quantize import add_weights_arg
from engine.pictures import make_grid, pil_image, to_uint8

MAX_NAME_BYTES = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle_path", required=True,
                   help="checkpoint written by train.py, or a DALLE-pytorch dalle.pt (or its -ds-cp folder)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--text", help="prompts separated by |")
    prompts.add_argument("--text_file", help="a UTF-8 file of prompts, one per line (blank lines are skipped)")
    p.add_argument("--num_images", type=positive_int, default=128, help="images per prompt")
    p.add_argument("--batch_size", type=positive_int, default=4)
    p.add_argument("--top_k", type=top_k_arg, default=0.9,
                   help="in [0, 1): DALLE-pytorch's threshold, keep the top (1 - top_k) fraction of the whole "
                        "vocabulary; a whole number >= 1: keep that many tokens (1: greedy)")
    p.add_argument("--top_p", type=fraction, default=None,
                   help="nucleus sampling: keep the most likely tokens that reach this probability mass")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--cond_scale", type=number(float, math.isfinite, "a finite number"), default=None,
                   help="classifier-free guidance scale, 1 = off (default: guided for a model trained with null "
                        "captions, --null_cond_prob > 0, else 1)")
    p.add_argument("--seed", type=rng_seed, default=None,
                   help="makes the samples reproducible (default: a random seed, recorded in settings.json)")
    p.add_argument("--img", default=None, help="image whose first rows prime the generation")
    p.add_argument("--num_init_img_tokens", type=non_negative_int, default=None,
                   help="image tokens taken from --img (default: 0.4375 of them)")
    p.add_argument("--truncate_captions", action="store_true", help="truncate prompts longer than the model's text")
    p.add_argument("--gentxt", action="store_true",
                   help="let the model complete each prompt into a caption first (an empty prompt: from scratch)")
    p.add_argument("--rerank", action="store_true",
                   help="write the images best first, by the model's likelihood of each given its caption")
    p.add_argument("--clip_path", default=None,
                   help="a CLIP checkpoint (engine.save_clip): write the images best first by its score")
    p.add_argument("--keep", type=positive_int, default=None,
                   help="write only the best K of the --num_images candidates: by --clip_path's score, else by the "
                        "model's likelihood (as --rerank) (default: all of them)")
    p.add_argument("--no_cache", action="store_true",
                   help="a full forward pass per token instead of the KV cache (the slow reference, for checking)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU): faster steps after a compilation of "
                        "tens of seconds per batch size; worth it for many images on a GPU (on a CPU the eager step "
                        "runs the fused C++ layers, as fast)")
    p.add_argument("--outputs_dir", default="./outputs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="under torchrun or the DeepSpeed launcher each process takes its LOCAL_RANK's GPU")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the DeepSpeed launcher
    add_sampling_precision_arg(p)
    add_weights_arg(p)
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    check_device(p, args.device)
    check_writable(p, "--outputs_dir", args.outputs_dir)
    if args.text_file is not None:
        args.prompts = read_prompts(p, args.text_file)
    else:
        # Undecodable bytes in the command line arrive as lone surrogates, which no file can hold: make them U+FFFD.
        text = args.text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        args.prompts = [prompt.strip() for prompt in text.split("|")]
    if args.num_init_img_tokens is not None and args.img is None:
        p.error("--num_init_img_tokens needs --img")
    if args.rerank and args.clip_path is not None:
        p.error("--rerank ranks by the model's likelihood, --clip_path by the CLIP's score: pass one of them")
    if args.keep is None:
        args.keep = args.num_images
    elif args.keep > args.num_images:
        p.error(f"--keep {args.keep} is more than the --num_images {args.num_images} candidates")
    elif args.clip_path is None:
        args.rerank = True  # keeping the best K needs a ranking; without a CLIP, the model's own
    return args


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The flags ``load_model`` reads beside --dalle_path: a DALLE-pytorch file's VQGAN, another tokenizer."""
    vqgan = p.add_argument_group("a DALLE-pytorch dalle.pt trained on a VQGAN other than taming's ImageNet f16-1024")
    vqgan.add_argument("--vqgan_config_path", default=None, help="the VQGAN's yaml (the dalle.pt holds its weights)")
    vqgan.add_argument("--vqgan_model_path", default=None, help="its .ckpt, if the dalle.pt lacks the weights")
    tok = p.add_argument_group("tokenizer (default: the one stored in the checkpoint; CLIP's BPE for a dalle.pt)")
    tok.add_argument("--bpe_path", default=None)
    tok.add_argument("--hug", action="store_true")
    tok.add_argument("--chinese", action="store_true")


def fail(message: str) -> NoReturn:
    raise SystemExit(f"error: {message}")


_UNSAFE = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f-\x9f]')  # separators, what Windows rejects, control characters
_WINDOWS_DEVICES = re.compile(r"(con|prn|aux|nul|com\d|lpt\d)(\..*)?", re.IGNORECASE)


def prompt_dir_name(prompt: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A folder name for a prompt that is safe on common filesystems: unsafe characters dropped, whitespace runs as
    one _, no leading dot (hidden, `.`, `..`) or trailing dot (Windows drops it), not a Windows device name, at most
    max_bytes of UTF-8 cut at a character boundary, never empty."""
    name = "_".join(_UNSAFE.sub("", unicodedata.normalize("NFC", prompt)).split())
    name = name.encode()[:max_bytes].decode(errors="ignore").strip(".")
    if _WINDOWS_DEVICES.fullmatch(name):
        name = "_" + name
    return name or "_"


def unique_name(name: str, used: set[str], max_bytes: int = MAX_NAME_BYTES) -> str:
    """name, else name_2, name_3, ...: the first not yet in `used` (compared case-insensitively, as macOS and Windows
    compare file names), which it joins."""
    candidate, n = name, 1
    while candidate.casefold() in used:
        n += 1
        suffix = f"_{n}"
        candidate = name.encode()[: max_bytes - len(suffix)].decode(errors="ignore") + suffix
    used.add(candidate.casefold())
    return candidate


def save_jpg(image: torch.Tensor, path: Path) -> None:
    """Save a (channels, h, w) uint8 image; JPEG has no alpha, so a fourth channel is dropped."""
    pil_image(image, alpha=False).save(path, quality=95)


def load_prime(path: str, size: int, channels: int) -> torch.Tensor:
    """The priming image as (1, channels, size, size): its centre square, resized."""
    if channels not in (3, 4):
        fail(f"--img needs a VAE for RGB or RGBA images; this one has {channels} channels")
    try:
        img = load_image(path, transparent=channels == 4)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        fail(f"--img {path}: not a readable image ({e})")
    return random_resized_crop(img, size, (1.0, 1.0), rng=random.Random(0))[None]


def load_model(args: argparse.Namespace):
    """The model, its tokenizer and the precision it was trained in (None if the checkpoint does not say)."""
    try:
        ckpt = load_dalle(args.dalle_path, device=args.device, bpe_path=args.bpe_path, hug=args.hug,
                          chinese=args.chinese, vqgan_model_path=args.vqgan_model_path,
                          vqgan_config_path=args.vqgan_config_path)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # CheckpointError is a ValueError
        fail(f"cannot load --dalle_path {args.dalle_path}: {e}")
    model = ckpt.model.eval()
    if model.vae is None:
        fail(f"{args.dalle_path} holds no VAE, so its image codes cannot be decoded into images")
    tokenizer = ckpt.tokenizer
    if args.bpe_path or args.hug or args.chinese:
        try:
            tokenizer = build_tokenizer(bpe_path=args.bpe_path, hug=args.hug, chinese=args.chinese)
        except (OSError, ImportError, ValueError) as e:
            fail(f"cannot build the tokenizer: {e}")
    if tokenizer is None:
        fail("the checkpoint stores no tokenizer: pass --bpe_path (and --hug or --chinese)")
    if tokenizer.vocab_size > model.config.num_text_tokens:
        fail(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.num_text_tokens}: "
             "it is not the tokenizer the model was trained with")
    return model, tokenizer, ckpt.extra.get("precision")


def caption_ids(prompt: str, tokenizer, length: int, truncate: bool, whose: str) -> torch.Tensor:
    try:
        return tokenizers.caption_ids(prompt, tokenizer, length, truncate, whose,
                                      too_long="shorten it or pass --truncate_captions")
    except ValueError as e:
        fail(str(e))


def encode_prompts(prompts: list[str], tokenizer, length: int, args: argparse.Namespace) -> list[torch.Tensor]:
    """Each prompt as a (1, length) caption padded with 0, or with --gentxt as an unpadded (1, n) prefix."""
    encoded = []
    for prompt in prompts:
        ids = caption_ids(prompt, tokenizer, length, args.truncate_captions, "the model's")
        encoded.append((ids if args.gentxt else F.pad(ids, (0, length - len(ids))))[None].to(args.device))
    return encoded


def load_reranker(args: argparse.Namespace, prompts: list[str], dalle_tokenizer, vae):
    """The --clip_path CLIP and the tokenizer of its captions (its own, else the DALL-E's), checked against the
    prompts and the VAE's images."""
    try:
        ckpt = load_clip(args.clip_path, device=args.device)
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # CheckpointError is a ValueError
        fail(f"cannot load --clip_path {args.clip_path}: {e}")
    clip, c = ckpt.model.eval(), ckpt.model.config
    tokenizer = dalle_tokenizer if ckpt.tokenizer is None else ckpt.tokenizer
    if tokenizer.vocab_size > c.num_text_tokens:
        source = "the DALL-E's tokenizer (the CLIP file stores none)" if ckpt.tokenizer is None else "its tokenizer"
        fail(f"--clip_path {args.clip_path}: the CLIP has {c.num_text_tokens} text tokens but {source} has "
             f"{tokenizer.vocab_size}")
    if c.channels != vae.channels:
        fail(f"--clip_path {args.clip_path}: the CLIP takes {c.channels}-channel images, the VAE makes "
             f"{vae.channels}-channel ones")
    for prompt in prompts:  # --gentxt completions are checked as far as they can be: their prefix
        caption_ids(prompt, tokenizer, c.text_seq_len, args.truncate_captions, "the CLIP's")
    return clip, tokenizer


def clip_scores(clip, tokenizer, caption: str, images: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The CLIP's score (n,) of each uint8 image (n, c, h, w) for `caption`, --batch_size images at a time.
    The caption is cut to the CLIP's length: an over-long prompt was refused up front without --truncate_captions,
    and the length of a --gentxt completion is no flag's to choose (nor is it checked, as it must not fail midway)."""
    length = clip.config.text_seq_len
    ids = tokenizer.encode(caption)[:length] if caption else []
    text = F.pad(torch.tensor(ids, dtype=torch.long), (0, length - len(ids)))[None]
    return clip.score(text, images, args.batch_size)  # the pixels as written


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the generate.py processes a launcher started (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    def owns(self, prompt: int) -> bool:
        """Whether this process writes the folder of prompt number `prompt`."""
        return prompt % self.world == self.rank


def join_launch(args: argparse.Namespace) -> Ranks:
    """Under torchrun or the DeepSpeed launcher (WORLD_SIZE > 1): join their process group, on gloo for CPU runs and
    NCCL for GPUs (one per LOCAL_RANK), and take this process's share of the work."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if torch.device(args.device).type == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return Ranks(torch.distributed.get_rank(), world)


def sample_all(model, texts: list[torch.Tensor], prime: torch.Tensor | None, options: dict,
               args: argparse.Namespace, seed: int, ranks: Ranks
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, float]]:
    """Every prompt's args.num_images images (n, c, h, w) as uint8 and their scores (n,), sampled --batch_size
    images at a time in batches filled across prompts; yields (prompt index, images, scores, seconds since its first
    batch began) as soon as a prompt's last image is done, for the prompts whose folders this process writes.

    Image i of a prompt draws from the random stream of (seed, i), so it is the same image whatever shares its batch:
    a run is reproducible at any --batch_size and number of processes. With several processes each round gives every
    process a batch of the (prompt, image) work, in order, and gathers the results to every process."""
    n = args.num_images
    work = [(p, i) for p in range(len(texts)) for i in range(n)]
    vae = model.vae
    images: dict[int, list[torch.Tensor]] = {}
    scores: dict[int, list[torch.Tensor]] = {}
    began: dict[int, float] = {}
    round_size = args.batch_size * ranks.world
    with tqdm(total=len(work), unit="img", desc=f"{len(texts)} prompt{'s' * (len(texts) > 1)}",
              disable=ranks.rank != 0) as bar:
        for start in range(0, len(work), round_size):
            in_round = work[start:start + round_size]  # one batch for each process, in rank order
            now = time.perf_counter()
            for p, _ in in_round:
                began.setdefault(p, now)
            batch = in_round[ranks.rank * args.batch_size:(ranks.rank + 1) * args.batch_size]
            out = torch.zeros(0, vae.channels, vae.image_size, vae.image_size, dtype=torch.uint8)
            out_scores = torch.zeros(0)
            if batch:
                out, out_scores = model.generate_images(
                    torch.cat([texts[p] for p, _ in batch]),
                    img=None if prime is None else prime.expand(len(batch), -1, -1, -1), seed=seed,
                    image_indices=torch.tensor([i for _, i in batch]), return_scores=True, **options)
                out, out_scores = to_uint8(out), out_scores.float().cpu()
            if ranks.world > 1:
                out, out_scores = gather_round(out, out_scores, args.batch_size, args.device)
            for row, (p, i) in enumerate(in_round):
                if not ranks.owns(p):
                    continue
                images.setdefault(p, []).append(out[row])
                scores.setdefault(p, []).append(out_scores[row])
                if i == n - 1:
                    yield p, torch.stack(images.pop(p)), torch.stack(scores.pop(p)), time.perf_counter() - began[p]
            bar.update(len(in_round))


def gather_round(images: torch.Tensor, scores: torch.Tensor, batch_size: int, device: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's batch of a round, in rank order, on every process (tensors only: nothing is unpickled). The
    batches are padded to batch_size rows for the collective; the padding is dropped."""
    counts = torch.tensor([images.shape[0]], device=device)
    padded = torch.zeros(batch_size, *images.shape[1:], dtype=torch.uint8)
    padded[: images.shape[0]] = images
    padded_scores = torch.zeros(batch_size)
    padded_scores[: scores.shape[0]] = scores
    parts = []
    for tensor in (counts, padded.to(device), padded_scores.to(device)):
        gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, tensor)
        parts.append([t.cpu() for t in gathered])
    keep = [int(c) for c in parts[0]]
    return (torch.cat([t[:k] for t, k in zip(parts[1], keep)]), torch.cat([t[:k] for t, k in zip(parts[2], keep)]))


def write_prompt_dir(outputs_dir: Path, name: str, images: torch.Tensor, caption: str, settings: dict) -> Path:
    """Write the folder under a hidden temporary name, then rename it to `name`: it appears complete or not at all.
    A folder of that name from an earlier run is moved aside only once the new one is complete."""
    # Prompt folders never start with a dot. Not mkdtemp: its folders are private (0700) and would stay so.
    tmp = outputs_dir / f".tmp-{secrets.token_hex(8)}"
    tmp.mkdir()
    try:
        for i, image in enumerate(images):
            save_jpg(image, tmp / f"{i}.jpg")
        save_jpg(make_grid(images), tmp / "grid.jpg")
        (tmp / "caption.txt").write_text(caption + "\n", encoding="utf-8")
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except BaseException:  # Ctrl-C included
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dest = outputs_dir / name
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=outputs_dir))
        os.rename(dest, old / name)
        os.rename(tmp, dest)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dest)
    return dest


def read_prompts(p: argparse.ArgumentParser, path: str) -> list[str]:
    """The prompts of a --text_file: one per line, UTF-8 (a byte-order mark allowed), blank lines skipped; a | is
    part of its line's prompt."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        p.error(f"--text_file {path}: cannot be read ({e.strerror or e})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        p.error(f"--text_file {path}: not UTF-8 text (invalid byte at offset {e.start})")
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        p.error(f"--text_file {path}: holds no prompt, only blank lines")
    return prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = args.prompts
    if not args.gentxt and not all(prompts):
        fail("--text holds an empty prompt (prompts are separated by |; with --gentxt an empty prompt means a caption "
             "sampled from scratch)")
    outputs_dir = Path(args.outputs_dir)
    ranks = join_launch(args)

    # Everything is checked before anything is generated or written.
    model, tokenizer, trained = load_model(args)
    precision = prepare_sampling(model, args.precision, args.device, trained, args.weights)
    c = model.config
    texts = encode_prompts(prompts, tokenizer, c.text_seq_len, args)
    prime, num_init = None, None
    if args.img is not None:
        num_init = int(0.4375 * c.image_seq_len) if args.num_init_img_tokens is None else args.num_init_img_tokens
        if num_init >= c.image_seq_len:
            fail(f"--num_init_img_tokens must be less than the model's {c.image_seq_len} image tokens, got {num_init}")
        prime = load_prime(args.img, model.vae.image_size, model.vae.channels).to(args.device)
    clip = clip_tokenizer = None
    if args.clip_path is not None:
        clip, clip_tokenizer = load_reranker(args, prompts, tokenizer, model.vae)

    step_fn = None
    if args.compile:
        if args.no_cache:
            print("note: --compile compiles the cached decode step; ignored with --no_cache", file=sys.stderr)
        else:
            step_fn = model.compiled_decode_step()
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed  # recorded, so any run can be repeated
    if ranks.world > 1:  # one seed for all the processes: rank 0's
        shared = torch.tensor([seed], device=args.device)
        torch.distributed.broadcast(shared, 0)
        seed = int(shared)
    # A float --top_k is DALLE-pytorch's threshold, an int a count (see top_k_arg).
    filter_thres, top_k = (args.top_k, None) if isinstance(args.top_k, float) else (None, args.top_k)
    text_options = dict(filter_thres=filter_thres, top_k=top_k, top_p=args.top_p, temperature=args.temperature)
    cond_scale = c.default_cond_scale if args.cond_scale is None else args.cond_scale
    image_options = dict(text_options, cond_scale=cond_scale, num_init_img_tokens=num_init,
                         use_cache=not args.no_cache, step_fn=step_fn)

    try:
        outputs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --outputs_dir {outputs_dir}: {e}")
    captions = list(prompts)
    if args.gentxt:  # every caption first: they name the folders
        texts = [model.generate_texts(text, **text_options, seed=seed) for text in texts]
        captions = [tokenizer.decode(text[0]).strip() for text in texts]
    used: set[str] = set()
    names = [unique_name(prompt_dir_name(caption), used) for caption in captions]
    for index, images, scores, elapsed in sample_all(model, texts, prime, image_options, args, seed, ranks):
        prompt, caption, text, started = prompts[index], captions[index], texts[index], time.perf_counter() - elapsed
        similarities, order = None, torch.arange(len(images))
        if clip is not None:
            similarities = clip_scores(clip, clip_tokenizer, caption, images, args)
            order = similarities.argsort(descending=True, stable=True)
        elif args.rerank:
            order = scores.argsort(descending=True, stable=True)
        order = order[: args.keep]
        images, scores = images[order], scores[order]
        elapsed = time.perf_counter() - started
        settings = dict(
            prompt=prompt, caption=caption, caption_tokens=int((text != 0).sum()), caption_length=c.text_seq_len,
            checkpoint=str(Path(args.dalle_path).resolve()), tokenizer=type(tokenizer).__name__,
            device=str(args.device), seed=seed, num_images=args.num_images, batch_size=args.batch_size,
            filter_thres=filter_thres, top_k=top_k, top_p=args.top_p, temperature=args.temperature,
            cond_scale=cond_scale, img=None if prime is None else str(Path(args.img).resolve()),
            num_init_img_tokens=num_init, truncate_captions=args.truncate_captions, gentxt=args.gentxt,
            rerank=args.rerank, clip=None if clip is None else str(Path(args.clip_path).resolve()), keep=args.keep,
            use_cache=not args.no_cache, compile=step_fn is not None, precision=precision, weights=args.weights,
            images=[f"{i}.jpg" for i in range(len(images))], scores=scores.tolist(),  # log p(image | caption)
            clip_scores=None if similarities is None else similarities[order].tolist(),
            elapsed_s=round(elapsed, 3), images_per_s=round(args.num_images / elapsed, 3),  # candidates, CLIP included
        )
        dest = write_prompt_dir(outputs_dir, names[index], images, caption, settings)
        best = f" (the best of {args.num_images})" if args.keep < args.num_images else ""
        print(f"wrote {len(images)} images{best}, grid.jpg and settings.json to {dest}")
    if ranks.world > 1:
        leave_process_group()


if __name__ == "__main__":
    main()
