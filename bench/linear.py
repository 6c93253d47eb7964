"""The decode step's products on a CPU: a handful of rows times each weight of the small configuration (dim 256:
QKV 768 x 256, output 256 x 256, GEGLU 2048 x 256, feed-forward out 256 x 1024), through ``kernels.cpp.small_linear``
with the weight as stored, (out, in), and packed along output features (``kernels.cpp.pack_weight``, what the fused
decode step and the prefill read), beside ``F.linear`` on the float32 weight, for float32, bfloat16 and int8 weights,
on each instruction set the CPU has.

    python bench/linear.py
    python bench/linear.py --rows 1,4,16 --threads 1,2

Each cell is the median of ``--iters`` calls, in microseconds; GMAC/s is the packed product's multiply-adds per
second. The floor is the weight's bytes as stored over the machine's read bandwidth, measured in the same run (a sum
over 1 GiB): a bound for weights out of cache, which these, called again and again, are not. Prints a table last and
writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Timer, environment, machine_rates, write_report  # noqa: E402
from engine.model.quantize import int8_per_feature  # noqa: E402
from kernels import cpp  # noqa: E402

SHAPES = ((768, 256), (256, 256), (2048, 256), (256, 1024))


def median_us(run, iters: int) -> float:
    for _ in range(max(iters // 10, 5)):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def stored(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kind == "int8":
        return int8_per_feature(weight)
    return (weight.bfloat16() if kind == "bf16" else weight), None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="4", help="row counts, comma-separated")
    p.add_argument("--threads", default=str(torch.get_num_threads()), help="thread counts, comma-separated")
    p.add_argument("--weights", default="fp32,bf16,int8")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--json", default=str(ROOT / "bench" / "linear.json"))
    return p.parse_args(argv)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not cpp.available():
        raise SystemExit(f"the C++ kernels are unavailable: {cpp.load_error()}")
    rates = machine_rates(torch.device("cpu"), None, Timer(torch.device("cpu")))
    gen = torch.Generator().manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for isa in cpp.cpu_isas():
            with cpp.use_cpu_isa(isa):
                for kind in args.weights.split(","):
                    for out, inp in SHAPES:
                        weight = torch.randn(out, inp, generator=gen) / inp**0.5
                        w, scale = stored(weight, kind)
                        packed, bias = cpp.pack_weight(w), torch.randn(out, generator=gen)
                        dense = w.float() * (scale[:, None] if scale is not None else 1)
                        for rows in rows_list:
                            x = torch.randn(rows, inp, generator=gen)
                            cell = {"threads": threads, "isa": isa, "weights": kind, "out": out, "in": inp,
                                    "rows": rows}
                            cell["f_linear_us"] = median_us(lambda: F.linear(x, dense, bias), args.iters)
                            cell["stored_us"] = median_us(lambda: cpp.small_linear(x, w, bias, scale), args.iters)
                            cell["packed_us"] = median_us(lambda: cpp.small_linear(x, packed, bias, scale),
                                                          args.iters)
                            cell["packed_gmac_s"] = rows * out * inp / cell["packed_us"] / 1e3
                            cell["floor_us"] = w.numel() * w.element_size() / rates.bandwidth * 1e6
                            results.append(cell)
    header = ("| threads | isa | weights | shape | rows | F.linear us | (out, in) us | packed us | packed x (out, in) | "
              "packed GMAC/s | floor us |\n|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['threads']} | {r['isa']} | {r['weights']} | {r['out']} x {r['in']} | {r['rows']} | "
             f"{r['f_linear_us']:.1f} | {r['stored_us']:.1f} | {r['packed_us']:.1f} | "
             f"{r['stored_us'] / r['packed_us']:.2f} | {r['packed_gmac_s']:.0f} | {r['floor_us']:.1f} |"
             for r in results]
    env = environment(torch.device("cpu"))
    title = (f"{env['device_name']}, torch {env['torch']}, commit {env['commit']}; "
             f"read bandwidth {rates.bandwidth / 1e9:.1f} GB/s")
    write_report({"environment": env, "read_bandwidth": rates.bandwidth, "iters": args.iters, "results": results},
                 args.json, title + "\n\n" + header + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
