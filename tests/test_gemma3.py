"""Gemma-3-270M (`gemma3`, Q4_K_M, a real K-quant checkpoint) against llama.cpp on the same files.

F32 twin (llama.cpp's re-typing of the file): teacher-forced logits over 600 positions (past the
512-token sliding window) with median relative L2 error <= 0.5%, 98th percentile <= 2% and top-1
agreement >= 99% off near-ties; the same bar for decode steps (the fused C++ step) at positions
520..599, where the local layers must drop the oldest positions; greedy 32 tokens equal to
llama.cpp's for a plain, a chat and a 600-token prompt. Q4_K_M: our distance from the F32 result
within llama.cpp's own (mean <= 1.5x, 95th percentile <= 2x). Tokenizer: chat text with special
tokens; the chat template renders as llama.cpp's built-in "gemma" one. Tiny hand-made files: the SWA
pattern and base and YaRN as llama.cpp reads them; bad or unsupported variants fail with errors
naming the key or tensor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hetero_moe
from hetero_moe.errors import HeteroMoEError, MissingKeyError, MissingTensorError, UnsupportedError

from .reference import (LlamaRef, assert_same_greedy, compare_logits, llama_chat_render,
                        quantize_with_llama, rel_err)
from .test_api import N_GEN, TIE_MARGIN, llama_greedy
from .test_parity import TEXT

N_POS = 600              # > the 512-token sliding window
N_DECODE_FROM = 520      # decode steps from here to N_POS, past the window
MAX_MEDIAN = 0.005
MAX_P98 = 0.02
MIN_TOP1 = 0.99
SELF_MARGIN_MEAN = 1.5   # ours vs the F32 result: at most this x llama.cpp's own mean distance
SELF_MARGIN_P95 = 2.0    # ... and this x its 95th percentile
PROMPTS = {
    "plain": "The Eiffel Tower is located in Paris, the capital of France. It was built",
    "chat": [{"role": "user", "content": "Write a short poem about the sea."}],
}


@pytest.fixture(scope="module")
def files(llama_cpp):
    from hetero_moe.assets_gemma import gemma3_path
    try:
        q = str(gemma3_path())
    except HeteroMoEError as e:
        pytest.skip(f"model unavailable: {e}")
    return q, quantize_with_llama(q, q[:-len(".gguf")] + ".f32-twin.gguf", "ALL_F32")


@pytest.fixture(scope="module")
def ids(files):
    ref = LlamaRef(files[0], n_ctx=1024)
    out = ref.tokenize(TEXT * 3)[:N_POS]
    ref.close()
    assert len(out) == N_POS
    return out


@pytest.fixture(scope="module")
def f32_ref(files):
    ref = LlamaRef(files[1], n_ctx=1024)
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def exact(f32_ref, ids):
    """llama.cpp's logits on the F32 twin."""
    return f32_ref.logits(ids)


@pytest.fixture(scope="module")
def f32_model(files):
    return hetero_moe.load(files[1], threads=2, n_ctx=1024)


def _strict(ours: np.ndarray, want: np.ndarray, what: str) -> dict:
    err = rel_err(ours, want)
    stats = compare_logits(ours, want)
    stats.update(median_rel_err=float(np.median(err)), p98_rel_err=float(np.percentile(err, 98)))
    print(what, stats)
    assert stats["median_rel_err"] <= MAX_MEDIAN, stats
    assert stats["p98_rel_err"] <= MAX_P98, stats
    assert stats["decided"] >= 0.5 * len(want), f"too many near-ties to judge: {stats}"
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats
    return stats


