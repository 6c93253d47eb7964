"""One command for a short GPU lease: correctness, benchmarks and results, each part with its own time budget.

    python bench/gpu_check.py              # make gpu-check: ~7-8 minutes on one H100 (README: the parts' estimates)
    python bench/gpu_check.py --quick      # make gpu-check-quick: ~3.5 minutes
    python bench/gpu_check.py --dry-run    # the same script on the CPU at tiny sizes (~30 s): it cannot rot

Parts, in order, each run as child processes with a timeout, so a hang or a CUDA crash in one never stops the others:

1. correctness: tests/test_triton_gpu.py (every Triton kernel natively against float64 with its default tiles, and
   every tile setting the autotuner may choose; sharded with -k so that Triton compiles in parallel),
   tests/test_decode.py -k cuda and tests/test_dispatch.py, all at once (--quick: DALL-E's geometry, fp16 and bf16,
   decoding, and test_dispatch's CUDA test);
2. attention: bench/attn.py at the model's training geometry (text 257 + 32x32, seq 1280), batch 8, 8 heads, bf16,
   our kernels' tiles chosen by the autotuner (``kernels.triton.tuning``) at their first call;
3. sampling: bench/generate.py, the large configuration with sparse layers, decode steps against the memory floor;
4. training: bench/train.py's first case (text 256 + 32x32) under bf16 autocast, batch 16;
5. invariance (not with --quick): bench/invariance.py, how many of 8 images come out the same alone and batched, in
   fp32 and bf16 (cuBLAS is not batch-invariant; the random streams are);
6. static (optional, not with --quick): bench/gpu_static.py --targets 90 --subset, a process per pattern, only when
   its budget fits in the time left; its result is reported but does not set the exit status.

A part gets its budget or the time left before the overall deadline, whichever is less. Results: a JSON file
(``bench/gpu-check.json``), every part's own JSON and log (``bench/gpu-check-logs/``), a dated section appended to
``bench/RESULTS.md``, and the summary table printed last. The exit status is the first failing part's. The
autotuner's choices (made in the attention and training parts) go to a tile cache of the run's own,
``gpu-check-logs/attention-tiles.json``, and into the attention table.

``--dry-run`` runs every part on the CPU at tiny sizes, the Triton kernels in their interpreter (``TRITON_INTERPRET=1``
in the child processes), and writes everything to a temporary directory, never to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import environment  # noqa: E402
from bench.invariance import table as invariance_table  # noqa: E402
from kernels import PATTERNS as ALL_PATTERNS  # noqa: E402

PY = sys.executable
# test_triton_gpu.py shards: each process compiles its own kernels, so the compiles use the machine's cores.
SHARDS = ("test_attention and fp16", "test_attention and bf16", "test_attention and fp32", "test_attention and tf32",
          "test_decode", "test_tile_candidates and (fp16 or bf16)",
          "test_tile_candidates and (fp32 or tf32)")
QUICK_SHARDS = SHARDS[:2] + SHARDS[4:5]
TILE_CACHE = "attention-tiles.json"  # the autotuner's choices during the run, in the logs folder
# All parts together: make gpu-check adds the build (~1 minute) to the full run's; --quick needs none.
DEADLINE_S = {"full": 445, "quick": 210, "dry-run": 600}


@dataclass
class Part:
    name: str
    budget_s: float
    commands: list[list[str]]  # run at the same time
    summarize: Callable[[Path], tuple[dict, str, str]]  # logs dir -> (figures, one-line summary, markdown table)
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False
    # filled in by run_part
    status: str = "not run"
    rc: int = 0
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    short: str = ""
    table: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Part definitions


def pytest_cmd(*args: str) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


def parts_for(mode: str, logs: Path) -> list[Part]:
    dry, quick = mode == "dry-run", mode == "quick"
    device = ["--device", "cpu" if dry else "cuda"]
    gpu_tests = [pytest_cmd("--noconftest", "tests/test_triton_gpu.py", *([] if shard is None else ["-k", shard]))
                 for shard in ([None] if dry else QUICK_SHARDS if quick else SHARDS)]
    # test_decode's CUDA tests compile a decode step with inductor (~1 minute): --quick leaves that to the sampling
    # benchmark, which checks every compiled step it times against the full forward pass; and it runs only GPU code,
    # so that make gpu-check-quick needs no build of the C++ CPU kernels.
    other_tests = pytest_cmd("tests/test_dispatch.py", "-k", "cuda") if quick else \
        pytest_cmd("tests/test_decode.py", "tests/test_dispatch.py", "-k", "cuda or test_dispatch")
    # the defaults, as a run with DALLE_ENGINE_AUTOTUNE=0 launches them; test_tile_candidates covers the others
    test_env = {"GPU_CHECK_RECORD": str(logs / "correctness-errors.jsonl"), "DALLE_ENGINE_AUTOTUNE": "0"}
    if dry:
        test_env.update(GPU_CHECK_DRY_RUN="1")
    elif quick:
        test_env.update(GPU_CHECK_QUICK="1")

    if dry:  # tiny sizes; the model's Triton paths forced, in the interpreter
        attn = ["--text_len", "9", "--fmap_size", "4", "--seq", "24", "--batch", "1", "--heads", "1", "--iters", "1",
                "--warmup", "0", "--patterns", "axial_row", "--no_flex", "--backend", "triton", "--dtype", "bf16"]
        generate = ["--configs", "tiny", "--batches", "1", "--positions", "2", "--iters", "1", "--max_run_s", "0",
                    "--no-compile", "--bandwidth_gbs", "100"]
        train = ["--tiny", "--steps", "1", "--warmup", "1", "--no_peer"]
        invariance = ["--config", "tiny", "--prompts", "2", "--precisions", "fp32,bf16"]
        static = [["--dtypes", "bf16", "--head_dims", "64", "--patterns", "axial_row"]]
    else:
        attn = ["--text_len", "257", "--fmap_size", "32", "--seq", "1280", "--batch", "8", "--heads", "8",
                "--patterns", "axial_row" if quick else "axial_row,axial_col,conv_like"]
        # batch 64: where the keys and values read, not the weights, dominate the floor (kernels.md §5.4)
        generate = ["--configs", "large", "--iters", "10"]
        generate += ["--batches", "64", "--positions", "2", "--max_run_s", "0"] if quick else \
            ["--batches", "1,64", "--positions", "3", "--max_run_s", "5"]
        train = ["--cases", "0", "--batch", "16", "--steps", "5" if quick else "10", "--warmup", "3"]
        invariance = ["--precisions", "fp32,bf16", "--prompts", "8"]  # eager batch-1 steps: launch-bound
        # one process per pattern: the compiles use the machine's cores
        static = [["--subset", "--patterns", pattern] for pattern in ALL_PATTERNS]
    model_env = {"DALLE_ENGINE_ATTENTION": "triton"} if dry else {}
    budgets = {"correctness": 150, "attention": 180, "sampling": 180, "training": 60, "invariance": 45, "static": 60}
    if quick:
        budgets.update(correctness=90, attention=75, sampling=120, training=50)
    if dry:
        budgets = dict.fromkeys(budgets, 120)
    parts = [
        Part("correctness", budgets["correctness"], gpu_tests + [other_tests],
             lambda logs: summarize_tests(logs, allow_skips=dry), test_env),
        Part("attention", budgets["attention"],
             [[PY, "bench/attn.py", *device, *attn, "--json", str(logs / "attn.json")]], summarize_attention),
        Part("sampling", budgets["sampling"],
             [[PY, "bench/generate.py", *device, *generate, "--patterns", "sparse", "--no-peer",
               "--json", str(logs / "generate.json")]], summarize_sampling, model_env),
        Part("training", budgets["training"],
             [[PY, "bench/train.py", *device, "--bf16", *train, "--json", str(logs / "train.json")]],
             summarize_training, model_env),
    ]
    if not quick:
        parts.append(Part("invariance", budgets["invariance"],
                          [[PY, "bench/invariance.py", *device, *invariance, "--json", str(logs / "invariance.json")]],
                          summarize_invariance))
        static_cmds = [[PY, "bench/gpu_static.py", "--targets", "90", *args, "--json", str(logs / f"static-{i}.json")]
                       for i, args in enumerate(static)]
        # the static report compiles for sm_90 ahead of time: never in the interpreter
        parts.append(Part("static", budgets["static"], static_cmds, summarize_static, {"TRITON_INTERPRET": ""},
                          optional=True))
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Running


def run_part(part: Part, logs: Path, timeout: float, base_env: dict[str, str]) -> None:
    """Start the part's commands together, wait for them up to ``timeout``, then summarize what they wrote."""
    env = {**base_env, **part.env}
    env = {k: v for k, v in env.items() if v != ""}  # "" unsets
    start = time.monotonic()
    procs = []
    for i, cmd in enumerate(part.commands):
        log = open(logs / f"{part.name}-{i}.log", "w")
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        # A session of its own: on timeout the whole tree (pytest, compile workers) is killed through its id.
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    timed_out = False
    for proc, log in procs:
        try:
            proc.wait(timeout=max(0.0, start + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    part.seconds = time.monotonic() - start
    codes = [proc.returncode for proc, _ in procs]
    part.rc = 124 if timed_out else next((c for c in codes if c != 0), 0)
    part.status = "timeout" if timed_out else "ok" if part.rc == 0 else f"failed (exit {part.rc})"
    try:
        part.figures, part.short, part.table = part.summarize(logs)
    except Exception as error:  # a missing or partial output: the part failed, the others go on
        failed = [i for i, c in enumerate(codes) if c != 0]
        # the failing command's last words (usually the exception) say more than the missing file
        last = [line for line in (logs / f"{part.name}-{failed[0]}.log").read_text(errors="replace").splitlines()
                if line.strip()][-1:] if failed else []
        part.short = (last[0].strip() if last else f"no figures: {type(error).__name__}: {error}")[:160]
        if part.rc == 0:
            part.rc, part.status = 1, "failed (no figures)"
    if part.figures.get("problem") and part.rc == 0:
        part.rc, part.status = 1, f"failed ({part.figures['problem']})"
    if timed_out:
        part.short = f"killed at {timeout:.0f} s; {part.short}"


def log_tail(part: Part, logs: Path, lines: int = 25) -> str:
    out = []
    for log in sorted(logs.glob(f"{part.name}-*.log")):
        out += [f"--- {log} (last {lines} lines)", *log.read_text(errors="replace").splitlines()[-lines:]]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Summaries: (figures for the JSON, one line for the summary table, a markdown table for RESULTS.md)


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f} %"


def summarize_tests(logs: Path, allow_skips: bool = False) -> tuple[dict, str, str]:
    counts: dict[str, int] = {}
    for log in sorted(logs.glob("correctness-*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if re.search(r" in [\d.]+s", line)]
        last = lines[-1] if lines else ""
        for number, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last):
            what = "error" if what.startswith("error") else what
            counts[what] = counts.get(what, 0) + int(number)
    worst: dict[str, dict] = {}  # per kernel: the comparison that used most of its error budget
    records = logs / "correctness-errors.jsonl"
    for line in records.read_text().splitlines() if records.exists() else []:
        r = json.loads(line)
        kernel = "attention" if r["test"].startswith("test_attention") else "decode"
        r["of_budget"] = r["err"] / r["budget"] if r["budget"] > 0 else float("inf")
        if kernel not in worst or r["of_budget"] > worst[kernel]["of_budget"]:
            worst[kernel] = r
    figures = {"tests": counts, "worst_of_budget": worst}
    if counts.get("skipped") and not allow_skips:  # on a GPU every selected test must run
        figures["problem"] = f"{counts['skipped']} tests skipped"
    short = ", ".join(f"{n} {what}" for what, n in counts.items() if what != "deselected") or "no test summary"
    if worst:
        short += "; max error / budget: " + ", ".join(f"{k} {w['of_budget']:.2f}" for k, w in worst.items())
    return figures, short, ""


def summarize_attention(logs: Path) -> tuple[dict, str, str]:
    result = json.loads((logs / "attn.json").read_text())
    by = {(r["pattern"], r["method"]): r for r in result["rows"]}
    patterns = list(dict.fromkeys(r["pattern"] for r in result["rows"]))
    lines = ["| pattern | ours fwd / fwd+bwd ms | ours fwd+bwd TFLOP/s | Flex fwd+bwd ms | SDPA causal fwd+bwd ms | "
             "ours x Flex (fwd / fwd+bwd) | ours x SDPA causal (fwd / fwd+bwd) | peak MiB fwd+bwd (ours / Flex) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    figures, shorts = {}, []
    for p in patterns:
        ours, flex, causal = by[p, "ours"], by.get((p, "flex"), {}), by.get((p, "sdpa_causal"), {})
        figures[p] = {"ours": {k: ours.get(k) for k in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_tflops", "peak_mib_fwd_bwd")},
                      "x_flex": [flex.get("ours_speedup_fwd"), flex.get("ours_speedup_fwd_bwd")],
                      "x_sdpa_causal": [causal.get("ours_speedup_fwd"), causal.get("ours_speedup_fwd_bwd")],
                      "flex_error": flex.get("error")}
        flex_ms = f"error: {flex['error'][:40]}" if flex.get("error") else fmt(flex.get("fwd_bwd_ms"), ".2f")
        lines.append(f"| {p} | {fmt(ours['fwd_ms'], '.3f')} / {fmt(ours['fwd_bwd_ms'], '.3f')} | "
                     f"{fmt(ours['fwd_bwd_tflops'], '.1f')} | {flex_ms} | {fmt(causal.get('fwd_bwd_ms'), '.3f')} | "
                     f"{fmt(flex.get('ours_speedup_fwd'), '.2f', 'x')} / "
                     f"{fmt(flex.get('ours_speedup_fwd_bwd'), '.2f', 'x')} | "
                     f"{fmt(causal.get('ours_speedup_fwd'), '.2f', 'x')} / "
                     f"{fmt(causal.get('ours_speedup_fwd_bwd'), '.2f', 'x')} | "
                     f"{fmt(ours.get('peak_mib_fwd_bwd'), '.0f')} / {fmt(flex.get('peak_mib_fwd_bwd'), '.0f')} |")
        shorts.append(f"{p} {fmt(ours['fwd_bwd_ms'], '.3f')} ms ({fmt(flex.get('ours_speedup_fwd_bwd'), '.2f', 'x')}"
                      f" Flex)")
    r0 = result["rows"][0]
    title = (f"text {r0['text_len']} + {r0['fmap_size']}x{r0['fmap_size']} (seq {r0['seq']}), batch {r0['batch']}, "
             f"{r0['heads']} heads x {r0['dim_head']}, {result['dtype']}; median of {result['timing']['iters']}")
    tiles, tile_table = tile_choices(logs)
    figures["tiles"] = tiles
    return figures, "fwd+bwd: " + ", ".join(shorts), f"Attention, {title}:\n\n" + "\n".join(lines) + tile_table


def tile_choices(logs: Path) -> tuple[list[dict], str]:
    """The autotuner's choices made during the run (``kernels.triton.tuning``; the attention and training parts):
    each shape's chosen setting and time against the default's."""
    from kernels.triton.tuning import Tiles

    path = logs / TILE_CACHE
    entries = json.loads(path.read_text())["entries"] if path.exists() else {}
    choices = []
    lines = ["| kernel | dtype | products | head dim | batch x heads | shape | chosen | ms | default | ms |",
             "|---|---|---|---:|---:|---|---|---:|---|---:|"]
    for name, entry in sorted(entries.items()):
        _, _, kernel, dtype, products, head_dim, rows, pattern, *shape = name.split("|")
        chosen, default, ms = str(Tiles(**entry["tiles"])), entry["default"], entry["ms"]
        choices.append({"kernel": kernel, "dtype": dtype, "products": products, "head_dim": int(head_dim[1:]),
                        "batch_x_heads": int(rows[2:]), "shape": "|".join([pattern, *shape]), "chosen": chosen,
                        "default": default, "ms": ms})
        default_ms = ms.get(default) if isinstance(ms.get(default), float) else None  # or why it could not run
        lines.append(f"| {kernel} | {dtype} | {products} | {head_dim[1:]} | {rows[2:]} | {pattern} {shape[0]} | "
                     f"{chosen} | {ms[chosen]:.3f} | {default} | {fmt(default_ms, '.3f')} |")
    if not choices:
        return [], ""
    return choices, "\n\nAttention tile settings chosen by the autotuner (median ms per launch):\n\n" + "\n".join(lines)


def summarize_sampling(logs: Path) -> tuple[dict, str, str]:
    result = json.loads((logs / "generate.json").read_text())
    lines = ["| config | patterns | batch | method | ms/step | floor ms/step | of floor | images/s | x naive |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['patterns']} | {r['batch']} | {r['method']} | {r['ms_per_step']:.3f} | "
                     f"{fmt(r['floor_ms'], '.3f')} | {percent(r['floor_fraction'])} | {r['images_per_s']:.3g} "
                     f"({r['images_per_s_kind']}) | {fmt(r['speedup_vs_naive'], '.1f', 'x')} |")
    biggest = max(r["batch"] for r in result["rows"])
    fastest = min((r for r in result["rows"] if r["batch"] == biggest and r["method"] != "naive"),
                  key=lambda r: r["ms_per_step"])
    short = (f"batch {biggest} {fastest['method']}: {fastest['ms_per_step']:.3f} ms/step, "
             f"{percent(fastest['floor_fraction'])} of the floor")
    return {"rows": result["rows"]}, short, f"Sampling ({result['dtype']}, random weights):\n\n" + "\n".join(lines)


def summarize_training(logs: Path) -> tuple[dict, str, str]:
    result = json.loads((logs / "train.json").read_text())
    lines = ["| configuration | model | tokens/s | ms/step | peak MiB | DALLE-pytorch tokens/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["results"]:
        peer = fmt(r["dalle_pytorch_tokens_per_s"], ",.0f") if not r.get("dalle_pytorch_error") else "error"
        lines.append(f"| {r['case']} | {r['model']} | {r['ours_tokens_per_s']:,.0f} | {r['ours_step_ms']:.1f} | "
                     f"{fmt(r['ours_peak_mib'], ',.0f')} | {peer} |")
    r = result["results"][0]
    short = (f"{r['ours_tokens_per_s']:,.0f} tok/s, {r['ours_step_ms']:.1f} ms/step, "
             f"{fmt(r['ours_peak_mib'], ',.0f')} MiB peak")
    return {"precision": result["precision"], "rows": result["results"]}, short, \
        f"Training steps ({result['precision']} autocast, whole optimizer steps):\n\n" + "\n".join(lines)


def summarize_invariance(logs: Path) -> tuple[dict, str, str]:
    result = json.loads((logs / "invariance.json").read_text())
    rows = result["rows"]
    short = ", ".join(f"{r['precision']} {r['same_images']}/{r['images']}" for r in rows) + " images the same"
    return {"rows": rows}, short, ("Batch invariance (each image alone, and all in one batch; bench/invariance.py):\n\n"
                                   + invariance_table(rows))


def summarize_static(logs: Path) -> tuple[dict, str, str]:
    results = [json.loads(path.read_text()) for path in sorted(logs.glob("static-*.json"))]
    variants = [v for result in results for v in result["variants"]]
    bad = [f"{v['kernel']} {v['dtype']} {v['head_dim']} {v['label']}: {'; '.join(v['problems'])}"
           for v in variants if v["problems"]]
    figures = {"triton": results[0]["triton"], "variants": len(variants), "with_problems": bad}
    return figures, f"{len(variants)} variants for sm_90, {len(bad)} with problems", ""


# ---------------------------------------------------------------------------------------------------------------
# Report


def gpu_state() -> str | None:
    """Clocks, power and temperature, recorded rather than set (kernels.md §10.4); None without nvidia-smi."""
    query = "name,pstate,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def summary_table(parts: list[Part]) -> str:
    lines = ["| part | status | seconds (budget) | figures |", "|---|---|---:|---|"]
    for p in parts:
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} ({p.budget_s:.0f}) | {p.short} |")
    return "\n".join(lines)


def results_section(env: dict, mode: str, argv: list[str], parts: list[Part], total_s: float, json_path: str) -> str:
    what = {"full": "", "quick": " (--quick)", "dry-run": " (dry run on the CPU)"}[mode]
    lines = [f"## GPU check{what} on {env['device_name']}, {env['date'][:10]}", "",
             f"{env['date']}, `python bench/gpu_check.py {shlex.join(argv)}`".rstrip() +
             f": torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, commit "
             f"{(env['commit'] or '?')[:7]}, {total_s:.0f} s in all. Figures: `{json_path}`.", "",
             summary_table(parts)]
    for p in parts:
        if p.table:
            lines += ["", p.table]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer dtypes, patterns and batches: under 4 minutes")
    mode.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes, to a temp dir")
    p.add_argument("--out", help="where gpu-check.json and gpu-check-logs/ go (default: bench/; a new temporary "
                                 "directory with --dry-run)")
    p.add_argument("--results", help="the RESULTS.md to append to (default: bench/RESULTS.md; OUT/RESULTS.md with "
                                     "--dry-run, which never writes bench/RESULTS.md)")
    p.add_argument("--time_scale", type=float, default=1.0, help="multiply every budget and the deadline")
    p.add_argument("--commit", help="the commit measured, where the copy has no .git")
    args = p.parse_args(argv)
    args.mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    bench_results = ROOT / "bench" / "RESULTS.md"
    out = Path(args.out) if args.out else None if args.dry_run else ROOT / "bench"
    results = Path(args.results) if args.results else bench_results if not args.dry_run else out and out / "RESULTS.md"
    if args.dry_run and results and results.resolve() == bench_results.resolve():
        p.error("--dry-run never writes bench/RESULTS.md")
    out = out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    args.json, args.logs, args.results = out / "gpu-check.json", out / "gpu-check-logs", results or out / "RESULTS.md"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    for old in args.logs.glob("*"):  # figures from an earlier run must not pass for this one's
        old.unlink()
    dry = args.mode == "dry-run"
    try:
        env = environment(torch.device("cpu" if dry else "cuda"))
    except Exception as error:  # no usable GPU here: the parts will each say why
        env = {**environment(torch.device("cpu")), "device_name": f"no CUDA device ({type(error).__name__})"}
    env["commit"] = args.commit or env["commit"]
    env["gpu_state"] = {"start": gpu_state()}
    base_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DALLE_ENGINE_ATTENTION")}
    base_env["PYTHONUNBUFFERED"] = "1"  # complete logs even from a killed child
    base_env["DALLE_ENGINE_TILE_CACHE"] = str(args.logs / TILE_CACHE)  # tuned afresh, and recorded
    if dry:
        base_env["TRITON_INTERPRET"] = "1"  # before the children import triton
    parts = parts_for(args.mode, args.logs)
    start = time.monotonic()
    deadline = start + DEADLINE_S[args.mode] * args.time_scale
    print(f"gpu-check ({args.mode}) on {env['device_name']}: {len(parts)} parts, deadline "
          f"{DEADLINE_S[args.mode] * args.time_scale:.0f} s; logs in {args.logs}", flush=True)
    for i, part in enumerate(parts, 1):
        part.budget_s *= args.time_scale
        left = deadline - time.monotonic()
        print(f"[{i}/{len(parts)}] {part.name} (budget {min(part.budget_s, left):.0f} s) ... ", end="", flush=True)
        if part.optional and left < part.budget_s:
            part.status, part.short = "skipped", f"only {max(left, 0):.0f} s left"
        elif left < min(15.0, part.budget_s):  # too little to start a part in
            part.status, part.rc, part.short = "out of time", 124, f"only {max(left, 0):.0f} s left"
        else:
            try:
                run_part(part, args.logs, min(part.budget_s, left), base_env)
            except Exception as error:  # e.g. a command that cannot start: this part fails, the next ones run
                part.status, part.rc, part.short = "error", 1, f"{type(error).__name__}: {error}"[:200]
        print(f"{part.status} ({part.seconds:.0f} s) {part.short}", flush=True)
        if part.status not in ("ok", "skipped"):
            print(log_tail(part, args.logs), file=sys.stderr, flush=True)
    total_s = time.monotonic() - start
    env["gpu_state"]["end"] = gpu_state()
    required = [p for p in parts if not p.optional]
    status = next((p.rc for p in required if p.rc), 0)

    result = {"command": "python bench/gpu_check.py " + shlex.join(argv), "mode": args.mode, **env,
              "total_s": total_s, "deadline_s": DEADLINE_S[args.mode] * args.time_scale, "exit_status": status,
              "parts": [{"name": p.name, "status": p.status, "rc": p.rc, "seconds": p.seconds, "budget_s": p.budget_s,
                         "optional": p.optional, "commands": [shlex.join(c) for c in p.commands],
                         "summary": p.short, "figures": p.figures} for p in parts]}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    shown = args.json.resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    section = results_section(env, args.mode, argv, parts, total_s, str(shown))
    with open(args.results, "a") as f:
        f.write("\n" + section)
    for p in parts:
        if p.table:
            print("\n" + p.table)
    print(f"\nwrote {args.json}, appended to {args.results}; exit status {status}\n")
    print(summary_table(parts))  # last: what a truncated log shows
    return status


if __name__ == "__main__":
    sys.exit(main())
