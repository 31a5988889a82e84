"""Triton NSA kernels (hetero_moe/kernels/triton/nsa.py) vs the torch reference, in fp32.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be
set before the kernels are defined, hence before the import below)."""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hetero_moe.kernels.triton import nsa as N
from hetero_moe.layers.sparse_attn import reference as R
from hetero_moe.layers.sparse_attn.config import SparseAttnConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = SparseAttnConfig(mode="approx", cmp_block=8, cmp_stride=4, sel_block=16, top_n=4,
                         n_init=1, n_local=2, window=16, min_len=0)
ATOL = RTOL = 1e-5          # fp32 kernels vs the float64 reference (observed ~1e-6)
IMP_TOL = 1e-5              # block importances (sums of probabilities, <= G * l / d)


def rand_qkv(T, H, hkv, dk, dv, L, seed=0, latent=False, B=None):
    g = torch.Generator().manual_seed(seed)
    lead = () if B is None else (B,)
    q = torch.randn(*lead, T, H, dk, generator=g)
    k = torch.randn(*lead, L, hkv, dk, generator=g)
    v = k[..., :dv] if latent else torch.randn(*lead, L, hkv, dv, generator=g)
    return q, k, v


def rand_weights(cfg, H, dk, dv, dmodel, seed=1):
    g = torch.Generator().manual_seed(seed)
    l = cfg.cmp_block
    return R.NSAWeights(
        cmp_k=torch.randn(dk, l * dk, generator=g) / math.sqrt(l * dk),
        cmp_k_pe=torch.randn(l, dk, generator=g) * 0.1,
        cmp_v=torch.randn(dv, l * dv, generator=g) / math.sqrt(l * dv),
        cmp_v_pe=torch.randn(l, dv, generator=g) * 0.1,
        gate=torch.randn(3 * H, dmodel, generator=g) / math.sqrt(dmodel))


def dev(*ts):
    return [t.to(DEV) for t in ts]


def assert_same_selection(got, want, importance):
    """Indices must match; a row may differ only by swapping blocks whose reference importance
    ties within IMP_TOL (fp32 vs float64 rounding)."""
    got = got.cpu()
    for kh, ti in (got != want).any(-1).nonzero().tolist():
        a = [j for j in got[kh, ti].tolist() if j >= 0]
        b = [j for j in want[kh, ti].tolist() if j >= 0]
        assert len(a) == len(b), (kh, ti, a, b)
        ia, ib = importance[kh, ti, a].sum(), importance[kh, ti, b].sum()
        assert abs(float(ia - ib)) <= IMP_TOL, (kh, ti, a, b)


def check_invariants(idx, pos0, cfg):
    hkv, T, n = idx.shape
    assert idx.dtype == torch.int32 and n == cfg.top_n
    for ti in range(T):
        cur = (pos0 + ti) // cfg.sel_block
        forced = {j for j in range(cur + 1) if j < cfg.n_init or j > cur - cfg.n_local}
        for kh in range(hkv):
            row = idx[kh, ti].tolist()
            sel = [j for j in row if j >= 0]
            assert row == sel + [-1] * (n - len(sel)) and sel == sorted(set(sel)), row
            assert all(j <= cur for j in sel) and forced <= set(sel), (pos0 + ti, row)
            assert len(sel) == min(n, cur + 1)


# ---------------------------------------------------------------------------------- selection

SELECT_CASES = [  # (H, Hkv, Dk, L, T, cfg changes)
    (2, 2, 16, 70, 70, {}),                          # G=1, prefill from 0
    (4, 2, 32, 90, 30, {}),                          # G=2, chunk at pos0 = 60
    (8, 2, 16, 77, 9, {"n_init": 2, "n_local": 1}),  # G=4
    (8, 1, 64, 70, 5, {"n_init": 0, "n_local": 0}),  # G=8, no forced blocks
    (2, 1, 16, 333, 4, {}),                          # 21 selection blocks: two chunks of 16
    (2, 1, 192, 50, 3, {}),                          # Dk 192 (two dot chunks)
    (2, 1, 576, 50, 3, {}),                          # MLA latent keys (nine dot chunks)
]


