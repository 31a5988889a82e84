"""Invariants of the torch sparse-attention reference (layers/sparse_attn/reference.py)."""
from __future__ import annotations

import math

import pytest
import torch

from hetero_moe.layers.sparse_attn import reference as R
from hetero_moe.layers.sparse_attn.config import SparseAttnConfig

# Small geometry: many blocks at short lengths.
SMALL = SparseAttnConfig(mode="approx", cmp_block=8, cmp_stride=4, sel_block=16, top_n=4,
                         n_init=1, n_local=2, window=16, min_len=0)
EXACT = 0.0      # float64 inside: equal math gives equal fp32 results, whatever the length
CLOSE = 1e-5     # same math, different association order


def rand_qkv(T, H, hkv, dk, dv, seed=0, pos0=0, latent=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, dk, generator=g)
    k = torch.randn(pos0 + T, hkv, dk, generator=g)
    v = k[..., :dv] if latent else torch.randn(pos0 + T, hkv, dv, generator=g)
    return q, k, v


def rand_weights(cfg, H, dk, dv, dmodel, seed=1, gate_bias=None):
    g = torch.Generator().manual_seed(seed)
    l = cfg.cmp_block
    w = R.NSAWeights(
        cmp_k=torch.randn(dk, l * dk, generator=g) / math.sqrt(l * dk),
        cmp_k_pe=torch.randn(l, dk, generator=g) * 0.1,
        cmp_v=torch.randn(dv, l * dv, generator=g) / math.sqrt(l * dv),
        cmp_v_pe=torch.randn(l, dv, generator=g) * 0.1,
        gate=torch.randn(3 * H, dmodel, generator=g) / math.sqrt(dmodel))
    return w


def decode_all(q, k, v, cfg, scale, pos0=0):
    """Token by token (T = 1 calls) over a growing cache."""
    return torch.cat([R.sparse_attention(q[i:i + 1], k[:pos0 + i + 1], v[:pos0 + i + 1],
                                         pos0 + i, cfg, scale) for i in range(q.shape[0])])


# ------------------------------------------------------------------------------ Eq. 9 mapping

@pytest.mark.parametrize("l,d,ls", [(8, 4, 16), (32, 16, 64), (16, 4, 8), (4, 4, 16),
                                    (12, 4, 8), (64, 16, 32)])
def test_eq9_matches_bruteforce_overlap(l, d, ls):
    cfg = SMALL.with_(cmp_block=l, cmp_stride=d, sel_block=ls)
    ns, nc = 9, 30
    torch.testing.assert_close(R.eq9_weights(cfg, ns, nc), R.eq9_weights_bruteforce(cfg, ns, nc),
                               rtol=0, atol=0)


def test_eq9_default_block_weights():
    # l=32, d=16, l'=64: block 0 gets cmp blocks 0,1,2 fully (2 = 32/16) and half of block 3.
    w = R.eq9_weights(SparseAttnConfig(), 2, 8)
    assert w[0].tolist() == [2, 2, 2, 1, 0, 0, 0, 0]
    assert w[1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1]


# -------------------------------------------------------------------------------- compression

def test_compress_mean_and_phi():
    cfg = SMALL
    x = torch.randn(37, 2, 16, dtype=torch.float64)
    nc = cfg.n_cmp(36)
    assert nc == (37 - 8) // 4 + 1
    mean = R.compress(x, cfg)
    assert mean.shape == (nc, 2, 16)
    for i in range(nc):
        torch.testing.assert_close(mean[i], x[i * 4:i * 4 + 8].mean(0), rtol=0, atol=1e-6)
    w = torch.randn(16, 8 * 16, dtype=torch.float64)
    pe = torch.randn(8, 16, dtype=torch.float64)
    phi = R.compress(x, cfg, w, pe)
    for i in range(nc):
        for h in range(2):
            want = w @ (x[i * 4:i * 4 + 8, h] + pe).reshape(-1)
            torch.testing.assert_close(phi[i, h], want, rtol=1e-5, atol=1e-5)
    assert R.compress(x[:7], cfg).shape == (0, 2, 16)


