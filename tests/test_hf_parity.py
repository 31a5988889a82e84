"""GPTQ/AWQ Hugging Face folders vs llama.cpp on the same weights dequantized into an F32 GGUF.

The folder and its F32 twin come from hetero_moe/testing/make_hf_model.py: the twin holds exactly
s * (q - z) per weight (and the fp16 values of the float tensors), so with float activations
both runtimes compute the same function. Bars on the float path (our torch reference with float
activations, weights repacked into Q4_0/Q5_0 and decoded): median relative logit error <= 0.5%,
98th percentile <= 2%, greedy 32 tokens equal up to a near-tie of llama.cpp's logits after at
least 16 equal tokens. The C++ kernels (8-bit activations, as for every GGUF type) are held to
llama.cpp's own deviation on the same blocks: llama.cpp running a GGUF holding our repacked
blocks, against its F32 result (mean <= 1.5x, 95th percentile <= 2x, as tests/test_parity.py).
"""
from __future__ import annotations

import numpy as np
import pytest

import hetero_moe
from hetero_moe import quant
from hetero_moe.api import Model
from hetero_moe.hf import open_model
from hetero_moe.layers.linear import KernelOptions
from hetero_moe.models.base import config_from_gguf
from hetero_moe.models.transformer import Transformer
from hetero_moe.runtime.placement import plan_placement
from hetero_moe.testing.make_hf_model import QuantOptions, cached_hf_test_model

from .reference import LlamaRef, assert_same_greedy, compare_logits, rel_err

N_POS = 300
N_GEN = 32
MIN_SAME_TOKENS = 16
MEDIAN_BAR, P98_BAR = 0.005, 0.02
SELF_MARGIN_MEAN, SELF_MARGIN_P95 = 1.5, 2.0
TIE_SIGMAS = 3.0

CASES = [
    ("qwen3moe", QuantOptions("gptq", 128, sym=True)),
    ("qwen3moe", QuantOptions("awq", 128)),
    ("llama-moe", QuantOptions("gptq", 128, sym=True)),
    ("llama-moe", QuantOptions("awq", 128)),
    ("qwen3moe", QuantOptions("gptq", 64, sym=False)),                  # Q5_0 repack
    ("llama-moe", QuantOptions("gptq", 64, sym=False, desc_act=True)),  # act-order: F32
    ("qwen2moe", QuantOptions("gptq", 128, sym=True)),
]


KERNEL_CASES = CASES[:4] + [CASES[5]]   # act-order: down_proj exact, the rest Q8_0/F16


def _id(c):
    a, o = c
    return f"{a}-{o.fmt}-g{o.group_size}" + ("-asym" if not o.sym else "") + \
        ("-act" if o.desc_act else "")


def load_float(path: str, n_ctx: int = 512) -> Model:
    """Our model with float activations (torch path, no activation quantization)."""
    g = open_model(path)
    cfg = config_from_gguf(g)
    net = Transformer(cfg, g, plan_placement("none"), n_ctx,
                      KernelOptions(cpu_kernels="torch", act_quant=False))
    return Model(g, cfg, net, 2, 0.0)


def _prompt_ids() -> list[int]:
    return np.random.default_rng(0).integers(3, 49152, size=N_POS).tolist()


def _greedy(m: Model, ids: list[int], n: int) -> list[int]:
    out, logits = [], m.logits(ids)[-1]
    pos = len(ids)
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        logits = m.eval([t], pos)[-1]
        pos += 1
    return out


@pytest.mark.llama
@pytest.mark.parametrize("arch,opts", CASES, ids=[_id(c) for c in CASES])
def test_folder_float_vs_llama_f32_twin(arch, opts, llama_cpp):
    _float_vs_twin(arch, opts)


# DeepseekV3ForCausalLM folders (kv_b_proj, loaded as llama.cpp's attn_kv_b layout): V2-Lite-like
# (no q LoRA, softmax) and V3-like (q LoRA, sigmoid with e_score_correction_bias, groups, YaRN)
DEEPSEEK = ["tiny-lite", "tiny-v3"]


@pytest.mark.llama
@pytest.mark.parametrize("preset", DEEPSEEK)
def test_deepseek_folder_float_vs_llama_f32_twin(preset, llama_cpp):
    _float_vs_twin("deepseek2-kvb", QuantOptions("gptq", 128, sym=True), preset)


