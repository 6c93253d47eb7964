"""What the GPU compiler makes of the Triton kernels, found on any machine, GPU or not.

The kernels' own launch code (``attention._forward`` / ``_backward`` and ``decode._decode``, what the public entry
points run) is called on CPU tensors while a stand-in Triton driver reports the target GPU. Triton's JIT hook then
compiles each launch ahead of time for that target instead of running it, so every variant the entry points would
launch, with their tile sizes, warps, stages and constants, is compiled exactly as on the GPU. ptxas's report gives
registers and spills, the TTGIR how each ``tl.dot`` was lowered (wgmma, mma.sync or FMA) with its warp layout, the
PTX the MMA instruction counts.

Run in a process without ``TRITON_INTERPRET`` (the interpreter replaces the JIT), e.g. through
``bench/gpu_static.py``.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.compiler import ASTSource
from triton.runtime.driver import driver

# Per-architecture limits: shared memory per block (opt-in maximum) and per SM, registers and warps per SM.
SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
KERNEL_NAMES = {"_fwd_kernel": "fwd", "_bwd_preprocess_kernel": "bwd_pre", "_bwd_dkdv_kernel": "bwd_dkdv",
                "_bwd_dq_kernel": "bwd_dq", "_decode_kernel": "decode", "_combine_kernel": "combine",
                "_w8_linear_kernel": "w8_linear"}
SIXTEEN_BIT = ("f16", "bf16")

_MMA_LAYOUT = re.compile(r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[(\d+), (\d+)\]"
                         r".*?instrShape = \[(\d+), (\d+)", re.M)
_DOT_OP = re.compile(r"= (ttng\.warp_group_dot|tt\.dot) ")
_OPERAND = re.compile(r" : (?:!ttg\.memdesc|tensor)<\d+x\d+x(\w+)")
_RESULT = re.compile(r"-> tensor<(\d+)x(\d+)x\w+, #(\w+)>")
_PRECISION = re.compile(r"inputPrecision = (\w+)")
_PRECISIONS = {"0": "tf32", "1": "tf32x3", "2": "ieee"}  # TTGIR's InputPrecision enum, when printed as a number


@dataclass
class Dot:
    """One ``tl.dot`` as compiled: its lowering, result tile, operand type, precision and warp coverage."""

    lowering: str  # "wgmma", "mma.sync" or "fma"
    rows: int
    cols: int
    operand: str  # "bf16", "f16", "f32"
    precision: str  # "tf32" or "ieee" for f32 operands
    duplicated: bool  # the warps' MMA tiles cover more than the result: several warps compute the same part

    def __str__(self) -> str:
        return f"{self.lowering}{'(dup)' if self.duplicated else ''}"


@dataclass
class Compiled:
    """One kernel variant compiled for one architecture."""

    kernel: str
    arch: int
    dtype: str
    head_dim: int
    label: str  # pattern, splits, precision: what distinguishes variants of one kernel, dtype and head dim
    num_warps: int
    num_stages: int
    blocks: str  # the tile constants, e.g. "64x64"
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    dots: list[Dot] = field(default_factory=list)
    ptx_wgmma: int = 0
    ptx_mma: int = 0
    error: str | None = None

    @property
    def blocks_per_sm(self) -> int:
        by_regs = REGS_PER_SM // max(1, -(-self.regs // 8) * 8 * 32 * self.num_warps)
        by_smem = SMEM_PER_SM[self.arch] // self.smem if self.smem else MAX_BLOCKS_PER_SM
        return min(by_regs, by_smem, MAX_WARPS_PER_SM // self.num_warps, MAX_BLOCKS_PER_SM)

    def problems(self) -> list[str]:
        """What the gate refuses: a compile error, spills, too much shared memory, a 16-bit (or TF32) product
        without tensor-core MMA, or MMA work duplicated across warps."""
        if self.error:
            return [f"compile error: {self.error}"]
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores}/{self.spill_loads} B")
        if self.smem > SMEM_PER_BLOCK[self.arch]:
            found.append(f"shared memory {self.smem} B over the {SMEM_PER_BLOCK[self.arch]} B limit")
        for dot in self.dots:
            if dot.lowering == "fma" and (dot.operand in SIXTEEN_BIT or dot.precision == "tf32"):
                found.append(f"{dot.operand} {dot.rows}x{dot.cols} product on FMA units, not tensor cores")
            if dot.duplicated:
                found.append(f"{dot.lowering} {dot.rows}x{dot.cols} product duplicated across warps")
        return found


# Launching and benchmarking need a real GPU: the hook in compiling_for compiles every launch and never runs it.
_COMPILE_ONLY = "the static driver compiles kernels ahead of time and cannot run or time them"


class _StaticDriver(DriverBase):
    """Reports a GPU target to the JIT; nothing here ever reaches a device (the hook compiles, never launches)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError(_COMPILE_ONLY)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError(_COMPILE_ONLY)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclass
