"""Training plumbing shared by the training scripts: their common flags, data and tokenizer, DeepSpeed, the training
loop, resumable state, checkpoint rotation, metrics and samples."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from engine.cli import (
    check_device,
    check_writable,
    fraction,
    leave_process_group,
    non_negative_int,
    positive_float,
    positive_int,
    rng_seed,
)
from engine.codecs.tokenizers import HugTokenizer, Tokenizer, YttmTokenizer, build_tokenizer
from engine.data import (
    Skip,
    TextImageFolder,
    TokenizedShapes,
    WebDatasetStream,
    collate,
    decode_caption,
    read_caption,
    webdataset_source,
)
from engine.demo.shapes import HELD_OUT, ShapesDataset
from engine.io.checkpoint import stale_temporaries
from engine.io.files import write_atomically
from engine.model.precision import (
    DTYPES,
    add_precision_args,
    describe,
    gpu_bf16_supported,
    requested_precision,
    training_precision,
)
from engine.train.run_lock import RunLock, RunLocked

if TYPE_CHECKING:
    from engine.io.checkpoint import Checkpoint


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    samples_skipped: int = 0  # bad samples dropped so far


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded per-epoch permutation, from its `start`-th sample on (for exact resumes)."""

    def __init__(self, size: int, *, seed: int, epoch: int, start: int, rank: int, world: int):
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        self.indices = perm[rank::world][start:].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def pack_state(optimizer: torch.optim.Optimizer, scheduler: Any, progress: Progress,
               scaler: torch.amp.GradScaler | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Everything needed to resume, as JSON metadata plus named tensors (optimizer moments, RNG states)."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in opt["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {
        "progress": dataclasses.asdict(progress),
        "param_groups": opt["param_groups"],
        "optim_scalars": scalars,
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None or not scaler.is_enabled() else scaler.state_dict(),
    }
    return meta, tensors


def resumed_progress(extra: dict[str, Any]) -> Progress:
    """The progress a checkpoint's extra records, or SystemExit if it is not a valid one."""
    fields = {f.name for f in dataclasses.fields(Progress)}
    stored = extra.get("progress")
    if not (isinstance(stored, dict) and set(stored) == fields
            and all(type(v) is int and v >= 0 for v in stored.values())):
        raise SystemExit(f"error: the checkpoint's training progress is damaged: {stored!r}")
    return Progress(**stored)


def check_unfinished(progress: Progress, epochs: int, source: str) -> None:
    """SystemExit if a resumed run already trained `epochs`: it would train nothing, yet seem to succeed."""
    if progress.epoch >= epochs:
        raise SystemExit(f"error: {source} has already trained {progress.epoch} epochs; pass --epochs above that to "
                         f"train on (got --epochs {epochs})")


def too_few_samples(batch_size: int, available: int, source: str) -> str:
    """The message that stops a run whose data cannot fill one optimizer step."""
    return (f"error: an optimizer step takes --batch_size {batch_size} samples, but {source} holds only {available}: "
            "lower --batch_size")


def restore_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                  scheduler: Any, scaler: torch.amp.GradScaler | None = None) -> Progress:
    """Inverse of pack_state: loads optimizer, scheduler, scaler and RNG states; returns the progress. A state that
    does not fit them (damaged, or from another model) is a SystemExit."""
    progress = resumed_progress(meta)
    try:
        state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["optim_scalars"].items()}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if scheduler is not None and meta["scheduler"] is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta["scaler"] is not None:
            scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.cpu"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise SystemExit(f"error: the checkpoint's optimizer or RNG state is damaged: {e!r}") from None
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return progress


def keep_tagged_copy(path: Path, step: int, keep_n: int | None) -> None:
    """Also keep `path` as `<stem>-step<N><suffix>` and prune all but the newest `keep_n` such copies.

    A hard link costs nothing: checkpoints are only ever replaced by rename, never rewritten in place.
    """
    if not keep_n:
        return
    tagged = path.with_name(f"{path.stem}-step{step:09d}{path.suffix}")
    tagged.unlink(missing_ok=True)
    os.link(path, tagged)
    copies = sorted(path.parent.glob(f"{path.stem}-step*{path.suffix}"))
    for old in copies[:-keep_n]:
        old.unlink()


