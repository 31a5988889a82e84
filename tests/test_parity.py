"""Teacher-forced logits vs llama.cpp on the same GGUF files.

Bar: relative L2 error <= 2% at every position and top-1 agreement >= 99% where llama.cpp's own
top-1/top-2 margin exceeds 3 standard deviations of its measured error (3*sqrt(2) RMS logit errors).

The strict bar holds on float files, where both runtimes do exact arithmetic: each quantized file
is also re-typed to F32 by llama.cpp (the same weights, dequantized) and compared there.

On quantized files llama.cpp multiplies 8-bit-quantized activations with its own blocking, and its
result moves away from the exact float result of the same weights by 1-3% per position (more where
an MoE router is near a tie); ours carries the same kind of quantization noise, so the two cannot
agree to 2% everywhere without reproducing llama.cpp's arithmetic bit for bit. On those files the
test measures llama.cpp's own deviation (quantized file vs its F32 twin) at the same positions and
requires ours to stay within it: mean error <= 1.5x and 95th percentile <= 2x llama.cpp's (or the
2% bar, whichever is larger), and the top-1 agreement bar unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest

import torch

import hetero_moe
from hetero_moe.layers.moe import MoE

from .conftest import tiny_model
from .reference import LlamaRef, compare_logits, quantize_with_llama, rel_err

N_POS = 300
MAX_REL_ERR = 0.02
MIN_TOP1 = 0.99
ROUTER_TIE = 1e-4        # router top-k margin (probability) below which experts may differ
SELF_MARGIN_MEAN = 1.5   # ours may be at most this x llama.cpp's own mean quantization deviation
SELF_MARGIN_P95 = 2.0    # ... and this x its 95th percentile

ARCHES = [("llama", "tiny"), ("llama", "tiny-tied"), ("llama-moe", "tiny"), ("qwen3moe", "tiny"),
          ("qwen2moe", "tiny"), ("olmoe", "tiny"), ("qwen3moe", "tiny-yarn"), ("llama", "tiny-yarn")]

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


def _ours(path: str, ids: list[int], kernels: str, margins: list | None = None) -> np.ndarray:
    """Our logits; with `margins`, also each position's smallest router top-k margin."""
    m = hetero_moe.load(path, threads=2, n_ctx=512, cpu_kernels=kernels)
    moes = [b.ffn for b in m.net.blocks if isinstance(b.ffn, MoE)]
    for moe in moes:
        moe.margin_log = []
    out = m.logits(ids).numpy()
    if margins is not None:
        per_layer = [torch.cat(moe.margin_log).numpy() for moe in moes]
        margins.extend(np.min(per_layer, axis=0) if per_layer else np.ones(len(ids)))
    return out


def _strict(stats: dict, n: int, err: np.ndarray | None = None,
            margins: list | None = None) -> None:
    """The 2% bar at every position, except where the MoE router itself was at a near-tie
    (top-k margin < ROUTER_TIE in probability): there the two runtimes may pick different
    experts, like a near-tie of the final top-1. Such positions must be rare."""
    if err is not None and margins is not None and len(margins):
        ties = np.asarray(margins) < ROUTER_TIE
        stats["router_near_ties"] = int(ties.sum())
        stats["max_rel_err_off_ties"] = float(err[~ties].max())
        assert ties.mean() <= 0.02, stats
        assert stats["max_rel_err_off_ties"] <= MAX_REL_ERR, stats
    else:
        assert stats["max_rel_err"] <= MAX_REL_ERR, stats
    assert stats["decided"] >= 0.5 * n, f"too many near-ties to judge: {stats}"
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats


def _twin(path: str) -> str:
    """llama.cpp's F32 re-typing of a cached model, cached beside it."""
    return quantize_with_llama(path, path[:-len(".gguf")] + ".f32-twin.gguf", "ALL_F32")


def _within_reference_noise(path: str, ids: list[int], kernels: str, tag: str) -> dict:
    """Compare on a quantized file, bounded by llama.cpp's own quantization deviation."""
    ref = LlamaRef(path, n_ctx=512)
    want = ref.logits(ids)
    ref.close()
    twin = _twin(path)
    exact = LlamaRef(twin, n_ctx=512).logits(ids)
    ref_noise = rel_err(want, exact)
    ours = _ours(path, ids, kernels)
    err = rel_err(ours, want)
    stats = compare_logits(ours, want)
    stats.update(p95_rel_err=float(np.percentile(err, 95)),
                 llama_q_vs_f32_mean=float(ref_noise.mean()),
                 llama_q_vs_f32_p95=float(np.percentile(ref_noise, 95)))
    print(tag, stats)
    assert err.mean() <= max(MAX_REL_ERR, SELF_MARGIN_MEAN * ref_noise.mean()), stats
    assert stats["p95_rel_err"] <= max(MAX_REL_ERR, SELF_MARGIN_P95 * stats["llama_q_vs_f32_p95"]), stats
    assert stats["decided"] >= 0.5 * len(ids), f"too many near-ties to judge: {stats}"
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats
    return stats


@pytest.fixture(scope="module")
def smol_ids(smollm2, llama_cpp):
    ref = LlamaRef(smollm2, n_ctx=512)
    ids = ref.tokenize(TEXT * 2)[:N_POS]
    ref.close()
    assert len(ids) == N_POS
    return ids


@pytest.mark.llama
def test_smollm2_float_twin_strict(smollm2, smol_ids):
    f32 = _twin(smollm2)
    want = LlamaRef(f32, n_ctx=512).logits(smol_ids)
    stats = compare_logits(_ours(f32, smol_ids, "auto"), want)
    print("SmolLM2 F32 twin:", stats)
    _strict(stats, N_POS)


@pytest.mark.llama
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_smollm2_q4_1(smollm2, smol_ids, kernels):
    _within_reference_noise(smollm2, smol_ids, kernels, f"SmolLM2 Q4_1 [{kernels}]")


@pytest.mark.llama
@pytest.mark.parametrize("arch,preset", ARCHES)
def test_tiny_model_float_twin_strict(arch, preset, llama_cpp):
    path = _twin(tiny_model(arch, preset=preset))
    ids = np.random.default_rng(0).integers(3, 49152, size=N_POS).tolist()
    want = LlamaRef(path, n_ctx=512).logits(ids)
    margins: list = []
    ours = _ours(path, ids, "auto", margins)
    stats = compare_logits(ours, want)
    _strict(stats, N_POS, rel_err(ours, want), margins)
    print(arch, preset, "F32 twin", stats)


@pytest.mark.llama
@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("arch,preset", ARCHES)
def test_tiny_model_q4_k_m(arch, preset, kernels, llama_cpp):
    ids = np.random.default_rng(0).integers(3, 49152, size=N_POS).tolist()
    _within_reference_noise(tiny_model(arch, preset=preset), ids, kernels,
                            f"{arch} {preset} Q4_K_M [{kernels}]")