class Recorder:
    """The launches compiled so far; ``label`` tags the next ones (e.g. the pattern being launched)."""

    arch: int
    label: str = ""
    records: list[Compiled] = field(default_factory=list)


@contextlib.contextmanager
def compiling_for(arch: int) -> Iterator[Recorder]:
    """Inside the block, every Triton launch is compiled for sm_``arch`` and recorded instead of run."""
    recorder = Recorder(arch)
    seen: set[str] = set()

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        variant = str((fn.name, compile["signature"], compile["constants"], compile["num_warps"],
                       compile["num_stages"]))
        if variant in seen:  # e.g. axial_col, which launches axial_row's kernels
            return True
        seen.add(variant)
        names = fn.jit_function.arg_names
        constants = {names[path[0]]: value for path, value in compile["constants"].items() if len(path) == 1}
        dtype = next(t[1:] for t in compile["signature"].values() if t.startswith("*"))  # the first tensor's
        blocks = "x".join(str(v) for k, v in sorted(constants.items()) if k.startswith("BLOCK_") and k != "BLOCK_D")
        record = Compiled(KERNEL_NAMES.get(fn.name, fn.name), arch, dtype, constants.get("HEAD_DIM", 0),
                          recorder.label, compile["num_warps"], compile["num_stages"], blocks)
        src = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=driver.active.get_current_target(),
                                          options={"num_warps": record.num_warps, "num_stages": record.num_stages})
        except Exception as e:  # noqa: BLE001 - any compiler failure is a finding to report, not a crash
            record.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        else:
            _read_report(record, compiled, log.getvalue())
        recorder.records.append(record)
        return True  # compiled here: the JIT neither compiles nor launches it

    saved = (knobs.runtime.jit_cache_hook, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    previous = driver._active  # None without a GPU, where reset_active() would fail to find a driver
    driver.set_active(_StaticDriver(arch))
    knobs.runtime.jit_cache_hook = hook
    knobs.nvidia.dump_ptxas_log = True  # ptxas's -v report, printed as it compiles
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    try:
        yield recorder
    finally:
        knobs.runtime.jit_cache_hook, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        driver.set_active(previous)


def _read_report(record: Compiled, compiled, ptxas_log: str) -> None:
    record.smem = compiled.metadata.shared
    if m := re.search(r"Used (\d+) registers", ptxas_log):
        record.regs = int(m[1])
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log):
        record.spill_stores, record.spill_loads = int(m[1]), int(m[2])
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    record.dots = parse_dots(ttgir)
    record.ptx_wgmma = len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M))
    record.ptx_mma = len(re.findall(r"^\s*mma\.sync", ptx, re.M))


def parse_dots(ttgir: str) -> list[Dot]:
    """Every dot of a TTGIR module: its lowering from its result's layout, and whether its warps' MMA tiles
    (warpsPerCTA x instrShape) cover more than the result tile, so that some warps repeat others' work."""
    layouts = {name: (int(major), int(wm), int(wn), int(im), int(in_))
               for name, major, wm, wn, im, in_ in _MMA_LAYOUT.findall(ttgir)}
    dots = []
    for line in ttgir.splitlines():
        if not _DOT_OP.search(line) or not (result := _RESULT.search(line)):
            continue
        operand = _OPERAND.search(line)[1]
        precision = _PRECISION.search(line)
        precision = _PRECISIONS.get(precision[1], precision[1]) if precision and operand == "f32" else ""
        rows, cols, layout = int(result[1]), int(result[2]), result[3]
        if layout in layouts:
            major, wm, wn, im, in_ = layouts[layout]
            lowering = "wgmma" if major == 3 else "mma.sync"
            duplicated = wm * im > rows or wn * in_ > cols
        else:
            lowering, duplicated = "fma", False
        dots.append(Dot(lowering, rows, cols, operand, precision, duplicated))
    return dots