class RunLogger:
    """Metrics to `metrics.jsonl` and TensorBoard; sample images as JPEGs (and to TensorBoard). `fields` (e.g. the
    precision) go into every metrics.jsonl record as they are, not plotted.

    A run that starts at optimizer step `start_step` (that of the checkpoint it resumes, else 0) first drops what an
    earlier run logged after that step, so the metrics of a resumed run continue without repeated steps.
    """

    def __init__(self, out_dir: str | os.PathLike, *, config: dict[str, Any], start_step: int = 0,
                 tensorboard: bool = True, wandb_project: str | None = None, wandb_entity: str | None = None,
                 fields: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.fields = fields or {}
        (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
        _drop_metrics_after(self.out_dir / "metrics.jsonl", start_step)
        self.metrics = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step + 1)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("--wandb_name needs Weights & Biases: pip install wandb") from e
            self.wandb = wandb.init(project=wandb_project, entity=wandb_entity, config=config)

    def scalars(self, step: int, **values: float) -> None:
        self.metrics.write(json.dumps({"step": step, "time": time.time(), **self.fields, **values}) + "\n")
        self.metrics.flush()
        for name, value in values.items():
            if self.tb is not None:
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def images(self, step: int, images: torch.Tensor, captions: list[str]) -> Path:
        """Save (n, C, H, W) images in [0, 1] side by side, with their captions in a .txt beside them."""
        row = torch.cat(list(images[:, :3].clamp(0, 1)), dim=2)
        pixels = (row * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        path = self.out_dir / "samples" / f"step{step:09d}.jpg"
        Image.fromarray(pixels).save(path, quality=95)
        path.with_suffix(".txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        if self.tb is not None:
            self.tb.add_images("samples", images[:, :3].clamp(0, 1), step)
            self.tb.add_text("sample_captions", " | ".join(captions), step)
        return path

    def close(self) -> None:
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_metrics_after(path: Path, step: int) -> None:
    """Keep the records of steps up to `step`, dropping later ones and any line a killed run left half-written."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_atomically(path, "".join(kept).encode("utf-8"))


# --- command line ---------------------------------------------------------------------------------------------------
# The flags train.py and train_clip.py share, in groups so that each script can place its own among them.


def add_data_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--image_text_folder", default=None,
                       help="folder of images with same-name .txt captions, or WebDataset shards (with --wds): a "
                            "folder of .tar files, a .tar path or brace pattern, an http(s):// or pipe: URL")
    group.add_argument("--wds", default="", help="IMG_KEY,CAPTION_KEY: read --image_text_folder as WebDataset")
    group.add_argument("--truncate_captions", action="store_true", help="truncate captions longer than text_seq_len")
    group.add_argument("--random_resize_crop_lower_ratio", dest="resize_ratio", type=fraction, default=0.75,
                       help="smallest share of the image area a random crop keeps")


def add_tokenizer_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--bpe_path", default=None, help="YouTokenToMe model (or tokenizer JSON with --hug)")
    group.add_argument("--hug", action="store_true")
    group.add_argument("--chinese", action="store_true")
    group.add_argument("--bpe_vocab_size", type=positive_int, default=8000,
                       help="vocabulary of a BPE trained on the captions (at least 257 for the byte-level BPE)")
    group.add_argument("--yttm", action="store_true",
                       help="without --bpe_path, train a YouTokenToMe BPE (needs youtokentome) instead of the "
                            "default byte-level BPE, whose merges repeat in every process")
    group.add_argument("--num_workers", type=non_negative_int, default=2)


def add_run_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--epochs", type=positive_int, default=20)
    group.add_argument("--batch_size", type=positive_int, default=4, help="global batch per optimizer step")
    group.add_argument("--ga_steps", type=positive_int, default=1, help="gradient accumulation steps")
    group.add_argument("--learning_rate", type=positive_float, default=3e-4)
    group.add_argument("--clip_grad_norm", type=positive_float, default=0.5)
    group.add_argument("--lr_decay", action="store_true", help="halve the learning rate when the loss plateaus")
    group.add_argument("--warmup_steps", type=non_negative_int, default=0,
                       help="raise the learning rate linearly from 0 over the first N optimizer steps")
    group.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                       help="after warm-up: keep --learning_rate, or follow a cosine down to a tenth of it at the "
                            "last step (needs data of known length)")
    add_precision_args(group)
    group.add_argument("--seed", type=rng_seed, default=0)
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(base: float, step: int, total: int | None, warmup: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: a linear warm-up over `warmup` steps, then
    `base`, or a cosine from `base` to base/10 at the last step. A pure function of the step, so a resumed run
    continues the same curve."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    done = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))


def add_output_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--output_dir", default=None, help="logs, metrics and samples (default: <name>-logs)")
    group.add_argument("--save_every_n_steps", type=positive_int, default=1000)
    group.add_argument("--keep_n_checkpoints", type=positive_int, default=None,
                       help="also keep the last N step checkpoints")
    group.add_argument("--log_every_n_steps", type=positive_int, default=10)


def add_wandb_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--wandb_name", default=None, help="log to this Weights & Biases project too")
    group.add_argument("--wandb_entity", default=None)


def add_distributed_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--distributed_backend", "--distr_backend", default=None, choices=["deepspeed"])
    group.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    group.add_argument("--local_rank", type=int, default=-1)


def add_shapes_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--num_samples", type=positive_int, default=20000, help="pairs per epoch")
    group.add_argument("--image_size", type=positive_int, default=32)


def check_data_source(p: argparse.ArgumentParser, flag: str, folder: str, wds: str | None) -> None:
    """A parse error unless ``folder`` is a folder, or with --wds names shards that exist."""
    if not wds and not Path(folder).is_dir():
        p.error(f"{flag}: {folder!r} does not exist or is not a folder")
    if wds:
        try:
            webdataset_source(folder)
        except FileNotFoundError as e:
            p.error(f"{flag}: {e}")


def parse_training_args(p: argparse.ArgumentParser, argv: list[str] | None, name_flag: str) -> argparse.Namespace:
    """Parse with DeepSpeed's own flags (--deepspeed, --deepspeed_config) added, or a stand-in that says how to get
    them, and check the flags every training script shares, the output folders included (`name_flag`: the flag of
    the checkpoint name)."""
    try:
        import deepspeed
    except ImportError:
        p.add_argument("--deepspeed", action="store_true", help="needs DeepSpeed: pip install deepspeed")
    else:
        p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.deepspeed:
        args.distributed_backend = "deepspeed"
    args.precision = requested_precision(p, args)  # "auto" until the device decides (Trainer)
    world = int(os.environ.get("WORLD_SIZE", "1")) if args.deepspeed else 1  # set by the deepspeed launcher
    if (why := _indivisible_batch(args, world)) is not None:
        p.error(why)
    if args.wds and len(args.wds.split(",")) != 2:
        p.error("--wds takes IMG_KEY,CAPTION_KEY, e.g. --wds jpg,txt")
    if args.lr_decay and (args.lr_schedule != "constant" or args.warmup_steps):
        p.error("--lr_decay and --warmup_steps/--lr_schedule both set the learning rate: choose one")
    check_device(p, args.device)
    check_output_folders(p, args, name_flag)
    resumes = getattr(args, "dalle_path", None) or getattr(args, "clip_path", None)  # its tokenizer, if it has one
    trains_bpe = hasattr(args, "bpe_vocab_size") and not (args.bpe_path or args.hug or args.chinese or resumes)
    if trains_bpe and not args.yttm and args.bpe_vocab_size < 257:
        p.error(f"--bpe_vocab_size {args.bpe_vocab_size}: the byte-level BPE trained on the captions needs at least "
                f"257 (256 bytes + padding)")
    if trains_bpe and args.yttm and importlib.util.find_spec("youtokentome") is None:
        p.error("--yttm needs youtokentome: pip install Cython && pip install --no-build-isolation youtokentome")
    if args.image_text_folder is not None:
        check_data_source(p, "--image_text_folder", args.image_text_folder, args.wds)
    args.deepspeed_overrides = {}  # a --deepspeed_config file's settings, read once here
    if getattr(args, "deepspeed_config", None):
        try:
            args.deepspeed_overrides = json.loads(Path(args.deepspeed_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            p.error(f"--deepspeed_config {args.deepspeed_config}: not a readable JSON file ({e})")
        if not isinstance(args.deepspeed_overrides, dict):
            p.error(f"--deepspeed_config {args.deepspeed_config}: not a JSON object")
        args.deepspeed_config = None  # deepspeed.initialize refuses a config given twice
    return args


def check_output_folders(p: argparse.ArgumentParser, args: argparse.Namespace, name_flag: str) -> None:
    """An argparse error unless the checkpoint's folder and the log folder can be written."""
    name = getattr(args, name_flag)
    if not name or name.endswith(("/", os.sep)):
        p.error(f"--{name_flag} {name!r} is not a file name")
    check_writable(p, f"--{name_flag}", Path(name).parent)
    check_writable(p, "--output_dir" if args.output_dir else f"--{name_flag} (its -logs folder)", log_dir(args, name))


def log_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.output_dir or f"{name}-logs")


# --- data -----------------------------------------------------------------------------------------------------------


def builtin_shapes(args: argparse.Namespace, image_size: int | None = None,
                   num_samples: int | None = None) -> ShapesDataset:
    """The built-in data, drawn at ``image_size`` (e.g. a resumed model's) or --image_size. A larger ``num_samples``
    than --num_samples continues the same sequence past the training pairs, e.g. for a held-out split."""
    return ShapesDataset(num_samples or args.num_samples, image_size or args.image_size, seed=args.seed,
                         exclude=HELD_OUT)


def sample_captions(args: argparse.Namespace, limit: int = 20000) -> tuple[list[str], int]:
    """Captions to train a BPE on, from the first `limit` samples of the training data, and the number of those
    whose caption could not be read (skipped)."""
    if args.image_text_folder is None:
        shapes = builtin_shapes(args)
        return [shapes.caption(i) for i in range(min(limit, len(shapes)))], 0
    if args.wds:
        import webdataset as wds

        caption_key = args.wds.split(",")[1].lower()
        stream = wds.WebDataset(webdataset_source(args.image_text_folder), shardshuffle=False,
                                handler=wds.warn_and_continue, empty_check=False)
        raw = [sample.get(caption_key) for sample in itertools.islice(stream, limit)]
        captions = [decode_caption(r, caption_key) for r in raw if r is not None]
    else:
        captions = [read_caption(f) for f in sorted(Path(args.image_text_folder).rglob("*.txt"))[:limit]]
    readable = [c for c in captions if c is not None]
    return readable, len(captions) - len(readable)


def build_data(args: argparse.Namespace, tokenizer: Tokenizer, text_len: int, image_size: int):
    """The training data: a map-style dataset (resumable by sampler offset) or a WebDataset stream."""
    common = dict(tokenizer=tokenizer, text_len=text_len, image_size=image_size,
                  truncate_captions=args.truncate_captions, resize_ratio=args.resize_ratio, seed=args.seed)
    if args.image_text_folder is None:
        return TokenizedShapes(builtin_shapes(args, image_size), tokenizer, text_len, args.truncate_captions)
    try:
        if args.wds:
            keys = args.wds.split(",")
            return WebDatasetStream(webdataset_source(args.image_text_folder), img_key=keys[0], caption_key=keys[1],
                                    **common)
        return TextImageFolder(args.image_text_folder, **common)
    except (OSError, ValueError) as e:  # e.g. a folder without a single image-caption pair
        raise SystemExit(f"error: --image_text_folder: {e}") from None


def build_tokenizer_for(args: argparse.Namespace, name: str, rank0_first: Callable) -> Tokenizer:
    """The tokenizer the flags name, or a BPE trained on the data's captions: byte-level (HuggingFace
    ``tokenizers``, saved as <name>-bpe.json), or YouTokenToMe with ``--yttm`` (<name>-bpe.model)."""
    if args.bpe_path or args.chinese or args.hug:
        try:
            return build_tokenizer(bpe_path=args.bpe_path, hug=args.hug, chinese=args.chinese)
        except (OSError, ValueError, ImportError) as e:
            raise SystemExit(f"error: cannot load the tokenizer: {e}") from None
    kind, model_file = (YttmTokenizer, f"{name}-bpe.model") if args.yttm else (HugTokenizer, f"{name}-bpe.json")

    def train_bpe() -> Tokenizer:
        captions, unreadable = sample_captions(args)
        lines = [line for c in captions for line in c.splitlines() if line.strip()]
        if unreadable:
            print(f"skipped {unreadable} unreadable captions while training the tokenizer", file=sys.stderr)
        if not lines:
            raise SystemExit(f"error: no captions found in {args.image_text_folder} to train a tokenizer on")
        try:
            return kind.train(lines, args.bpe_vocab_size, model_file)
        except ValueError as e:  # e.g. a vocabulary smaller than the captions' alphabet
            raise SystemExit(f"error: cannot train a tokenizer on the captions: {e} (--bpe_vocab_size)") from None

    return rank0_first(train_bpe, lambda: kind(model_file))


def epoch_batches(dataset, args: argparse.Namespace, progress: Progress, micro_batch: int, rank: int, world: int):
    """Micro-batches of the current epoch, skipping those already consumed before a resume."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(progress.epoch)
    generator = torch.Generator().manual_seed(args.seed + progress.epoch)  # keeps worker seeds off the global RNG
    if isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=micro_batch, num_workers=args.num_workers, collate_fn=collate,
                            generator=generator)
        return itertools.islice(loader, progress.batch_in_epoch, None)
    sampler = EpochSampler(len(dataset), seed=args.seed, epoch=progress.epoch,
                           start=progress.batch_in_epoch * micro_batch, rank=rank, world=world)
    return DataLoader(dataset, batch_size=micro_batch, sampler=sampler, drop_last=True, collate_fn=collate,
                      num_workers=args.num_workers, generator=generator)


# --- distributed ----------------------------------------------------------------------------------------------------


@dataclass
class Distributed:
    """This process's place in the run: rank, number of processes, device, and whether DeepSpeed drives it."""

    rank: int
    world: int
    device: str
    deepspeed: bool

    def rank0_first(self, build: Callable[[], Any], load: Callable[[], Any]) -> Any:
        """Build on rank 0, which writes a file; the other ranks wait for it and load it."""
        if not self.deepspeed:
            return build()
        built = build() if self.rank == 0 else None
        torch.distributed.barrier()
        return built if self.rank == 0 else load()

    def close(self) -> None:
        """The last call of a run: under DeepSpeed, ends the process (see ``leave_process_group``)."""
        if self.deepspeed and torch.distributed.is_initialized():
            leave_process_group()

    def all_ok(self, ok: bool) -> bool:
        """Whether `ok` holds on every process, so that all of them stop together."""
        if self.world == 1:
            return ok
        flag = torch.tensor(int(ok), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def mean(self, value: torch.Tensor) -> float:
        """A scalar tensor's mean over the processes."""
        if self.world > 1:
            value = value.float().clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value.item()


def setup_distributed(args: argparse.Namespace) -> Distributed:
    """Initialises DeepSpeed's process group when asked to."""
    if args.distributed_backend != "deepspeed":
        return Distributed(0, 1, args.device, deepspeed=False)
    import deepspeed

    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:
        release_shared_buffer(torch.distributed.get_rank())
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                       f"cuda:{local_rank}" if on_gpu else "cpu", deepspeed=True)


def release_shared_buffer(rank: int) -> None:
    """Unlink this process's shared-memory buffer of DeepSpeed's CPU all-reduce (``/dev/shm/deepspeed_allreduce_buffer_
    <uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, 66 MB): DeepSpeed never does, so every CPU run, finished or killed, left
    its buffers behind until /dev/shm filled. Once every process has mapped every other's (they do while initialising,
    hence the barrier) the name is not needed: the memory stays mapped until the processes exit."""
    torch.distributed.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


@contextlib.contextmanager
def claim_outputs(args: argparse.Namespace, name: str, dist: Distributed) -> Iterator[None]:
    """Lock the checkpoint name and the log folder for the run inside the block, after deleting the temporary files
    of killed runs. Rank 0 takes the locks; every process exits with the same message if another run holds them."""
    error, locks = None, []
    if dist.rank == 0:
        ckpt = Path(f"{name}.safetensors")
        try:
            for path in (ckpt.parent / f".{ckpt.name}.lock", log_dir(args, name) / ".lock"):
                locks.append(RunLock(path).acquire())
        except RunLocked as e:
            error = str(e)
        except OSError as e:
            error = f"cannot lock the outputs of {name}: {e}"
        else:
            for stale in stale_temporaries(ckpt):  # the lock is ours, so no live run is writing them
                stale.unlink(missing_ok=True)
    try:
        if not dist.all_ok(error is None):
            raise SystemExit(f"error: {error or 'another run holds the outputs (see rank 0)'}")
        yield
    finally:
        for lock in locks:
            lock.release()


def load_or_exit(flag: str, path: str, load: Callable[..., Any], **options: Any) -> Any:
    """`load(path, **options)`, or SystemExit naming the flag when the file cannot be loaded."""
    try:
        return load(path, **options)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: cannot load {flag} {path}: {e}") from None


def micro_batch_size(args: argparse.Namespace, world: int) -> int:
    if (why := _indivisible_batch(args, world)) is not None:
        raise SystemExit(f"error: {why}")
    return args.batch_size // (args.ga_steps * world)


def _indivisible_batch(args: argparse.Namespace, world: int) -> str | None:
    if args.batch_size % (args.ga_steps * world):
        return (f"--batch_size {args.batch_size} must be divisible by --ga_steps x processes ({args.ga_steps} x "
                f"{world})")
    return None


def deepspeed_config(args: argparse.Namespace, micro_batch: int, precision: str) -> dict:
    config = {
        "train_batch_size": args.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": args.ga_steps,
        "gradient_clipping": args.clip_grad_norm,
        "fp16": {"enabled": precision == "fp16"},
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 10**9,
    }
    return config | args.deepspeed_overrides  # a user's --deepspeed_config overrides the built-in settings


# --- the training loop ----------------------------------------------------------------------------------------------


def adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """The Adam runs train with. Parameters on a CPU take torch's fused implementation, one pass over each tensor where
    the default makes a dozen (a fifth of its time: 5 % of a small model's training step); elsewhere torch's default."""
    on_cpu = all(p.device.type == "cpu" for p in params)
    return torch.optim.Adam(params, lr=lr, fused=True if on_cpu else None)


class Trainer:
    """The optimisation side of a run, with or without DeepSpeed: Adam with gradient accumulation, clipping, mixed
    precision (`self.precision`: the flag's, else bf16 or fp16 on a GPU, fp32 on a CPU) and (--lr_decay) a plateau
    schedule; the epoch loop with its progress bar and metrics; checkpoints that resume exactly (optimizer, scheduler,
    RNG and data position).

    `write(extra, aux, state_dict)` writes the checkpoint `<name>.safetensors` on rank 0; `state_dict` is None, or
    the weights gathered from ZeRO-3 shards. `self.extra` (the precision, at least) is merged into every
    checkpoint's extra; every metrics.jsonl record names the precision too.
    """

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, dist: Distributed, *, name: str,
                 micro_batch: int, resumed: Checkpoint | None,
                 write: Callable[[dict[str, Any], dict[str, torch.Tensor], dict | None], None]):
        self.args, self.model, self.dist, self.micro_batch, self.write = args, model, dist, micro_batch, write
        self.ckpt_path, self.ds_dir = Path(f"{name}.safetensors"), Path(f"{name}-ds-cp")
        resuming = resumed is not None and "progress" in resumed.extra
        resumed_at = resumed_progress(resumed.extra) if resuming else None
        if resumed_at is not None:
            check_unfinished(resumed_at, args.epochs, "the resumed checkpoint")
        device_type = torch.device(dist.device).type
        self.precision = training_precision(args.precision, device_type, gpu_bf16_supported(dist.device))
        self.extra: dict[str, Any] = {"precision": self.precision}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adam(self.params, args.learning_rate)
        self.scheduler = None
        if args.lr_decay:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", factor=0.5,
                                                                        patience=10, cooldown=10, min_lr=1e-6)
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.precision == "fp16" and not dist.deepspeed)
        self.progress = Progress()
        self.engine = None
        if dist.deepspeed:
            import deepspeed

            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                args=args, model=model, optimizer=self.optimizer, model_parameters=self.params,
                config=deepspeed_config(args, micro_batch, self.precision))
            if resuming:
                self.progress = resumed_at
                self.engine.load_checkpoint(self.ds_dir, tag=f"step{self.progress.step:09d}")
                if self.scheduler is not None and resumed.extra.get("scheduler"):
                    self.scheduler.load_state_dict(resumed.extra["scheduler"])
        elif resuming:
            self.progress = restore_state(resumed.extra, resumed.aux, self.optimizer, self.scheduler, self.scaler)
        self.saved_step = self.progress.step if resuming else None  # of the checkpoint on disk
        self._reported: set[str] = set()  # kinds of bad samples already named
        self.amp_dtype = None if self.precision == "fp32" else DTYPES[self.precision]
        self._device_type = device_type
        self.logger = None
        if dist.rank == 0:
            print(describe(self.precision, args.precision, device_type, deepspeed=dist.deepspeed), flush=True)
            self.logger = RunLogger(log_dir(args, name),
                                    config=vars(args) | {"model": model.config.to_dict(), "precision": self.precision},
                                    start_step=self.progress.step, wandb_project=args.wandb_name,
                                    wandb_entity=args.wandb_entity, fields={"precision": self.precision})

    @property
    def module(self) -> torch.nn.Module:
        """What to call for the training forward pass: the DeepSpeed engine, or the model itself."""
        return self.engine or self.model

    def autocast(self):
        if self.amp_dtype is None or self.engine is not None:  # DeepSpeed casts the model itself
            return nullcontext()
        return torch.autocast(self._device_type, dtype=self.amp_dtype)

    def inputs(self, text: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the run's device, its images in the model's dtype."""
        text, images = text.to(self.dist.device), images.to(self.dist.device)
        if self.engine is not None and self.amp_dtype is not None:
            images = images.to(self.amp_dtype)  # DeepSpeed casts the whole model (a DALL-E's frozen VAE included)
        return text, images

    def _backward(self, loss: torch.Tensor) -> bool:
        """Accumulate the gradients of `loss`; True when that completed an optimizer step."""
        if self.engine is not None:
            stepped = self.engine.is_gradient_accumulation_boundary()
            self.engine.backward(loss)
            self.engine.step()
            return stepped
        self.scaler.scale(loss / self.args.ga_steps).backward()
        if self.progress.batch_in_epoch % self.args.ga_steps:
            return False
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.args.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self) -> None:
        """Write the checkpoint (and its step-tagged copy); every rank must call it."""
        progress, scheduler, state_dict = self.progress, self.scheduler, None
        if self.engine is not None:
            # DeepSpeed keeps the (possibly sharded) optimizer in its own folder; the consolidated file beside it
            # is what the sampling scripts and a resume read. Every rank takes part in both.
            meta = {"progress": dataclasses.asdict(progress), "scheduler": scheduler and scheduler.state_dict()}
            tensors = {}
            self.engine.save_checkpoint(self.ds_dir, tag=f"step{progress.step:09d}")
            if self.args.zero_stage == 3:
                state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            meta, tensors = pack_state(self.optimizer, scheduler, progress, self.scaler)
        self.saved_step = progress.step
        if self.dist.rank == 0:
            self.write(meta | self.extra, tensors, state_dict)
            keep_tagged_copy(self.ckpt_path, progress.step, self.args.keep_n_checkpoints)
            if self.engine is not None and self.args.keep_n_checkpoints:
                for old in sorted(self.ds_dir.glob("step*"))[: -self.args.keep_n_checkpoints]:
                    shutil.rmtree(old)

    def fit(self, dataset, forward: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], *,
            desc: str, tokens_per_sample: int, after_step: Callable[[int, torch.Tensor], None] | None = None,
            after_epoch: Callable[[], None] | None = None) -> None:
        """Train until --epochs, from where a resume left off. `forward(module, text, images)` gives the loss;
        `after_step(step, text)` runs after every optimizer step and `after_epoch()` before each epoch's save.

        Raises SystemExit, before any step, if the data cannot fill one optimizer step, and as soon as a step's loss
        is NaN or infinite, without saving: the checkpoint on disk keeps the last good state."""
        args, dist, progress = self.args, self.dist, self.progress
        tokens_per_step = args.batch_size * tokens_per_sample
        start, start_step = time.time(), progress.step
        total = None  # a stream's length is unknown
        if not isinstance(dataset, IterableDataset):
            per_epoch = len(dataset) // dist.world // self.micro_batch // args.ga_steps
            if per_epoch == 0:
                raise SystemExit(too_few_samples(args.batch_size, len(dataset), "the data"))
            total = args.epochs * per_epoch
        elif args.lr_schedule != "constant":
            raise SystemExit(f"error: --lr_schedule {args.lr_schedule} needs the number of steps, and a stream's "
                             "length is unknown: use --lr_schedule constant (with --warmup_steps, or --lr_decay)")
        unpaired = getattr(dataset, "unpaired_images", 0)
        if unpaired and dist.rank == 0:
            tqdm.write(f"skipping {unpaired} images without a caption file every epoch (counted in samples_skipped; "
                       f"first: {dataset.first_unpaired_image})")
        bar = tqdm(total=total, disable=dist.rank != 0, desc=desc, initial=progress.step)
        loss_value = math.nan
        losses = torch.zeros((), device=dist.device)  # summed over the micro-batches of one step
        while progress.epoch < args.epochs:
            whole_epoch, steps_before = progress.batch_in_epoch == 0, progress.step
            if whole_epoch and dist.rank == 0:
                progress.samples_skipped += unpaired
            if self.engine is None:
                self.optimizer.zero_grad(set_to_none=True)  # an epoch's last incomplete accumulation is dropped
            losses.zero_()
            micro_batches = 0
            for batch in epoch_batches(dataset, args, progress, self.micro_batch, dist.rank, dist.world):
                progress.batch_in_epoch += 1
                progress.samples_skipped += batch.skipped
                self._report(batch.skips)
                if batch.text.shape[0] == 0:
                    continue
                text, images = self.inputs(batch.text, batch.images)
                if args.warmup_steps or args.lr_schedule != "constant":
                    lr = scheduled_lr(args.learning_rate, progress.step, total, args.warmup_steps, args.lr_schedule)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                with self.autocast():
                    loss = forward(self.module, text, images)
                losses += loss.detach().float()
                micro_batches += 1
                if not self._backward(loss):
                    continue
                progress.step += 1
                loss_value = dist.mean(losses / micro_batches)
                losses.zero_()
                micro_batches = 0
                if not math.isfinite(loss_value):
                    bar.close()  # before the message, which would otherwise be followed by the bar
                    self._stop_on(loss_value)
                bar.update(1)
                if dist.rank == 0 and progress.step % args.log_every_n_steps == 0:
                    rate = (progress.step - start_step) * tokens_per_step / (time.time() - start)
                    self.logger.scalars(progress.step, loss=loss_value, epoch=progress.epoch, tokens_per_s=rate,
                                        lr=self.optimizer.param_groups[0]["lr"],
                                        samples_skipped=progress.samples_skipped)
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:.0f}", skipped=progress.samples_skipped)
                if after_step is not None:
                    after_step(progress.step, text)
                if progress.step % args.save_every_n_steps == 0:
                    self.save()
            if whole_epoch and progress.step == steps_before:
                raise SystemExit(f"error: epoch {progress.epoch + 1} of the data gave no optimizer step of "
                                 f"--batch_size {args.batch_size} good samples ({progress.samples_skipped} bad "
                                 "samples skipped so far): check the data, or lower --batch_size")
            progress.epoch += 1
            progress.batch_in_epoch = 0
            if self.scheduler is not None and not math.isnan(loss_value):
                self.scheduler.step(loss_value)
            if after_epoch is not None:
                after_epoch()
            self.save()
        bar.close()
        if dist.rank == 0:
            self.logger.close()

    def _report(self, skips: tuple[Skip, ...]) -> None:
        """Name the first skipped sample of each kind; later ones are only counted."""
        for skip in skips:
            if self.dist.rank == 0 and skip.reason not in self._reported:
                self._reported.add(skip.reason)
                tqdm.write(f"skipping samples with {skip.reason} (counted in samples_skipped; first: {skip.where})")

    def _stop_on(self, loss_value: float) -> NoReturn:
        if self.dist.rank == 0:
            self.logger.close()
        raise SystemExit(non_finite_loss(loss_value, self.progress.step, self.ckpt_path, self.saved_step))


def non_finite_loss(loss_value: float, step: int, ckpt_path: Path, saved_step: int | None) -> str:
    """The message that stops a run whose loss became NaN or infinite."""
    kept = f"{ckpt_path} keeps step {saved_step}" if saved_step is not None else "no checkpoint was written"
    return (f"error: the loss became {loss_value} at step {step}; stopped without saving: {kept}. Lower "
            "--learning_rate, or train with --bf16 or --fp32 rather than --fp16")
