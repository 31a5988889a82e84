"""Shape-only GGUF files of real models (hetero_moe/testing/shape_only.py).

The Q4_K_M type rules are checked against llama.cpp's own quantizer on small random models, tensor
by tensor, together with the file order, offsets and size llama-quantize writes; the real-model
presets are checked for sparse size, published file sizes, tensor counts and parsed config.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time

import gguf
import pytest

from hetero_moe.gguf import GGUFFile
from hetero_moe.models.base import config_from_gguf
from hetero_moe.testing import make_model as mm
from hetero_moe.testing import shape_only as so

GB = 10**9   # published GGUF sizes are decimal GB
MAX_ON_DISK = 64 << 20
MAX_WRITE_S = 20.0

# logical size ranges: the published Q4_K_M file sizes of the real models
SIZE_RANGES = {
    "deepseek-r1": (377 * GB, 405 * GB),
    "qwen3-235b-a22b": (133 * GB, 143 * GB),
    "qwen3-30b-a3b": (17 * GB, 19 * GB),
}


def _tensor_count(preset: str) -> int:
    """From the block structure: 3 globals (token_embd, output_norm, output) plus the blocks."""
    sp, s = so.resolve(preset)
    if sp.arch == "deepseek2":
        attn = 9    # attn_norm, q_a, q_a_norm, q_b, kv_a_mqa, kv_a_norm, k_b, v_b, output
        dense = 4   # ffn_norm, gate, up, down
        moe = 9     # ffn_norm, gate_inp, gate/up/down_exps, exp_probs_b, gate/up/down_shexp
        lead = sp.p.mla.dense_lead
        return 3 + lead * (attn + dense) + (s.n_layer - lead) * (attn + moe)
    # qwen3moe: attn_norm, q, k, v, output, q_norm, k_norm + ffn_norm, gate_inp, gate/up/down_exps
    return 3 + s.n_layer * (7 + 5)


def _on_disk(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each preset written once into pytest's tmp dir, with its write time."""
    root, made = tmp_path_factory.mktemp("shape-only"), {}

    def get(preset):
        if preset not in made:
            t0 = time.perf_counter()
            path = so.write_shape_only(preset, root / f"{preset}.gguf")
            made[preset] = (path, time.perf_counter() - t0)
        return made[preset]
    return get


# --- the type rules against llama.cpp's quantizer ---------------------------------------------------

# (arch, preset, layers): MoE with 8 experts (llama.cpp's n_expert == 8 rules), deepseek2 MLA split
# and legacy kv_b with fallbacks (rows of 64..128), q LoRA or not, a dense tied model (attn_v and
# ffn_down counters, tied lm_head), qwen2moe (biases, 1-D shared-expert gate). 8 layers make
# use_more_bits pick a pattern that is neither "all" nor "none".
AGREEMENT_CASES = [
    ("qwen3moe", "tiny", 8),
    ("deepseek2", "tiny-v3", 8),
    ("deepseek2", "tiny-lite", 4),
    ("deepseek2-kvb", "tiny-v3", 8),
    ("qwen3", "tiny-tied", 8),
    ("qwen2moe", "tiny", None),
]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python's quantizer is the reference")
@pytest.mark.parametrize("arch,preset,layers", AGREEMENT_CASES)
def test_q4_k_m_types_order_and_offsets_match_llama_quantize(arch, preset, layers):
    g = GGUFFile(mm.cached_test_model(arch, preset, quant="Q4_K_M", layers=layers))
    a = g.architecture
    got = list(g)   # file order
    want = so.q4_k_m_layout([(t.name, t.shape) for t in got], g.metadata[f"{a}.block_count"],
                            g.metadata.get(f"{a}.expert_count", 0))
    assert [t.name for t in want] == [t.name for t in got]          # llama-quantize's order
    types = {t.name: t.type_name for t in got}
    assert {t.name: t.ggml_type.name for t in want} == types       # every tensor's type
    base = got[0].offset
    assert [(t.offset, t.nbytes) for t in want] == [(t.offset - base, t.nbytes) for t in got]
    assert base % so.ALIGNMENT == 0
    assert g.file_size == base + so.data_size(want)


def test_agreement_cases_exercise_the_rules():
    """Which rules the cases above cover (by prediction; the test above ties it to llama.cpp)."""
    seen = set()
    for arch, preset, layers in AGREEMENT_CASES:
        s = mm.resolve_shape(arch, preset, layers)
        for t in so.q4_k_m_layout([(t.name, t.shape) for t in mm.tensor_plan(arch, s)],
                                  s.n_layer, s.p.n_expert):
            seen.add((so.category(t.name), t.ggml_type.name))
    for rule in [("attn_v", "Q6_K"), ("attn_v", "Q4_K"), ("attn_v", "Q8_0"),   # use_more_bits, E=8
                 ("attn_k", "Q8_0"), ("attn_output", "Q5_K"),                     # E=8
                 ("attn_kv_b", "Q8_0"), ("attn_kv_b", "Q5_0"),                    # Q6_K/Q4_K fallbacks
                 ("ffn_down", "Q6_K"), ("ffn_down", "Q4_K"), ("ffn_down", "Q8_0"),
                 ("token_embd", "Q6_K"), ("token_embd", "Q4_K"), ("output", "Q6_K"),
                 ("other", "Q5_0"), ("other", "F32"), ("ffn_gate", "F32")]:
        assert rule in seen, rule


