import contextlib
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from engine.model.config import DALLEConfig
from engine.model.dalle import DALLE
from kernels import cpp


def tiny_config(**overrides) -> DALLEConfig:
    base = dict(num_text_tokens=23, text_seq_len=5, num_image_tokens=17, image_fmap_size=3,
                dim=32, depth=2, heads=2, dim_head=16)
    base.update(overrides)
    return DALLEConfig(**base)


def random_batch(config: DALLEConfig, batch: int = 3, generator: torch.Generator | None = None):
    text = torch.randint(1, config.num_text_tokens, (batch, config.text_seq_len), generator=generator)
    text[:, config.text_seq_len - 2:] = 0  # trailing padding, as the tokenizers produce
    codes = torch.randint(0, config.num_image_tokens, (batch, config.image_seq_len), generator=generator)
    return text, codes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_deepspeed(script: Path, args: list[str], cwd: Path) -> None:
    """Run `script` under the deepspeed launcher as 2 CPU processes (gloo), failing with their output.

    Each run gets a free port (the launcher's default, 29500, may still be held by an earlier run's processes) and
    runs without the Triton interpreter flag the Triton tests set (DeepSpeed imports Triton, ~4x slower with it)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    env = {**os.environ, "PATH": f"{launcher.parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(port), str(script), "--deepspeed",
                          *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"deepspeed {script.name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the run left its shared memory behind: {left}"


@contextlib.contextmanager
def stand_in_modules(contents: dict[str, dict[str, object]]):
    """Register modules named as `contents`' keys, holding its attributes, only inside the block: lets objects
    that claim a foreign package (e.g. `__module__ = "dall_e.encoder"`) be pickled without that package."""
    assert not any(name in sys.modules for name in contents)
    modules = {name: types.ModuleType(name) for name in contents}
    for name, attributes in contents.items():
        for attribute, value in attributes.items():
            setattr(modules[name], attribute, value)
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in contents:
            del sys.modules[name]


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny convs: threads gain nothing, and on a busy machine OpenMP's waiting
    makes them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=cpp.cpu_isas()[:2] if cpp.available() else ["unavailable"])
def cpu_isa(request):
    """The two best builds of the C++ row kernels this CPU can run (AVX-512 and AVX2 on an AVX-512 machine), one after
    the other: a test using this fixture runs once per instruction set (test_cpu_isa.py checks the baseline build
    too)."""
    if not cpp.available():
        pytest.skip(f"C++ kernels unavailable: {cpp.load_error()}")
    with cpp.use_cpu_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    return DALLE(tiny_config())
