"""Training plumbing shared by the training scripts: resumable state, checkpoint rotation, metrics and samples."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image


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


def restore_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                  scheduler: Any, scaler: torch.amp.GradScaler | None = None) -> Progress:
    """Inverse of pack_state: loads optimizer, scheduler, scaler and RNG states; returns the progress."""
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
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return Progress(**meta["progress"])


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
    """Metrics to `metrics.jsonl` and TensorBoard; sample images as JPEGs (and to TensorBoard)."""

    def __init__(self, out_dir: str | os.PathLike, *, config: dict[str, Any], tensorboard: bool = True,
                 wandb_project: str | None = None, wandb_entity: str | None = None):
        self.out_dir = Path(out_dir)
        (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("--wandb_name needs Weights & Biases: pip install wandb") from e
            self.wandb = wandb.init(project=wandb_project, entity=wandb_entity, config=config)

    def scalars(self, step: int, **values: float) -> None:
        self.metrics.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
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
