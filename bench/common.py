"""What the benchmarks share: timing, the environment record written into their JSON, random-weight checkpoints
with prompts for the benchmarks that run whole models, and DALLE-pytorch, the peer they compare with."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import DALLE, DALLEConfig, DiscreteVAE, DiscreteVAEConfig, HugTokenizer, save_dalle

ROOT = Path(__file__).resolve().parents[1]


class Timer:
    """Milliseconds of one call: CUDA events around it after flushing L2 (as ``triton.testing.do_bench``), or
    ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, run: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e3
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    return f"CPU: {models[0] if models else platform.processor()} ({len(models) or '?'} logical cores)"


def environment(device: torch.device) -> dict:
    """Device, library versions, git commit and date, for a benchmark's JSON."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {"device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# Peak memory bandwidth (bytes/s) by device name fragment, most specific first: the bandwidth floor's denominator.
BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
             ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12), ("L40S", 0.864e12), ("A10G", 0.6e12))


@dataclass
class Rates:
    """The machine's memory bandwidth (bytes/s) and matrix-multiply rate (FLOP/s): the floors' denominators."""

    bandwidth: float | None
    flops: float | None
    measured: bool

    def floor_ms(self, bytes_: float, flops: float) -> float | None:
        """The larger of ``bytes_`` over the bandwidth and ``flops`` over the product rate (either may be unknown)."""
        floors = [bytes_ / self.bandwidth if self.bandwidth else 0.0, flops / self.flops if self.flops else 0.0]
        return max(floors) * 1e3 if any(floors) else None


def matmul_rate(device: torch.device, dtype: torch.dtype, timer: Timer) -> float:
    """FLOP/s of a large square product in ``dtype`` (2048^3 on a CPU, 8192^3 on a GPU), best of 5: what the
    machine's GEMMs reach, the denominator of a compute floor."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up: threads, BLAS dispatch, clocks
    return 2 * n**3 / (min(timer(lambda: a @ b) for _ in range(5)) / 1e3)


def machine_rates(device: torch.device, override_gbs: float | None, timer: Timer) -> Rates:
    """On a GPU the device's bandwidth by name (no FLOP floor: the bandwidth floor dominates a decode step); on a
    CPU both measured here, best of 5 (a sum over 1 GiB, a float32 product)."""
    if override_gbs:
        return Rates(override_gbs * 1e9, None, False)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return Rates(next((bw for fragment, bw in BANDWIDTH if fragment in name), None), None, False)
    buffer = torch.ones(2**28, device=device)  # 1 GiB, far past any cache
    read_s = min(timer(buffer.sum) for _ in range(5)) / 1e3
    return Rates(buffer.numel() * 4 / read_s, matmul_rate(device, torch.float32, timer), True)


def write_report(result: dict, path: str | Path, table: str) -> None:
    """A benchmark's end: its JSON written to ``path``, its table printed last (what a cut-off log still shows)."""
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + table)
    print(f"\nJSON: {path}")

WORDS = ["a", "small", "large", "red", "green", "blue", "circle", "square", "triangle", "at", "the", "top", "left"]
CONFIGS = {
    "tiny": (dict(text_seq_len=8, image_fmap_size=4, dim=32, depth=2, heads=2, dim_head=16),
             dict(image_size=16, num_layers=2, num_tokens=64, codebook_dim=16, hidden_dim=8)),
    "small": (dict(text_seq_len=32, image_fmap_size=16, dim=256, depth=4, heads=8, dim_head=32),
              dict(image_size=64, num_layers=2, num_tokens=512, codebook_dim=64, hidden_dim=32)),
}


def random_checkpoint(name: str, folder: Path) -> Path:
    """A random-weight DALL-E (sparse attention mix, trained-with-null-captions config: guided by default) with a VAE
    and a BPE."""
    torch.manual_seed(0)
    dalle, vae = CONFIGS[name]
    captions = [f"a {s} {c} {k}" for s in WORDS[1:3] for c in WORDS[3:6] for k in WORDS[6:9]]
    tokenizer = HugTokenizer.train(captions * 4, 300, str(folder / "bpe.json"))
    vae = DiscreteVAE(DiscreteVAEConfig(**vae))
    config = DALLEConfig(num_text_tokens=tokenizer.vocab_size, num_image_tokens=vae.num_tokens,
                         attn_types=("axial_row", "axial_col", "axial_row", "conv_like"), **dalle)
    path = folder / "dalle.safetensors"
    save_dalle(path, DALLE(config, vae), tokenizer)
    return path


def prompts(count: int) -> list[str]:
    return [f"{WORDS[i % 13]} {WORDS[(i * 7) % 13]} {WORDS[3 + i % 3]} {WORDS[6 + i % 3]}" for i in range(count)]


def import_dalle_pytorch():
    """DALLE-pytorch with its unused heavy imports (pretrained VAEs, torchvision, transformers) stubbed out."""
    def stub(name: str, **attrs) -> None:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules.setdefault(name, module)

    stub("pkg_resources", get_distribution=lambda _: types.SimpleNamespace(version="1.6.6"))
    for name in ("torchvision", "torchvision.transforms", "transformers", "taming", "taming.models",
                 "taming.models.vqgan", "dall_e", "omegaconf", "requests", "yaml"):
        try:
            __import__(name)
        except ImportError:
            stub(name, BertTokenizer=object, VQModel=object, GumbelVQ=object, OmegaConf=object, load_model=None,
                 map_pixels=None, unmap_pixels=None)
    import dalle_pytorch

    return dalle_pytorch
