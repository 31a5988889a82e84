"""The whole-model C++ decode step (runtime/fused_decode.py, csrc/decode.cpp) against the per-op
path it replaces: same logits and the same KV-cache rows, for every architecture shape it covers
(q/k norms per head and over all heads, q/k/v biases, dense FFN, MoE with and without a gated shared
expert), plus the cases it must hand back to the per-op path and its argument checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hetero_moe
from hetero_moe.errors import ContextLengthError
from hetero_moe.runtime import fused_decode

from .conftest import tiny_model

ARCHS = ["llama", "qwen3moe", "qwen2moe", "olmoe", "llama-moe"]


def _ids(n, vocab, seed=0):
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _step(m, prompt, tok, fused):
    """Prefill `prompt`, then one decode step of `tok` on the chosen path -> (logits [V], the
    step's cache rows per layer)."""
    m.net.fused = None if fused else False
    m.eval(prompt, 0)
    logits = m.eval([tok], len(prompt))[-1].clone()
    p = len(prompt)
    rows = [(c.k[p].clone(), c.v[p].clone()) for c in m.net.cache.layers]
    return logits, rows


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cache,repack", [("f32", "off"), ("f32", "on"), ("f16", "off")])
def test_fused_step_equals_per_op_path(llama_cpp, arch, cache, repack):
    """On the file's blocks and on the 16-row layouts (repack="on"; with a float32 cache both
    paths agree to ~1e-7 on every architecture here). With an f16 cache a last-bit difference of a
    key or value between the paths can flip its rounding by one f16 step (2^-11 relative), and a
    routing near-tie can turn a last-bit difference into another expert: the rows agree to that
    step, and the logits of the step that reads them to 5e-3 of their largest (measured up to
    1.6e-3 on the file's blocks; the 16-row layouts' summation order meets such a tie on qwen3moe
    tiny, 8.4e-3, so the f16 case keeps the file's blocks)."""
    m = hetero_moe.load(tiny_model(arch), threads=2, n_ctx=128, cache_type=cache, repack=repack)
    assert m.net.cache.layers[0].k_store.dtype == {"f32": torch.float32, "f16": torch.float16}[cache]
    tol = 1e-3 if cache == "f32" else 5e-3
    row_tol = 1e-4 if cache == "f32" else 1e-3
    V = m.config.n_vocab
    for seed, n in ((0, 1), (1, 17), (2, 90)):
        ids = _ids(n + 1, V, seed)
        got, got_rows = _step(m, ids[:-1], ids[-1], fused=True)
        assert isinstance(m.net.fused, fused_decode.FusedDecode), m.net.fused_reason
        want, want_rows = _step(m, ids[:-1], ids[-1], fused=False)
        assert m.net.fused is False
        # same kernels and math; only float summation order differs (norms, router, softmax)
        torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=0)
        assert int(got.argmax()) == int(want.argmax())
        for (gk, gv), (wk, wv) in zip(got_rows, want_rows):
            torch.testing.assert_close(gk.float(), wk.float(), atol=row_tol, rtol=row_tol)
            torch.testing.assert_close(gv.float(), wv.float(), atol=row_tol, rtol=row_tol)


def test_fused_generation_matches_per_op_greedy(llama_cpp):
    m = hetero_moe.load(tiny_model("qwen3moe"), threads=2, n_ctx=128)
    ids = _ids(12, m.config.n_vocab, 5)
    m.net.fused = None
    a = m.generate(ids, max_tokens=24, temperature=0)
    assert isinstance(m.net.fused, fused_decode.FusedDecode)
    m.net.fused = False
    b = m.generate(ids, max_tokens=24, temperature=0)
    assert a.tokens == b.tokens


