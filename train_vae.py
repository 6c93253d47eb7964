"""Train a DiscreteVAE on a folder of images (nested folders fine), for `train.py --vae_path`.

    python train_vae.py --image_folder DATA --image_size 128 --num_tokens 8192
    python train_vae.py --image_folder DATA --vae_path vae.safetensors      # resume where it stopped

Unreadable images are skipped and counted. Every --save_every_n_steps the checkpoint (<name>.safetensors, with the
optimizer, scheduler, temperature and data position) is replaced atomically.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.checkpoint import load_vae, save_vae
from engine.data import ImageFolder, collate_images
from engine.training import EpochSampler, Progress, RunLogger, keep_tagged_copy, pack_state, restore_state
from engine.vae import DiscreteVAE, DiscreteVAEConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_folder", required=True, help="folder of images, searched recursively")
    p.add_argument("--vae_path", default=None, help="a checkpoint of this script to resume from")
    p.add_argument("--vae_output_file_name", default="vae", help="checkpoint <name>.safetensors")
    p.add_argument("--output_dir", default=None, help="logs, metrics and samples (default: <name>-logs)")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lr_decay_rate", type=float, default=0.98, help="multiplies the lr every 100 steps")
    p.add_argument("--starting_temp", type=float, default=1.0)
    p.add_argument("--temp_min", type=float, default=0.5)
    p.add_argument("--anneal_rate", type=float, default=1e-6, help="every 100 steps temp *= exp(-rate * step)")
    p.add_argument("--num_images_save", type=int, default=4)
    p.add_argument("--num_tokens", type=int, default=8192)
    p.add_argument("--num_layers", type=int, default=3)
    p.add_argument("--num_resnet_blocks", type=int, default=2)
    p.add_argument("--smooth_l1_loss", action="store_true")
    p.add_argument("--emb_dim", type=int, default=512, help="codebook vector width")
    p.add_argument("--hidden_dim", type=int, default=256)
    p.add_argument("--kl_loss_weight", type=float, default=0.0)
    p.add_argument("--transparent", action="store_true", help="RGBA images")
    p.add_argument("--save_every_n_steps", type=int, default=100)
    p.add_argument("--keep_n_checkpoints", type=int, default=None)
    p.add_argument("--log_every_n_steps", type=int, default=10)
    p.add_argument("--sample_every_n_steps", type=int, default=100, help="0 disables reconstruction images")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    name = args.vae_output_file_name
    ckpt_path = Path(f"{name}.safetensors")
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    resumed = load_vae(args.vae_path) if args.vae_path else None
    if resumed is not None:
        vae = resumed.model
    else:
        vae = DiscreteVAE(DiscreteVAEConfig(
            image_size=args.image_size, num_tokens=args.num_tokens, codebook_dim=args.emb_dim,
            num_layers=args.num_layers, num_resnet_blocks=args.num_resnet_blocks, hidden_dim=args.hidden_dim,
            channels=4 if args.transparent else 3, smooth_l1_loss=args.smooth_l1_loss,
            kl_div_loss_weight=args.kl_loss_weight))
    vae.to(args.device).train()
    dataset = ImageFolder(args.image_folder, image_size=vae.image_size, transparent=vae.channels == 4)

    optimizer = torch.optim.Adam(vae.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay_rate)
    progress = Progress()
    temp = args.starting_temp
    if resumed is not None and "progress" in resumed.extra:
        progress = restore_state(resumed.extra, resumed.aux, optimizer, scheduler)
        temp = resumed.extra["temperature"]

    logger = RunLogger(args.output_dir or f"{name}-logs", config=vars(args))

    def save() -> None:
        meta, tensors = pack_state(optimizer, scheduler, progress)
        save_vae(ckpt_path, vae, extra={**meta, "temperature": temp}, aux=tensors)
        keep_tagged_copy(ckpt_path, progress.step, args.keep_n_checkpoints)

    bar = tqdm(desc="vae", initial=progress.step)
    while progress.epoch < args.epochs:
        sampler = EpochSampler(len(dataset), seed=args.seed, epoch=progress.epoch,
                               start=progress.batch_in_epoch * args.batch_size, rank=0, world=1)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            collate_fn=collate_images, num_workers=args.num_workers,
                            generator=torch.Generator().manual_seed(args.seed + progress.epoch))
        for images, skipped in loader:
            progress.batch_in_epoch += 1
            progress.samples_skipped += skipped
            if len(images) == 0:
                continue
            images = images.to(args.device)
            loss, recons = vae(images, return_loss=True, return_recons=True, temp=temp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.step += 1
            bar.update(1)
            if progress.step % 100 == 0:  # DALLE-pytorch's schedule: decay and anneal every 100 steps
                scheduler.step()
                temp = max(temp * math.exp(-args.anneal_rate * progress.step), args.temp_min)
            if progress.step % args.log_every_n_steps == 0:
                logger.scalars(progress.step, loss=loss.item(), temperature=temp, lr=optimizer.param_groups[0]["lr"],
                               epoch=progress.epoch, samples_skipped=progress.samples_skipped)
                bar.set_postfix(loss=f"{loss.item():.4f}", temp=f"{temp:.3f}", skipped=progress.samples_skipped)
            if args.sample_every_n_steps and progress.step % args.sample_every_n_steps == 0:
                _log_reconstructions(vae, images[: args.num_images_save], logger, progress.step)
            if progress.step % args.save_every_n_steps == 0:
                save()
        progress.epoch += 1
        progress.batch_in_epoch = 0
        save()
    bar.close()
    logger.close()
    print(f"wrote {ckpt_path} (step {progress.step}, {progress.samples_skipped} bad images skipped)")


@torch.no_grad()
def _log_reconstructions(vae: DiscreteVAE, images: torch.Tensor, logger: RunLogger, step: int) -> None:
    """Originals next to hard reconstructions (decoded argmax codes): what DALL-E will see."""
    vae.eval()
    hard = vae.decode(vae.get_codebook_indices(images))
    vae.train()
    logger.images(step, torch.cat([images, hard]), ["originals, then hard reconstructions"])


if __name__ == "__main__":
    main()
