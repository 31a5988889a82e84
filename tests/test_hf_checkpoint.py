"""Hugging Face folders: config.json -> ModelConfig, safetensors shards (index, zero copy),
tokenizer.json -> the same tokenizer as llama.cpp's on the twin GGUF, and clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hetero_moe.errors import GGUFFormatError, MissingKeyError, UnsupportedError
from hetero_moe.gguf import GGUFFile
from hetero_moe.hf import HFCheckpoint, is_hf_folder, open_model
from hetero_moe.models.base import config_from_gguf
from hetero_moe.testing.make_hf_model import QuantOptions, cached_hf_test_model

from .reference import LlamaRef

GPTQ = QuantOptions("gptq", 128, sym=True)


@pytest.fixture(scope="module")
def q3_gptq():
    return cached_hf_test_model("qwen3moe", GPTQ)


@pytest.fixture()
def copy_of(tmp_path, q3_gptq):
    def make():
        dst = tmp_path / "m"
        shutil.copytree(q3_gptq[0], dst)
        return dst
    return make


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "llama-moe", "llama"])
def test_config_matches_the_gguf_twin(arch):
    folder, twin = cached_hf_test_model(arch, GPTQ)
    assert is_hf_folder(folder) and not is_hf_folder(twin)
    ours, want = config_from_gguf(open_model(folder)), config_from_gguf(GGUFFile(twin))
    for f in ("arch", "n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_vocab",
              "n_ctx_train", "rms_eps", "rope_base", "rope_type", "rope_dim", "n_ff", "n_expert",
              "n_expert_used", "n_ff_exp", "n_ff_shexp", "norm_topk", "shexp_gate", "qk_norm",
              "attn_bias", "tied_embeddings"):
        assert getattr(ours, f) == getattr(want, f), f


def test_tensors_match_the_twin_names_and_shapes(q3_gptq):
    g, t = HFCheckpoint(q3_gptq[0]), GGUFFile(q3_gptq[1])
    assert set(g.tensors) == set(t.tensors)
    for name, ti in t.tensors.items():
        assert g.tensors[name].shape == ti.shape, name
    # float tensors are views of the mapped shard (zero copy), quantized ones were repacked
    emb = g.tensors["token_embd.weight"]
    part = next(p for p in g._parts if p.path == emb.path)
    base = np.frombuffer(part.mm, dtype=np.uint8)
    assert np.shares_memory(emb.data, base)
    assert g.tensors["blk.0.ffn_gate_exps.weight"].type_name == "Q4_0"
    assert g.tensors["blk.0.attn_q.weight"].type_name == "Q4_0"


@pytest.mark.llama
def test_tokenizer_matches_llama_cpp(q3_gptq, llama_cpp):
    import hetero_moe
    from hetero_moe.tokenizer import Tokenizer
    g = HFCheckpoint(q3_gptq[0])
    tok = Tokenizer.from_gguf_metadata(g.metadata, source=g.path)
    ref = LlamaRef(str(q3_gptq[1]), n_ctx=64)
    texts = ["Hello world", "  leading spaces and 12345 digits", "<|im_start|>user\nHi<|im_end|>",
             "Grüße aus Zürich! 3.14159", "def f(x):\n\treturn x**2\n"]
    for s in texts:
        assert tok.encode(s) == ref.tokenize(s), s
        assert tok.decode(tok.encode(s)) == s
    assert g.metadata["tokenizer.ggml.pre"] == "smollm"
    assert g.metadata["tokenizer.chat_template"] == GGUFFile(q3_gptq[1]).metadata[
        "tokenizer.chat_template"]
    del hetero_moe


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def test_unsupported_architecture_is_named(copy_of):
    d = copy_of()
    _edit_json(d / "config.json", architectures=["FalconForCausalLM"])
    with pytest.raises(UnsupportedError, match="FalconForCausalLM"):
        HFCheckpoint(d)


def test_missing_config_key_is_named(copy_of):
    d = copy_of()
    _edit_json(d / "config.json", num_experts=None)
    with pytest.raises(MissingKeyError, match="config.json.*'num_experts'"):
        HFCheckpoint(d)


def test_unsupported_quant_method_is_named(copy_of):
    d = copy_of()
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "bitsandbytes"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="quant_method 'bitsandbytes'"):
        HFCheckpoint(d)
    cfg["quantization_config"].update(quant_method="gptq", bits=8)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="bits = 8"):
        HFCheckpoint(d)


def test_missing_shard_is_named(copy_of):
    d = copy_of()
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        HFCheckpoint(d)


def test_shape_disagreeing_with_config_is_named(copy_of):
    import hetero_moe
    d = copy_of()
    _edit_json(d / "config.json", moe_intermediate_size=128)
    with pytest.raises(GGUFFormatError, match="ffn_gate_exps"):
        hetero_moe.load(str(d), threads=1, gpu="none")


def test_truncated_shard_is_named(copy_of):
    d = copy_of()
    p = d / "model-00001-of-00002.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(GGUFFormatError, match="model-00001-of-00002.safetensors.*truncated"):
        HFCheckpoint(d)


def test_bad_tensor_dtype_is_named(tmp_path):
    from safetensors.numpy import save_file
    folder, _ = cached_hf_test_model("llama", None)
    d = tmp_path / "m"
    shutil.copytree(folder, d)
    for p in d.glob("*.safetensors"):
        p.unlink()
    (d / "model.safetensors.index.json").unlink()
    save_file({"model.norm.weight": np.zeros(256, np.int32)}, str(d / "model.safetensors"))
    with pytest.raises(GGUFFormatError, match="'model.norm.weight' has dtype I32"):
        HFCheckpoint(d)


def test_unknown_tensor_is_named(copy_of):
    from safetensors.numpy import save_file
    d = copy_of()
    save_file({"model.layers.0.mystery.weight": np.zeros(4, np.float16)},
              str(d / "extra.safetensors"))
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.mystery.weight"] = "extra.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(GGUFFormatError, match="mystery"):
        HFCheckpoint(d)


def test_gpu_tier_interpret_runs_the_repacked_blocks(q3_gptq):
    """The GPU tier (Triton kernels through the interpreter) on a GPTQ folder: the repacked
    Q4_0 blocks are GGUF blocks, so the planner and the Triton table take them as they are."""
    pytest.importorskip("triton")
    import torch

    import hetero_moe
    from hetero_moe.runtime import planner as P
    path = str(q3_gptq[0])
    kw = dict(gpu="interpret", n_ctx=64, cpu_bandwidth_gbps=20,
              overrides=[r"^output\.weight$=cpu"])
    full = P.plan(path, **kw)
    fixed = full.gpu_total - full.gpu_groups["hot_experts"]
    hot = sum(full.n_expert // 3 * full.expert_gpu_bytes[l] for l in full.moe_layers)
    p = P.plan(path, vram=fixed + hot, **kw)
    assert p.fits, p.reason
    ids = list(range(200, 208))
    gpu = hetero_moe.load(path, gpu="interpret", plan=p).logits(ids)
    cpu = hetero_moe.load(path, gpu="none", n_ctx=64).logits(ids)
    rel = (torch.linalg.norm(gpu - cpu, dim=1) / torch.linalg.norm(cpu, dim=1)).max().item()
    assert rel < 0.03, rel          # float activations on the GPU tier vs q8_0 on the CPU
    assert (gpu.argmax(1) == cpu.argmax(1)).float().mean() >= 0.875


def test_yarn_rope_scaling_maps_to_llama_cpp_keys(copy_of):
    """rope_scaling {rope_type: yarn} becomes the GGUF keys llama.cpp's converter writes, and the
    model then runs YaRN RoPE (tests/test_parity.py checks YaRN against llama.cpp on GGUF files)."""
    import math

    import hetero_moe
    d = copy_of()
    _edit_json(d / "config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 1024})
    g = HFCheckpoint(d)
    assert g.get("qwen3moe.rope.scaling.type") == "yarn"
    assert g.get("qwen3moe.rope.scaling.factor") == 4.0
    assert g.get("qwen3moe.rope.scaling.original_context_length") == 1024
    cfg = config_from_gguf(g)
    y = cfg.rope_yarn
    assert y is not None and y.ext_factor == 1.0 and y.n_ctx_orig == 1024 and y.freq_scale == 0.25
    m = hetero_moe.load(d, threads=2, n_ctx=64, gpu="none")
    mag = float((m.net.rope.cos[5] ** 2 + m.net.rope.sin[5] ** 2).sqrt()[0])
    assert abs(mag - (1 + 0.1 * math.log(4.0))) < 1e-5       # ggml's YaRN magnitude
    m.close()
    _edit_json(d / "config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(MissingKeyError, match="original_max_position_embeddings"):
        HFCheckpoint(d)
    _edit_json(d / "config.json", rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(UnsupportedError, match="longrope"):
        HFCheckpoint(d)


@pytest.mark.parametrize("preset", ["tiny-lite", "tiny-v3"])
def test_deepseek_config_matches_the_gguf_twin(preset, tmp_path):
    """DeepseekV3ForCausalLM: MLA dims, routing (softmax / sigmoid with e_score_correction_bias,
    groups, scale, norm), dense lead, shared experts and YaRN map to llama.cpp's deepseek2 keys;
    kv_b_proj loads as attn_kv_b and the bias as exp_probs_b. Unsupported variants are named."""
    folder, twin = cached_hf_test_model("deepseek2-kvb", GPTQ, preset=preset)
    g = open_model(folder)
    ours, want = config_from_gguf(g), config_from_gguf(GGUFFile(twin))
    for f in ours.__dataclass_fields__:
        if f != "name":
            assert getattr(ours, f) == getattr(want, f), f
    assert set(g.tensors) == set(GGUFFile(twin).tensors)
    assert "blk.1.attn_kv_b.weight" in g.tensors
    assert ("blk.1.exp_probs_b.bias" in g.tensors) == (preset == "tiny-v3")
    d = tmp_path / "m"
    shutil.copytree(folder, d)
    _edit_json(d / "config.json", moe_layer_freq=2)
    with pytest.raises(UnsupportedError, match="moe_layer_freq"):
        HFCheckpoint(d)
    _edit_json(d / "config.json", moe_layer_freq=1, scoring_func="sqrtsoftplus")
    with pytest.raises(UnsupportedError, match="sqrtsoftplus"):
        HFCheckpoint(d)


def test_act_order_folder_is_compact():
    """Act-order (desc_act, groups scattered): the experts' down_proj is sorted into exact Q5_0
    blocks (gate/up rows permuted alike), gate/up re-quantized to Q8_0, attention to F16; nothing
    stays F32, and each down_proj's blocks hold the twin's weights exactly, columns permuted."""
    from hetero_moe import quant
    folder, twin = cached_hf_test_model("llama-moe", QuantOptions("gptq", 64, sym=False,
                                                                  desc_act=True))
    g, t = open_model(folder), GGUFFile(twin)
    types = {n: ti.type_name for n, ti in g.tensors.items() if n.startswith("blk.0.")}
    assert types["blk.0.ffn_down_exps.weight"] == "Q5_0"
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_up_exps.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_output.weight"] == "F16"
    assert "F32" not in {ti.type_name for n, ti in g.tensors.items() if len(ti.shape) > 1}
    mine = g.tensors["blk.0.ffn_down_exps.weight"]
    down = quant.dequantize(mine.data, mine.ggml_type, mine.shape).numpy()
    ref = t.tensors["blk.0.ffn_down_exps.weight"]
    want = quant.dequantize(ref.data, ref.ggml_type, ref.shape).numpy()
    for e in range(down.shape[0]):
        perm = g._col_perm[f"model.layers.0.block_sparse_moe.experts.{e}.w2"]
        assert np.array_equal(down[e], want[e][:, perm])


def test_lm_head_q8_0_option(q3_gptq):
    """load(folder, lm_head="q8_0"): the fp16 lm_head becomes Q8_0 blocks (ggml's layout) in
    memory; the logits stay within Q8_0's rounding of the float result and pick the same tokens."""
    import hetero_moe
    from hetero_moe.hf import quant as hq
    folder = q3_gptq[0]
    ids = list(range(100, 164))
    base = hetero_moe.load(str(folder), threads=2, n_ctx=128, gpu="none")
    q8 = hetero_moe.load(str(folder), threads=2, n_ctx=128, gpu="none", lm_head="q8_0")
    t, t0 = q8.gguf.tensors["output.weight"], base.gguf.tensors["output.weight"]
    assert (t0.type_name, t.type_name) == ("F16", "Q8_0")
    assert t.nbytes == t0.nbytes * 34 // 64
    from gguf import GGMLQuantizationType, quants
    w = np.asarray(t0.data).view(np.float16).reshape(t0.shape).astype(np.float32)
    assert np.array_equal(np.asarray(t.data), quants.quantize(w, GGMLQuantizationType.Q8_0)
                          .reshape(-1))
    a, b = base.logits(ids).numpy(), q8.logits(ids).numpy()
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert np.median(rel) < 0.01, np.median(rel)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    with pytest.raises(ValueError, match="lm_head"):
        hq.quantize_lm_head(open_model(folder), "q4_0")


SPM_TEXTS = [
    "Hello world", " Hello world", "  two leading spaces", "trailing space ", "a  b   c",
    "\tTab and\nnewline\n\n", "digits 0123456789 and 3.14159, 2024", "café naïve über straße",
    "日本語のテキスト", "Ελληνικά и русский", "emoji 🙂🚀 here",
    "byte fallback: € 한국어 ☃ \u00a0nbsp \u2581 literal",
    "<s>after bos", "one</s>two", "x <s> y </s> z", "<unk> literal", "</s>", " ", "",
    "def f(x):\n    return x * 2\n", "The quick brown fox jumps over the lazy dog.",
]


@pytest.mark.parametrize("scheme", ["spm", "spm-first", "spm-always"])
def test_spm_tokenizer_json_matches_tokenizers(tmp_path, scheme):
    """A SentencePiece-style tokenizer.json (BPE with byte_fallback; the Llama-2/Mixtral Prepend
    normalizer, or a Metaspace pre-tokenizer with prepend_scheme first/always): our ids equal the
    `tokenizers` library's on spaces, leading spaces, unicode, digits, byte-fallback characters
    and special tokens, with and without the BOS the post-processor adds."""
    from tokenizers import Tokenizer as HFTokenizer

    from hetero_moe.hf.tokenizer import tokenizer_metadata
    from hetero_moe.testing.make_hf_model import spm_tokenizer_files
    from hetero_moe.tokenizer import Tokenizer
    tj, tc = spm_tokenizer_files(scheme={"spm": "prepend", "spm-first": "first",
                                         "spm-always": "always"}[scheme])
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False))
    md = tokenizer_metadata(tmp_path, {"vocab_size": 640})
    assert md["tokenizer.ggml.model"] == "llama"
    ours = Tokenizer.from_gguf_metadata(md, source="t")
    ref = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ours.token_attr(3 + 0x41) & ours.token_attr(3 + 0x41).BYTE
    for text in SPM_TEXTS:
        assert ours.encode(text, add_special=False) == \
            ref.encode(text, add_special_tokens=False).ids, text
        assert ours.encode(text) == ref.encode(text).ids, text
    byte_ids = ours.encode("€", add_special=False)
    assert all(3 <= i < 259 for i in byte_ids[-3:])                       # <0xE2> <0x82> <0xAC>
    assert ours.decode(ours.encode("x café € 🙂", add_special=False)).strip() == "x café € 🙂"