def test_fused_step_hands_back(llama_cpp, monkeypatch):
    """Sparse attention that applies, routing-margin logging and the environment switch take the
    per-op path."""
    from hetero_moe.layers.sparse_attn import SparseAttnConfig
    m = hetero_moe.load(tiny_model("qwen3moe"), threads=2, n_ctx=128)
    ids = _ids(40, m.config.n_vocab, 3)
    calls = []
    real, real_tok = fused_decode.FusedDecode.step, fused_decode.FusedDecode.token_step
    monkeypatch.setattr(fused_decode.FusedDecode, "step",
                        lambda self, x, pos: calls.append(pos) or real(self, x, pos))
    monkeypatch.setattr(fused_decode.FusedDecode, "token_step",     # eval's one-token path
                        lambda self, tok, pos: calls.append(pos) or real_tok(self, tok, pos))
    m.eval(ids[:-1], 0)
    m.eval(ids[-1:], len(ids) - 1)
    assert calls == [len(ids) - 1]
    sp = SparseAttnConfig(mode="approx", min_len=8, sel_block=16, top_n=2, n_local=1, window=8)
    m.eval(ids[-1:], len(ids) - 1, sparse_attn=sp)                  # sparse applies: per-op
    m.eval(ids[-1:], len(ids) - 1, sparse_attn=sp.with_(min_len=64))   # below min_len: fused
    assert calls == [len(ids) - 1] * 2
    moe = m.net.blocks[0].ffn
    moe.margin_log = []
    m.eval(ids[-1:], len(ids) - 1)
    assert len(calls) == 2 and len(moe.margin_log) == 1
    moe.margin_log = None

    monkeypatch.setenv("HETERO_MOE_FUSED_DECODE", "0")
    off = hetero_moe.load(tiny_model("qwen3moe"), threads=2, n_ctx=128)
    off.eval(ids, 0)
    off.eval([5], len(ids))
    assert off.net.fused is False and "HETERO_MOE_FUSED_DECODE" in off.net.fused_reason
    monkeypatch.delenv("HETERO_MOE_FUSED_DECODE")

    ds = hetero_moe.load(tiny_model("deepseek2", preset="tiny-lite"), threads=2, n_ctx=64)
    ds.eval([5, 6, 7], 0)
    ds.eval([8], 3)                                  # latent attention is covered (test_fused_mla)
    assert isinstance(ds.net.fused, fused_decode.FusedDecode), ds.net.fused_reason


def test_fused_step_cache_checks(llama_cpp):
    m = hetero_moe.load(tiny_model("qwen3moe"), threads=2, n_ctx=16)
    ids = _ids(16, m.config.n_vocab)
    m.eval(ids[:15], 0)
    m.eval(ids[15:], 15)                                   # the last position fits
    assert isinstance(m.net.fused, fused_decode.FusedDecode)
    with pytest.raises(ContextLengthError, match="context length 16"):
        m.net.forward(torch.tensor([5]), 16)
    m.net.cache.reset(4)
    with pytest.raises(ValueError, match="cannot write at 9"):
        m.net.forward(torch.tensor([5]), 9)


def test_decode_plan_rejects_bad_descriptions(llama_cpp):
    m = hetero_moe.load(tiny_model("qwen3moe"), threads=2, n_ctx=32)
    m.eval([5, 6], 0)
    m.eval([7], 2)
    f = m.net.fused
    lib = f._lib
    ints, floats = f._ints.copy(), f._floats
    with pytest.raises(ValueError, match="description ends"):
        lib.decode_plan(ints[:40], floats)
    with pytest.raises(ValueError, match="left over"):
        lib.decode_plan(np.concatenate([ints, [0]]), floats)
    bad = ints.copy()
    bad[22 + 1] -= 4                                     # rope_cos byte length (after 22 header ints)
    with pytest.raises(ValueError, match="rope_cos has"):
        lib.decode_plan(bad, floats)
    bad = ints.copy()
    bad[1] = 0                                           # D
    with pytest.raises(ValueError, match="D = 0"):
        lib.decode_plan(bad, floats)
    with pytest.raises(ValueError, match="3 floats"):
        lib.decode_plan(ints, floats[:2])
    D, V = m.config.n_embd, m.config.n_vocab
    x, logits = np.zeros(D, np.float32), np.zeros(V, np.float32)
    with pytest.raises(ValueError, match="outside the context"):
        lib.decode_step(f.plan, x, 32, logits)
    with pytest.raises(ValueError, match="x has"):
        lib.decode_step(f.plan, np.zeros(D - 1, np.float32), 0, logits)
    with pytest.raises(ValueError, match="logits has"):
        lib.decode_step(f.plan, x, 0, np.zeros(V + 1, np.float32))


