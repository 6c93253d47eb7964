"""Train a DALL-E model on image-caption pairs.

    python train.py --image_text_folder DATA --vae_path vae.safetensors        # a folder of images + .txt captions
    python train.py --image_text_folder 'shards/data-{000000..000099}.tar' --wds jpg,txt --vae_path vae.safetensors
    deepspeed train.py ... --deepspeed --zero_stage 2 --bf16                     # several GPUs (or CPU processes)
    python train.py                                                             # built-in shapes data

With no --image_text_folder it trains on a built-in dataset of coloured shapes: first a DiscreteVAE (unless
--vae_path is given), then the DALL-E. Without --bpe_path a YouTokenToMe BPE is trained on the captions. The
checkpoint (<name>.safetensors) holds the model, its VAE, the tokenizer and the training state: pass it back as
--dalle_path to resume exactly where it stopped, or to generate.py to sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from engine.checkpoint import load_dalle, load_vae, save_dalle, save_vae
from engine.config import DALLEConfig, add_config_args, config_from_args
from engine.dalle import DALLE
from engine.data import TextImageFolder, WebDatasetStream, collate, webdataset_source
from engine.shapes import BACKGROUNDS, HELD_OUT, ShapesDataset
from engine.tokenizers import Tokenizer, YttmTokenizer, build_tokenizer
from engine.training import EpochSampler, Progress, RunLogger, keep_tagged_copy, pack_state, restore_state
from engine.vae import DiscreteVAE, DiscreteVAEConfig
from engine.vqgan import VQGanVAE

DERIVED = ("num_text_tokens", "num_image_tokens", "image_fmap_size")  # taken from the tokenizer and the VAE
# Where DALLE-pytorch keeps the ImageNet f16 1024 VQGAN it downloads; nothing is downloaded here.
TAMING_DIR = Path("~/.cache/dalle")
TAMING_FILES = ("vqgan.1024.model.ckpt", "vqgan.1024.config.yml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data and models")
    src.add_argument("--image_text_folder", default=None,
                     help="folder of images with same-name .txt captions, or WebDataset shards (with --wds): a "
                          "folder of .tar files, a .tar path or brace pattern, an http(s):// or pipe: URL")
    src.add_argument("--wds", default="", help="IMG_KEY,CAPTION_KEY: read --image_text_folder as WebDataset")
    src.add_argument("--truncate_captions", action="store_true", help="truncate captions longer than text_seq_len")
    src.add_argument("--random_resize_crop_lower_ratio", dest="resize_ratio", type=float, default=0.75)
    src.add_argument("--vae_path", default=None, help="VAE checkpoint (from train_vae.py)")
    src.add_argument("--taming", action="store_true", help="use a taming VQGAN (default: ImageNet f16 1024 codes)")
    src.add_argument("--vqgan_model_path", default=None, help=f"taming .ckpt (default {TAMING_DIR}/{TAMING_FILES[0]})")
    src.add_argument("--vqgan_config_path", default=None, help=f"its yaml (default {TAMING_DIR}/{TAMING_FILES[1]})")
    src.add_argument("--dalle_path", default=None, help="checkpoint to resume from, or a DALLE-pytorch dalle.pt to "
                                                        "fine-tune (model flags are then ignored)")
    src.add_argument("--bpe_path", default=None, help="YouTokenToMe model (or tokenizer JSON with --hug)")
    src.add_argument("--hug", action="store_true")
    src.add_argument("--chinese", action="store_true")
    src.add_argument("--bpe_vocab_size", type=int, default=8000, help="vocabulary of a BPE trained on the captions")
    src.add_argument("--num_workers", type=int, default=2)
    run = p.add_argument_group("training")
    run.add_argument("--epochs", type=int, default=20)
    run.add_argument("--batch_size", type=int, default=4, help="global batch per optimizer step")
    run.add_argument("--ga_steps", type=int, default=1, help="gradient accumulation steps")
    run.add_argument("--learning_rate", type=float, default=3e-4)
    run.add_argument("--clip_grad_norm", type=float, default=0.5)
    run.add_argument("--lr_decay", action="store_true", help="halve the learning rate when the loss plateaus")
    run.add_argument("--fp16", action="store_true")
    run.add_argument("--bf16", action="store_true")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    out = p.add_argument_group("output")
    out.add_argument("--dalle_output_file_name", default="dalle", help="checkpoint <name>.safetensors")
    out.add_argument("--output_dir", default=None, help="logs, metrics and samples (default: <name>-logs)")
    out.add_argument("--save_every_n_steps", type=int, default=1000)
    out.add_argument("--keep_n_checkpoints", type=int, default=None, help="also keep the last N step checkpoints")
    out.add_argument("--log_every_n_steps", type=int, default=10)
    out.add_argument("--sample_every_n_steps", type=int, default=1000, help="0 disables sample images")
    out.add_argument("--wandb_name", default=None, help="log to this Weights & Biases project too")
    out.add_argument("--wandb_entity", default=None)
    dist = p.add_argument_group("distributed")
    dist.add_argument("--distributed_backend", "--distr_backend", default=None, choices=["deepspeed"])
    dist.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    dist.add_argument("--local_rank", type=int, default=-1)
    demo = p.add_argument_group("built-in shapes data (no --image_text_folder)")
    demo.add_argument("--num_samples", type=int, default=20000, help="pairs per epoch")
    demo.add_argument("--image_size", type=int, default=32)
    demo.add_argument("--vae_steps", type=int, default=1500, help="DiscreteVAE training steps")
    add_config_args(p, DALLEConfig, exclude=DERIVED)
    try:
        import deepspeed
    except ImportError:
        p.add_argument("--deepspeed", action="store_true", help="needs DeepSpeed: pip install deepspeed")
    else:
        p = deepspeed.add_config_arguments(p)  # --deepspeed, --deepspeed_config
    args = p.parse_args(argv)
    if args.deepspeed:
        args.distributed_backend = "deepspeed"
    if args.fp16 and args.bf16:
        p.error("choose one of --fp16 and --bf16")
    return args


# --- data -----------------------------------------------------------------------------------------------------------


class TokenizedShapes(Dataset):
    """The built-in shapes as (tokens, image) pairs, the contract of the other datasets."""

    def __init__(self, shapes: ShapesDataset, tokenizer: Tokenizer, text_len: int, truncate: bool):
        self.shapes, self.tokenizer, self.text_len, self.truncate = shapes, tokenizer, text_len, truncate

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int):
        caption, image = self.shapes[index]
        return self.tokenizer.tokenize([caption], self.text_len, self.truncate)[0], image


def builtin_shapes(args: argparse.Namespace, image_size: int | None = None) -> ShapesDataset:
    """The built-in data, drawn at ``image_size`` (a resumed model's VAE size) or --image_size."""
    return ShapesDataset(args.num_samples, image_size or args.image_size, seed=args.seed, exclude=HELD_OUT)


def sample_captions(args: argparse.Namespace, limit: int = 20000) -> list[str]:
    """Captions to train a BPE on: the first `limit` of the training data."""
    if args.image_text_folder is None:
        shapes = builtin_shapes(args)
        return [shapes.caption(i) for i in range(min(limit, len(shapes)))]
    if args.wds:
        import webdataset as wds

        caption_key = args.wds.split(",")[1]
        stream = wds.WebDataset(webdataset_source(args.image_text_folder), shardshuffle=False,
                                handler=wds.warn_and_continue, empty_check=False)
        captions = []
        for sample in itertools.islice(stream, limit):
            raw = sample.get(caption_key)
            if raw is not None:
                text = raw.decode("utf-8", errors="replace")
                captions.append(json.loads(text).get("caption", "") if caption_key == "json" else text)
        return captions
    files = sorted(Path(args.image_text_folder).rglob("*.txt"))[:limit]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def build_data(args, tokenizer: Tokenizer, config: DALLEConfig, image_size: int):
    """The training data: a map-style dataset (resumable by sampler offset) or a WebDataset stream."""
    common = dict(tokenizer=tokenizer, text_len=config.text_seq_len, image_size=image_size,
                  truncate_captions=args.truncate_captions, resize_ratio=args.resize_ratio, seed=args.seed)
    if args.image_text_folder is None:
        return TokenizedShapes(builtin_shapes(args, image_size), tokenizer, config.text_seq_len,
                               args.truncate_captions)
    if args.wds:
        keys = args.wds.split(",")
        if len(keys) != 2:
            raise SystemExit("--wds takes IMG_KEY,CAPTION_KEY, e.g. --wds jpg,txt")
        return WebDatasetStream(webdataset_source(args.image_text_folder), img_key=keys[0], caption_key=keys[1],
                                **common)
    return TextImageFolder(args.image_text_folder, **common)


def epoch_batches(dataset, args, progress: Progress, micro_batch: int, rank: int, world: int):
    """Micro-batches of the current epoch, skipping those already consumed before a resume."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(progress.epoch)
    generator = torch.Generator().manual_seed(args.seed + progress.epoch)  # keeps worker seeds off the global RNG
    if isinstance(dataset, torch.utils.data.IterableDataset):
        loader = DataLoader(dataset, batch_size=micro_batch, num_workers=args.num_workers, collate_fn=collate,
                            generator=generator)
        return itertools.islice(loader, progress.batch_in_epoch, None)
    sampler = EpochSampler(len(dataset), seed=args.seed, epoch=progress.epoch,
                           start=progress.batch_in_epoch * micro_batch, rank=rank, world=world)
    return DataLoader(dataset, batch_size=micro_batch, sampler=sampler, drop_last=True, collate_fn=collate,
                      num_workers=args.num_workers, generator=generator)


# --- models ---------------------------------------------------------------------------------------------------------


def train_shapes_vae(args: argparse.Namespace, device: str) -> DiscreteVAE:
    """A small DiscreteVAE for the built-in shapes."""
    shapes = builtin_shapes(args)
    # Normalising the background to 0 makes it look like the convs' zero padding, so a shape near the border gets the
    # same codes as elsewhere, only shifted (positions lie whole cells apart): what lets the DALL-E compose positions.
    background = tuple(c / 255 for c in BACKGROUNDS[0])
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=args.image_size, num_layers=2, num_tokens=128, codebook_dim=64,
                                        hidden_dim=48, kl_div_loss_weight=1e-3,
                                        normalization=(background, (0.5, 0.5, 0.5)))).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    loader = DataLoader(shapes, batch_size=32, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), args.vae_steps)
    bar = tqdm(batches, total=args.vae_steps, desc="vae")
    for step, (_, images) in enumerate(bar):
        loss = vae(images.to(device), return_loss=True, temp=max(0.999**step, 0.5))  # anneal the temperature
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval()


def taming_vqgan(args: argparse.Namespace) -> VQGanVAE:
    model_path = Path(args.vqgan_model_path or TAMING_DIR / TAMING_FILES[0]).expanduser()
    config_path = Path(args.vqgan_config_path or TAMING_DIR / TAMING_FILES[1]).expanduser()
    missing = [str(p) for p in (model_path, config_path) if not p.is_file()]
    if missing:
        raise SystemExit(
            f"--taming needs a VQGAN checkpoint and its yaml; not found: {', '.join(missing)}. Download taming's "
            "ImageNet f16 1024 model (ckpts/last.ckpt and configs/model.yaml, linked from "
            "https://github.com/CompVis/taming-transformers) or use your own, and pass them with --vqgan_model_path "
            f"and --vqgan_config_path (or save them as {TAMING_DIR}/{TAMING_FILES[0]} and {TAMING_FILES[1]})")
    return VQGanVAE.from_taming(model_path, config_path)


def build_tokenizer_for(args: argparse.Namespace, name: str, rank0_first) -> Tokenizer:
    if args.bpe_path or args.chinese:
        return build_tokenizer(bpe_path=args.bpe_path, hug=args.hug, chinese=args.chinese)
    model_file = f"{name}-bpe.model"

    def train_bpe() -> Tokenizer:
        captions = [line for c in sample_captions(args) for line in c.splitlines() if line.strip()]
        if not captions:
            raise SystemExit(f"no captions found in {args.image_text_folder} to train a tokenizer on")
        return YttmTokenizer.train(captions, args.bpe_vocab_size, model_file)

    return rank0_first(train_bpe, lambda: YttmTokenizer(model_file))


# --- distributed ----------------------------------------------------------------------------------------------------


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, str]:
    """(rank, world size, device); initialises DeepSpeed's process group when asked to."""
    if args.distributed_backend != "deepspeed":
        return 0, 1, args.device
    import deepspeed

    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    return rank, world, f"cuda:{local_rank}" if on_gpu else "cpu"


def deepspeed_config(args: argparse.Namespace, micro_batch: int) -> dict:
    config = {
        "train_batch_size": args.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": args.ga_steps,
        "gradient_clipping": args.clip_grad_norm,
        "fp16": {"enabled": args.fp16},
        "bf16": {"enabled": args.bf16},
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 10**9,
    }
    if args.deepspeed_config:  # a user's JSON overrides the built-in settings
        config.update(json.loads(Path(args.deepspeed_config).read_text()))
        args.deepspeed_config = None  # deepspeed.initialize refuses a config given twice
    return config


# --- training -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    torch.manual_seed(args.seed)
    name = args.dalle_output_file_name
    ckpt_path = Path(f"{name}.safetensors")
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    deepspeed_on = args.distributed_backend == "deepspeed"

    def rank0_first(build, load):
        """Build on rank 0, which writes a file; the other ranks wait for it and load it."""
        if not deepspeed_on:
            return build()
        built = build() if rank == 0 else None
        torch.distributed.barrier()
        return built if rank == 0 else load()

    resumed = None
    if args.dalle_path:  # this engine's checkpoint, or a DALLE-pytorch dalle.pt to fine-tune
        resumed = load_dalle(args.dalle_path, vqgan_model_path=args.vqgan_model_path,
                             vqgan_config_path=args.vqgan_config_path, bpe_path=args.bpe_path, hug=args.hug,
                             chinese=args.chinese)
    if resumed is not None:
        model, tokenizer = resumed.model, resumed.tokenizer
        if tokenizer is None:
            tokenizer = build_tokenizer_for(args, name, rank0_first)
    else:
        vae_file = f"{name}-vae.safetensors"
        if args.vae_path:
            vae = load_vae(args.vae_path).model
        elif args.taming or args.vqgan_model_path or args.vqgan_config_path:
            vae = taming_vqgan(args)
        elif args.image_text_folder is None:
            def train_and_save():
                vae = train_shapes_vae(args, device)
                save_vae(vae_file, vae)
                return vae

            vae = rank0_first(train_and_save, lambda: load_vae(vae_file).model)
        else:
            raise SystemExit("pass --vae_path (a VAE checkpoint from train_vae.py) or --taming (a VQGAN)")
        tokenizer = build_tokenizer_for(args, name, rank0_first)
        config = config_from_args(DALLEConfig, args, num_text_tokens=tokenizer.vocab_size,
                                  num_image_tokens=vae.num_tokens, image_fmap_size=vae.fmap_size)
        torch.manual_seed(args.seed)  # identical initial weights on every rank, whatever ran before
        model = DALLE(config, vae)
    config = model.config
    model.to(device)

    if args.batch_size % (args.ga_steps * world):
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by --ga_steps x processes "
                         f"({args.ga_steps} x {world})")
    micro_batch = args.batch_size // (args.ga_steps * world)
    dataset = build_data(args, tokenizer, config, model.vae.image_size)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    scheduler = None
    if args.lr_decay:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=10,
                                                               cooldown=10, min_lr=1e-6)
    device_type = torch.device(device).type
    scaler = torch.amp.GradScaler(device_type, enabled=args.fp16 and not deepspeed_on)
    progress = Progress()
    ds_dir = Path(f"{name}-ds-cp")
    engine = None
    if deepspeed_on:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                                       model_parameters=params,
                                                       config=deepspeed_config(args, micro_batch))
        if resumed is not None and "progress" in resumed.extra:
            progress = Progress(**resumed.extra["progress"])
            engine.load_checkpoint(ds_dir, tag=f"step{progress.step:09d}")
            if scheduler is not None and resumed.extra.get("scheduler"):
                scheduler.load_state_dict(resumed.extra["scheduler"])
    elif resumed is not None and "progress" in resumed.extra:
        progress = restore_state(resumed.extra, resumed.aux, optimizer, scheduler, scaler)
    amp_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    autocast = (lambda: torch.autocast(device_type, dtype=amp_dtype)) if amp_dtype and not deepspeed_on else nullcontext

    logger = None
    if rank == 0:
        logger = RunLogger(args.output_dir or f"{name}-logs", config=vars(args) | {"model": config.to_dict()},
                           wandb_project=args.wandb_name, wandb_entity=args.wandb_entity)

    def save() -> None:
        state_dict = None
        if engine is not None:
            # DeepSpeed keeps the (possibly sharded) optimizer in its own folder; the consolidated file beside it
            # is what generate.py and a resume read. Every rank takes part in both.
            meta = {"progress": dataclasses.asdict(progress), "scheduler": scheduler and scheduler.state_dict()}
            tensors = {}
            engine.save_checkpoint(ds_dir, tag=f"step{progress.step:09d}")
            if args.zero_stage == 3:
                state_dict = engine._zero3_consolidated_16bit_state_dict()
        else:
            meta, tensors = pack_state(optimizer, scheduler, progress, scaler)
        if rank == 0:
            save_dalle(ckpt_path, model, tokenizer, extra=meta, aux=tensors, state_dict=state_dict)
            keep_tagged_copy(ckpt_path, progress.step, args.keep_n_checkpoints)
            if engine is not None and args.keep_n_checkpoints:
                for old in sorted(ds_dir.glob("step*"))[: -args.keep_n_checkpoints]:
                    shutil.rmtree(old)

    tokens_per_step = args.batch_size * config.total_seq_len
    start, start_step = time.time(), progress.step
    total = None  # a stream's length is unknown
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        total = args.epochs * (len(dataset) // world // micro_batch // args.ga_steps)
    bar = tqdm(total=total, disable=rank != 0, desc="dalle", initial=progress.step)
    loss_value = math.nan
    while progress.epoch < args.epochs:
        for batch in epoch_batches(dataset, args, progress, micro_batch, rank, world):
            progress.batch_in_epoch += 1
            progress.samples_skipped += batch.skipped
            if batch.text.shape[0] == 0:
                continue
            text, images = batch.text.to(device), batch.images.to(device)
            if engine is not None and amp_dtype is not None:
                images = images.to(amp_dtype)  # DeepSpeed casts the whole model, the frozen VAE included
            with autocast():
                loss = (engine or model)(text, images, return_loss=True)
            if engine is not None:
                stepped = engine.is_gradient_accumulation_boundary()
                engine.backward(loss)
                engine.step()
            else:
                scaler.scale(loss / args.ga_steps).backward()
                stepped = progress.batch_in_epoch % args.ga_steps == 0
                if stepped:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, args.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
            if not stepped:
                continue
            progress.step += 1
            loss_value = _mean_across_ranks(loss.detach(), world)
            bar.update(1)
            if rank == 0 and progress.step % args.log_every_n_steps == 0:
                rate = (progress.step - start_step) * tokens_per_step / (time.time() - start)
                logger.scalars(progress.step, loss=loss_value, epoch=progress.epoch, tokens_per_s=rate,
                               lr=optimizer.param_groups[0]["lr"], samples_skipped=progress.samples_skipped)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:.0f}", skipped=progress.samples_skipped)
            if args.sample_every_n_steps and progress.step % args.sample_every_n_steps == 0 and rank == 0 \
                    and not (deepspeed_on and args.zero_stage == 3):
                _log_sample(model, tokenizer, text[:1], logger, progress.step)
            if progress.step % args.save_every_n_steps == 0:
                save()
        progress.epoch += 1
        progress.batch_in_epoch = 0
        if scheduler is not None and not math.isnan(loss_value):
            scheduler.step(loss_value)
        save()
    bar.close()
    if rank == 0:
        logger.close()
        print(f"wrote {ckpt_path} (step {progress.step}, {progress.samples_skipped} bad samples skipped)")


def _mean_across_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.float().clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value.item()


@torch.no_grad()
def _log_sample(model: DALLE, tokenizer: Tokenizer, text: torch.Tensor, logger: RunLogger, step: int) -> None:
    image = model.generate_images(text, filter_thres=0.9, seed=step)
    logger.images(step, image, [tokenizer.decode(text[0])])


if __name__ == "__main__":
    main()
