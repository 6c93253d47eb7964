"""Train a DALL-E model on image-caption pairs.

    python train.py --image_text_folder DATA --vae_path vae.safetensors        # a folder of images + .txt captions
    python train.py --image_text_folder 'shards/data-{000000..000099}.tar' --wds jpg,txt --vae_path vae.safetensors
    deepspeed train.py ... --deepspeed --zero_stage 2 --bf16                     # several GPUs (or CPU processes)
    python train.py                                                             # built-in shapes data

With no --image_text_folder it trains on a built-in dataset of coloured shapes: first a DiscreteVAE (unless
--vae_path is given), then the DALL-E. Without --bpe_path a byte-level BPE is trained on the captions (--yttm: a
YouTokenToMe one). The checkpoint (<name>.safetensors) holds the model, its VAE, the tokenizer and the training state: pass it back as
--dalle_path to resume exactly where it stopped, or to generate.py to sample.

On a GPU it trains under bf16 autocast (fp16 with loss scaling where the GPU lacks bf16), on a CPU in fp32; --fp32,
--bf16 or --fp16 choose. The precision is printed at start and kept in metrics.jsonl and the checkpoint's extra.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.cli import non_negative_int, positive_int
from engine.codecs.tokenizers import Tokenizer
from engine.codecs.vae import DiscreteVAE, DiscreteVAEConfig
from engine.codecs.vqgan import VQGanVAE
from engine.demo.shapes import BACKGROUNDS
from engine.eval import at_least_two, eval_samples, evaluate
from engine.io.checkpoint import load_dalle, load_vae, save_dalle, save_vae
from engine.model.config import DALLEConfig, add_config_args, config_from_args
from engine.model.dalle import DALLE
from engine.train.training import (
    Distributed,
    RunLogger,
    Trainer,
    add_data_args,
    add_distributed_args,
    add_output_args,
    add_run_args,
    add_shapes_args,
    add_tokenizer_args,
    add_wandb_args,
    build_data,
    build_tokenizer_for,
    builtin_shapes,
    check_data_source,
    claim_outputs,
    load_or_exit,
    micro_batch_size,
    parse_training_args,
    setup_distributed,
)

DERIVED = ("num_text_tokens", "num_image_tokens", "image_fmap_size")  # taken from the tokenizer and the VAE
# Where DALLE-pytorch keeps the ImageNet f16 1024 VQGAN it downloads; nothing is downloaded here.
TAMING_DIR = Path("~/.cache/dalle")
TAMING_FILES = ("vqgan.1024.model.ckpt", "vqgan.1024.config.yml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data and models")
    add_data_args(src)
    src.add_argument("--vae_path", default=None, help="VAE checkpoint (from train_vae.py)")
    src.add_argument("--taming", action="store_true", help="use a taming VQGAN (default: ImageNet f16 1024 codes)")
    src.add_argument("--vqgan_model_path", default=None, help=f"taming .ckpt (default {TAMING_DIR}/{TAMING_FILES[0]})")
    src.add_argument("--vqgan_config_path", default=None, help=f"its yaml (default {TAMING_DIR}/{TAMING_FILES[1]})")
    src.add_argument("--dalle_path", default=None, help="checkpoint to resume from, or a DALLE-pytorch dalle.pt to "
                                                        "fine-tune (model flags are then ignored)")
    add_tokenizer_args(src)
    add_run_args(p.add_argument_group("training"))
    out = p.add_argument_group("output")
    out.add_argument("--dalle_output_file_name", default="dalle", help="checkpoint <name>.safetensors")
    add_output_args(out)
    out.add_argument("--sample_every_n_steps", type=non_negative_int, default=1000, help="0 disables sample images")
    val = p.add_argument_group("validation on held-out pairs (engine.eval)")
    val.add_argument("--val_folder", default=None,
                     help="held-out image-caption pairs (a folder, or shards with --wds): caption retrieval by the "
                          "model's likelihood and image-token perplexity, logged as val/...")
    val.add_argument("--val_every_n_steps", type=positive_int, default=500,
                     help="validate every N optimizer steps, and after the last")
    val.add_argument("--val_pairs", type=positive_int, default=128, help="the first N readable held-out pairs")
    val.add_argument("--val_candidates", type=at_least_two, default=16,
                     help="captions each image is ranked among (its own and N - 1 others)")
    add_wandb_args(out)
    add_distributed_args(p.add_argument_group("distributed"))
    demo = p.add_argument_group("built-in shapes data (no --image_text_folder)")
    add_shapes_args(demo)
    demo.add_argument("--vae_steps", type=positive_int, default=1500, help="DiscreteVAE training steps")
    add_config_args(p, DALLEConfig, exclude=DERIVED)
    args = parse_training_args(p, argv, "dalle_output_file_name")
    if args.val_folder is not None:
        check_data_source(p, "--val_folder", args.val_folder, args.wds)
    try:  # check the model flags now, not after a VAE and a tokenizer have been trained
        config_from_args(DALLEConfig, args, **dict.fromkeys(DERIVED, 1))
        if args.image_text_folder is None and not (args.vae_path or args.dalle_path):
            shapes_vae_config(args.image_size)
    except ValueError as e:
        p.error(str(e))
    return args


# --- models ---------------------------------------------------------------------------------------------------------


def shapes_vae_config(image_size: int) -> DiscreteVAEConfig:
    """A small DiscreteVAE for the built-in shapes."""
    # Normalising the background to 0 makes it look like the convs' zero padding, so a shape near the border gets the
    # same codes as elsewhere, only shifted (positions lie whole cells apart): what lets the DALL-E compose positions.
    background = tuple(c / 255 for c in BACKGROUNDS[0])
    return DiscreteVAEConfig(image_size=image_size, num_layers=2, num_tokens=128, codebook_dim=64, hidden_dim=48,
                             kl_div_loss_weight=1e-3, normalization=(background, (0.5, 0.5, 0.5)))


def train_shapes_vae(args: argparse.Namespace, device: str) -> DiscreteVAE:
    shapes = builtin_shapes(args)
    vae = DiscreteVAE(shapes_vae_config(args.image_size)).to(device)
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
    return load_or_exit("--vqgan_model_path", model_path, VQGanVAE.from_taming, config_path=config_path)


# --- training -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist = setup_distributed(args)
    with claim_outputs(args, args.dalle_output_file_name, dist):
        train(args, dist)
    dist.close()


def train(args: argparse.Namespace, dist: Distributed) -> None:
    torch.manual_seed(args.seed)
    name = args.dalle_output_file_name
    ckpt_path = Path(f"{name}.safetensors")

    resumed = None
    if args.dalle_path:  # this engine's checkpoint, or a DALLE-pytorch dalle.pt to fine-tune
        resumed = load_or_exit("--dalle_path", args.dalle_path, load_dalle, vqgan_model_path=args.vqgan_model_path,
                               vqgan_config_path=args.vqgan_config_path, bpe_path=args.bpe_path, hug=args.hug,
                               chinese=args.chinese)
    if resumed is not None:
        model, tokenizer = resumed.model, resumed.tokenizer
        if tokenizer is None:
            tokenizer = build_tokenizer_for(args, name, dist.rank0_first)
    else:
        vae_file = f"{name}-vae.safetensors"
        if args.vae_path:
            vae = load_or_exit("--vae_path", args.vae_path, load_vae).model
        elif args.taming or args.vqgan_model_path or args.vqgan_config_path:
            vae = taming_vqgan(args)
        elif args.image_text_folder is None:
            def train_and_save():
                vae = train_shapes_vae(args, dist.device)
                save_vae(vae_file, vae)
                return vae

            vae = dist.rank0_first(train_and_save, lambda: load_vae(vae_file).model)
        else:
            raise SystemExit("pass --vae_path (a VAE checkpoint from train_vae.py) or --taming (a VQGAN)")
        tokenizer = build_tokenizer_for(args, name, dist.rank0_first)
        config = config_from_args(DALLEConfig, args, num_text_tokens=tokenizer.vocab_size,
                                  num_image_tokens=vae.num_tokens, image_fmap_size=vae.fmap_size)
        torch.manual_seed(args.seed)  # identical initial weights on every rank, whatever ran before
        model = DALLE(config, vae)
    config = model.config
    model.to(dist.device)

    micro_batch = micro_batch_size(args, dist.world)
    dataset = build_data(args, tokenizer, config.text_seq_len, model.vae.image_size)

    def write(extra, aux, state_dict) -> None:
        save_dalle(ckpt_path, model, tokenizer, extra=extra, aux=aux, state_dict=state_dict)

    trainer = Trainer(args, model, dist, name=name, micro_batch=micro_batch, resumed=resumed, write=write)

    whole_model_here = dist.rank == 0 and not (dist.deepspeed and args.zero_stage == 3)

    def validate(step: int) -> None:
        samples, _ = eval_samples(args.val_folder, tokenizer=tokenizer, text_len=config.text_seq_len,
                                  image_size=model.vae.image_size, wds=args.wds or "",
                                  truncate_captions=args.truncate_captions, seed=args.seed)
        report = evaluate(model, tokenizer, samples, candidates=args.val_candidates, num_pairs=args.val_pairs,
                          seed=args.seed, batch_size=micro_batch, device=dist.device)
        if report["pairs"]:
            retrieval = report["retrieval"] or {}
            trainer.logger.scalars(step, **{f"val/{k}": v for k, v in (
                ("retrieval_top1", retrieval.get("top1")), ("retrieval_mean_rank", retrieval.get("mean_rank")),
                ("perplexity", report["perplexity"]), ("pairs", report["pairs"])) if v is not None})

    def after_step(step: int, text: torch.Tensor) -> None:
        if args.sample_every_n_steps and step % args.sample_every_n_steps == 0 and whole_model_here:
            _log_sample(model, tokenizer, text[:1], trainer.logger, step)
        if args.val_folder and step % args.val_every_n_steps == 0 and whole_model_here:
            validate(step)

    def after_epoch() -> None:  # the final model's figures, unless its last step has just logged them
        progress = trainer.progress
        if args.val_folder and whole_model_here and progress.epoch == args.epochs and \
                progress.step % args.val_every_n_steps:
            validate(progress.step)

    trainer.fit(dataset, lambda module, text, images: module(text, images, return_loss=True), desc="dalle",
                tokens_per_sample=config.total_seq_len, after_step=after_step, after_epoch=after_epoch)
    if dist.rank == 0:
        progress = trainer.progress
        print(f"wrote {ckpt_path} (step {progress.step}, {progress.samples_skipped} bad samples skipped)")


@torch.no_grad()
def _log_sample(model: DALLE, tokenizer: Tokenizer, text: torch.Tensor, logger: RunLogger, step: int) -> None:
    image = model.generate_images(text, filter_thres=0.9, seed=step)
    logger.images(step, image, [tokenizer.decode(text[0])])


if __name__ == "__main__":
    main()
