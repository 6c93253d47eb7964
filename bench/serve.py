"""Serving throughput and latency: serve.py at 1, 8 and 32 concurrent clients against offline batched generate.py,
in one run, on one model (random weights unless ``--dalle_path``).

    python bench/serve.py                                # the "small" model (dim 256, depth 4, 32 + 16x16 tokens)
    python bench/serve.py --config tiny --clients 1,4    # smoke test

Each client sends ``--requests`` requests one after another (each: one prompt, ``--num_images`` images, its own
seed) and waits for each to finish (its "done" event) before the next. Latency is submit -> done per request (p50,
p95); images/s is all the clients' images over the wall time. The offline figure is generate.py's batched sampler
(``sample_all``: batches filled across prompts, VAE decoding included, no files written) on the same prompts and
images at ``--batch_size``; the server decodes at most ``--batch_size`` guided images together too. The single-request
figure is one generate.py sampling of one request alone, model load excluded: what the 1-client p95 compares with.
Each client count runs ``--repeats`` times, served and offline in turns. The clients are coroutines in one thread of
this process, on the same machine as the server: their CPU time is reported beside the figures. The floor is the
images/s of decode steps at their floor (``bench/generate.py``'s: the larger of a step's bytes over the memory
bandwidth and its FLOPs over the matrix-multiply rate, both measured in the same run) with ``--batch_size`` images
(and their null-caption rows when guided) in every step; prefill and VAE decoding are left out, so no sampler reaches
it. Prints a table last and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
from bench.common import (CONFIGS, Timer, environment, machine_rates, prompts, random_checkpoint,  # noqa: E402
                          write_report)
from bench.generate import step_cost  # noqa: E402

def offline(ckpt: Path, texts: list[str], num_images: int, batch_size: int) -> tuple[float, float]:
    """(images/s, seconds) of generate.py's batched sampler on ``texts``, model load excluded."""
    with tempfile.TemporaryDirectory() as out:
        args = generate.parse_args(["--dalle_path", str(ckpt), "--text", "|".join(texts), "--num_images",
                                    str(num_images), "--batch_size", str(batch_size), "--seed", "0",
                                    "--device", "cpu", "--outputs_dir", out, "--truncate_captions"])
    model, tokenizer, _ = generate.load_model(args)
    encoded = generate.encode_prompts(texts, tokenizer, model.config.text_seq_len, args)
    options = dict(filter_thres=args.top_k, top_k=None, top_p=None, temperature=1.0,
                   cond_scale=model.config.default_cond_scale, num_init_img_tokens=None, use_cache=True, step_fn=None)
    start = time.perf_counter()
    for _ in generate.sample_all(model, encoded, None, options, args, 0, generate.Ranks()):
        pass
    seconds = time.perf_counter() - start
    return len(texts) * num_images / seconds, seconds


def floor_images_per_s(ckpt: Path, batch_size: int) -> float | None:
    """Images/s with every decode step of ``batch_size`` images at its floor (see the docstring)."""
    device = torch.device("cpu")
    model, _, _ = generate.load_model(generate.parse_args(["--dalle_path", str(ckpt), "--text", "-", "--device",
                                                           "cpu"]))
    c = model.config
    rows = batch_size * (2 if c.default_cond_scale != 1 else 1)
    step_ms = machine_rates(device, None, Timer(device)).floor_ms(*step_cost(model, rows, torch.float32))
    return None if step_ms is None else batch_size / ((c.image_seq_len - 1) * step_ms / 1e3)


