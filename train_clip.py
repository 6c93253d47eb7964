"""Train a CLIP (engine.CLIP: contrastive text and image encoders) on image-caption pairs, e.g. to rerank DALL-E images.

    python train_clip.py --image_text_folder DATA                          # a folder of images + .txt captions
    python train_clip.py --image_text_folder 'shards/data-{000000..000099}.tar' --wds jpg,txt
    deepspeed train_clip.py ... --deepspeed --zero_stage 2 --bf16          # several GPUs (or CPU processes)
    python train_clip.py --visual_patch_size 8                             # built-in shapes data, 32 px

Data, tokenizer (a YouTokenToMe BPE trained on the captions unless --bpe_path), feedback (progress bar,
metrics.jsonl, TensorBoard), bad-sample skipping, DeepSpeed, precision (bf16 by default on a GPU) and exact resumes
work as in train.py. The checkpoint (<name>.safetensors, read by engine.load_clip) holds the model, its tokenizer and
the training state: pass it back as --clip_path to resume where it stopped.

The contrastive loss, like DALLE-pytorch's CLIP's, draws a caption's negatives from the other images of its process's
micro-batch (--batch_size / (--ga_steps x processes)): gradient accumulation and more processes add none.

On the built-in shapes, held-out pairs are scored after every epoch: top-1 text->image and image->text retrieval among
--retrieval_candidates pairs, and near misses: how often an image's caption beats every caption that changes one
attribute (colour, shape, size or position), the distinction reranking a DALL-E's samples needs. The figures are
printed, logged to metrics.jsonl and kept in the checkpoint's extra["retrieval"].
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from engine.cli import non_negative_int, positive_int
from engine.codecs.tokenizers import Tokenizer
from engine.data import TokenizedShapes, collate
from engine.demo.shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapesDataset
from engine.io.checkpoint import load_clip, save_clip
from engine.model.clip import CLIP, CLIPConfig
from engine.model.config import add_config_args, config_from_args
from engine.train.training import (
    Distributed,
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
    claim_outputs,
    load_or_exit,
    micro_batch_size,
    parse_training_args,
    setup_distributed,
)

DERIVED = ("num_text_tokens",)  # taken from the tokenizer
ATTRIBUTE_VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "position": tuple(POSITIONS)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data and model")
    add_data_args(src)
    src.add_argument("--clip_path", default=None, help="checkpoint to resume from (model flags are then ignored)")
    add_tokenizer_args(src)
    add_run_args(p.add_argument_group("training"))
    out = p.add_argument_group("output")
    out.add_argument("--clip_output_file_name", default="clip", help="checkpoint <name>.safetensors")
    add_output_args(out)
    add_wandb_args(out)
    add_distributed_args(p.add_argument_group("distributed"))
    demo = p.add_argument_group("built-in shapes data (no --image_text_folder)",
                                "Shapes are drawn at the model's image size: --image_size and --visual_image_size "
                                "each set both (default 32).")
    add_shapes_args(demo)
    demo.add_argument("--eval_samples", type=non_negative_int, default=1024,
                      help="held-out pairs scored after every epoch (0: none)")
    demo.add_argument("--retrieval_candidates", type=positive_int, default=32,
                      help="pairs among which each held-out caption and image is matched")
    add_config_args(p, CLIPConfig, exclude=DERIVED)
    p.set_defaults(image_size=None, visual_image_size=None)  # resolved below: they depend on the data source
    args = parse_training_args(p, argv, "clip_output_file_name")

    if args.image_text_folder is None:
        if args.image_size and args.visual_image_size and args.image_size != args.visual_image_size:
            p.error(f"the built-in shapes are drawn at the model's size: --image_size {args.image_size} and "
                    f"--visual_image_size {args.visual_image_size} differ (pass one of them)")
        args.image_size = args.visual_image_size = args.image_size or args.visual_image_size or 32
        if 0 < args.eval_samples < args.retrieval_candidates:
            p.error(f"--eval_samples {args.eval_samples} must be 0 or at least --retrieval_candidates "
                    f"{args.retrieval_candidates}")
    else:
        args.visual_image_size = args.visual_image_size or CLIPConfig.visual_image_size
    if args.retrieval_candidates < 2:
        p.error("--retrieval_candidates must be at least 2")
    try:  # check the model flags now, not after a tokenizer has been trained
        config_from_args(CLIPConfig, args, num_text_tokens=1)
    except ValueError as e:
        p.error(str(e))
    return args


# --- held-out retrieval ---------------------------------------------------------------------------------------------


def held_out_shapes(args: argparse.Namespace, config: CLIPConfig) -> ShapesDataset:
    """The built-in shapes with the --eval_samples pairs the training never sees after the training ones: the same
    seeded sequence, continued."""
    return builtin_shapes(args, config.visual_image_size, num_samples=args.num_samples + args.eval_samples)


def held_out_batches(args: argparse.Namespace, tokenizer: Tokenizer,
                     config: CLIPConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(text, images, labels) batches of --retrieval_candidates held-out pairs. A label names the pair's shape
    spec; pairs with equal labels show the very same picture."""
    shapes = held_out_shapes(args, config)
    pairs = TokenizedShapes(shapes, tokenizer, config.text_seq_len, args.truncate_captions)
    label_of = {spec: i for i, spec in enumerate(shapes.specs)}
    n = args.retrieval_candidates
    for start in range(args.num_samples, len(shapes) - n + 1, n):
        indices = range(start, start + n)
        batch = collate([pairs[i] for i in indices])
        yield batch.text, batch.images, torch.tensor([label_of[shapes.sample(i)[0]] for i in indices])