@pytest.mark.parametrize("H,hkv,dk,L,T,kw", SELECT_CASES)
def test_selection_matches_reference(H, hkv, dk, L, T, kw):
    cfg = SMALL.with_(**kw)
    q, k, _ = rand_qkv(T, H, hkv, dk, dk, L, seed=L + T)
    pos0, scale = L - T, dk ** -0.5
    kc = R.compress(k, cfg)
    want_imp = R.block_importance(q, kc, pos0, cfg, scale)
    got_imp = N.block_importance(*dev(q, kc.float()), pos0, cfg, scale).cpu()
    assert torch.equal(torch.isinf(got_imp), torch.isinf(want_imp))
    fin = torch.isfinite(want_imp)
    torch.testing.assert_close(got_imp[fin].double(), want_imp[fin], rtol=RTOL, atol=IMP_TOL)
    got = N.select_blocks(*dev(q, kc.float()), pos0, cfg, scale)
    assert_same_selection(got, R.topn_blocks(want_imp, pos0, cfg), want_imp)
    check_invariants(got.cpu(), pos0, cfg)


@pytest.mark.parametrize("H,hkv,dk,L,T", [(4, 2, 32, 90, 12), (2, 2, 16, 333, 5),
                                         (8, 1, 576, 60, 3), (2, 1, 16, 34, 34)])
def test_minmax_selection_matches_reference(H, hkv, dk, L, T):
    cfg = SMALL.with_(score="minmax")
    q, k, _ = rand_qkv(T, H, hkv, dk, dk, L, seed=L + T)
    pos0, scale = L - T, dk ** -0.5
    want_imp = R.minmax_importance(q, k, pos0, cfg, scale)
    got_imp = N.minmax_importance(*dev(q, k), pos0, cfg, scale).cpu()
    assert torch.equal(torch.isinf(got_imp), torch.isinf(want_imp))
    fin = torch.isfinite(want_imp)
    torch.testing.assert_close(got_imp[fin].double(), want_imp[fin], rtol=RTOL, atol=IMP_TOL)
    got = N.select_blocks_minmax(*dev(q, k), pos0, cfg, scale)
    assert_same_selection(got, R.topn_blocks(want_imp, pos0, cfg), want_imp)
    check_invariants(got.cpu(), pos0, cfg)


