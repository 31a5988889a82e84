"""CPU sparse attention (decode fast path, masked prefill, compressed-key cache) against a
brute-force float64 transcription of config.py's semantics and against the torch reference."""
from __future__ import annotations

import math

import pytest
import torch

from hetero_moe.layers.sparse_attn import SparseAttnConfig, cpu, reference
from hetero_moe.layers.sparse_attn.cache import SparseCache, compress

ATOL = 2e-5   # fp32 attention over <= 1k keys vs float64


# -- a loop-per-query transcription of the spec (float64) -----------------------------------------
def naive(q, k, v, pos0, cfg, scale, nsa=None, x=None):
    q, k, v = q.double(), k.double(), v.double()
    T, H, Dk = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    l, d, lp = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    out = torch.zeros(T, H, v.shape[-1], dtype=torch.float64)
    for i in range(T):
        t = pos0 + i
        if t + 1 < cfg.min_len:
            for h in range(H):
                s = (k[:t + 1, h // G] @ q[i, h]) * scale
                out[i, h] = torch.softmax(s, 0) @ v[:t + 1, h // G]
            continue
        nc = cfg.n_cmp(t)
        for hk in range(Hkv):
            if nsa is None:
                kc = torch.stack([k[c * d:c * d + l, hk].mean(0) for c in range(nc)]) \
                    if nc else torch.zeros(0, Dk, dtype=torch.float64)
            else:
                kc = torch.stack([nsa.cmp_k.double() @ (k[c * d:c * d + l, hk]
                                                        + nsa.cmp_k_pe.double()).flatten()
                                  for c in range(nc)]) if nc else torch.zeros(0, Dk).double()
                vc = torch.stack([nsa.cmp_v.double() @ (v[c * d:c * d + l, hk]
                                                        + nsa.cmp_v_pe.double()).flatten()
                                  for c in range(nc)]) if nc else None
            pc = torch.zeros(nc, dtype=torch.float64)
            probs = []
            for g in range(G):
                pr = torch.softmax((kc @ q[i, hk * G + g]) * scale, 0) if nc else pc
                probs.append(pr)
                pc = pc + pr
            n_blk = t // lp + 1
            imp = []
            for j in range(n_blk):
                acc = 0.0
                for m in range(lp // d):
                    for n in range(l // d):
                        c = (lp // d) * j + m - n
                        if 0 <= c < nc:
                            acc += float(pc[c])
                forced = j < cfg.n_init or j > t // lp - cfg.n_local
                imp.append((math.inf if forced else acc, j))
            chosen = sorted(sorted(imp, key=lambda e: e[1]), key=lambda e: -e[0])[:cfg.top_n]
            blocks = sorted(j for _, j in chosen)
            sel = sorted({p for j in blocks for p in range(j * lp, (j + 1) * lp) if p <= t})
            win = list(range(max(0, t - cfg.window + 1), t + 1))
            for g in range(G):
                h = hk * G + g
                if nsa is None:
                    idx = torch.tensor(sorted(set(sel) | set(win)))
                    s = (k[idx, hk] @ q[i, h]) * scale
                    out[i, h] = torch.softmax(s, 0) @ v[idx, hk]
                    continue
                gate = torch.sigmoid(nsa.gate.double() @ x[i].double()).view(3, H)[:, h]
                o = 0
                for br, idx in ((1, torch.tensor(sel)), (2, torch.tensor(win))):
                    s = (k[idx, hk] @ q[i, h]) * scale
                    o = o + gate[br] * (torch.softmax(s, 0) @ v[idx, hk])
                if nc:
                    o = o + gate[0] * (probs[g] @ vc)
                out[i, h] = o
    return out.float()


def _qkv(T, L, H, Hkv, Dk, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, Dk, generator=g)
    k = torch.randn(L, Hkv, Dk, generator=g)
    v = torch.randn(L, Hkv, Dv, generator=g)
    return q, k, v


SMALL = SparseAttnConfig(mode="approx", cmp_block=8, cmp_stride=4, sel_block=16, top_n=4,
                         n_init=1, n_local=1, window=16, min_len=0)


def _decode_all(q, k, v, pos0, cfg, scale, nsa=None, x=None):
    """Token-by-token decode over an incrementally grown cache -> [T, H, Dv]."""
    Hkv, Dk, Dv = k.shape[1], k.shape[2], v.shape[2]
    sc = SparseCache(cfg, k.shape[0], Hkv, Dk, Dv, "cpu", nsa)
    outs = []
    for i in range(q.shape[0]):
        L = pos0 + i + 1
        xi = None if x is None else x[i:i + 1]
        outs.append(cpu.forward(q[i:i + 1], k[:L], v[:L], pos0 + i, sc, cfg, scale, nsa, xi))
    return torch.stack(outs).view(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("H,Hkv,Dk,Dv", [(4, 4, 64, 64), (4, 2, 64, 64), (8, 2, 128, 128),
                                         (8, 1, 192, 128), (4, 1, 576, 512), (16, 2, 32, 32)])
def test_decode_matches_naive(H, Hkv, Dk, Dv):
    L = 157                                    # not a multiple of any block
    q, k, v = _qkv(5, L, H, Hkv, Dk, Dv)
    pos0 = L - 5
    out = _decode_all(q, k, v, pos0, SMALL, Dk ** -0.5)
    ref = naive(q, k, v, pos0, SMALL, Dk ** -0.5)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (8, 1)])
def test_prefill_matches_naive_and_decode(H, Hkv):
    L, T = 171, 30
    q, k, v = _qkv(T, L, H, Hkv, 64, 64, seed=1)
    cfg = SMALL.with_(min_len=150)             # rows straddle min_len: dense then sparse
    pos0 = L - T
    sc = SparseCache(cfg, L, Hkv, 64, 64, "cpu")
    sc.update(k[:pos0], v[:pos0])
    pre = cpu.forward(q, k, v, pos0, sc, cfg, 0.125).view(T, H, -1)
    ref = naive(q, k, v, pos0, cfg, 0.125)
    torch.testing.assert_close(pre, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(pre, _decode_all(q, k, v, pos0, cfg, 0.125), atol=ATOL, rtol=0)


def _nsa(H, Dk, Dv, D, cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    l = cfg.cmp_block
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    return cpu.NSAWeights(r(Dk, l * Dk), r(l, Dk), r(Dv, l * Dv), r(l, Dv), r(3 * H, D))


@pytest.mark.parametrize("H,Hkv,Dk,Dv", [(4, 2, 32, 32), (4, 1, 48, 32)])
def test_nsa_decode_and_prefill_match_naive(H, Hkv, Dk, Dv):
    L, T, D = 131, 40, 24
    cfg = SMALL.with_(mode="nsa")
    q, k, v = _qkv(T, L, H, Hkv, Dk, Dv, seed=2)
    w = _nsa(H, Dk, Dv, D, cfg)
    x = torch.randn(T, D)
    pos0 = L - T
    ref = naive(q, k, v, pos0, cfg, Dk ** -0.5, w, x)
    dec = _decode_all(q, k, v, pos0, cfg, Dk ** -0.5, w, x)
    torch.testing.assert_close(dec, ref, atol=ATOL, rtol=0)
    sc = SparseCache(cfg, L, Hkv, Dk, Dv, "cpu", w)
    pre = cpu.forward(q, k, v, pos0, sc, cfg, Dk ** -0.5, w, x).view(T, H, -1)
    torch.testing.assert_close(pre, ref, atol=ATOL, rtol=0)


def test_every_block_selected_is_dense():
    L = 300
    q, k, v = _qkv(1, L, 8, 2, 64, 64, seed=4)
    cfg = SMALL.with_(top_n=(L + 15) // 16, window=1)
    out = _decode_all(q, k, v, L - 1, cfg, 0.125)
    dense = naive(q, k, v, L - 1, cfg.with_(min_len=L + 1), 0.125)
    torch.testing.assert_close(out, dense, atol=ATOL, rtol=0)


def test_window_covers_everything_is_dense():
    L = 100
    q, k, v = _qkv(1, L, 4, 2, 32, 32, seed=5)
    out = _decode_all(q, k, v, L - 1, SMALL.with_(window=L), 0.2)
    torch.testing.assert_close(out, naive(q, k, v, L - 1, SMALL.with_(min_len=L + 1), 0.2),
                               atol=ATOL, rtol=0)


def test_selection_ties_go_to_lower_index():
    # all-equal importance: only forced blocks beat ties, the rest are the lowest indices
    cfg = SMALL.with_(top_n=4, n_init=1, n_local=1)
    p = torch.zeros(1, 1, cfg.n_cmp(200))
    sel = cpu.select_blocks(p, torch.tensor([200]), cfg)
    assert sel.tolist() == [[[0, 1, 2, 12]]]
    # fewer eligible blocks than top_n: -1 padding
    sel = cpu.select_blocks(torch.zeros(1, 1, 0), torch.tensor([20]), cfg)
    assert sel.tolist() == [[[0, 1, -1, -1]]]


def test_eq9_weights_count_shared_tokens():
    cfg = SparseAttnConfig(cmp_block=32, cmp_stride=16, sel_block=64)
    w, pad, stride = cpu.eq9_kernel(cfg)
    assert w.tolist() == [1, 2, 2, 2, 1] and pad == 1 and stride == 4
    p = torch.zeros(1, 12)
    p[0, 3] = 1.0                  # block 3 covers tokens 48..79: 16 in sel 0, 16 in sel 1
    assert cpu.pool_eq9(p, cfg, 3).tolist() == [[1.0, 1.0, 0.0]]


# -- cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["approx", "nsa"])
def test_incremental_cache_equals_bulk(mode):
    cfg = SMALL.with_(mode=mode)
    L, Hkv, Dk = 97, 2, 16
    _, k, v = _qkv(1, L, 2, Hkv, Dk, Dk, seed=6)
    w = _nsa(2, Dk, Dk, 8, cfg) if mode == "nsa" else None
    inc = SparseCache(cfg, L, Hkv, Dk, Dk, "cpu", w)
    for n in range(1, L + 1):
        kc, vc = inc.update(k[:n], v[:n])
        assert kc.shape[1] == cfg.n_cmp(n - 1)
    bulk = SparseCache(cfg, L, Hkv, Dk, Dk, "cpu", w)
    kb, vb = bulk.update(k, v)
    # means are exact; learned phi is a matmul whose rounding depends on the batch of blocks
    same = torch.equal if w is None else \
        (lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=1e-6))
    assert same(kc, kb)
    first = k[:cfg.cmp_block, 1].mean(0) if w is None else \
        w.cmp_k @ (k[:cfg.cmp_block, 1] + w.cmp_k_pe).flatten()
    torch.testing.assert_close(kb[1, 0], first, atol=1e-5, rtol=1e-5)
    if mode == "nsa":
        assert same(vc, vb)


def test_cache_truncate_and_regrow():
    cfg = SMALL
    L, Hkv, Dk = 80, 2, 8
    _, k, v = _qkv(1, L, 2, Hkv, Dk, Dk, seed=7)
    sc = SparseCache(cfg, L, Hkv, Dk, Dk, "cpu")
    sc.update(k, v)
    sc.truncate(30)
    assert sc.n == cfg.n_cmp(29) == 6
    k2 = k.clone()
    k2[30:] = torch.randn(L - 30, Hkv, Dk)
    kc, _ = sc.update(k2, v)
    fresh, _ = SparseCache(cfg, L, Hkv, Dk, Dk, "cpu").update(k2, v)
    assert torch.equal(kc, fresh)
    sc.truncate(0)
    assert sc.n == 0


def test_compress_mean_layout():
    cfg = SMALL
    x = torch.arange(40, dtype=torch.float32).view(20, 1, 2).repeat(1, 3, 1)
    out = compress(x, cfg, 0, cfg.n_cmp(19))               # blocks at 0, 4, 8, 12
    assert out.shape == (3, 4, 2)
    assert out[2, 1].tolist() == x[4:12, 2].mean(0).tolist()


# -- against the torch reference -----------------------------------------------------------------
@pytest.mark.parametrize("H,Hkv,Dk,Dv", [(4, 4, 64, 64), (4, 2, 64, 64), (8, 2, 128, 128),
                                         (16, 2, 64, 64), (8, 1, 192, 128), (4, 1, 576, 512)])
@pytest.mark.parametrize("score", ["mean", "minmax"])
def test_decode_and_prefill_match_reference(H, Hkv, Dk, Dv, score):
    L, T = 181, 5
    cfg = SMALL.with_(score=score)
    q, k, v = _qkv(T, L, H, Hkv, Dk, Dv, seed=8)
    if Dk == 576:                                   # MLA latent: values are the keys' first dims
        v = k[..., :Dv]
    pos0 = L - T
    ref = torch.cat([reference.sparse_attention(q[i:i + 1], k[:pos0 + i + 1], v[:pos0 + i + 1],
                                                pos0 + i, cfg, Dk ** -0.5) for i in range(T)])
    torch.testing.assert_close(_decode_all(q, k, v, pos0, cfg, Dk ** -0.5), ref,
                               atol=ATOL, rtol=0)
    sc = SparseCache(cfg, L, Hkv, Dk, Dv, "cpu")
    pre = cpu.forward(q, k, v, pos0, sc, cfg, Dk ** -0.5).view(T, H, -1)
    torch.testing.assert_close(pre, reference.sparse_attention(q, k, v, pos0, cfg, Dk ** -0.5),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("H,Hkv,Dk,Dv", [(4, 2, 32, 32), (8, 1, 48, 32)])
def test_nsa_matches_reference(H, Hkv, Dk, Dv):
    L, T, D = 150, 6, 24
    cfg = SMALL.with_(mode="nsa")
    q, k, v = _qkv(T, L, H, Hkv, Dk, Dv, seed=9)
    w = _nsa(H, Dk, Dv, D, cfg)
    x = torch.randn(T, D)
    pos0 = L - T
    ref = reference.sparse_attention(q, k, v, pos0, cfg, Dk ** -0.5, w, x)
    dec = _decode_all(q, k, v, pos0, cfg, Dk ** -0.5, w, x)
    torch.testing.assert_close(dec, ref, atol=ATOL, rtol=0)


def test_default_geometry_matches_reference_at_length():
    # default block sizes, a context long enough for every mechanism (forced, top-n, window)
    cfg = SparseAttnConfig(mode="approx", min_len=0)
    L = 2500
    q, k, v = _qkv(1, L, 8, 2, 64, 64, seed=10)
    ref = reference.sparse_attention(q, k, v, L - 1, cfg, 0.125)
    sc = SparseCache(cfg, L, 2, 64, 64, "cpu")
    out = cpu.forward(q, k, v, L - 1, sc, cfg, 0.125).view(1, 8, -1)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert not torch.allclose(out, reference.dense_attention(q, k, v, L - 1, 0.125), atol=1e-3)


# -- model level -----------------------------------------------------------------------------------
N_CTX = 320


def _with_nsa(src, dst, cfg, skip=()):
    """A copy of GGUF `src` with random NSA tensors for every layer (except names in skip); the
    tokenizer's arrays are left out (slow to copy, and logits from ids do not need them)."""
    import gguf
    import numpy as np

    from hetero_moe.gguf import GGUFFile
    g = GGUFFile(src)
    arch = g.architecture
    w = gguf.GGUFWriter(dst, arch)
    for k, val in g.metadata.items():
        vt = gguf.GGUFValueType(g.value_types[k])
        if k != "general.architecture" and vt != gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, val, vt)
    n_layer, H = g.metadata[f"{arch}.block_count"], g.metadata[f"{arch}.attention.head_count"]
    D = g.metadata[f"{arch}.embedding_length"]
    Dh, l = D // H, cfg.cmp_block
    rng = np.random.default_rng(0)
    extra = {}
    for i in range(n_layer):
        shapes = {"nsa_cmp_k": (Dh, l * Dh), "nsa_cmp_k_pe": (l, Dh), "nsa_cmp_v": (Dh, l * Dh),
                  "nsa_cmp_v_pe": (l, Dh), "nsa_gate": (3 * H, D)}
        for n, shp in shapes.items():
            name = f"blk.{i}.{n}.weight"
            if name not in skip:
                scale = 0.1 if n.endswith("_pe") else 1.0 / np.sqrt(shp[1])
                extra[name] = (rng.standard_normal(shp) * scale).astype(np.float32)
    tensors = list(g)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), len(t.data),
                          raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
    for name, a in extra.items():
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        w.write_tensor_data(np.asarray(t.data))
    for a in extra.values():
        w.write_tensor_data(a)
    w.close()
    return str(dst)


def _load(path, **kw):
    """A model whose matmuls are plain fp32 (no activation quantization): logits then move by
    rounding only, so sparse-vs-dense equalities can be checked tightly. With the quantized
    activations of the fast kernels a 1e-7 input change can flip a rounding step and move
    logits by ~0.3 on this random-weight model."""
    import hetero_moe
    from hetero_moe.layers.linear import QuantLinear
    m = hetero_moe.load(path, n_ctx=N_CTX, cpu_kernels="torch", **kw)
    for b in m.net.blocks:
        for part in (b.attn, b.ffn):
            for v in vars(part).values():
                if isinstance(v, QuantLinear):
                    v.act_quant = False
    m.net.lm_head.act_quant = False
    return m


@pytest.fixture(scope="module")
def tiny_llama():
    from hetero_moe.testing.make_model import cached_test_model
    return str(cached_test_model("llama"))


@pytest.fixture(scope="module")
def dense_model(tiny_llama):
    return _load(tiny_llama)


def _ids(n, seed=0):
    return torch.randint(10, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _decode_logits(model, ids, n_prefill, sparse_attn=None):
    """Logits predicting ids[n_prefill:] and one more, from a prefill then one decode step per
    token -> [len(ids) - n_prefill + 1, V]."""
    rows = [model.eval(ids[:n_prefill], 0, sparse_attn=sparse_attn)]
    for p in range(n_prefill, len(ids)):
        rows.append(model.eval(ids[p:p + 1], p, sparse_attn=sparse_attn))
    return torch.cat(rows)


# prefill "sparse": every row of a prompt takes the sparse rule, so prompts and decode agree row
# by row (the default "dense" prefill is tested on its own below)
RESTRICT = SparseAttnConfig(mode="approx", top_n=2, n_local=1, window=16, min_len=0,
                            prefill="sparse")


@pytest.fixture(scope="module")
def sparse_model(tiny_llama):
    return _load(tiny_llama, sparse_attn=RESTRICT)


def test_model_every_block_selected_equals_dense(sparse_model, dense_model):
    every = SparseAttnConfig(mode="approx", top_n=N_CTX // 64 + 1, window=1, min_len=0,
                             prefill="sparse")
    ids = _ids(240)
    dense = dense_model.logits(ids)
    torch.testing.assert_close(sparse_model.logits(ids, sparse_attn=every), dense,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_decode_logits(sparse_model, ids, 228, every), dense[227:],
                               atol=1e-4, rtol=1e-4)
    # the loaded restrictive default really changes the result (the branch is live)
    assert (sparse_model.logits(ids) - dense).abs().max() > 1e-2


def test_model_decode_equals_prefill_and_cache_reuse(sparse_model):
    cfg = RESTRICT.with_(window=32, min_len=100)
    ids = _ids(230, seed=1)
    pre = sparse_model.logits(ids, sparse_attn=cfg)
    torch.testing.assert_close(_decode_logits(sparse_model, ids, 215, cfg), pre[214:],
                               atol=1e-4, rtol=1e-4)
    # below min_len attention is dense: the first rows equal the dense model's (up to rounding:
    # the chunk runs through the masked path, not SDPA)
    torch.testing.assert_close(pre[:99], sparse_model.logits(ids[:99], sparse_attn="off"),
                               atol=1e-4, rtol=1e-4)
    # prefix reuse truncates the compressed-key cache: a changed suffix equals a fresh run
    ids2 = ids[:150] + _ids(80, seed=2)
    sparse_model.eval(ids, 0, sparse_attn=cfg)
    again = sparse_model.eval(ids2[150:], 150, all_logits=True, sparse_attn=cfg)
    fresh = sparse_model.logits(ids2, sparse_attn=cfg)[150:]
    torch.testing.assert_close(again, fresh, atol=1e-5, rtol=1e-5)


def test_dense_prefill_is_a_dense_prompt_then_a_decode_step(sparse_model, dense_model):
    """prefill "dense" (the default): every prompt row but the last is dense; the last row is a
    decode step over the cache the dense rows wrote."""
    cfg = RESTRICT.with_(window=32, min_len=100, prefill="dense")
    assert SparseAttnConfig().prefill == "dense"
    ids = _ids(230, seed=5)
    pre = sparse_model.logits(ids, sparse_attn=cfg)
    dense = dense_model.logits(ids)
    torch.testing.assert_close(pre[:-1], dense[:-1], atol=1e-4, rtol=1e-4)
    assert (pre[-1] - dense[-1]).abs().max() > 1e-2          # the last row really is sparse
    sparse_model.eval(ids[:-1], 0, sparse_attn="off")
    last = sparse_model.eval(ids[-1:], len(ids) - 1, sparse_attn=cfg)
    torch.testing.assert_close(last, pre[-1:], atol=1e-4, rtol=1e-4)
    # below min_len even the last row stays dense
    short = sparse_model.logits(ids[:99], sparse_attn=cfg)
    torch.testing.assert_close(short, dense_model.logits(ids[:99]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prefill"):
        SparseAttnConfig(mode="approx", prefill="fast")


def test_per_call_override(sparse_model, dense_model):
    ids = _ids(150, seed=3)
    off = sparse_model.generate(ids, max_tokens=5, temperature=0, sparse_attn="off")
    assert off.tokens == dense_model.generate(ids, max_tokens=5, temperature=0).tokens
    assert sparse_model.sparse_attn == RESTRICT and dense_model.sparse_attn.mode == "off"
    sp = sparse_model.generate(ids, max_tokens=5, temperature=0)
    via_dense = dense_model.generate(ids, max_tokens=5, temperature=0, sparse_attn=RESTRICT)
    assert sp.tokens == via_dense.tokens
    stream = "".join(dense_model.stream(ids, max_tokens=5, temperature=0, sparse_attn=RESTRICT))
    assert dense_model.last_completion.tokens == sp.tokens and isinstance(stream, str)
    with pytest.raises(TypeError, match="sparse_attn"):
        dense_model.generate(ids, max_tokens=1, sparse_attn=3)
    with pytest.raises(ValueError, match="mode"):
        dense_model.generate(ids, max_tokens=1, sparse_attn="fast")


def test_nsa_missing_weights_named(tiny_llama, dense_model):
    import hetero_moe
    from hetero_moe.errors import MissingTensorError
    with pytest.raises(MissingTensorError, match=r"blk\.0\.nsa_cmp_k\.weight"):
        hetero_moe.load(tiny_llama, n_ctx=N_CTX, sparse_attn="nsa")
    with pytest.raises(MissingTensorError, match=r"blk\.0\.nsa_cmp_k\.weight"):
        dense_model.generate(_ids(10), max_tokens=2, sparse_attn="nsa")


def test_nsa_model(tiny_llama, dense_model, tmp_path):
    import hetero_moe
    from hetero_moe.errors import MissingTensorError
    cfg = SparseAttnConfig(mode="nsa", top_n=2, n_local=1, window=32, min_len=64,
                           prefill="sparse")
    path = _with_nsa(tiny_llama, tmp_path / "nsa.gguf", cfg)
    m = _load(path, sparse_attn=cfg)
    ids = _ids(200, seed=4)
    pre = m.logits(ids)
    assert torch.isfinite(pre).all()
    torch.testing.assert_close(_decode_logits(m, ids, 190), pre[189:], atol=1e-4, rtol=1e-4)
    dense = dense_model.logits(ids)
    assert (pre[64:] - dense[64:]).abs().max() > 1e-2
    torch.testing.assert_close(pre[:63], dense[:63], atol=1e-4, rtol=1e-4)   # below min_len
    # the NSA tensors are accepted with another mode and ignored by it
    torch.testing.assert_close(m.logits(ids, sparse_attn="off"), dense, atol=0, rtol=0)
    off = hetero_moe.load(path, n_ctx=N_CTX)
    assert off.sparse_attn.mode == "off" and off.net.blocks[1].attn.nsa is not None
    bad = _with_nsa(tiny_llama, tmp_path / "part.gguf", cfg, skip=("blk.1.nsa_gate.weight",))
    with pytest.raises(MissingTensorError, match=r"blk\.1\.nsa_gate\.weight"):
        hetero_moe.load(bad, n_ctx=N_CTX)


def test_cli_sparse_flags():
    from hetero_moe.cli import _sparse_config, build_parser
    args = build_parser().parse_args(["run", "m.gguf", "--sparse-attn", "approx",
                                      "--sparse-top-n", "8", "--sparse-block", "128",
                                      "--sparse-window", "256", "--sparse-min-len", "4096"])
    assert _sparse_config(args) == SparseAttnConfig(mode="approx", top_n=8, sel_block=128,
                                                    window=256, min_len=4096)
    args = build_parser().parse_args(["bench", "m.gguf", "--sparse-attn", "nsa",
                                      "--sparse-prefill", "sparse"])
    assert _sparse_config(args).mode == "nsa" and _sparse_config(args).prefill == "sparse"
    assert _sparse_config(build_parser().parse_args(["bench", "m.gguf"])).mode == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "m.gguf", "--sparse-attn", "dense"])
    from hetero_moe.cli import main
    with pytest.raises(SystemExit):
        main(["bench", "m.gguf", "--sparse-block", "50"])