def test_config_follows_llama_cpp(files):
    m = hetero_moe.load(files[0], threads=2, n_ctx=64)
    c = m.config
    assert (c.arch, c.n_layer, c.swa_window, c.rope_base, c.rope_base_swa) == \
        ("gemma3", 18, 512, 1e6, 1e4)
    assert [i for i, local in enumerate(c.swa_layers) if not local] == [5, 11, 17]
    assert c.attn_scale == 1 / 16 and c.tied_embeddings and c.final_softcap == 0
    assert abs(c.embd_scale - 640 ** 0.5) < 1e-5
    # norms are stored with Gemma's "1 +" already added by llama.cpp's converter
    assert float(m.net.blocks[0].attn_norm.mean()) > 1.0
    assert [b.attn.window for b in m.net.blocks].count(512) == 15
    assert m.net.blocks[0].attn.rope is m.net.rope_swa and m.net.blocks[5].attn.rope is m.net.rope


@pytest.mark.llama
def test_f32_twin_teacher_forced(f32_model, ids, exact):
    _strict(f32_model.logits(ids).numpy(), exact, "gemma3 F32 twin, prompt")


def _decode_rows(m, ids: list[int]) -> np.ndarray:
    """Logits of positions N_DECODE_FROM.. as decode steps, one token at a time."""
    m.eval(ids[:N_DECODE_FROM], 0)
    return np.stack([m.eval([t], j)[0].numpy() for j, t in enumerate(ids[N_DECODE_FROM:],
                                                                      N_DECODE_FROM)])


@pytest.mark.llama
def test_f32_twin_decode_past_the_window(f32_model, ids, exact):
    """Decode steps at positions 520..599 (the per-op path: an F32 lm_head is a torch matmul, which
    the fused step does not take): the local layers read only their last 512 positions."""
    _strict(_decode_rows(f32_model, ids), exact[N_DECODE_FROM:],
            "gemma3 F32 twin, decode past the window")


def _within_llama_noise(ours: np.ndarray, want: np.ndarray, exact: np.ndarray, what: str) -> None:
    """Ours within llama.cpp's own quantization distance (want: llama.cpp on the quantized file,
    exact: on its F32 twin), both measured from the exact result and from llama.cpp's."""
    noise = rel_err(want, exact)
    ours_f32, ours_q = rel_err(ours, exact), rel_err(ours, want)
    stats = compare_logits(ours, want)
    stats.update(llama_q_vs_f32_mean=float(noise.mean()), llama_q_vs_f32_p95=float(np.percentile(noise, 95)),
                 ours_vs_f32_mean=float(ours_f32.mean()), ours_vs_f32_p95=float(np.percentile(ours_f32, 95)),
                 ours_vs_llama_q_mean=float(ours_q.mean()), ours_vs_llama_q_p95=float(np.percentile(ours_q, 95)))
    print(what, stats)
    for d in (ours_f32, ours_q):
        assert d.mean() <= SELF_MARGIN_MEAN * noise.mean(), stats
        assert np.percentile(d, 95) <= SELF_MARGIN_P95 * np.percentile(noise, 95), stats
    assert stats["decided"] >= 0.5 * len(ours), stats
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats


@pytest.mark.llama
def test_q4_k_m_within_llama_cpp_noise(files, ids, exact):
    from hetero_moe.runtime.fused_decode import FusedDecode
    ref = LlamaRef(files[0], n_ctx=1024)
    want = ref.logits(ids)
    ref.close()
    m = hetero_moe.load(files[0], threads=2, n_ctx=1024)
    _within_llama_noise(m.logits(ids).numpy(), want, exact, "gemma3 Q4_K_M, prompt")
    # decode steps past the window through the fused C++ step
    decode = _decode_rows(m, ids)
    assert isinstance(m.net.fused, FusedDecode), m.net.fused_reason
    _within_llama_noise(decode, want[N_DECODE_FROM:], exact[N_DECODE_FROM:],
                        "gemma3 Q4_K_M, fused decode past the window")


