"""Choosing which build of the C++ row kernels runs (AVX-512, AVX2 or baseline x86-64): ``kernels.cpp.use_cpu_isa``
and ``DALLE_ENGINE_CPU_ISA``. The kernels' own tests run once for each of the two best instruction sets (the
``cpu_isa`` fixture); here every build, the baseline included, is checked against the float64 product."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_small_linear import check, randn

from kernels import cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason=f"C++ kernels unavailable: {cpp.load_error()}")


def test_instruction_sets_agree_to_rounding_and_can_be_chosen(cpu_isa: str) -> None:
    """Every build computes the same product within the float32 budget; the one chosen is the one that runs."""
    assert cpp.cpu_isa() == cpu_isa and cpu_isa in cpp.cpu_isas() and cpp.cpu_isas()[-1] == "baseline"
    gen = torch.Generator().manual_seed(6)
    x, w = randn(5, 1030, dtype=torch.float32, gen=gen), randn(37, 1030, dtype=torch.float32, gen=gen)
    here = cpp.small_linear(x, w)
    for other in cpp.cpu_isas():
        with cpp.use_cpu_isa(other):
            assert cpp.cpu_isa() == other
            check(cpp.small_linear(x, w), x, w, None)
            torch.testing.assert_close(cpp.small_linear(x, w), here, rtol=1e-5, atol=1e-5)
    assert cpp.cpu_isa() == cpu_isa
    with pytest.raises(RuntimeError, match="must be avx512, avx2 or baseline, got 'sse9'"):
        with cpp.use_cpu_isa("sse9"):
            pass
    assert cpp.cpu_isa() == cpu_isa


def test_the_instruction_set_is_read_from_the_environment() -> None:
    code = "import torch; from kernels import cpp; cpp.small_linear(torch.ones(1, 4), torch.ones(2, 4)); " \
           "print(cpp.cpu_isa())"

    def run(isa: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, "DALLE_ENGINE_CPU_ISA": isa},
                              capture_output=True, text=True, timeout=120)

    for isa in cpp.cpu_isas():
        out = run(isa)
        assert out.returncode == 0 and out.stdout.strip() == isa, out.stderr[-2000:]
    bad = run("avx9")  # a warning, and the best build: never a failure in the middle of a run
    assert bad.returncode == 0 and bad.stdout.strip() == cpp.cpu_isas()[0], bad.stderr[-2000:]
    assert "DALLE_ENGINE_CPU_ISA must be avx512, avx2 or baseline, got 'avx9': running" in bad.stderr
