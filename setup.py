"""Build and install hetero-moe.

Install with ``pip install -e .`` (CPU) or ``pip install -e ".[test]"`` for the test suite.
Users with a GPU install their CUDA build of torch first; the range below accepts it.
"""
from setuptools import find_packages, setup

setup(
    name="hetero-moe",
    version="0.1.0",
    description="Heterogeneous CPU/GPU runtime for 4-bit Mixture-of-Experts models (GGUF)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hetero_moe", "hetero_moe.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "gguf>=0.10",
        "safetensors",
        "psutil",
        "tqdm",
        "jinja2>=3.0",
        "tokenizers>=0.15",
    ],
    extras_require={
        "test": ["pytest>=7", "llama-cpp-python>=0.3.0"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["hetero-moe=hetero_moe.cli:main"]},
)