def test_topn_kernel_tie_breaking():
    cfg = SMALL.with_(top_n=5)
    g = torch.Generator().manual_seed(3)
    T, pos0 = 40, 70
    ns = -(-(pos0 + T) // cfg.sel_block)
    imp = torch.randint(0, 3, (2, T, ns), generator=g).float()     # many exact ties
    imp = imp.masked_fill(~R.eligible_blocks(pos0, T, ns, cfg)[None], float("-inf"))
    got = N.topn_blocks(imp.to(DEV), pos0, cfg).cpu()
    assert torch.equal(got, R.topn_blocks(imp, pos0, cfg))


def test_uniform_scores_tie_to_lower_blocks():
    cfg = SMALL.with_(top_n=5)
    T = 132                             # t = 131 sees 32 compressed blocks: p = 1/32 exactly
    q = torch.zeros(3, 2, 16)
    k = torch.randn(T, 1, 16)
    kc = R.compress(k, cfg)
    got = N.select_blocks(*dev(q, kc.float()), T - 3, cfg, 1.0).cpu()
    assert torch.equal(got, R.select_blocks(q, kc, T - 3, cfg, 1.0))
    assert got[0, -1].tolist() == [0, 1, 2, 7, 8]


def test_selection_batched_and_chunked(monkeypatch):
    cfg = SMALL
    B, T, L = 2, 20, 60
    q, k, _ = rand_qkv(T, 4, 2, 16, 16, L, seed=4, B=B)
    kc = torch.stack([R.compress(k[b], cfg) for b in range(B)]).float()
    got = N.select_blocks(*dev(q, kc), L - T, cfg, 0.25).cpu()
    for b in range(B):
        imp = R.block_importance(q[b], kc[b], L - T, cfg, 0.25)
        assert_same_selection(got[b], R.topn_blocks(imp, L - T, cfg), imp)
    # a query chunk in the middle of the call (t_off) gives the same rows (up to the rounding
    # of a differently tiled dot)
    part = N.block_importance(*dev(q, kc), L - T, cfg, 0.25, t_off=7, n_q=5).cpu()
    full = N.block_importance(*dev(q, kc), L - T, cfg, 0.25).cpu()
    torch.testing.assert_close(part, full[:, :, 7:12], rtol=1e-6, atol=1e-6)
    # long prefills select in query chunks bounded by the scratch budget: 3 queries here
    ns = -(-L // cfg.sel_block)
    monkeypatch.setattr(N, "_IMP_BUDGET", B * 2 * ns * 3)
    assert torch.equal(N.select_blocks(*dev(q, kc), L - T, cfg, 0.25).cpu(), got)
    got_mm = N.select_blocks_minmax(*dev(q, k), L - T, cfg, 0.25).cpu()
    for b in range(B):
        imp = R.minmax_importance(q[b], k[b], L - T, cfg, 0.25)
        assert_same_selection(got_mm[b], R.topn_blocks(imp, L - T, cfg), imp)


# ---------------------------------------------------------------------------------- attention

ATTN_CASES = [  # (H, Hkv, Dk, Dv, latent)
    (2, 2, 64, 64, False),      # G=1, MHA
    (4, 2, 64, 64, False),      # G=2
    (4, 1, 128, 128, False),    # G=4
    (8, 1, 32, 32, False),      # G=8
    (2, 1, 192, 128, False),    # DeepSeek head dims
    (2, 1, 576, 512, True),     # MLA latent cache: v is a view of k
]


@pytest.mark.parametrize("H,hkv,dk,dv,latent", ATTN_CASES)
def test_attention_matches_reference(H, hkv, dk, dv, latent):
    L, T = 83, 3 if dk > 128 else 6                 # L: not a multiple of any block size
    # Dv 512 uses 16-key tiles: 32-token blocks then take two tiles each
    cfg = SMALL.with_(sel_block=32, top_n=2, n_local=1, window=8) if dv > 256 else SMALL
    q, k, v = rand_qkv(T, H, hkv, dk, dv, L, seed=dk + H, latent=latent)
    pos0, scale = L - T, dk ** -0.5
    idx = R.selection(q, k, pos0, cfg, scale)
    want = R.sparse_attention(q, k, v, pos0, cfg, scale, indices=idx)
    qd, kd = dev(q, k)
    vd = kd[..., :dv] if latent else v.to(DEV)
    got = N.block_sparse_attention(qd, kd, vd, idx.to(DEV), pos0, cfg, scale).cpu()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # the nsa branches: selected tokens alone, window alone
    w = rand_weights(cfg, H, dk, dv, 4)
    _, o_slc, o_win = R.nsa_branches(q, k, v, pos0, cfg.with_(mode="nsa"), scale, w, idx)
    g_slc, g_win = N.block_sparse_attention(qd, kd, vd, idx.to(DEV), pos0, cfg, scale,
                                            branches=True)
    torch.testing.assert_close(g_slc.cpu(), o_slc.float(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g_win.cpu(), o_win.float(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("score", ["mean", "minmax"])
def test_full_pipeline_prefill_from_zero(score):
    cfg = SMALL.with_(top_n=3, n_init=0, n_local=1, window=8, score=score)
    T = 52                                          # 4 selection blocks, 3 kept
    q, k, v = rand_qkv(T, 2, 1, 16, 16, T, seed=5)
    got = N.sparse_attention(*dev(q, k, v), 0, cfg, 0.25).cpu()
    torch.testing.assert_close(got, R.sparse_attention(q, k, v, 0, cfg, 0.25),
                               rtol=RTOL, atol=ATOL)


def test_window_or_topn_covering_everything_is_dense():
    L, T = 60, 4
    q, k, v = rand_qkv(T, 4, 2, 32, 16, L, seed=6)
    dense = R.dense_attention(q, k, v, L - T, 32 ** -0.5)
    for cfg in (SMALL.with_(window=L), SMALL.with_(window=1, top_n=4)):
        got = N.sparse_attention(*dev(q, k, v), L - T, cfg, 32 ** -0.5).cpu()
        torch.testing.assert_close(got, dense, rtol=RTOL, atol=ATOL)
    off = N.sparse_attention(*dev(q, k, v), L - T, SMALL.with_(min_len=L + 1), 32 ** -0.5)
    torch.testing.assert_close(off.cpu(), dense, rtol=RTOL, atol=ATOL)


def test_decode_equals_prefill():
    cfg = SMALL
    L, T = 80, 4
    q, k, v = rand_qkv(T, 4, 2, 32, 32, L, seed=7)
    pos0 = L - T
    pre = N.sparse_attention(*dev(q, k, v), pos0, cfg, 0.2).cpu()
    kc = R.compress(k, cfg).float()
    idx_pre = N.select_blocks(*dev(q, kc), pos0, cfg, 0.2).cpu()
    for i in range(T):
        t = pos0 + i
        dec = N.sparse_attention(*dev(q[i:i + 1], k[:t + 1], v[:t + 1]), t, cfg, 0.2).cpu()
        torch.testing.assert_close(dec, pre[i:i + 1], rtol=0, atol=0)
        kc_t = R.compress(k[:t + 1], cfg).float()
        idx = N.select_blocks(*dev(q[i:i + 1], kc_t), t, cfg, 0.2).cpu()
        assert torch.equal(idx[:, 0], idx_pre[:, i])


def test_future_keys_do_not_matter():
    # prefill of positions 58..69: queries before 66 must not see keys 66.., partial blocks
    # included (selection, window and attention)
    L, T = 70, 12
    q, k, v = rand_qkv(T, 2, 1, 16, 16, L, seed=12)
    k2, v2 = k.clone(), v.clone()
    k2[66:] = torch.randn(4, 1, 16) * 5
    v2[66:] = torch.randn(4, 1, 16) * 5
    a = N.sparse_attention(*dev(q, k, v), L - T, SMALL, 0.25).cpu()
    b = N.sparse_attention(*dev(q, k2, v2), L - T, SMALL, 0.25).cpu()
    torch.testing.assert_close(a[:8], b[:8], rtol=0, atol=0)
    assert float((a[8:] - b[8:]).abs().max()) > 1e-3


def test_batched_attention():
    cfg = SMALL
    B, L, T = 2, 50, 4
    q, k, v = rand_qkv(T, 4, 2, 16, 16, L, seed=8, B=B)
    got = N.sparse_attention(*dev(q, k, v), L - T, cfg, 0.25).cpu()
    for b in range(B):
        torch.testing.assert_close(got[b], R.sparse_attention(q[b], k[b], v[b], L - T, cfg, 0.25),
                                   rtol=RTOL, atol=ATOL)


def test_default_config():
    cfg = SparseAttnConfig(mode="approx", min_len=0)
    L, T = 1250, 2                                  # 20 selection blocks, 16 kept
    q, k, v = rand_qkv(T, 2, 1, 32, 32, L, seed=9)
    want = R.sparse_attention(q, k, v, L - T, cfg, 32 ** -0.5)
    got = N.sparse_attention(*dev(q, k, v), L - T, cfg, 32 ** -0.5).cpu()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert float((want - R.dense_attention(q, k, v, L - T, 32 ** -0.5)).abs().max()) > 1e-4


# ----------------------------------------------------------------------------------------- nsa

def test_nsa_mode_matches_reference():
    cfg = SMALL.with_(mode="nsa")
    L, T, H, D = 75, 5, 4, 12
    q, k, v = rand_qkv(T, H, 2, 32, 16, L, seed=10)
    w = rand_weights(cfg, H, 32, 16, D)
    x = torch.randn(T, D)
    want = R.sparse_attention(q, k, v, L - T, cfg, 32 ** -0.5, weights=w, x=x)
    got = N.sparse_attention(*dev(q, k, v), L - T, cfg, 32 ** -0.5, weights=w, x=x).cpu()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_nsa_single_open_gate_is_that_branch(branch):
    cfg = SMALL.with_(mode="nsa")
    L, T, H, D = 60, 4, 2, 6
    q, k, v = rand_qkv(T, H, 1, 16, 16, L, seed=11)
    w = rand_weights(cfg, H, 16, 16, D)
    gate = torch.full((3, H, D), -1000.0 / D)       # x = 1: sigmoid(+-1000) is exactly 1 / 0
    gate[branch] = 1000.0 / D
    w.gate = gate.reshape(3 * H, D)
    got = N.sparse_attention(*dev(q, k, v), L - T, cfg, 0.25, weights=w, x=torch.ones(T, D))
    want = R.nsa_branches(q, k, v, L - T, cfg, 0.25, w)[branch]
    torch.testing.assert_close(got.cpu(), want.float(), rtol=RTOL, atol=ATOL)


def test_errors_name_the_problem():
    q, k, v = rand_qkv(4, 4, 2, 16, 16, 10)
    idx = torch.zeros(2, 4, SMALL.top_n, dtype=torch.int32)
    with pytest.raises(ValueError, match="pos0"):
        N.block_sparse_attention(q, k, v, idx, 5, SMALL, 1.0)
    with pytest.raises(ValueError, match="indices"):
        N.block_sparse_attention(q, k, v, idx[:, :2], 6, SMALL, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        N.block_sparse_attention(q[:, :3], k, v, idx, 6, SMALL, 1.0)
    with pytest.raises(ValueError, match="NSA weights"):
        N.sparse_attention(q, k, v, 6, SMALL.with_(mode="nsa"), 1.0)