@pytest.mark.parametrize("arch", ARCHS)
def test_token_step_equals_step_of_the_embedded_row(llama_cpp, arch):
    """eval's one-token path reads and dequantizes the embedding row in C++ (decode_token): the
    same logits, bit for bit, and the same cache rows as step() of the row embedded in Python."""
    m = hetero_moe.load(tiny_model(arch), threads=2, n_ctx=64)
    net, ids = m.net, _ids(9, m.config.n_vocab, 4)
    m.eval(ids[:8], 0)
    got = m.eval(ids[8:], 8)[-1].clone()
    assert net.fused._emb_src is not None, "the tiny models' tables are file rows"
    rows = [(c.k[8].clone(), c.v[8].clone()) for c in net.cache.layers]
    assert all(c.length == 9 for c in net.cache.layers) and net.cache.pos == 9
    m.eval(ids[:8], 0)
    net.cache.reset(8)
    want = net.fused.step(net._embed(torch.tensor(ids[8:])).float().clone(), 8)[-1]
    assert torch.equal(got, want)
    for (gk, gv), c in zip(rows, net.cache.layers):
        assert torch.equal(gk, c.k[8]) and torch.equal(gv, c.v[8])


def test_decode_token_rejects_bad_arguments(llama_cpp, tmp_path):
    m = hetero_moe.load(tiny_model("qwen3moe"), threads=2, n_ctx=32)
    m.eval([5, 6], 0)
    m.eval([7], 2)
    f, lib, V = m.net.fused, m.net.fused._lib, m.config.n_vocab
    fd, off, n, typ, scale = f._emb_src
    lg = np.zeros(V, np.float32)
    lib.decode_token(f.plan, fd, off, n, typ, scale, 7, 3, lg)              # fine
    with pytest.raises(ValueError, match=f"token id {V} is out of range"):
        lib.decode_token(f.plan, fd, off, n, typ, scale, V, 3, lg)
    with pytest.raises(ValueError, match="token id -1"):
        lib.decode_token(f.plan, fd, off, n, typ, scale, -1, 3, lg)
    with pytest.raises(ValueError, match="outside the context"):
        lib.decode_token(f.plan, fd, off, n, typ, scale, 7, 32, lg)
    with pytest.raises(ValueError, match="ggml_type 9999"):
        lib.decode_token(f.plan, fd, off, n, 9999, scale, 7, 3, lg)
    with pytest.raises(ValueError, match="logits has"):
        lib.decode_token(f.plan, fd, off, n, typ, scale, 7, 3, np.zeros(V - 1, np.float32))
    with pytest.raises(OSError):                                             # not an open file
        lib.decode_token(f.plan, 987654, off, n, typ, scale, 7, 3, lg)
    small = tmp_path / "short.bin"                                           # the row lies past its end
    small.write_bytes(b"\0" * 100)
    with open(small, "rb") as fh:
        with pytest.raises(OSError, match="short read of embedding row 7"):
            lib.decode_token(f.plan, fh.fileno(), 0, n, typ, scale, 7, 3, lg)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_steps_batch_equals_each_alone(llama_cpp, arch, monkeypatch):
    """decode_steps: B sequences of different lengths, each in its own cache, in one C++ call.
    Each row equals that sequence's single fused step (the GEMM tiles of several rows sum in
    another order than the one-row GEMV: float rounding), and each cache gets the same rows."""
    m = hetero_moe.load(tiny_model(arch), threads=2, n_ctx=128)
    net, V = m.net, m.config.n_vocab
    calls = []
    real = fused_decode.FusedDecode.steps
    monkeypatch.setattr(fused_decode.FusedDecode, "steps",
                        lambda self, x, p, c: calls.append(len(p)) or real(self, x, p, c))
    prompts = [_ids(n, V, seed) for seed, n in ((0, 3), (1, 17), (2, 60), (3, 9))]
    toks = [11, 12, 13, 14]
    batch = [net.new_cache() for _ in prompts]
    solo = [net.new_cache() for _ in prompts]
    for ids, b, s in zip(prompts, batch, solo):
        net.forward(torch.tensor(ids), 0, cache=b)
        net.forward(torch.tensor(ids), 0, cache=s)
    pos = [len(p) for p in prompts]
    rows = net.forward_batch(toks, pos, batch)
    assert calls == [4], net.fused_reason
    for j in range(4):
        alone = net.forward_batch([toks[j]], [pos[j]], [solo[j]])[0]
        err = float((rows[j] - alone).norm() / alone.norm())
        assert err < 1e-4, (arch, j, err)
        assert int(rows[j].argmax()) == int(alone.argmax())
        p = pos[j]
        for lb, ls in zip(batch[j].layers, solo[j].layers):
            assert lb.length == ls.length == p + 1
            torch.testing.assert_close(lb.k[p], ls.k[p], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lb.v[p], ls.v[p], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lb.k[:p], ls.k[:p], atol=0, rtol=0)   # earlier rows kept
        assert batch[j].pos == p + 1
    assert calls == [4, 1, 1, 1, 1]
    # one row on the model's own cache is the single-sequence step, bit for bit
    m.eval(prompts[1], 0)
    one = m.eval([toks[1]], pos[1])[-1].clone()
    m.eval(prompts[1], 0)
    x = net.embed(torch.tensor([toks[1]])).float().clone()
    again = real(net.fused, x, [pos[1]], [net.cache])[0]
    assert torch.equal(one, again)


