"""Train a DALL-E model.

With no data arguments it trains on the built-in shapes dataset: first a DiscreteVAE (unless --vae_path is given),
then the DALL-E, and writes one self-contained checkpoint that generate.py samples from:

    python train.py --dim 128 --depth 4 --text_seq_len 16 --epochs 1
    python generate.py --dalle_path dalle.safetensors --text 'a large red circle on the left'
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.checkpoint import load_vae, save_dalle, save_vae
from engine.config import DALLEConfig, add_config_args, config_from_args
from engine.dalle import DALLE
from engine.shapes import ShapesDataset
from engine.tokenizers import YttmTokenizer, build_tokenizer
from engine.vae import DiscreteVAE, DiscreteVAEConfig

DERIVED = ("num_text_tokens", "num_image_tokens", "image_fmap_size")  # taken from the tokenizer and the VAE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae_path", default=None, help="a VAE checkpoint; without it a DiscreteVAE is trained first")
    p.add_argument("--dalle_output_file_name", default="dalle", help="writes <name>.safetensors")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--clip_grad_norm", type=float, default=0.5)
    p.add_argument("--truncate_captions", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo = p.add_argument_group("built-in shapes data")
    demo.add_argument("--num_samples", type=int, default=20000, help="pairs per epoch")
    demo.add_argument("--image_size", type=int, default=32)
    demo.add_argument("--vae_steps", type=int, default=1500, help="DiscreteVAE training steps")
    demo.add_argument("--bpe_vocab_size", type=int, default=100, help="BPE vocabulary trained on the captions")
    tok = p.add_argument_group("tokenizer (default: a YouTokenToMe BPE trained on the captions)")
    tok.add_argument("--bpe_path", default=None)
    tok.add_argument("--hug", action="store_true")
    tok.add_argument("--chinese", action="store_true")
    add_config_args(p, DALLEConfig, exclude=DERIVED)
    return p.parse_args(argv)


def batches(loader: DataLoader, steps: int):
    """`steps` batches, cycling over the loader."""
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)


def train_vae(dataset: ShapesDataset, args: argparse.Namespace) -> DiscreteVAE:
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=args.image_size, num_layers=2, num_tokens=128, codebook_dim=64,
                                        hidden_dim=48, kl_div_loss_weight=1e-3)).to(args.device)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    bar = tqdm(batches(loader, args.vae_steps), total=args.vae_steps, desc="vae")
    for step, (_, images) in enumerate(bar):
        temp = max(1.0 * 0.999**step, 0.5)  # anneal the gumbel temperature
        loss = vae(images.to(args.device), return_loss=True, temp=temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dataset = ShapesDataset(args.num_samples, args.image_size, seed=args.seed)
    name = args.dalle_output_file_name
    Path(name).parent.mkdir(parents=True, exist_ok=True)

    if args.vae_path:
        vae, _ = load_vae(args.vae_path, device=args.device)
    else:
        vae = train_vae(dataset, args)
        save_vae(f"{name}-vae.safetensors", vae)
    if args.bpe_path or args.chinese:
        tokenizer = build_tokenizer(bpe_path=args.bpe_path, hug=args.hug, chinese=args.chinese)
    else:
        captions = [dataset.caption(i) for i in range(min(len(dataset), 5000))]
        tokenizer = YttmTokenizer.train(captions, args.bpe_vocab_size, f"{name}-bpe.model")

    config = config_from_args(DALLEConfig, args, num_text_tokens=tokenizer.vocab_size,
                              num_image_tokens=vae.num_tokens, image_fmap_size=vae.fmap_size)
    model = DALLE(config, vae).to(args.device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    steps = args.epochs * len(loader)
    start = time.time()
    bar = tqdm(batches(loader, steps), total=steps, desc="dalle")
    for step, (captions, images) in enumerate(bar):
        text = tokenizer.tokenize(captions, config.text_seq_len, args.truncate_captions).to(args.device)
        loss = model(text, images.to(args.device), return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        opt.step()
        tokens = (step + 1) * args.batch_size * config.total_seq_len
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.time() - start):.0f}")
    save_dalle(f"{name}.safetensors", model, tokenizer, extra={"epochs": args.epochs, "steps": steps})
    print(f"wrote {name}.safetensors")


if __name__ == "__main__":
    main()
