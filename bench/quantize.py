"""What weight-only quantisation costs in quality: the next-code distributions of a model with its linear layers
stored in bf16 or int8 (``--weights``, ``engine.model.quantize``) against the same model in float32, on one
checkpoint (random weights unless ``--dalle_path``).

    python bench/quantize.py --dalle_path demo/dalle.safetensors
    python bench/quantize.py --config tiny --prompts 2          # smoke test

The float32 model samples one image per prompt (seed 0, generate.py's default settings). Each stored model then
reads the same captions and codes through the cached decoder (prefill and decode steps, as sampling runs them) and its
logits over the image codes at every position are compared with float32's: the largest logit error relative to the
logits' spread, the mean KL divergence of its distribution from float32's, how often its most likely code is
float32's, and, sampling again from the same seeds, how many codes and images come out the same. Prints a table last
and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
from bench.common import CONFIGS, environment, prompts, random_checkpoint, write_report  # noqa: E402
from engine.model.quantize import WEIGHTS, StoredLinear, quantize_weights, stored_bytes  # noqa: E402
from engine.sampling import Settings, image_codes, resolve, row_keys  # noqa: E402
from engine.sampling.decode import decoding  # noqa: E402


@torch.no_grad()
def teacher_logits(model, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the image codes (batch, image_seq_len, codes) of each code given the caption and the
    codes before it, through the cached decoder."""
    c = model.config
    with decoding(model):
        cache = model.new_cache(text.shape[0], text.device)
        out = [model.prefill(model._text_with_pads(text), None, cache)]
        for i in range(c.image_seq_len - 1):
            out.append(model.decode_step(codes[:, i], torch.tensor(c.text_len + i), cache))
    return torch.stack(out, dim=1).float().log_softmax(dim=-1)


def compare(reference: torch.Tensor, stored: torch.Tensor) -> dict:
    """Log-probabilities of a stored model against float32's, over every caption and position."""
    kl = (reference.exp() * (reference - stored)).sum(dim=-1)
    spread = reference.std(dim=-1, keepdim=True)
    return {"max_logit_error_over_spread": float(((stored - reference).abs() / spread).max()),
            "mean_kl_nats": float(kl.mean()), "max_kl_nats": float(kl.max()),
            "top1_agreement": float((stored.argmax(-1) == reference.argmax(-1)).float().mean())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle_path", default=None, help="a checkpoint (default: a random --config model)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--prompts", type=int, default=16, help="captions, one image each")
    p.add_argument("--weights", default="bf16,int8", help=f"comma-separated, of {', '.join(WEIGHTS[1:])}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "bench" / "quantize.json"))
    args = p.parse_args(argv)
    args.weights = args.weights.split(",")
    unknown = sorted(set(args.weights) - set(WEIGHTS[1:]))
    if unknown:
        p.error(f"unknown weights {', '.join(unknown)}: choose from {', '.join(WEIGHTS[1:])}")
    return args


def table(rows: list[dict]) -> str:
    lines = ["| weights | linear bytes vs fp32 | max logit error / spread | mean KL nats | max KL nats | top-1 same | "
             "codes same | images same |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['bytes_ratio']:.2f} | {r['max_logit_error_over_spread']:.3g} | "
                     f"{r['mean_kl_nats']:.2e} | {r['max_kl_nats']:.2e} | {100 * r['top1_agreement']:.1f} % | "
                     f"{100 * r['same_codes']:.1f} % | {r['same_images']} of {r['images']} |")
    return "\n".join(lines)


def linear_bytes(model) -> int:
    """Bytes of the linear layers' weights, scales and biases, as stored."""
    return sum(stored_bytes(m) for m in model.modules() if isinstance(m, nn.Linear | StoredLinear))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        ckpt = Path(args.dalle_path) if args.dalle_path else random_checkpoint(args.config, Path(folder))
        gen_args = generate.parse_args(["--dalle_path", str(ckpt), "--text", "a", "--device", "cpu",
                                        "--truncate_captions"])
        model, tokenizer, _ = generate.load_model(gen_args)
    model.eval()
    c = model.config
    text = torch.cat(generate.encode_prompts(prompts(args.prompts), tokenizer, c.text_seq_len, gen_args))
    settings = resolve(model, Settings(filter_thres=0.9), args.prompts)
    keys = row_keys(args.seed, torch.arange(args.prompts))
    codes = image_codes(model, text, settings, keys)[0]
    reference = teacher_logits(model, text, codes)
    rows = []
    for weights in args.weights:
        stored = quantize_weights(copy.deepcopy(model), weights)
        resampled = image_codes(stored, text, settings, keys)[0]
        same = resampled == codes
        rows.append({"weights": weights, "bytes_ratio": linear_bytes(stored) / linear_bytes(model),
                     **compare(reference, teacher_logits(stored, text, codes)),
                     "same_codes": float(same.float().mean()), "same_images": int(same.all(dim=1).sum()),
                     "images": args.prompts})
        print(table(rows[-1:]), flush=True)
    result = {"benchmark": "quantize", "environment": environment(torch.device("cpu")), "config": args.config,
              "dalle_path": args.dalle_path, "prompts": args.prompts, "seed": args.seed, "rows": rows}
    write_report(result, args.json, table(rows))


if __name__ == "__main__":
    main()