def test_type_rules_by_hand():
    T = gguf.GGMLQuantizationType
    q = so.q4_k_m_type
    # fallbacks: Q4_K -> Q5_0, Q6_K -> Q8_0, then F16 for rows that are not whole 32-blocks
    assert q("blk.0.attn_k_b.weight", (128, 512, 128), 61, 256) == T.Q5_0
    assert q("blk.0.attn_v_b.weight", (128, 128, 512), 61, 256) == T.Q4_K
    assert q("blk.0.ffn_down_exps.weight", (8, 256, 128), 8, 16) == T.Q8_0      # layer 0: more bits
    assert q("blk.1.ffn_down_exps.weight", (8, 256, 128), 8, 16) == T.Q5_0
    assert q("blk.1.ffn_up_exps.weight", (8, 48, 48), 8, 16) == T.F16
    assert q("output.weight", (1000, 128), 8, 16) == T.Q8_0
    assert q("output.weight", (1000, 256), 8, 16) == T.Q6_K
    # kept in their converted type
    for name, shape in [("blk.3.ffn_gate_inp.weight", (256, 7168)), ("blk.3.exp_probs_b.bias", (256,)),
                        ("blk.0.attn_kv_a_norm.weight", (512,)), ("output_norm.weight", (7168,))]:
        assert q(name, shape, 61, 256) == T.F32, name
    # use_more_bits for R1's 61 layers: 0..6, 53..60, and every third from 9
    assert [i for i in range(61) if so.use_more_bits(i, 61)] == \
        list(range(7)) + list(range(9, 53, 3)) + list(range(53, 61))
    # n_expert == 8 exactly, not >= 8
    assert q("blk.0.attn_output.weight", (256, 256), 8, 8) == T.Q5_K
    assert q("blk.0.attn_output.weight", (256, 256), 8, 16) == T.Q4_K


# --- the real-model presets -------------------------------------------------------------------------

@pytest.mark.parametrize("preset", list(so.SHAPE_PRESETS))
def test_preset_file_is_sparse_real_sized_and_parses(written, preset):
    path, seconds = written(preset)
    lo, hi = SIZE_RANGES[preset]
    assert lo <= path.stat().st_size <= hi, path.stat().st_size / GB
    assert _on_disk(path) < MAX_ON_DISK
    assert seconds < MAX_WRITE_S
    g = GGUFFile(path)
    want = so.plan(preset)
    assert len(g.tensors) == len(want) == _tensor_count(preset)
    got = list(g)
    assert [(t.name, t.shape, t.type_name, t.nbytes) for t in got] == \
        [(t.name, t.shape, t.ggml_type.name, t.nbytes) for t in want]
    assert all(t.offset % so.ALIGNMENT == 0 for t in got)
    assert g.file_size == got[0].offset + so.data_size(want)
    assert g.metadata["general.file_type"] == so.FTYPE_Q4_K_M
    assert g.metadata["general.alignment"] == 32
    sp, s = so.resolve(preset)
    assert len(g.metadata["tokenizer.ggml.tokens"]) == sp.vocab
    cfg = config_from_gguf(g)
    p = sp.p
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_vocab, cfg.n_ctx_train) == \
        (sp.arch, p.n_layer, p.hidden, p.n_head, sp.vocab, p.context)
    assert (cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp) == (p.n_expert, p.n_expert_used, p.expert_ff)
    assert cfg.rope_base == p.rope_base and cfg.rms_eps == pytest.approx(p.rms_eps)
    assert not cfg.tied_embeddings
    g.close()


EXPECTED_COUNTS = {"deepseek-r1": 1086, "qwen3-235b-a22b": 1131, "qwen3-30b-a3b": 579}


@pytest.mark.parametrize("preset", list(so.SHAPE_PRESETS))
def test_tensor_counts_of_the_real_files(preset):
    """R1 with split attn_k_b/attn_v_b (1025 in files with the legacy attn_kv_b), Qwen3 as published."""
    assert _tensor_count(preset) == EXPECTED_COUNTS[preset]


