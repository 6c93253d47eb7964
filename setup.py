from setuptools import find_packages, setup

setup(
    name="dalle-engine",
    version="0.1.0",
    description="A fast, kernel-backed DALL-E engine: train text-to-image transformers and sample from them.",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
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
    ],
    extras_require={
        # youtokentome only builds with Cython pre-installed and --no-build-isolation (see README).
        "yttm": ["youtokentome>=1.0.6"],
        "deepspeed": ["deepspeed>=0.14"],
        "test": ["pytest", "pytest-benchmark"],
    },
)
