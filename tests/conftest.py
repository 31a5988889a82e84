"""Shared fixtures: real and generated models, and llama.cpp as the reference."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HETERO_MOE_THREADS", "2")


@pytest.fixture(scope="session")
def smollm2():
    from hetero_moe.assets import smollm2_path
    return str(smollm2_path())


@pytest.fixture(scope="session")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference; install "
                                                   "the test extras: pip install -e '.[test]'")


def tiny_model(arch: str, quant: str = "Q4_K_M", preset: str = "tiny") -> str:
    from hetero_moe.testing.make_model import cached_test_model
    return str(cached_test_model(arch, preset=preset, quant=quant))