def test_spm_folder_runs(tmp_path):
    """make_hf_test_model(tokenizer="spm") writes a Mixtral folder that loads and whose
    tokenizer is the tokenizer.json's."""
    import hetero_moe
    from hetero_moe.testing.make_hf_model import make_hf_test_model
    from tokenizers import Tokenizer as HFTokenizer
    folder, _ = make_hf_test_model("llama-moe", tmp_path / "m", GPTQ, write_twin=False,
                                   tokenizer="spm")
    m = hetero_moe.load(str(folder), threads=2, n_ctx=128, gpu="none")
    ref = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    for text in SPM_TEXTS:
        assert m.tokenizer.encode(text) == ref.encode(text).ids, text
    out = m.generate(m.tokenizer.encode("Hello world"), max_tokens=4, temperature=0)
    assert len(out.tokens) == 4 or out.finish_reason == "stop"


def test_spm_unsupported_spelled_out(tmp_path):
    from hetero_moe.hf.tokenizer import tokenizer_metadata
    from hetero_moe.testing.make_hf_model import spm_tokenizer_files
    tj, tc = spm_tokenizer_files(scheme="first")
    tj["pre_tokenizer"]["split"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    with pytest.raises(UnsupportedError, match="split = true"):
        tokenizer_metadata(tmp_path, {"vocab_size": 640})