@torch.no_grad()
def retrieval_accuracy(clip: CLIP, batches, autocast: Callable, device: str) -> dict[str, float]:
    """Top-1 retrieval within each batch: the share of captions whose best-scoring image is their pair's, and of
    images whose best-scoring caption is. A pair with an identical picture counts as a match too: no model could tell
    the two apart, and a tie between them is broken arbitrarily."""
    hits_t2i = hits_i2t = total = 0
    for text, images, labels in batches:
        text, images = text.to(device), images.to(device)
        with autocast():
            sim = clip.encode_text(text, text != 0) @ clip.encode_image(images).t()
        same = (labels[:, None] == labels[None, :]).to(device)
        rows = torch.arange(len(labels), device=device)
        hits_t2i += same[rows, sim.argmax(dim=1)].sum().item()
        hits_i2t += same[sim.argmax(dim=0), rows].sum().item()
        total += len(labels)
    return {"text_to_image": hits_t2i / total, "image_to_text": hits_i2t / total, "pairs": total}


@torch.no_grad()
def near_miss_accuracy(clip: CLIP, shapes: ShapesDataset, first: int, tokenizer: Tokenizer, truncate: bool,
                       autocast: Callable, device: str, chunk: int = 64) -> dict[str, float]:
    """Per attribute, the share of images (the shapes from index `first` on) whose own caption scores highest among
    the captions that change only that attribute, in the same template (a tie goes to the first value).
    Random candidates seldom differ in one attribute alone, so retrieval among them can be perfect while the CLIP
    still mixes up shapes of one colour and place; reranking samples of one prompt needs exactly that distinction."""
    hits = dict.fromkeys(ATTRIBUTE_VALUES, 0)
    for start in range(first, len(shapes), chunk):
        indices = range(start, min(start + chunk, len(shapes)))
        samples = [shapes.sample(i) for i in indices]
        images = torch.stack([shapes[i][1] for i in indices]).to(device)
        captions = [dataclasses.replace(spec, **{attribute: value}).caption(template)
                    for spec, template, _ in samples for attribute, values in ATTRIBUTE_VALUES.items()
                    for value in values]
        text = tokenizer.tokenize(captions, clip.config.text_seq_len, truncate).to(device)
        with autocast():
            image_latents = clip.encode_image(images).float()
            text_latents = clip.encode_text(text, text != 0).float().view(len(samples), -1, image_latents.shape[-1])
        sims = (text_latents @ image_latents[..., None])[..., 0].cpu()  # (samples, captions per sample)
        for attribute, values in ATTRIBUTE_VALUES.items():
            best, sims = sims[:, :len(values)].argmax(dim=1), sims[:, len(values):]
            truth = torch.tensor([values.index(getattr(spec, attribute)) for spec, _, _ in samples])
            hits[attribute] += int((best == truth).sum())
    return {attribute: count / (len(shapes) - first) for attribute, count in hits.items()}


