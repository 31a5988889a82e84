"""Teacher-forced logits vs llama.cpp on the same GGUF files."""
from __future__ import annotations

import numpy as np
import pytest

import hetero_moe

from .conftest import tiny_model
from .reference import LlamaRef, compare_logits

N_POS = 300
MAX_REL_ERR = 0.02
MIN_TOP1 = 0.99

ARCHES = ["llama", "llama-tied", "llama-moe", "qwen3moe", "qwen2moe", "olmoe"]

TEXT = (
    "The history of mixture-of-experts models begins in the early 1990s, when researchers "
    "proposed training several small networks, each specialising on part of the input space, "
    "together with a gating network that decides which expert should handle each example. "
    "Modern language models revive the idea at enormous scale: a router picks a handful of "
    "feed-forward experts for every token, so that the number of parameters grows while the "
    "compute per token stays nearly constant. Running such models on a single consumer GPU is "
    "hard because the experts alone can weigh hundreds of gigabytes. A heterogeneous runtime "
    "keeps attention and the shared parts on the GPU and streams the routed experts from system "
    "memory, where the CPU multiplies them in their quantized form.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(20)])\n"
    "In 2024, 3.14159 and 2.71828 were still the two most famous constants; 1,234,567 is not. "
    "Les modèles de langage parlent aussi français, et un peu d'allemand: Grüße aus Zürich!"
)


def _check(path: str, ids: list[int], kernels: str) -> dict:
    ref = LlamaRef(path, n_ctx=512)
    want = ref.logits(ids)
    ref.close()
    m = hetero_moe.load(path, threads=2, n_ctx=512, cpu_kernels=kernels)
    got = m.logits(ids).numpy()
    stats = compare_logits(got, want)
    assert stats["max_rel_err"] <= MAX_REL_ERR, stats
    assert stats["decided"] >= 0.5 * len(ids), f"too many near-ties to judge: {stats}"
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats
    return stats


@pytest.mark.llama
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_smollm2_parity(smollm2, llama_cpp, kernels):
    ref = LlamaRef(smollm2, n_ctx=512)
    ids = ref.tokenize(TEXT * 2)[:N_POS]
    ref.close()
    assert len(ids) >= 256
    print(_check(smollm2, ids, kernels))


@pytest.mark.llama
@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_model_parity(arch, kernels, llama_cpp):
    path = tiny_model(arch)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 49152, size=N_POS).tolist()
    print(arch, _check(path, ids, kernels))