@pytest.mark.llama
@pytest.mark.parametrize("prompt", [*PROMPTS, "long"])
def test_f32_twin_greedy(files, f32_model, prompt, request):
    """32 greedy tokens as llama.cpp's; "long": the 600-token test text, so that the prompt and
    every generated token run past the 512-token sliding window."""
    m = f32_model
    if prompt == "long":
        ids = request.getfixturevalue("ids")
        assert len(ids) > m.config.swa_window
    else:
        p = PROMPTS[prompt]
        ids = m.chat_ids(p) if isinstance(p, list) else m.tokenize(p)
    got = m.generate(ids, max_tokens=N_GEN, temperature=0).tokens
    want, rows = llama_greedy(files[1], ids, m.tokenizer.eog_ids, n_ctx=1024)
    print(prompt, "\nours ", got, "\nllama", want)
    assert_same_greedy(got, want, rows, m.tokenizer.eog_ids, f"gemma3 F32 {prompt}", N_GEN,
                       TIE_MARGIN)


@pytest.mark.llama
def test_tokenizer_chat_text_with_special_tokens(files):
    m = hetero_moe.load(files[0], threads=2, n_ctx=64)
    ref = LlamaRef(files[0], n_ctx=64)
    msgs = [{"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello! <b>bold</b> 1,234 and émigré"},
            {"role": "assistant", "content": "Bonjour !"},
            {"role": "user", "content": "Et maintenant?\n\n  Des espaces."}]
    text = m.tokenizer.decode(m.chat_ids(msgs))
    assert text.startswith("<bos><start_of_turn>user\nAnswer in French.\n\nHello!")
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert m.chat_ids(msgs) == ref.tokenize(text[len("<bos>"):], add_bos=True, special=True)
    for t in (text, text[len("<bos>"):], "<start_of_turn>user\n<end_of_turn><eos><pad>x"):
        for special in (True, False):
            assert m.tokenizer.encode(t, add_special=True, parse_special=special) == \
                ref.tokenize(t, add_bos=True, special=special), (t, special)
    end_of_turn = ref.tokenize("<end_of_turn>", add_bos=False, special=True)
    assert len(end_of_turn) == 1 and end_of_turn[0] in m.tokenizer.eog_ids


CHATS = {
    "user": [{"role": "user", "content": "Hi"}],
    "system spaces": [{"role": "system", "content": "  Be brief.  "},
                      {"role": "user", "content": "Hi"}],
    "system user assistant user": [{"role": "system", "content": "Answer in French."},
                                   {"role": "user", "content": "Hello!"},
                                   {"role": "assistant", "content": " Bonjour ! "},
                                   {"role": "user", "content": "Et maintenant?"}],
    "system assistant user": [{"role": "system", "content": "Be brief."},
                              {"role": "assistant", "content": "How can I help?"},
                              {"role": "user", "content": "Say hi."}],
    # two system messages; C isspace() is trimmed, NBSP/ideographic space/\x1c/\x85 are not
    "whitespace": [{"role": "system", "content": "\t\x0b\x0c\r\n S1 \xa0"},
                   {"role": "system", "content": "   "}, {"role": "system", "content": " S2\n"},
                   {"role": "user", "content": "\u3000U\x1c \x85"}],
}


@pytest.mark.llama
def test_chat_template_matches_llama_cpp(files):
    """The real file has no Jinja template; its chat is llama.cpp's built-in "gemma" handler
    (llama_chat_apply_template by name): the same text, with and without the generation prompt,
    and the same prompt ids (the BOS added by the tokenizer, not written in the text)."""
    m = hetero_moe.load(files[0], threads=2, n_ctx=64)
    ref = LlamaRef(files[0], n_ctx=64)
    assert m.gguf.get("tokenizer.chat_template") is None
    assert "tokenizer.chat_template" not in ref.llm.metadata
    from hetero_moe.chat import render_chat
    for name, msgs in CHATS.items():
        for gen in (True, False):
            want = llama_chat_render(msgs, gen, b"gemma")
            assert render_chat(m.chat_template, msgs, add_generation_prompt=gen) == want, \
                (name, gen)
            assert m.chat_ids(msgs, add_generation_prompt=gen) == \
                ref.tokenize(want, add_bos=True, special=True), (name, gen)
    ref.close()