# --- training -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist = setup_distributed(args)
    with claim_outputs(args, args.clip_output_file_name, dist):
        train(args, dist)
    dist.close()


def train(args: argparse.Namespace, dist: Distributed) -> None:
    torch.manual_seed(args.seed)
    name = args.clip_output_file_name
    ckpt_path = Path(f"{name}.safetensors")

    resumed = load_or_exit("--clip_path", args.clip_path, load_clip) if args.clip_path else None
    if resumed is not None:
        model, tokenizer = resumed.model, resumed.tokenizer
        if tokenizer is None:
            tokenizer = build_tokenizer_for(args, name, dist.rank0_first)
    else:
        tokenizer = build_tokenizer_for(args, name, dist.rank0_first)
        torch.manual_seed(args.seed)  # identical initial weights on every rank, whatever ran before
        model = CLIP(config_from_args(CLIPConfig, args, num_text_tokens=tokenizer.vocab_size))
    config = model.config
    model.to(dist.device)
    if dist.deepspeed:
        # DeepSpeed broadcasts every parameter viewed as bytes, which a 0-dim tensor cannot be: the scalar temperature
        # trains as a 1-element vector (the forward pass broadcasts it the same) and is saved as a scalar again.
        model.temperature = torch.nn.Parameter(model.temperature.detach().reshape(1))

    micro_batch = micro_batch_size(args, dist.world)
    dataset = build_data(args, tokenizer, config.text_seq_len, config.visual_image_size)

    def plain_model(state_dict: dict | None) -> CLIP:
        """The model as checkpoints hold it: itself, or under DeepSpeed an fp32 copy with a scalar temperature and,
        for ZeRO-3, where every rank holds only shards, the gathered ``state_dict``."""
        if not dist.deepspeed:
            return model
        weights = dict(model.state_dict() if state_dict is None else state_dict)
        weights["temperature"] = weights["temperature"].reshape(())
        clip = CLIP(config).to(dist.device)
        clip.load_state_dict(weights)
        return clip

    def write(extra, aux, state_dict) -> None:
        save_clip(ckpt_path, plain_model(state_dict), tokenizer, extra=extra, aux=aux)

    trainer = Trainer(args, model, dist, name=name, micro_batch=micro_batch, resumed=resumed, write=write)
    if resumed is not None and "retrieval" in resumed.extra:
        trainer.extra["retrieval"] = resumed.extra["retrieval"]  # until this run's first evaluation replaces it

    def evaluate() -> None:
        state_dict = None
        if trainer.engine is not None and args.zero_stage == 3:
            state_dict = trainer.engine._zero3_consolidated_16bit_state_dict()  # every rank takes part
        if dist.rank != 0:
            return
        model = plain_model(state_dict)
        scores = retrieval_accuracy(model, held_out_batches(args, tokenizer, config), trainer.autocast, dist.device)
        near_miss = near_miss_accuracy(model, held_out_shapes(args, config), args.num_samples, tokenizer,
                                       args.truncate_captions, trainer.autocast, dist.device)
        step, epochs = trainer.progress.step, trainer.progress.epoch
        trainer.extra["retrieval"] = {**scores, "candidates": args.retrieval_candidates, "near_miss": near_miss,
                                      "epochs": epochs, "step": step}
        trainer.logger.scalars(step, **{f"retrieval/{k}": scores[k] for k in ("text_to_image", "image_to_text")},
                               **{f"near_miss/{k}": v for k, v in near_miss.items()})
        tqdm.write(f"after epoch {epochs}: held-out top-1 retrieval among {args.retrieval_candidates}: "
                   f"text->image {scores['text_to_image']:.1%}, image->text {scores['image_to_text']:.1%}; "
                   "caption beats every one-attribute change: "
                   + ", ".join(f"{k} {v:.1%}" for k, v in near_miss.items()))

    evaluating = args.image_text_folder is None and args.eval_samples > 0
    trainer.fit(dataset, lambda module, text, images: module(text, images, text_mask=text != 0, return_loss=True),
                desc="clip", tokens_per_sample=config.text_seq_len + config.num_patches,
                after_epoch=evaluate if evaluating else None)
    if dist.rank == 0:
        progress = trainer.progress
        print(f"wrote {ckpt_path} (step {progress.step}, {progress.samples_skipped} bad samples skipped)")


if __name__ == "__main__":
    main()
