"""Sample images from a trained DALL-E checkpoint.

    python generate.py --dalle_path dalle.safetensors --text 'a red cube|a blue ball' --num_images 8

writes OUTPUTS_DIR/<prompt>/<i>.jpg and OUTPUTS_DIR/<prompt>/caption.txt for every prompt.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from engine.checkpoint import CheckpointError, load_dalle
from engine.data import load_image, random_resized_crop
from engine.tokenizers import build_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle_path", required=True, help="checkpoint written by train.py")
    p.add_argument("--text", required=True, help="prompts separated by |")
    p.add_argument("--num_images", type=int, default=128, help="images per prompt")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--top_k", type=float, default=0.9, help="top-k threshold, as a fraction of the vocabulary")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cond_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--outputs_dir", default="./outputs")
    p.add_argument("--seed", type=int, default=None, help="makes the samples reproducible")
    p.add_argument("--img", default=None, help="image whose first rows prime the generation")
    p.add_argument("--num_init_img_tokens", type=int, default=None, help="image tokens taken from --img")
    p.add_argument("--truncate_captions", action="store_true", help="truncate prompts longer than the model's text")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tok = p.add_argument_group("tokenizer (default: the one stored in the checkpoint)")
    tok.add_argument("--bpe_path", default=None)
    tok.add_argument("--hug", action="store_true")
    tok.add_argument("--chinese", action="store_true")
    args = p.parse_args(argv)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def prompt_dir_name(prompt: str) -> str:
    """A folder name for a prompt: spaces become underscores, path separators are dropped, at most 100 chars."""
    name = re.sub(r"[/\\\0]", "", prompt.strip().replace(" ", "_"))[:100]
    return name or "_"


def save_jpg(image: torch.Tensor, path: Path) -> None:
    """Save a (channels, h, w) image in [0, 1]; JPEG has no alpha, so a fourth channel is dropped."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if pixels.shape[2] == 1:
        Image.fromarray(pixels[..., 0], "L").save(path, quality=95)
    else:
        Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB").save(path, quality=95)


def load_prime(path: str, size: int, channels: int) -> torch.Tensor:
    """The priming image as (1, channels, size, size): its centre square, resized."""
    img = load_image(path, transparent=channels == 4)
    return random_resized_crop(img, size, (1.0, 1.0), rng=random.Random(0))[None]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        ckpt = load_dalle(args.dalle_path, device=args.device)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    model = ckpt.model.eval()
    tokenizer = ckpt.tokenizer
    if args.bpe_path or args.hug or args.chinese:
        tokenizer = build_tokenizer(bpe_path=args.bpe_path, hug=args.hug, chinese=args.chinese)
    if tokenizer is None:
        raise SystemExit("the checkpoint stores no tokenizer: pass --bpe_path (and --hug or --chinese)")

    prime = None
    if args.img:
        prime = load_prime(args.img, model.vae.image_size, model.vae.channels).to(args.device)

    for prompt in (p.strip() for p in args.text.split("|") if p.strip()):
        try:
            text = tokenizer.tokenize([prompt], model.config.text_seq_len, truncate_text=args.truncate_captions)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        text = text.to(args.device)
        out_dir = Path(args.outputs_dir) / prompt_dir_name(prompt)
        out_dir.mkdir(parents=True, exist_ok=True)
        index = 0
        with tqdm(total=args.num_images, desc=prompt[:40], unit="img") as bar:
            for batch_start in range(0, args.num_images, args.batch_size):
                n = min(args.batch_size, args.num_images - batch_start)
                seed = None if args.seed is None else args.seed + batch_start
                images = model.generate_images(
                    text.expand(n, -1), filter_thres=args.top_k, temperature=args.temperature,
                    cond_scale=args.cond_scale, seed=seed,
                    img=None if prime is None else prime.expand(n, -1, -1, -1),
                    num_init_img_tokens=args.num_init_img_tokens,
                )
                for image in images:
                    save_jpg(image, out_dir / f"{index}.jpg")
                    index += 1
                bar.update(n)
        (out_dir / "caption.txt").write_text(prompt + "\n")
        print(f"wrote {index} images to {out_dir}")


if __name__ == "__main__":
    main()