# -- bad and unsupported variants (tiny hand-made files) ---------------------------------------

D, H, DH, FF, V, L = 64, 2, 32, 128, 64, 4


def _write(path, meta: dict | None = None, drop: tuple = (), vocab: bool = False) -> str:
    """A tiny random gemma3 GGUF (F16 matrices, F32 norms); `meta` adds/overrides gemma3.* keys
    (None drops one); `vocab`: a minimal SentencePiece vocabulary, so that llama.cpp loads it."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "gemma3")
    if vocab:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(V - 3)])
        w.add_token_scores([0.0] * V)
        w.add_token_types([2, 3, 3] + [1] * (V - 3))
    keys = {"context_length": 256, "embedding_length": D, "block_count": L,
            "feed_forward_length": FF, "attention.head_count": H, "attention.head_count_kv": 1,
            "attention.key_length": DH, "attention.value_length": DH,
            "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e6,
            "attention.sliding_window": 4, "attention.sliding_window_pattern": 2}
    keys.update(meta or {})
    for k, v in keys.items():
        if v is None:
            continue
        if isinstance(v, list):
            w.add_array(f"gemma3.{k}", v)
        elif isinstance(v, str):
            w.add_string(f"gemma3.{k}", v)
        elif isinstance(v, float):
            w.add_float32(f"gemma3.{k}", v)
        else:
            w.add_uint32(f"gemma3.{k}", v)
    w.add_vocab_size(V)

    def mat(*shape):   # F16: a type with C++ kernels, so the fused decode step runs
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float16)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    t = {"token_embd.weight": mat(V, D), "output_norm.weight": norm(D)}
    for i in range(L):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": norm(D), p + "attn_q.weight": mat(H * DH, D),
                  p + "attn_k.weight": mat(DH, D), p + "attn_v.weight": mat(DH, D),
                  p + "attn_output.weight": mat(D, H * DH), p + "attn_q_norm.weight": norm(DH),
                  p + "attn_k_norm.weight": norm(DH), p + "post_attention_norm.weight": norm(D),
                  p + "ffn_norm.weight": norm(D), p + "ffn_gate.weight": mat(FF, D),
                  p + "ffn_up.weight": mat(FF, D), p + "ffn_down.weight": mat(D, FF),
                  p + "post_ffw_norm.weight": norm(D)})
    for name, arr in t.items():
        if name not in drop:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("meta,drop,error,match", [
    ({"attention.sliding_window": None}, (), MissingKeyError, "gemma3.final_logit_softcapping"),
    ({"attention.sliding_window_pattern": [True, False, True]}, (), UnsupportedError,
     "gemma3.attention.sliding_window_pattern.*4 booleans"),
    ({"attention.sliding_window_pattern": "6"}, (), UnsupportedError,
     "gemma3.attention.sliding_window_pattern.*layer period"),
    ({"expert_count": 4}, (), UnsupportedError, "gemma3.expert_count"),
    ({"rope.scaling.type": "longrope"}, (), UnsupportedError, "rope scaling 'longrope'"),
    ({"rope.scaling.type": "yarn"}, (), MissingKeyError, r"gemma3.rope.scaling.factor = 0.0"),
    ({"attention.value_length": 16}, (), UnsupportedError, "value_length 16"),
    ({}, ("blk.2.post_ffw_norm.weight",), MissingTensorError, "blk.2.post_ffw_norm.weight"),
    ({}, ("blk.0.attn_q_norm.weight",), MissingTensorError, "blk.0.attn_q_norm.weight"),
])
def test_bad_variants_fail_naming_the_key_or_tensor(tmp_path, meta, drop, error, match):
    path = _write(tmp_path / "bad.gguf", meta, drop)
    with pytest.raises(error, match=match):
        hetero_moe.load(path, threads=2, n_ctx=64)


def test_tiny_window_prompt_decode_and_torch_agree(tmp_path):
    """A 4-position window over 40 positions: the C++ prompt kernel, the torch kernels and the
    fused decode step (and the per-op decode path) give the same logits; the window matters."""
    path = _write(tmp_path / "tiny.gguf")
    ids = np.random.default_rng(1).integers(0, V, size=40).tolist()
    m = hetero_moe.load(path, threads=2, n_ctx=64)
    prompt = m.logits(ids).numpy()
    m.eval(ids[:20], 0)
    decode = np.stack([m.eval([t], j)[0].numpy() for j, t in enumerate(ids[20:], 20)])
    assert m.net.fused, m.net.fused_reason
    np.testing.assert_allclose(decode, prompt[20:], rtol=2e-4, atol=2e-4)
    m.net.fused = False                                  # the per-op decode path
    m.eval(ids[:20], 0)
    per_op = np.stack([m.eval([t], j)[0].numpy() for j, t in enumerate(ids[20:], 20)])
    np.testing.assert_allclose(per_op, prompt[20:], rtol=2e-4, atol=2e-4)
    # torch's kernels keep float activations where the C++ F16 kernel rounds them to f16
    torch_k = hetero_moe.load(path, threads=2, n_ctx=64, cpu_kernels="torch").logits(ids).numpy()
    assert rel_err(torch_k, prompt).max() <= 5e-3
    for b in m.net.blocks:
        b.attn.window = 0
    assert rel_err(m.logits(ids).numpy(), prompt)[8:].min() > 5e-2      # the window matters
    with pytest.raises(UnsupportedError, match="sliding-window"):
        m.generate(ids[:4], max_tokens=2, sparse_attn="approx")


@pytest.mark.llama
@pytest.mark.parametrize("meta,local", [
    ({"attention.sliding_window_pattern": 2, "rope.freq_base_swa": 5000.0},
     (True, False, True, False)),
    ({"attention.sliding_window_pattern": 3}, (True, True, False, True)),
    ({"attention.sliding_window_pattern": 0, "rope.freq_base_swa": 20000.0}, (True,) * 4),
    ({"attention.sliding_window_pattern": [False, False, True, True]}, (False, False, True, True)),
    # YaRN (with its factor) on the global layers only; the file's pattern is 2
    ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
      "rope.scaling.original_context_length": 8}, (True, False, True, False)),
])
def test_tiny_keys_as_llama_cpp_reads_them(tmp_path, llama_cpp, meta, local):
    """llama.cpp reads `attention.sliding_window_pattern` (a period or one boolean per layer) and
    `rope.freq_base_swa` for gemma3, it does not hard-code 6 and 10000: a tiny file with other
    values (a 4-position window over 24 positions) gives llama.cpp's logits, which the defaults
    would miss by ten times the bar. Likewise YaRN, on the global layers only (the same file read
    without the scaling: median 17% off)."""
    path = _write(tmp_path / "swa.gguf", meta, vocab=True)
    ids = np.random.default_rng(2).integers(3, V, size=24).tolist()
    ref = LlamaRef(path, n_ctx=64)
    want = ref.logits(ids)
    ref.close()
    m = hetero_moe.load(path, threads=2, n_ctx=64)
    assert m.config.swa_layers == local
    assert m.config.rope_base_swa == meta.get("rope.freq_base_swa", 1e4)
    err = rel_err(m.logits(ids).numpy(), want)
    print(meta, "median / max rel err", np.median(err), err.max())
    # measured: median <= 0.09%, max <= 0.22% (llama.cpp's f16 KV cache); the file read with the
    # default pattern or base instead: median >= 1.3%, max >= 3.3%
    assert np.median(err) <= 2e-3 and err.max() <= 5e-3, err