def test_decode_steps_rejects_bad_arguments(llama_cpp):
    m = hetero_moe.load(tiny_model("qwen3moe"), threads=2, n_ctx=32)
    m.eval([5, 6], 0)
    m.eval([7], 2)
    f, lib = m.net.fused, m.net.fused._lib
    D, V, L = m.config.n_embd, m.config.n_vocab, m.config.n_layer
    c = m.net.new_cache()
    addrs = np.stack([f._addrs(c), f._addrs(c)])                      # B = 2
    x, lg = np.zeros(2 * D, np.float32), np.zeros(2 * V, np.float32)
    pos = np.array([0, 1], np.int32)
    lib.decode_steps(f.plan, x, pos, addrs, lg)                        # fine
    with pytest.raises(ValueError, match="outside the context"):
        lib.decode_steps(f.plan, x, np.array([0, 32], np.int32), addrs, lg)
    with pytest.raises(ValueError, match="x has"):
        lib.decode_steps(f.plan, x[:D], pos, addrs, lg)
    with pytest.raises(ValueError, match="logits has"):
        lib.decode_steps(f.plan, x, pos, addrs, lg[:V])
    with pytest.raises(ValueError, match="caches has"):
        lib.decode_steps(f.plan, x, pos, addrs[:1], lg)
    bad = addrs.copy()
    bad[1, L - 1, 3] -= 4                                              # a short value cache
    with pytest.raises(ValueError, match=f"row 1 layer {L - 1}"):
        lib.decode_steps(f.plan, x, pos, bad, lg)
    bad = addrs.copy()
    bad[0, 0, 0] = 0
    with pytest.raises(ValueError, match="null address"):
        lib.decode_steps(f.plan, x, pos, bad, lg)
    with pytest.raises(ValueError, match="pos must hold"):
        lib.decode_steps(f.plan, x, np.zeros(0, np.int32), addrs, lg)
    small = hetero_moe.load(tiny_model("qwen3moe"), threads=2, n_ctx=16).net.new_cache()
    with pytest.raises(ValueError, match="expected"):                 # another context size
        lib.decode_steps(f.plan, x, pos, np.stack([f._addrs(c), f._addrs(small)]), lg)


@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])
def test_fused_step_with_yarn_rope(llama_cpp, arch):
    """YaRN RoPE tables (blended angles, scaled cos/sin) go through the fused step unchanged."""
    # a float32 cache: the paths' rows agree to 1e-4 (an f16 cache may round a last-bit
    # difference one f16 step apart, see test_fused_step_equals_per_op_path)
    m = hetero_moe.load(tiny_model(arch, preset="tiny-yarn"), threads=2, n_ctx=128,
                        cache_type="f32")
    assert m.config.rope_yarn is not None
    ids = _ids(41, m.config.n_vocab, 7)
    got, got_rows = _step(m, ids[:-1], ids[-1], fused=True)
    assert isinstance(m.net.fused, fused_decode.FusedDecode), m.net.fused_reason
    want, want_rows = _step(m, ids[:-1], ids[-1], fused=False)
    torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
    for (gk, gv), (wk, wv) in zip(got_rows, want_rows):
        torch.testing.assert_close(gk, wk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gv, wv, atol=1e-4, rtol=1e-4)
