"""Batch invariance: how many images come out the same, bit for bit, sampled alone (batch 1) and beside other prompts
(one batch of all), per precision, on one model (random weights unless ``--dalle_path``).

    python bench/invariance.py                                    # CPU: fp32 and bf16
    python bench/invariance.py --device cuda --precisions fp32,bf16,fp16

Every image draws from its own random stream (seed, image index), so only the arithmetic can differ between the two
runs: on a CPU every decode product is row-invariant in fp32 (tested), while bf16 products on a CPU and cuBLAS on a GPU
may round a row differently in another batch shape. A differing code changes every later one, so the table also gives
where the first difference falls. Sampling settings are generate.py's defaults (top_k 0.9, temperature 1, the model's
guidance). Prints a table last and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
from bench.common import CONFIGS, environment, prompts, random_checkpoint, synchronize, write_report  # noqa: E402
from engine.model.precision import DTYPES  # noqa: E402
from engine.sampling import Settings, image_codes, resolve, row_keys  # noqa: E402


def compare(ckpt: Path, precision: str, count: int, device: str, seed: int) -> dict:
    """Sample ``count`` prompts' first image alone and all together; what matches."""
    args = generate.parse_args(["--dalle_path", str(ckpt), "--text", "a", "--device", device, "--truncate_captions"])
    model, tokenizer, _ = generate.load_model(args)
    model.to(DTYPES[precision])
    c = model.config
    texts = torch.cat(generate.encode_prompts(prompts(count), tokenizer, c.text_seq_len, args)).to(device)
    settings = resolve(model, Settings(filter_thres=0.9), count)
    keys = row_keys(seed, torch.arange(count)).to(device)  # image 0 of each prompt: prompts differ, streams do not
    start = time.perf_counter()
    alone = torch.cat([image_codes(model, texts[i:i + 1], settings[i:i + 1], keys[i:i + 1])[0] for i in range(count)])
    synchronize(torch.device(device))
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    together = image_codes(model, texts, settings, keys)[0]
    synchronize(torch.device(device))
    together_s = time.perf_counter() - start
    same = alone == together
    first = [int(row.logical_not().nonzero()[0]) for row in same if not row.all()]
    return {"precision": precision, "images": count, "same_images": int(same.all(dim=1).sum()),
            "same_codes": float(same.float().mean()), "codes_per_image": c.image_seq_len,
            "first_difference": first, "median_first_difference": statistics.median(first) if first else None,
            "alone_s": alone_s, "together_s": together_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle_path", default=None, help="a checkpoint (default: a random --config model)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32,bf16", help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--prompts", type=int, default=16, help="prompts, one image each: the batch size together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "bench" / "invariance.json"))
    args = p.parse_args(argv)
    args.precisions = args.precisions.split(",")
    unknown = sorted(set(args.precisions) - set(DTYPES))
    if unknown:
        p.error(f"unknown precision {', '.join(unknown)}: choose from {', '.join(DTYPES)}")
    return args


def table(rows: list[dict]) -> str:
    lines = ["| precision | same images | same codes | first difference (median code) | alone s | together s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        first = "none" if r["median_first_difference"] is None else \
            f"{r['median_first_difference']:.0f} of {r['codes_per_image']}"
        lines.append(f"| {r['precision']} | {r['same_images']} of {r['images']} | {100 * r['same_codes']:.1f} % | "
                     f"{first} | {r['alone_s']:.1f} | {r['together_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        ckpt = Path(args.dalle_path) if args.dalle_path else random_checkpoint(args.config, Path(folder))
        rows = []
        for precision in args.precisions:
            rows.append(compare(ckpt, precision, args.prompts, args.device, args.seed))
            print(table(rows[-1:]), flush=True)
    result = {"benchmark": "invariance", "environment": environment(torch.device(args.device)),
              "config": args.config, "dalle_path": args.dalle_path, "seed": args.seed, "rows": rows}
    write_report(result, args.json, table(rows))


if __name__ == "__main__":
    main()
