"""The Python API: generation vs llama.cpp, streaming, sampling options, errors."""
from __future__ import annotations

import numpy as np
import pytest

import hetero_moe
from hetero_moe.errors import ContextLengthError
from hetero_moe.sampling import SamplingParamError, SamplingParams

from .conftest import tiny_model
from .reference import LlamaRef, assert_same_greedy

N_GEN = 32
TIE_MARGIN = 0.75   # greedy runs may part only where llama.cpp prefers its pick by <= this
PROMPT_SEED = {("llama", "tiny"): 7, ("llama-moe", "tiny"): 230,   # seeds other than 1 (below)
               ("qwen2moe", "tiny"): 52}
PROMPTS = ["The quick brown fox jumps over the lazy dog. Once upon a time,",
           "<|im_start|>user\nName three prime numbers.<|im_end|>\n<|im_start|>assistant\n"]


def llama_greedy(path: str, ids: list[int], eog: frozenset, n: int = N_GEN, n_ctx: int = 512):
    """llama.cpp's greedy continuation and the logits rows that chose each token (n_ctx: its
    context, which must hold the prompt and the n tokens)."""
    if len(ids) + n > n_ctx:
        raise ValueError(f"llama_greedy: {len(ids)} prompt + {n} generated tokens exceed "
                         f"n_ctx={n_ctx}")
    ref = LlamaRef(path, n_ctx=n_ctx)
    llm = ref.llm
    llm.reset()
    llm.eval(ids)
    out, rows = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        rows.append(row)
        t = int(row.argmax())
        if t in eog:
            break
        out.append(t)
        llm.eval([t])
    ref.close()
    return out, rows


@pytest.fixture(scope="module")
def smol(smollm2):
    return hetero_moe.load(smollm2, threads=2, n_ctx=512)


@pytest.mark.llama
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_matches_llama_cpp(smol, smollm2, prompt, llama_cpp):
    ids = smol.tokenize(prompt)
    got = smol.generate(ids, max_tokens=N_GEN, temperature=0)
    want, rows = llama_greedy(smollm2, ids, smol.tokenizer.eog_ids)
    print("ours ", got.tokens, "\nllama", want)
    assert_same_greedy(got.tokens, want, rows, smol.tokenizer.eog_ids, "SmolLM2", N_GEN, TIE_MARGIN)


@pytest.mark.llama
@pytest.mark.parametrize("arch,preset", [("llama", "tiny"), ("llama", "tiny-tied"),
                                         ("llama-moe", "tiny"), ("qwen3moe", "tiny"),
                                         ("qwen2moe", "tiny"), ("olmoe", "tiny")])
def test_tiny_greedy_matches_llama_cpp(arch, preset, llama_cpp):
    path = tiny_model(arch, preset=preset)
    m = hetero_moe.load(path, threads=2, n_ctx=512)
    # random weights leave near-ties everywhere: a prompt whose first 16 tokens are decided
    # (llama tiny parts at a near-tie at token 0 with seed 1; llama-moe tiny's llama.cpp run has
    # a 0.078-logit margin at token 0 with seed 1, and among seeds 1-300 seed 230's smallest
    # margin over 16 tokens is the largest, 0.69 logits: above 3 sqrt(2) x 0.086, the median
    # per-logit RMS difference between our logits and llama.cpp's on this file; qwen2moe tiny's
    # llama.cpp run has a 0.043-logit margin at token 9 with seed 1, which float summation order
    # decides (the repacked layouts part there, the file's blocks did not), and among seeds
    # 1-120 seed 52's smallest margin over 16 tokens is the largest, 0.56 logits)
    seed = PROMPT_SEED.get((arch, preset), 1)
    ids = np.random.default_rng(seed).integers(3, 49152, size=16).tolist()
    got = m.generate(ids, max_tokens=N_GEN, temperature=0)
    want, rows = llama_greedy(path, ids, m.tokenizer.eog_ids)
    assert_same_greedy(got.tokens, want, rows, m.tokenizer.eog_ids, f"{arch} {preset}", N_GEN,
                       TIE_MARGIN)


def test_stream_equals_generate(smol):
    prompt = "Write a haiku about the sea:"
    full = smol.generate(prompt, max_tokens=24, temperature=0.7, seed=3)
    pieces = list(smol.stream(prompt, max_tokens=24, temperature=0.7, seed=3))
    assert "".join(pieces) == full.text
    assert smol.last_completion.tokens == full.tokens
    t = full.timings
    assert t.prompt_tokens > 0 and t.generated_tokens == len(full.tokens)
    assert t.prefill_tps > 0 and t.decode_tps > 0