def test_deepseek_r1_metadata_and_types(written):
    path, _ = written("deepseek-r1")
    g = GGUFFile(path)
    want = {
        "block_count": 61, "context_length": 163840, "embedding_length": 7168,
        "feed_forward_length": 18432, "expert_feed_forward_length": 2048, "expert_count": 256,
        "expert_used_count": 8, "expert_shared_count": 1, "leading_dense_block_count": 3,
        "vocab_size": 129280, "attention.head_count": 128, "attention.head_count_kv": 1,
        "attention.key_length": 576, "attention.value_length": 512,
        "attention.key_length_mla": 192, "attention.value_length_mla": 128,
        "attention.q_lora_rank": 1536, "attention.kv_lora_rank": 512,
        "rope.dimension_count": 64, "expert_gating_func": 2, "expert_weights_norm": True,
        "expert_group_count": 8, "expert_group_used_count": 4, "rope.scaling.type": "yarn",
        "rope.scaling.original_context_length": 4096,
    }
    for k, v in want.items():
        assert g.metadata[f"deepseek2.{k}"] == v, k
    approx = {"attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0,
              "expert_weights_scale": 2.5, "rope.scaling.factor": 40.0,
              "rope.scaling.yarn_log_multiplier": 0.1, "rope.scaling.yarn_beta_fast": 32.0,
              "rope.scaling.yarn_beta_slow": 1.0}
    for k, v in approx.items():
        assert g.metadata[f"deepseek2.{k}"] == pytest.approx(v), k
    assert g.metadata["general.name"] == "DeepSeek R1"
    cfg = config_from_gguf(g)
    m = cfg.mla
    assert (m.q_lora, m.kv_lora, m.qk_nope, m.qk_rope, m.v_head, m.split) == (1536, 512, 128, 64, 128, True)
    assert (cfg.n_layer_dense_lead, cfg.gating, cfg.n_expert_groups, cfg.n_group_used) == (3, "sigmoid", 8, 4)
    assert cfg.n_ff_shexp == 2048 and cfg.norm_topk and cfg.expert_weights_scale == 2.5
    t = {x.name: x for x in g}
    assert t["blk.0.attn_k_b.weight"].shape == (128, 512, 128)   # [H, C, N]
    assert t["blk.0.attn_k_b.weight"].type_name == "Q5_0"        # rows of N = 128: Q4_K falls back
    assert t["blk.0.attn_v_b.weight"].shape == (128, 128, 512)   # [H, Dv, C]
    assert t["blk.0.attn_v_b.weight"].type_name == "Q4_K"
    assert t["blk.3.ffn_gate_exps.weight"].shape == (256, 2048, 7168)
    assert t["blk.3.exp_probs_b.bias"].type_name == "F32"
    assert t["blk.3.ffn_gate_inp.weight"].type_name == "F32"
    assert "blk.2.ffn_gate_exps.weight" not in t and "blk.2.ffn_down.weight" in t
    assert (t["output.weight"].type_name, t["token_embd.weight"].type_name) == ("Q6_K", "Q4_K")
    downs = [t[f"blk.{i}.ffn_down_exps.weight"].type_name for i in range(3, 61)]
    assert downs.count("Q6_K") == 27 and downs.count("Q4_K") == 31
    g.close()


def test_inspect_runs_on_shape_only_files(written, capsys):
    from hetero_moe.cli import main
    for preset in ("deepseek-r1", "qwen3-30b-a3b"):
        path, _ = written(preset)
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert so.SHAPE_PRESETS[preset].title in out


# --- cache and command line -------------------------------------------------------------------------

def test_cached_helper_writes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_MOE_CACHE", str(tmp_path))
    path = so.shape_only_model("qwen3-30b-a3b")
    assert path.parent == tmp_path / "test-models"
    assert f"v{so.FORMAT_VERSION}" in path.name and "qwen3-30b-a3b" in path.name
    mtime = path.stat().st_mtime_ns
    assert so.shape_only_model("qwen3-30b-a3b") == path and path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]   # no temporaries


def test_command_line(tmp_path, capsys):
    out = tmp_path / "q.gguf"
    assert mm.main(["--preset", "qwen3-30b-a3b", "--shape-only", "--out", str(out)]) == 0
    assert out.stat().st_size == os.path.getsize(out) and _on_disk(out) < MAX_ON_DISK
    assert mm.main(["--arch", "qwen3moe", "--preset", "qwen3-30b-a3b", "--shape-only",
                    "--out", str(out)]) == 0
    for argv in (["--preset", "deepseek-r1", "--out", str(out)],                  # needs --shape-only
                 ["--preset", "tiny", "--shape-only", "--out", str(out)],         # not a real model
                 ["--arch", "qwen3moe", "--preset", "deepseek-r1", "--shape-only", "--out", str(out)],
                 ["--preset", "deepseek-r1", "--shape-only", "--layers", "2", "--out", str(out)],
                 ["--preset", "tiny", "--out", str(out)]):                        # --arch missing
        with pytest.raises(SystemExit):
            mm.main(argv)
    assert "--arch is required" in capsys.readouterr().err


def test_unknown_preset_names_the_choices():
    with pytest.raises(Exception, match="deepseek-r1, qwen3-235b-a22b, qwen3-30b-a3b"):
        so.resolve("kimi-k2")


def test_byte_shape_round_trips():
    for t in so.plan("qwen3-30b-a3b")[:20]:
        assert math.prod(t.byte_shape) == t.nbytes