@pytest.mark.llama
@pytest.mark.parametrize("preset", DEEPSEEK)
def test_deepseek_folder_kernels_within_llama_noise(preset, llama_cpp, tmp_path):
    _kernels_within_noise("deepseek2-kvb", QuantOptions("gptq", 128, sym=True), tmp_path, preset)


def _float_vs_twin(arch, opts, preset="tiny"):
    folder, twin = cached_hf_test_model(arch, opts, preset=preset)
    ids = _prompt_ids()
    ref = LlamaRef(str(twin), n_ctx=512)
    want = ref.logits(ids)
    m = load_float(str(folder))
    ours = m.logits(ids).numpy()
    err = rel_err(ours, want)
    stats = compare_logits(ours, want)
    stats.update(median_rel_err=float(np.median(err)), p98_rel_err=float(np.percentile(err, 98)))
    print(_id((arch, opts)), stats)
    assert stats["median_rel_err"] <= MEDIAN_BAR, stats
    assert stats["p98_rel_err"] <= P98_BAR, stats
    assert stats["top1_agree_decided"] >= 0.99, stats
    # greedy continuation of a short prompt
    prompt = ids[:16]
    want_toks = ref.greedy(prompt, N_GEN)
    rows = ref.logits(prompt + want_toks)[len(prompt) - 1:]
    got = _greedy(m, prompt, N_GEN)
    first_diff = next((j for j, (a, b) in enumerate(zip(got, want_toks)) if a != b), N_GEN)
    if first_diff < N_GEN:
        assert first_diff >= MIN_SAME_TOKENS, (got, want_toks)
        rms = float(np.sqrt(((ours - want) ** 2).mean()))
        assert_same_greedy(got, want_toks, rows, frozenset(), _id((arch, opts)), N_GEN,
                           TIE_SIGMAS * np.sqrt(2.0) * rms)
    ref.close()


def _blocks_gguf(folder: str, twin: str, out: str) -> str:
    """A GGUF holding the tensors exactly as our loader presents the folder (the repacked
    Q4_0/Q5_0 blocks, F16 floats) with the twin's metadata: what llama.cpp runs on the same
    blocks."""
    import gguf
    from gguf import GGMLQuantizationType
    g = open_model(folder)
    r = gguf.GGUFReader(twin)
    w = gguf.GGUFWriter(out, g.architecture)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        sub = f.types[1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), vt, sub_type=sub)
    for t in r.tensors:
        mine = g.tensors[t.name]
        if len(mine.shape) == 1:        # llama.cpp multiplies by norm vectors in F32 only
            w.add_tensor(t.name, quant.dequantize(mine.data, mine.ggml_type, mine.shape).numpy())
            continue
        byte_shape = mine.shape[:-1] + (mine.nbytes // int(np.prod(mine.shape[:-1])),)
        w.add_tensor(t.name, np.asarray(mine.data).reshape(byte_shape), raw_shape=byte_shape,
                     raw_dtype=GGMLQuantizationType(mine.ggml_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.llama
@pytest.mark.parametrize("arch,opts", KERNEL_CASES, ids=[_id(c) for c in KERNEL_CASES])
def test_folder_kernels_within_llama_noise(arch, opts, llama_cpp, tmp_path):
    _kernels_within_noise(arch, opts, tmp_path)


def _kernels_within_noise(arch, opts, tmp_path, preset="tiny"):
    folder, twin = cached_hf_test_model(arch, opts, preset=preset)
    ids = _prompt_ids()
    exact = LlamaRef(str(twin), n_ctx=512).logits(ids)
    blocks = _blocks_gguf(str(folder), str(twin), str(tmp_path / "blocks.gguf"))
    llama_q = LlamaRef(blocks, n_ctx=512).logits(ids)
    noise = rel_err(llama_q, exact)
    m = hetero_moe.load(str(folder), threads=2, n_ctx=512, gpu="none")
    assert m.net.blocks[-1].ffn.use_kernel
    ours = m.logits(ids).numpy()
    err = rel_err(ours, exact)
    stats = compare_logits(ours, exact)
    stats.update(mean=float(err.mean()), p95=float(np.percentile(err, 95)),
                 llama_mean=float(noise.mean()), llama_p95=float(np.percentile(noise, 95)),
                 vs_llama_blocks_mean=float(rel_err(ours, llama_q).mean()))
    print(_id((arch, opts)), "kernels", stats)
    assert stats["mean"] <= SELF_MARGIN_MEAN * stats["llama_mean"], stats
    assert stats["p95"] <= SELF_MARGIN_P95 * stats["llama_p95"], stats
    assert stats["top1_agree_decided"] >= 0.99, stats
