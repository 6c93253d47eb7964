"""Train a DiscreteVAE on a folder of images (nested folders fine), for `train.py --vae_path`.

    python train_vae.py --image_folder DATA --image_size 128 --num_tokens 8192
    python train_vae.py --image_folder DATA --vae_path vae.safetensors      # resume where it stopped

Unreadable images are skipped and counted. Every --save_every_n_steps the checkpoint (<name>.safetensors, with the
optimizer, scheduler, temperature and data position) is replaced atomically.

On a GPU it trains under bf16 autocast (fp16 with loss scaling where the GPU lacks bf16), on a CPU in fp32; --fp32,
--bf16 or --fp16 choose. The precision is printed at start and kept in metrics.jsonl and the checkpoint's extra.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.cli import (
    check_device,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    rng_seed,
)
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.data import ImageFolder, collate_images
from engine.io.checkpoint import load_vae, save_vae
from engine.model.precision import (
    add_precision_args,
    autocast,
    describe,
    gpu_bf16_supported,
    requested_precision,
    training_precision,
)
from engine.train.training import (
    Distributed,
    EpochSampler,
    Progress,
    RunLogger,
    check_output_folders,
    check_unfinished,
    claim_outputs,
    keep_tagged_copy,
    load_or_exit,
    log_dir,
    non_finite_loss,
    pack_state,
    restore_state,
    too_few_samples,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_folder", required=True, help="folder of images, searched recursively")
    p.add_argument("--vae_path", default=None, help="a checkpoint of this script to resume from")
    p.add_argument("--vae_output_file_name", default="vae", help="checkpoint <name>.safetensors")
    p.add_argument("--output_dir", default=None, help="logs, metrics and samples (default: <name>-logs)")
    p.add_argument("--image_size", type=positive_int, default=128)
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--learning_rate", type=positive_float, default=1e-3)
    p.add_argument("--lr_decay_rate", type=fraction, default=0.98, help="multiplies the lr every 100 steps")
    p.add_argument("--starting_temp", type=positive_float, default=1.0)
    p.add_argument("--temp_min", type=positive_float, default=0.5)
    p.add_argument("--anneal_rate", type=non_negative_float, default=1e-6,
                   help="every 100 steps temp *= exp(-rate * step)")
    p.add_argument("--num_images_save", type=positive_int, default=4)
    p.add_argument("--num_tokens", type=positive_int, default=8192)
    p.add_argument("--num_layers", type=positive_int, default=3)
    p.add_argument("--num_resnet_blocks", type=non_negative_int, default=2)
    p.add_argument("--smooth_l1_loss", action="store_true")
    p.add_argument("--emb_dim", type=positive_int, default=512, help="codebook vector width")
    p.add_argument("--hidden_dim", type=positive_int, default=256)
    p.add_argument("--kl_loss_weight", type=non_negative_float, default=0.0)
    p.add_argument("--transparent", action="store_true", help="RGBA images")
    p.add_argument("--save_every_n_steps", type=positive_int, default=100)
    p.add_argument("--keep_n_checkpoints", type=positive_int, default=None)
    p.add_argument("--log_every_n_steps", type=positive_int, default=10)
    p.add_argument("--sample_every_n_steps", type=non_negative_int, default=100,
                   help="0 disables reconstruction images")
    p.add_argument("--num_workers", type=non_negative_int, default=2)
    p.add_argument("--seed", type=rng_seed, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_args(p)
    args = p.parse_args(argv)
    args.precision = requested_precision(p, args)
    check_device(p, args.device)
    check_output_folders(p, args, "vae_output_file_name")
    if not Path(args.image_folder).is_dir():
        p.error(f"--image_folder {args.image_folder!r} does not exist or is not a folder")
    if args.temp_min > args.starting_temp:
        p.error(f"--temp_min {args.temp_min} is above --starting_temp {args.starting_temp}")
    try:  # the model flags, checked before any work
        vae_config(args)
    except ValueError as e:
        p.error(str(e))
    return args


def vae_config(args: argparse.Namespace) -> DiscreteVAEConfig:
    return DiscreteVAEConfig(
        image_size=args.image_size, num_tokens=args.num_tokens, codebook_dim=args.emb_dim, num_layers=args.num_layers,
        num_resnet_blocks=args.num_resnet_blocks, hidden_dim=args.hidden_dim, channels=4 if args.transparent else 3,
        smooth_l1_loss=args.smooth_l1_loss, kl_div_loss_weight=args.kl_loss_weight)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with claim_outputs(args, args.vae_output_file_name, Distributed(0, 1, args.device, deepspeed=False)):
        train(args)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    name = args.vae_output_file_name
    ckpt_path = Path(f"{name}.safetensors")

    resumed = load_or_exit("--vae_path", args.vae_path, load_vae) if args.vae_path else None
    vae = resumed.model if resumed is not None else DiscreteVAE(vae_config(args))
    vae.to(args.device).train()
    try:
        dataset = ImageFolder(args.image_folder, image_size=vae.image_size, transparent=vae.channels == 4)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --image_folder: {e}") from None
    if len(dataset) < args.batch_size:
        raise SystemExit(too_few_samples(args.batch_size, len(dataset), args.image_folder))

    device_type = torch.device(args.device).type
    precision = training_precision(args.precision, device_type, gpu_bf16_supported(args.device))
    print(describe(precision, args.precision, device_type), flush=True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay_rate)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")  # disabled: backward and step as they are
    progress = Progress()
    temp = args.starting_temp
    if resumed is not None and "progress" in resumed.extra:
        progress = restore_state(resumed.extra, resumed.aux, optimizer, scheduler, scaler)
        temp = resumed.extra.get("temperature")
        if not isinstance(temp, float) or not temp > 0:
            raise SystemExit(f"error: --vae_path {args.vae_path} holds a damaged temperature: {temp!r}")
        check_unfinished(progress, args.epochs, f"--vae_path {args.vae_path}")
    saved_step = progress.step if resumed is not None else None

    logger = RunLogger(log_dir(args, name), config=vars(args) | {"precision": precision}, start_step=progress.step,
                       fields={"precision": precision})

    def save() -> None:
        nonlocal saved_step
        saved_step = progress.step
        meta, tensors = pack_state(optimizer, scheduler, progress, scaler)
        save_vae(ckpt_path, vae, extra={**meta, "temperature": temp, "precision": precision}, aux=tensors)
        keep_tagged_copy(ckpt_path, progress.step, args.keep_n_checkpoints)

    bar = tqdm(desc="vae", initial=progress.step)
    while progress.epoch < args.epochs:
        whole_epoch, steps_before = progress.batch_in_epoch == 0, progress.step
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
            with autocast(device_type, precision):
                loss, recons = vae(images, return_loss=True, return_recons=True, temp=temp)
            if not torch.isfinite(loss):
                logger.close()
                raise SystemExit(non_finite_loss(loss.item(), progress.step + 1, ckpt_path, saved_step))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skipped, with a smaller scale, when fp16 gradients overflowed
            scaler.update()
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
        if whole_epoch and progress.step == steps_before:
            raise SystemExit(f"error: no batch of --batch_size {args.batch_size} images held a readable image "
                             f"({progress.samples_skipped} unreadable images skipped)")
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