def test_seed_determinism(smol):
    a = smol.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=42)
    b = smol.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=42)
    c = smol.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=43)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_max_tokens_and_finish_reason(smol):
    out = smol.generate("1, 2, 3, 4,", max_tokens=5, temperature=0)
    assert len(out.tokens) == 5 and out.finish_reason == "length"


def test_stop_sequence(smol):
    base = smol.generate("1, 2, 3, 4,", max_tokens=20, temperature=0)
    assert " 7" in base.text, base.text
    out = smol.generate("1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert out.finish_reason == "stop"
    assert out.text == base.text[:base.text.index(" 7")]


def test_logprobs_and_echo(smol):
    prompt = "The capital of France is"
    out = smol.generate(prompt, max_tokens=4, temperature=0, logprobs=3, echo=True)
    assert out.text.startswith(prompt)
    assert len(out.logprobs) == len(out.tokens) == 4
    for lp in out.logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]
        assert lp.token == lp.top[0][0]                      # greedy picks the top token
        assert abs(lp.logprob - lp.top[0][2]) < 1e-5
    ids = smol.tokenize(prompt)
    assert [p.token for p in out.prompt_logprobs] == ids
    assert out.prompt_logprobs[0].logprob is None
    # echo logprobs equal log_softmax of the teacher-forced logits
    rows = smol.logits(ids)
    lsm = rows.log_softmax(-1)
    for i in range(1, len(ids)):
        assert abs(out.prompt_logprobs[i].logprob - float(lsm[i - 1, ids[i]])) < 1e-4


def test_chat(smol):
    out = smol.chat([{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
    assert out.text.strip() and out.finish_reason in ("stop", "length")
    pieces = list(smol.chat([{"role": "user", "content": "Hi"}], stream=True, max_tokens=4,
                            temperature=0))
    assert "".join(pieces) == smol.last_completion.text


def test_tokenize_detokenize_roundtrip(smol):
    text = "Hello, wörld! 🌍 12345"
    ids = smol.tokenize(text, add_special=False)
    assert smol.detokenize(ids) == text


def test_errors(smol):
    with pytest.raises(SamplingParamError, match="temperature"):
        smol.generate("x", temperature=-1)
    with pytest.raises(SamplingParamError, match="top_p"):
        smol.generate("x", top_p=0)
    with pytest.raises(TypeError):
        smol.generate("x", params=SamplingParams(), temperature=0)
    with pytest.raises(ValueError, match="empty"):
        smol.generate([])
    with pytest.raises(ContextLengthError, match="context window"):
        smol.generate(list(range(10, 600)), max_tokens=1)


@pytest.mark.llama
def test_cache_type(llama_cpp):
    """The KV cache's element type: f16 by default where the C++ kernels read it, f32 on the
    torch path, as asked otherwise. f16 halves the bytes per position; llama.cpp keeps its cache
    in f16 too, and our logits on an f16 cache are no farther from llama.cpp's than on an f32 one
    (on these random weights one rounding that moves an int8 activation step costs ~1% of a
    position's logits, so the two caches differ by about that much). Bad values are refused."""
    import torch
    from hetero_moe import cpu_backend
    from .reference import rel_err
    path = tiny_model("qwen3moe")
    default = hetero_moe.load(path, threads=2, n_ctx=64)
    f32 = hetero_moe.load(path, threads=2, n_ctx=64, cache_type="f32")
    want = torch.float16 if cpu_backend.available() else torch.float32
    assert default.net.cache.layers[0].k_store.dtype == want
    assert f32.net.cache.layers[0].k_store.dtype == torch.float32
    assert hetero_moe.load(path, threads=2, n_ctx=64, cpu_kernels="torch") \
        .net.cache.layers[0].k_store.dtype == torch.float32
    f16 = hetero_moe.load(path, threads=2, n_ctx=64, cache_type="f16")
    assert f16.net.cache.layers[0].v_store.dtype == torch.float16
    assert 2 * f16.net.cache.bytes_per_token() == f32.net.cache.bytes_per_token()
    ids = np.random.default_rng(3).integers(3, 49152, size=40).tolist()
    ref = LlamaRef(str(path), n_ctx=64).logits(ids)
    e16, e32 = rel_err(f16.logits(ids).numpy(), ref), rel_err(f32.logits(ids).numpy(), ref)
    print("mean relative error vs llama.cpp: f16 cache", e16.mean(), "f32 cache", e32.mean())
    assert e16.mean() <= 1.1 * e32.mean(), (e16.mean(), e32.mean())
    with pytest.raises(ValueError, match="cache_type"):
        hetero_moe.load(path, threads=2, n_ctx=64, cache_type="bf16")
