"""Teacher-forced logits vs llama.cpp on the same GGUF files.

Bar: relative L2 error <= 2% at every position and top-1 agreement >= 99% where llama.cpp's own
top-1/top-2 margin exceeds twice the measured RMS logit error.

When a model's logits are chaotic under 8-bit activation quantization (SmolLM2-Q4_1: a 1e-6
relative change of the input embeddings moves its logits by up to 4%), no implementation can meet
a per-position bar without reproducing llama.cpp's summation order bit for bit; llama.cpp itself
misses it between its batched and token-by-token paths. For such files the test measures that
self-disagreement on the same positions and requires ours to be no worse than it (mean and max),
and the strict bar is applied to the float twin of the same weights (re-typed to F32 by llama.cpp),
which checks the architecture's arithmetic exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

import hetero_moe

from .conftest import tiny_model
from .reference import LlamaRef, compare_logits, quantize_with_llama, rel_err

N_POS = 300
MAX_REL_ERR = 0.02
MIN_TOP1 = 0.99
SELF_MARGIN_MEAN = 1.5   # ours may be at most this x llama.cpp's own mean self-disagreement
SELF_MARGIN_MAX = 2.0    # ... and this x its max

ARCHES = [("llama", "tiny"), ("llama", "tiny-tied"), ("llama-moe", "tiny"), ("qwen3moe", "tiny"),
          ("qwen2moe", "tiny"), ("olmoe", "tiny")]

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


def _ours(path: str, ids: list[int], kernels: str) -> np.ndarray:
    m = hetero_moe.load(path, threads=2, n_ctx=512, cpu_kernels=kernels)
    return m.logits(ids).numpy()


def _strict(stats: dict, n: int) -> None:
    assert stats["max_rel_err"] <= MAX_REL_ERR, stats
    assert stats["decided"] >= 0.5 * n, f"too many near-ties to judge: {stats}"
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats


@pytest.fixture(scope="module")
def smol_ids(smollm2, llama_cpp):
    ref = LlamaRef(smollm2, n_ctx=512)
    ids = ref.tokenize(TEXT * 2)[:N_POS]
    ref.close()
    assert len(ids) == N_POS
    return ids


@pytest.mark.llama
def test_smollm2_float_twin_strict(smollm2, smol_ids, tmp_path_factory):
    f32 = quantize_with_llama(smollm2, str(tmp_path_factory.mktemp("f32") / "smol-f32.gguf"),
                              "ALL_F32")
    want = LlamaRef(f32, n_ctx=512).logits(smol_ids)
    stats = compare_logits(_ours(f32, smol_ids, "auto"), want)
    print("SmolLM2 F32 twin:", stats)
    _strict(stats, N_POS)


@pytest.mark.llama
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_smollm2_q4_1_within_reference_noise(smollm2, smol_ids, kernels):
    ref = LlamaRef(smollm2, n_ctx=512)
    want = ref.logits(smol_ids)
    self_err = rel_err(ref.logits_sequential(smol_ids), want)
    ours = _ours(smollm2, smol_ids, kernels)
    stats = compare_logits(ours, want)
    err = rel_err(ours, want)
    print(f"SmolLM2 Q4_1 [{kernels}]: {stats}; llama.cpp batched vs sequential: mean "
          f"{self_err.mean():.4f} max {self_err.max():.4f}")
    assert err.mean() <= max(MAX_REL_ERR / 2, SELF_MARGIN_MEAN * self_err.mean()), stats
    assert err.max() <= max(MAX_REL_ERR, SELF_MARGIN_MAX * self_err.max()), stats
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats


@pytest.mark.llama
@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("arch,preset", ARCHES)
def test_tiny_model_parity(arch, preset, kernels, llama_cpp):
    path = tiny_model(arch, preset=preset)
    ids = np.random.default_rng(0).integers(3, 49152, size=N_POS).tolist()
    want = LlamaRef(path, n_ctx=512).logits(ids)
    stats = compare_logits(_ours(path, ids, kernels), want)
    print(arch, preset, kernels, stats)
    _strict(stats, N_POS)