def run_clients(base: str, clients: int, requests: int, num_images: int) -> dict:
    """Every client's requests, one after another; latencies and throughput. The clients are coroutines sharing one
    connection pool in one thread: they load the machine the server runs on as little as a client can."""
    texts = prompts(clients * requests)

    async def client(http: httpx.AsyncClient, c: int) -> list[float]:
        latencies = []
        for r in range(requests):
            start = time.perf_counter()
            answer = await http.post("/api/requests", json=dict(prompt=texts[c * requests + r], seed=c * requests + r,
                                                                 num_images=num_images, truncate_captions=True))
            answer.raise_for_status()
            async with http.stream("GET", answer.json()["events"]) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event: ") and line[7:] in ("done", "failed", "cancelled"):
                        if line[7:] != "done":
                            raise RuntimeError(f"request ended {line[7:]}")
                        break
            latencies.append(time.perf_counter() - start)
        return latencies

    async def all_clients() -> list[list[float]]:
        limits = httpx.Limits(max_connections=2 * clients, max_keepalive_connections=2 * clients)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
            return await asyncio.gather(*(client(http, c) for c in range(clients)))

    start, cpu = time.perf_counter(), time.process_time()
    latencies = [x for per_client in asyncio.run(all_clients()) for x in per_client]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "images": len(latencies) * num_images, "wall_s": wall,
            "images_per_s": len(latencies) * num_images / wall, "p50_s": statistics.median(ordered),
            "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], "client_cpu_s": cpu,
            "texts": texts}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle_path", default=None, help="a checkpoint to serve (default: a random --config model)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--num_images", type=int, default=2, help="images per request")
    p.add_argument("--batch_size", type=int, default=16, help="images decoded together, server and offline")
    p.add_argument("--repeats", type=int, default=2, help="runs of each client count (a range, not a best run)")
    p.add_argument("--json", default=str(ROOT / "bench" / "serve.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        ckpt = Path(args.dalle_path) if args.dalle_path else random_checkpoint(args.config, Path(folder))
        port = free_port()
        # The server in a process of its own, as in use: clients in this one never take its interpreter lock.
        server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--dalle_path", str(ckpt), "--device",
                                   "cpu", "--port", str(port), "--batch_size", str(args.batch_size)])
        base = f"http://127.0.0.1:{port}"
        rows = []
        floor = floor_images_per_s(ckpt, args.batch_size)
        try:
            wait_until_up(base, server)
            run_clients(base, 1, 1, 1)  # warm-up
            for clients in [int(c) for c in args.clients.split(",")]:
                for repeat in range(args.repeats):  # served and offline in turns: both see the machine's drift
                    served = run_clients(base, clients, args.requests, args.num_images)
                    server_done = served.pop("texts")
                    offline_rate, offline_s = offline(ckpt, server_done, args.num_images, args.batch_size)
                    single_rate, single_s = offline(ckpt, server_done[:1], args.num_images, args.batch_size)
                    rows.append(dict(served, repeat=repeat, offline_images_per_s=offline_rate, offline_s=offline_s,
                                     ratio=served["images_per_s"] / offline_rate, single_request_s=single_s,
                                     p95_over_single=served["p95_s"] / single_s, floor_images_per_s=floor,
                                     of_floor=None if floor is None else served["images_per_s"] / floor))
                    print(table(rows[-1:]), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    result = {"benchmark": "serve", "environment": environment(torch.device("cpu")), "config": args.config,
              "dalle_path": args.dalle_path, "requests_per_client": args.requests, "num_images": args.num_images,
              "batch_size": args.batch_size, "repeats": args.repeats, "floor_images_per_s": floor, "rows": rows}
    write_report(result, args.json, table(rows))


def wait_until_up(base: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve.py exited with status {server.returncode}")
        try:
            httpx.get(f"{base}/api/info", timeout=5).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"serve.py did not answer within {timeout} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fmt(value: float | None, width: int, spec: str = ".2f", suffix: str = "") -> str:
    return f"{'n/a':>{width + len(suffix)}}" if value is None else f"{value:>{width}{spec}}{suffix}"


def table(rows: list[dict]) -> str:
    lines = ["clients  requests  images  images/s  offline img/s  ratio  floor img/s  of floor  p50 s  p95 s  "
             "single-run s  p95/single  client CPU s"]
    for r in rows:
        lines.append(f"{r['clients']:>7}  {r['requests']:>8}  {r['images']:>6}  {r['images_per_s']:>8.2f}  "
                     f"{r['offline_images_per_s']:>13.2f}  {r['ratio']:>5.2f}  {fmt(r['floor_images_per_s'], 11)}  "
                     f"{fmt(r['of_floor'] and 100 * r['of_floor'], 7, '.0f', '%')}  {r['p50_s']:>5.2f}  {r['p95_s']:>5.2f}  "
                     f"{r['single_request_s']:>12.2f}  {r['p95_over_single']:>10.2f}  {r['client_cpu_s']:>12.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
