"""Package metadata and the ``kernels._C`` C++ extension.

The extension's sources and flags live in ``csrc/build.json``, which ``CMakeLists.txt`` reads too. Building it needs
torch importable at build time (``pip install --no-build-isolation -e .``, as the Makefile does). Without torch, or
with ``DALLE_ENGINE_SKIP_CPP_BUILD=1``, the package installs without it and ``kernels.cpp.available()`` is False.
"""

import json
import os
import warnings
from pathlib import Path

from setuptools import find_packages, setup

BUILD = json.loads((Path(__file__).parent / "csrc" / "build.json").read_text())


def extension_build() -> dict:
    """``ext_modules`` and ``cmdclass`` for ``kernels._C``, or nothing where it cannot or should not be built."""
    if os.environ.get("DALLE_ENGINE_SKIP_CPP_BUILD", "0") == "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time (use pip install --no-build-isolation): "
                      "installing without the kernels._C extension", stacklevel=1)
        return {}
    sources = list(BUILD["sources"])
    compile_args = {"cxx": list(BUILD["cxx_flags"])}
    extension = CppExtension
    if BUILD["cuda_sources"] and torch.version.cuda is not None and CUDA_HOME is not None:
        sources += BUILD["cuda_sources"]
        compile_args["nvcc"] = list(BUILD["nvcc_flags"])
        extension = CUDAExtension
    module = extension(BUILD["name"], sources, extra_compile_args=compile_args,
                       extra_link_args=list(BUILD["link_flags"]))
    return {"ext_modules": [module], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="dalle-engine",
    version="0.1.0",
    description="A fast, kernel-backed DALL-E engine: train text-to-image transformers and sample from them.",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    package_data={"engine.serving": ["page.html"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "einops>=0.7",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "ftfy",
        "regex",
        "pillow",
        "tqdm",
        "webdataset>=0.2.86",
        "tensorboard",
        "fastapi>=0.110",  # serve.py
        "uvicorn>=0.29",
    ],
    extras_require={
        # youtokentome only builds with Cython pre-installed and --no-build-isolation (see README).
        "yttm": ["youtokentome>=1.0.6"],
        "deepspeed": ["deepspeed>=0.14"],
        # Triton kernels are tested in its CPU interpreter; the web page in Debian's chromium, driven by selenium.
        "test": ["pytest", "pytest-benchmark", "triton", "httpx", "selenium"],
    },
    **extension_build(),
)