# ---------------------------------------------------------------------------------- selection

def importance_bruteforce(q, k_cmp, pos0, cfg, scale):
    """Per query and head: softmax over complete compressed blocks, group sum, then each
    compressed block weighted by its token overlap with the selection block / d."""
    T, H, _ = q.shape
    nc, hkv, _ = k_cmp.shape
    g = H // hkv
    L = pos0 + T
    ns = -(-L // cfg.sel_block)
    out = torch.full((hkv, T, ns), float("-inf"), dtype=torch.float64)
    for ti in range(T):
        t = pos0 + ti
        vis = [i for i in range(nc) if i * cfg.cmp_stride + cfg.cmp_block - 1 <= t]
        for kh in range(hkv):
            p = torch.zeros(nc, dtype=torch.float64)
            for h in range(kh * g, (kh + 1) * g):
                if vis:
                    s = torch.stack([scale * (q[ti, h] @ k_cmp[i, kh]) for i in vis])
                    p[vis] += torch.softmax(s, 0)
            for j in range(ns):
                if j * cfg.sel_block > t:
                    continue
                sel = set(range(j * cfg.sel_block, (j + 1) * cfg.sel_block))
                out[kh, ti, j] = sum(
                    p[i] * len(sel & set(range(i * cfg.cmp_stride,
                                               i * cfg.cmp_stride + cfg.cmp_block)))
                    / cfg.cmp_stride for i in range(nc))
    return out


@pytest.mark.parametrize("pos0,T", [(0, 45), (30, 7)])
def test_block_importance_matches_bruteforce(pos0, T):
    q, k, _ = rand_qkv(T, 4, 2, 16, 16, seed=3, pos0=pos0)
    q, kc = q.double(), R.compress(k, SMALL)
    got = R.block_importance(q, kc, pos0, SMALL, 0.25)
    want = importance_bruteforce(q, kc, pos0, SMALL, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def topn_bruteforce(imp_row, t, cfg):
    """One query's selection by an explicit ranking: forced first, then (-score, index)."""
    cur = t // cfg.sel_block
    elig = list(range(cur + 1))
    forced = {j for j in elig if j < cfg.n_init or j > cur - cfg.n_local}
    rest = sorted((j for j in elig if j not in forced), key=lambda j: (-float(imp_row[j]), j))
    take = sorted(list(forced) + rest[:max(0, cfg.top_n - len(forced))])
    return take + [-1] * (cfg.top_n - len(take))


@pytest.mark.parametrize("seed", [0, 1])
def test_topn_ties_go_to_lower_index(seed):
    cfg = SMALL.with_(top_n=5)
    g = torch.Generator().manual_seed(seed)
    T, pos0 = 40, 70
    ns = -(-(pos0 + T) // cfg.sel_block)
    imp = torch.randint(0, 3, (2, T, ns), generator=g).float()  # many exact ties
    got = R.topn_blocks(imp, pos0, cfg)
    for kh in range(2):
        for ti in range(T):
            assert got[kh, ti].tolist() == topn_bruteforce(imp[kh, ti], pos0 + ti, cfg)


def test_uniform_scores_pick_lowest_blocks():
    # q = 0: every compressed block scores the same, so interior selection blocks tie exactly.
    cfg = SMALL.with_(top_n=5)
    T = 132                           # t = 131 sees 32 compressed blocks: p = 1/32 exactly
    q = torch.zeros(T, 2, 8)
    k = torch.randn(T, 1, 8)
    idx = R.select_blocks(q, R.compress(k, cfg), 0, cfg, 1.0)
    last = idx[0, -1].tolist()        # t = 131: blocks 0..8, forced 0, 7, 8; ties at 1..6
    assert last == [0, 1, 2, 7, 8]


def check_selection_invariants(idx, pos0, cfg):
    hkv, T, n = idx.shape
    assert idx.dtype == torch.int32 and n == cfg.top_n
    for kh in range(hkv):
        for ti in range(T):
            t = pos0 + ti
            cur = t // cfg.sel_block
            row = idx[kh, ti].tolist()
            sel = [j for j in row if j >= 0]
            assert row == sel + [-1] * (n - len(sel)), row           # padding at the end
            assert sel == sorted(set(sel)), row                      # ascending, unique
            assert all(j <= cur for j in sel), (t, row)              # no future block
            assert len(sel) == min(cfg.top_n, cur + 1)
            forced = {j for j in range(cur + 1) if j < cfg.n_init or j > cur - cfg.n_local}
            assert forced <= set(sel), (t, row)


@pytest.mark.parametrize("score", ["mean", "minmax"])
@pytest.mark.parametrize("n_init,n_local", [(1, 2), (0, 0), (2, 1)])
def test_selection_invariants(score, n_init, n_local):
    cfg = SMALL.with_(score=score, n_init=n_init, n_local=n_local)
    q, k, _ = rand_qkv(99, 4, 2, 16, 16, seed=5)
    check_selection_invariants(R.selection(q, k, 0, cfg, 0.25), 0, cfg)


def test_default_config_selection_invariants():
    cfg = SparseAttnConfig(mode="approx", min_len=0)
    q, k, _ = rand_qkv(5, 2, 1, 16, 16, seed=6, pos0=1195)
    check_selection_invariants(R.selection(q, k, 1195, cfg, 0.25), 1195, cfg)


def test_minmax_importance_matches_explicit_bound():
    cfg = SMALL.with_(score="minmax")
    T, H, hkv, ls, scale = 50, 4, 2, cfg.sel_block, 0.5
    q, k, _ = rand_qkv(T, H, hkv, 8, 8, seed=7)
    q, k = q.double(), k.double()
    got = R.minmax_importance(q, k, 0, cfg, scale)
    for ti in range(0, T, 3):
        for kh in range(hkv):
            p = torch.zeros(ti // ls + 1, dtype=torch.float64)
            for h in (2 * kh, 2 * kh + 1):
                u = []
                for j in range(ti // ls + 1):
                    keys = k[j * ls:min((j + 1) * ls, ti + 1), kh]
                    lo, hi = keys.min(0).values, keys.max(0).values
                    u.append(scale * torch.maximum(q[ti, h] * lo, q[ti, h] * hi).sum())
                    assert bool((scale * (keys @ q[ti, h]) <= u[-1] + 1e-5).all())
                p += torch.softmax(torch.stack(u), 0)
            torch.testing.assert_close(got[kh, ti, :len(p)], p, rtol=1e-5, atol=1e-6)
            assert bool(torch.isinf(got[kh, ti, len(p):]).all())


def test_causal_future_keys_do_not_matter():
    # Queries 0..39 of a 64-token prefill must not see keys 40..63, in selection or attention.
    for cfg in (SMALL, SMALL.with_(score="minmax"), SMALL.with_(n_local=0)):
        q, k, v = rand_qkv(64, 4, 2, 16, 16, seed=8)
        k2, v2 = k.clone(), v.clone()
        k2[40:] = torch.randn_like(k2[40:]) * 5
        v2[40:] = torch.randn_like(v2[40:]) * 5
        a = R.sparse_attention(q, k, v, 0, cfg, 0.25)[:40]
        b = R.sparse_attention(q, k2, v2, 0, cfg, 0.25)[:40]
        torch.testing.assert_close(a, b, rtol=0, atol=EXACT)
        mask = R.selected_token_mask(R.selection(q, k, 0, cfg, 0.25), 0, 64, cfg)
        assert not bool((mask & ~R.causal_mask(0, 64, 64)[None]).any())


# ---------------------------------------------------------------------------------- attention

def attention_bruteforce(q, k, v, idx, pos0, cfg, scale):
    """Per head and query: explicit key list = selected-block tokens <= t plus the window."""
    T, H, _ = q.shape
    hkv = k.shape[1]
    g = H // hkv
    out = torch.zeros(T, H, v.shape[-1])
    for ti in range(T):
        t = pos0 + ti
        for h in range(H):
            kh = h // g
            keys = {p for j in idx[kh, ti].tolist() if j >= 0
                    for p in range(j * cfg.sel_block, min((j + 1) * cfg.sel_block, t + 1))}
            keys |= set(range(max(0, t - cfg.window + 1), t + 1))
            pos = sorted(keys)
            p = torch.softmax(scale * (k[pos, kh] @ q[ti, h]), 0)
            out[ti, h] = p @ v[pos, kh]
    return out


@pytest.mark.parametrize("H,hkv", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_approx_matches_explicit_key_lists(H, hkv):
    q, k, v = rand_qkv(41, H, hkv, 16, 8, seed=9, pos0=30)
    cfg = SMALL.with_(window=8)
    idx = R.selection(q, k, 30, cfg, 0.25)
    got = R.sparse_attention(q, k, v, 30, cfg, 0.25, indices=idx)
    torch.testing.assert_close(got, attention_bruteforce(q, k, v, idx, 30, cfg, 0.25),
                               rtol=CLOSE, atol=CLOSE)
    torch.testing.assert_close(got, R.sparse_attention(q, k, v, 30, cfg, 0.25), rtol=0, atol=0)


HEAD_DIMS = [  # (H, Hkv, Dk, Dv, latent)
    (4, 2, 64, 64, False), (4, 1, 128, 128, False), (4, 4, 192, 128, False),
    (4, 1, 576, 512, True)]


@pytest.mark.parametrize("H,hkv,dk,dv,latent", HEAD_DIMS)
@pytest.mark.parametrize("score", ["mean", "minmax"])
def test_window_covering_everything_is_dense(H, hkv, dk, dv, latent, score):
    q, k, v = rand_qkv(37, H, hkv, dk, dv, seed=10, latent=latent)
    cfg = SMALL.with_(window=37, score=score)
    scale = dk ** -0.5
    torch.testing.assert_close(R.sparse_attention(q, k, v, 0, cfg, scale),
                               R.dense_attention(q, k, v, 0, scale), rtol=0, atol=EXACT)


@pytest.mark.parametrize("H,hkv,dk,dv,latent", HEAD_DIMS)
def test_topn_covering_every_block_is_dense(H, hkv, dk, dv, latent):
    q, k, v = rand_qkv(53, H, hkv, dk, dv, seed=11, latent=latent)
    cfg = SMALL.with_(window=1, top_n=4)           # 53 tokens = 4 selection blocks
    scale = dk ** -0.5
    torch.testing.assert_close(R.sparse_attention(q, k, v, 0, cfg, scale),
                               R.dense_attention(q, k, v, 0, scale), rtol=0, atol=EXACT)


def test_sparse_differs_from_dense_when_blocks_are_dropped():
    q, k, v = rand_qkv(80, 4, 2, 16, 16, seed=12)
    cfg = SMALL.with_(window=4, top_n=3)
    diff = (R.sparse_attention(q, k, v, 0, cfg, 0.25) - R.dense_attention(q, k, v, 0, 0.25))
    assert float(diff[:32].abs().max()) <= EXACT        # t < 48: all 3 blocks fit
    assert float(diff[60:].abs().max()) > 1e-3


def test_below_min_len_is_dense():
    q, k, v = rand_qkv(40, 4, 2, 16, 16, seed=13)
    cfg = SMALL.with_(window=2, top_n=1, n_init=0, n_local=1, min_len=41)
    torch.testing.assert_close(R.sparse_attention(q, k, v, 0, cfg, 0.25),
                               R.dense_attention(q, k, v, 0, 0.25), rtol=0, atol=0)
    assert float((R.sparse_attention(q, k, v, 0, cfg.with_(min_len=40), 0.25)
                  - R.dense_attention(q, k, v, 0, 0.25)).abs().max()) > 1e-3


@pytest.mark.parametrize("H,hkv,score", [(2, 2, "mean"), (4, 2, "mean"), (8, 2, "mean"),
                                         (8, 1, "mean"), (4, 2, "minmax"), (8, 1, "minmax")])
def test_decode_equals_prefill(H, hkv, score):
    cfg = SMALL.with_(score=score)
    q, k, v = rand_qkv(75, H, hkv, 16, 16, seed=14)
    pre = R.sparse_attention(q, k, v, 0, cfg, 0.25)
    dec = decode_all(q, k, v, cfg, 0.25)
    torch.testing.assert_close(dec, pre, rtol=0, atol=EXACT)
    # chunked prefill (pos0 > 0) agrees too
    half = R.sparse_attention(q[40:], k, v, 40, cfg, 0.25)
    torch.testing.assert_close(half, pre[40:], rtol=0, atol=EXACT)
    sel_pre = R.selection(q, k, 0, cfg, 0.25)
    for t in (17, 50, 74):
        sel = R.selection(q[t:t + 1], k[:t + 1], t, cfg, 0.25)
        assert torch.equal(sel[:, 0], sel_pre[:, t])


@pytest.mark.parametrize("H,hkv,dk,dv,latent", HEAD_DIMS[2:])
def test_decode_equals_prefill_wide_heads(H, hkv, dk, dv, latent):
    q, k, v = rand_qkv(40, H, hkv, dk, dv, seed=15, latent=latent)
    pre = R.sparse_attention(q, k, v, 0, SMALL, dk ** -0.5)
    torch.testing.assert_close(decode_all(q, k, v, SMALL, dk ** -0.5), pre, rtol=0, atol=EXACT)


def test_default_config_decode_equals_prefill():
    cfg = SparseAttnConfig(mode="approx", min_len=0)
    L, T = 1203, 3
    q, k, v = rand_qkv(T, 4, 2, 32, 32, seed=16, pos0=L - T)
    pre = R.sparse_attention(q, k, v, L - T, cfg, 32 ** -0.5)
    dec = decode_all(q, k, v, cfg, 32 ** -0.5, pos0=L - T)
    torch.testing.assert_close(dec, pre, rtol=0, atol=EXACT)
    dense = R.dense_attention(q, k, v, L - T, 32 ** -0.5)
    assert float((pre - dense).abs().max()) > 1e-4     # 19 blocks, 16 kept: really sparse


# ----------------------------------------------------------------------------------------- nsa

def gate_weights_for(branch, H, dmodel):
    """Gate rows giving W x = +1000 for `branch` and -1000 for the others when x = 1:
    sigmoid saturates to exactly 1 and 0 (also in float64)."""
    gate = torch.full((3, H, dmodel), -1000.0 / dmodel)
    gate[branch] = 1000.0 / dmodel
    return gate.reshape(3 * H, dmodel)


def cmp_branch_bruteforce(q, k, v, pos0, cfg, scale, w):
    T, H, _ = q.shape
    hkv = k.shape[1]
    g = H // hkv
    out = torch.zeros(T, H, v.shape[-1])
    for ti in range(T):
        nc = cfg.n_cmp(pos0 + ti)
        if nc == 0:
            continue
        for h in range(H):
            kh = h // g
            kc = torch.stack([w.cmp_k @ (k[i * cfg.cmp_stride:i * cfg.cmp_stride + cfg.cmp_block,
                                           kh] + w.cmp_k_pe).reshape(-1) for i in range(nc)])
            vc = torch.stack([w.cmp_v @ (v[i * cfg.cmp_stride:i * cfg.cmp_stride + cfg.cmp_block,
                                           kh] + w.cmp_v_pe).reshape(-1) for i in range(nc)])
            out[ti, h] = torch.softmax(scale * (kc @ q[ti, h]), 0) @ vc
    return out


@pytest.mark.parametrize("H,hkv,dk,dv", [(4, 2, 16, 16), (4, 4, 24, 16), (8, 1, 32, 16)])
def test_nsa_single_gate_equals_branch(H, hkv, dk, dv):
    T, D = 45, 12
    cfg = SMALL.with_(mode="nsa")
    q, k, v = rand_qkv(T, H, hkv, dk, dv, seed=17)
    x = torch.ones(T, D)
    scale = dk ** -0.5
    w = rand_weights(cfg, H, dk, dv, D)
    outs = []
    for branch in range(3):
        w.gate = gate_weights_for(branch, H, D)
        outs.append(R.sparse_attention(q, k, v, 0, cfg, scale, weights=w, x=x))
    o_cmp, o_slc, o_win = outs
    torch.testing.assert_close(o_cmp, cmp_branch_bruteforce(q, k, v, 0, cfg, scale, w),
                               rtol=CLOSE, atol=CLOSE)
    assert float(o_cmp[:7].abs().max()) == 0.0            # no complete block before t = 7
    win = R.masked_attention(q, k, v, R.window_mask(0, T, T, cfg.window)[None], scale)
    torch.testing.assert_close(o_win, win.float(), rtol=0, atol=0)
    # window >= length: the window branch is dense; top-n covering all: so is selection
    w.gate = gate_weights_for(2, H, D)
    torch.testing.assert_close(
        R.sparse_attention(q, k, v, 0, cfg.with_(window=T), scale, weights=w, x=x),
        R.dense_attention(q, k, v, 0, scale), rtol=0, atol=EXACT)
    w.gate = gate_weights_for(1, H, D)
    torch.testing.assert_close(
        R.sparse_attention(q, k, v, 0, cfg.with_(top_n=3), scale, weights=w, x=x),
        R.dense_attention(q, k, v, 0, scale), rtol=0, atol=EXACT)
    # the selection branch uses the phi keys, so it differs from the mean-pooled choice
    kc = R.compress(k, cfg, w.cmp_k, w.cmp_k_pe)
    idx = R.select_blocks(q, kc, 0, cfg, scale)
    torch.testing.assert_close(o_slc, R.masked_attention(
        q, k, v, R.selected_token_mask(idx, 0, T, cfg), scale).float(), rtol=0, atol=0)


def test_nsa_gates_combine_branches_and_decode_equals_prefill():
    T, H, hkv, dk, dv, D = 50, 4, 2, 16, 16, 10
    cfg = SMALL.with_(mode="nsa")
    q, k, v = rand_qkv(T, H, hkv, dk, dv, seed=18)
    x = torch.randn(T, D)
    w = rand_weights(cfg, H, dk, dv, D)
    out = R.sparse_attention(q, k, v, 0, cfg, 0.25, weights=w, x=x)
    o_cmp, o_slc, o_win = R.nsa_branches(q, k, v, 0, cfg, 0.25, w)
    gt = torch.sigmoid(x.double() @ w.gate.double().T).view(T, 3, H, 1)
    want = gt[:, 0] * o_cmp + gt[:, 1] * o_slc + gt[:, 2] * o_win
    torch.testing.assert_close(out, want.float(), rtol=0, atol=0)
    dec = torch.cat([R.sparse_attention(q[t:t + 1], k[:t + 1], v[:t + 1], t, cfg, 0.25,
                                        weights=w, x=x[t:t + 1]) for t in range(T)])
    torch.testing.assert_close(dec, out, rtol=0, atol=EXACT)


def test_errors_name_the_problem():
    q, k, v = rand_qkv(4, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="pos0"):
        R.sparse_attention(q, k, v, 1, SMALL, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        R.sparse_attention(q[:, :3], k, v, 0, SMALL, 1.0)
    with pytest.raises(ValueError, match="NSA weights"):
        R.sparse_attention(q, k, v, 0, SMALL.with_(mode="nsa"), 1.0)
    w = rand_weights(SMALL, 4, 8, 8, 6)
    w.cmp_k = w.cmp_k[:, :-1]
    with pytest.raises(ValueError, match="nsa_cmp_k"):
        R.sparse_attention(q, k, v, 0, SMALL.with_(mode="nsa"), 1.0, weights=w,
                           x=torch.ones(4, 6))
