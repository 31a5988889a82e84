"""Triton kernels for Native Sparse Attention (arXiv 2502.11089) and its `approx` form.

Semantics: hetero_moe/layers/sparse_attn/config.py; oracle: .../sparse_attn/reference.py.

Dimension key:
  B batch, T query tokens at positions pos0 .. pos0+T-1, L = pos0 + T cache positions
  H query heads, Hkv KV heads, G = H // Hkv, M rows of a program's tiles (padded to >= 16)
  Dk query/key dim, Dv value dim, Nc compressed blocks, Ns selection blocks, n = top_n

Attention: one program per (query token, KV head) with all G query heads of the group as the
rows of its tiles (group-centric loading: each fetched KV block serves the whole group).
Selection: one program per (BT query tokens, KV head), rows = token x head.

Kernels:
  _importance_kernel  compressed-key scores, softmax per head, group sum, Eq. 9 pooling
  _minmax_importance_kernel  `approx` score "minmax": Quest-style upper bounds, softmax, group sum
  _topn_kernel        forced blocks, causal eligibility, top-n (ties: lower index), -1 pad
  _attn_kernel        block-sparse attention over the selected blocks and the sliding window:
                      `approx` one softmax over their union, `nsa` two separate branch outputs

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors;
tiles are then computed in fp32 (the interpreter's bf16 dot is not exact).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetero_moe.config_env import triton_interpret
from hetero_moe.layers.sparse_attn.config import SparseAttnConfig

# Finite "minus infinity" for running maxima: a fully masked tile then gives exp(-inf) = 0
# instead of exp(-inf - -inf) = NaN.
_M_INIT = tl.constexpr(-1.0e30)
# Selection blocks scored per step of the importance kernel.
_SEL_CHUNK = 16
# Importance scratch budget (floats) per launch: long prefills run in query chunks.
_IMP_BUDGET = 1 << 26


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


# Integer index math is int64: the interpreter checks every int32 add/mul for overflow, which
# dominates its run time, and int64 offsets are safe for large caches. Helpers are inlined and
# reductions call tl.reduce with triton's own combine functions (which the interpreter maps to
# numpy) for the same reason: each nested jit call (tl.sum, tl.max) costs it milliseconds.
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min


@triton.jit
def _importance_kernel(
        q_ptr, s_qb, s_qt, s_qh, s_qd,
        kc_ptr, s_cb, s_cn, s_ch, s_cd,
        imp_ptr, s_ib, s_ih, s_it,          # [B, Hkv, Tc, Ns] fp32, prefilled with -inf
        n_kv_heads, pos0, t_off, n_q, n_cmp_max, n_sel, scale,
        G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, DK: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
        SPAN: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
        SEL_BLOCK: tl.constexpr, R: tl.constexpr, C: tl.constexpr, F32: tl.constexpr):
    # Rows: BT query tokens x GP (G padded) heads of one KV group; row = token * GP + head.
    M: tl.constexpr = BT * GP
    t_blk = tl.program_id(0).to(tl.int64) * BT
    pid = tl.program_id(1).to(tl.int64)
    b = pid // n_kv_heads
    g = pid % n_kv_heads

    rows = tl.arange(0, M).to(tl.int64)
    tok = t_blk + rows // GP                                            # query index in chunk
    head = rows % GP
    row_ok = (head < G) & (tok < n_q)
    t = pos0 + t_off + tok                                              # absolute position
    n_vis = tl.where(t + 1 >= CMP_BLOCK, (t + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0)
    n_vis = tl.where(row_ok, tl.minimum(n_vis, n_cmp_max), 0)
    nv_max = tl.reduce(n_vis, 0, _MAX)
    q_rows = q_ptr + b * s_qb + (t_off + tok) * s_qt + (g * G + head) * s_qh   # [M]
    k_base = kc_ptr + b * s_cb + g * s_ch

    # Pass 1: per-row softmax statistics over the complete compressed blocks.
    m_i = tl.full((M,), _M_INIT, dtype=tl.float32)
    l_i = tl.full((M,), 0.0, tl.float32)
    for c0 in range(0, nv_max, BLOCK_C):
        ci = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        ok = row_ok[:, None] & (ci[None, :] < n_vis[:, None])
        s = tl.full((M, BLOCK_C), 0.0, tl.float32)
        for d0 in range(0, DK, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            qt = tl.load(q_rows[:, None] + d[None, :] * s_qd,
                         mask=row_ok[:, None] & (d < DK)[None, :], other=0.0)
            kt = tl.load(k_base + ci[:, None] * s_cn + d[None, :] * s_cd,
                         mask=(ci < nv_max)[:, None] & (d < DK)[None, :], other=0.0)
            if F32:
                s += tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)),
                            input_precision="ieee")
            else:
                s += tl.dot(qt, tl.trans(kt.to(qt.dtype)))
        s = tl.where(ok, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        l_i = l_i * tl.exp(m_i - m_new) + tl.reduce(tl.exp(s - m_new[:, None]), 1, _SUM)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)

    # Pass 2, per chunk of BLOCK_S selection blocks: p_cmp of the compressed blocks they touch
    # (R*j0 - (C-1) .. R*(j0+BLOCK_S) - 1: SPAN >= R*BLOCK_S + C - 1 of them), summed over each
    # token's heads, pooled with Eq. 9: weight = cells (of d tokens) shared by cmp block i and
    # selection block j.
    cur = t // SEL_BLOCK                                                # [M]
    cur_max = tl.reduce(tl.where(row_ok, cur, 0), 0, _MAX)
    tb = t_blk + tl.arange(0, BT).to(tl.int64)                          # [BT] tokens
    cur_b = (pos0 + t_off + tb) // SEL_BLOCK
    imp_rows = imp_ptr + b * s_ib + g * s_ih + tb * s_it
    for j0 in range(0, cur_max + 1, BLOCK_S):
        ci = R * j0 - (C - 1) + tl.arange(0, SPAN).to(tl.int64)
        c_in = (ci >= 0) & (ci < R * (j0 + BLOCK_S))
        s = tl.full((M, SPAN), 0.0, tl.float32)
        for d0 in range(0, DK, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            qt = tl.load(q_rows[:, None] + d[None, :] * s_qd,
                         mask=row_ok[:, None] & (d < DK)[None, :], other=0.0)
            kt = tl.load(k_base + ci[:, None] * s_cn + d[None, :] * s_cd,
                         mask=(c_in & (ci < nv_max))[:, None] & (d < DK)[None, :], other=0.0)
            if F32:
                s += tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)),
                            input_precision="ieee")
            else:
                s += tl.dot(qt, tl.trans(kt.to(qt.dtype)))
        ok = row_ok[:, None] & c_in[None, :] & (ci[None, :] < n_vis[:, None])
        p = tl.exp(tl.where(ok, s * scale - m_i[:, None], float("-inf"))) / l_safe[:, None]
        j = j0 + tl.arange(0, BLOCK_S).to(tl.int64)
        lo = tl.maximum(ci[:, None], R * j[None, :])
        hi = tl.minimum(ci[:, None] + C, R * j[None, :] + R)
        w = tl.maximum(hi - lo, 0).to(tl.float32)                       # [SPAN, BLOCK_S]
        imp = tl.dot(p, w, input_precision="ieee")                      # [M, BLOCK_S]
        imp = tl.reduce(tl.reshape(imp, (BT, GP, BLOCK_S)), 1, _SUM)    # [BT, BLOCK_S]
        tl.store(imp_rows[:, None] + j[None, :], imp,
                 mask=(tb < n_q)[:, None] & (j[None, :] <= cur_b[:, None])
                 & (j < n_sel)[None, :])


@triton.jit
def _minmax_importance_kernel(
        q_ptr, s_qb, s_qt, s_qh, s_qd,
        lo_ptr, hi_ptr, s_rb, s_rn, s_rh, s_rd,   # running per-block key min / max [B, L, Hkv, Dk]
        imp_ptr, s_ib, s_ih, s_it,                # [B, Hkv, Tc, Ns] fp32, prefilled with -inf
        n_kv_heads, pos0, t_off, length, n_sel, scale,
        G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr, SEL_BLOCK: tl.constexpr):
    # One query token per program, rows = its GP (G padded) heads; no dot, so GP may be < 16.
    tq = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1).to(tl.int64)
    b = pid // n_kv_heads
    g = pid % n_kv_heads
    t = pos0 + t_off + tq
    cur = t // SEL_BLOCK
    rows = tl.arange(0, GP).to(tl.int64)
    row_ok = rows < G
    q_rows = q_ptr + b * s_qb + (t_off + tq) * s_qt + (g * G + rows) * s_qh   # [GP]
    r_base = b * s_rb + g * s_rh

    # Pass 1 computes the per-head softmax statistics of the upper bounds u, pass 2 recomputes
    # u and stores the group-summed probabilities.
    m_i = tl.full((GP,), _M_INIT, dtype=tl.float32)
    l_i = tl.full((GP,), 0.0, tl.float32)
    l_safe = l_i
    for step in tl.static_range(2):
        if step == 1:
            l_safe = tl.where(l_i > 0, l_i, 1.0)
        for j0 in range(0, cur + 1, BLOCK_S):
            j = j0 + tl.arange(0, BLOCK_S).to(tl.int64)
            j_ok = j <= cur
            # Last key of block j at or before t: bounds over exactly the keys a query sees.
            last = tl.minimum(tl.minimum(j * SEL_BLOCK + SEL_BLOCK - 1, t), length - 1)
            u = tl.full((GP, BLOCK_S), 0.0, tl.float32)
            for d0 in range(0, DK, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                qt = tl.load(q_rows[:, None] + d[None, :] * s_qd,
                             mask=row_ok[:, None] & (d < DK)[None, :], other=0.0).to(tl.float32)
                off = r_base + last[:, None] * s_rn + d[None, :] * s_rd
                msk = j_ok[:, None] & (d < DK)[None, :]
                lo = tl.load(lo_ptr + off, mask=msk, other=0.0).to(tl.float32)
                hi = tl.load(hi_ptr + off, mask=msk, other=0.0).to(tl.float32)
                qe = qt[:, None, :]
                u += tl.reduce(tl.maximum(qe * lo[None, :, :], qe * hi[None, :, :]), 2, _SUM)
            u = tl.where(j_ok[None, :], u * scale, float("-inf"))
            if step == 0:
                m_new = tl.maximum(m_i, tl.reduce(u, 1, _MAX))
                l_i = l_i * tl.exp(m_i - m_new) + tl.reduce(tl.exp(u - m_new[:, None]), 1, _SUM)
                m_i = m_new
            else:
                p = tl.where(row_ok[:, None], tl.exp(u - m_i[:, None]) / l_safe[:, None], 0.0)
                imp = tl.reduce(p, 0, _SUM)
                tl.store(imp_ptr + b * s_ib + g * s_ih + tq * s_it + j, imp,
                         mask=j_ok & (j < n_sel))


@triton.jit
def _topn_kernel(imp_ptr, s_ib, s_ih, s_it, idx_ptr, s_xb, s_xh, s_xt,
                 n_kv_heads, pos0, t_off, n_q, n_sel, n_init, n_local,
                 BT: tl.constexpr, TOPN: tl.constexpr, TOPN_PAD: tl.constexpr,
                 NS_PAD: tl.constexpr, SEL_BLOCK: tl.constexpr):
    tb = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT).to(tl.int64)   # [BT]
    pid = tl.program_id(1).to(tl.int64)
    b = pid // n_kv_heads
    g = pid % n_kv_heads
    t_ok = tb < n_q
    cur = ((pos0 + t_off + tb) // SEL_BLOCK)[:, None]                   # [BT, 1]
    j = tl.arange(0, NS_PAD).to(tl.int64)[None, :]                      # [1, NS]
    eligible = (j <= cur) & (j < n_sel) & t_ok[:, None]
    forced = eligible & ((j < n_init) | (j > cur - n_local))
    imp = tl.load(imp_ptr + b * s_ib + g * s_ih + tb[:, None] * s_it + j, mask=eligible,
                  other=float("-inf"))
    score = tl.where(forced, float("inf"), tl.where(eligible, imp, float("-inf")))
    sel = eligible & (j < 0)
    for _ in range(TOPN):
        x = tl.where(sel, float("-inf"), score)
        best = tl.reduce(x, 1, _MAX)[:, None]
        pick = tl.reduce(tl.where(x == best, j, NS_PAD), 1, _MIN)[:, None]  # ties: lower index
        sel = sel | ((j == pick) & (x > float("-inf")))
    rank = tl.associative_scan(sel.to(tl.int64), 1, _SUM) - 1         # ascending order
    out = idx_ptr + b * s_xb + g * s_xh + (t_off + tb)[:, None] * s_xt
    tl.store(out + rank, tl.broadcast_to(j.to(tl.int32), (BT, NS_PAD)), mask=sel)
    slot = tl.arange(0, TOPN_PAD).to(tl.int64)[None, :]
    count = tl.reduce(sel.to(tl.int64), 1, _SUM)[:, None]
    tl.store(out + slot, tl.full((BT, TOPN_PAD), -1, tl.int32),
             mask=(slot >= count) & (slot < TOPN) & t_ok[:, None])


@triton.jit
def _attn_kernel(
        q_ptr, s_qb, s_qt, s_qh, s_qd,
        k_ptr, s_kb, s_kn, s_kh, s_kd,
        v_ptr, s_vb, s_vn, s_vh, s_vd,
        idx_ptr, s_xb, s_xh, s_xt,
        o_ptr, s_ob, s_ot, s_oh, s_od,      # approx: the output; nsa: the selection branch
        w_ptr, s_wb, s_wt, s_wh, s_wd,      # nsa: the window branch
        n_kv_heads, pos0, scale, window,
        G: tl.constexpr, M: tl.constexpr, DK: tl.constexpr, BLOCK_D: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr, TOPN: tl.constexpr, TOPN_PAD: tl.constexpr, NSA: tl.constexpr,
        F32: tl.constexpr):
    tq = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1).to(tl.int64)
    b = pid // n_kv_heads
    g = pid % n_kv_heads
    t = pos0 + tq

    rows = tl.arange(0, M).to(tl.int64)
    row_ok = rows < G
    dv = tl.arange(0, DV_PAD).to(tl.int64)
    dv_ok = dv < DV
    q_base = q_ptr + b * s_qb + tq * s_qt + (g * G) * s_qh
    k_base = k_ptr + b * s_kb + g * s_kh
    v_base = v_ptr + b * s_vb + g * s_vh

    slot = tl.arange(0, TOPN_PAD).to(tl.int64)
    x_base = idx_ptr + b * s_xb + g * s_xh + tq * s_xt
    sel = tl.load(x_base + slot, mask=slot < TOPN, other=-1).to(tl.int64)  # ascending, -1 last
    n_sel = tl.reduce((sel >= 0).to(tl.int64), 0, _SUM)

    # Online softmax state (m, l, acc) of the selection branch.
    m_a = tl.full((M,), _M_INIT, dtype=tl.float32)
    l_a = tl.full((M,), 0.0, tl.float32)
    acc_a = tl.full((M, DV_PAD), 0.0, tl.float32)
    # Selected blocks, in key tiles of BLOCK_N: their tokens at positions <= t (the current
    # block is partial).
    N_SUB: tl.constexpr = (SEL_BLOCK + BLOCK_N - 1) // BLOCK_N
    for it in range(n_sel * N_SUB):
        blk = tl.load(x_base + it // N_SUB).to(tl.int64)
        within = (it % N_SUB) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        kpos = blk * SEL_BLOCK + within
        ok = (within < SEL_BLOCK) & (kpos <= t)
        s = tl.full((M, BLOCK_N), 0.0, tl.float32)
        for d0 in range(0, DK, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            qt = tl.load(q_base + rows[:, None] * s_qh + d[None, :] * s_qd,
                         mask=row_ok[:, None] & (d < DK)[None, :], other=0.0)
            kt = tl.load(k_base + kpos[:, None] * s_kn + d[None, :] * s_kd,
                         mask=ok[:, None] & (d < DK)[None, :], other=0.0)
            if F32:
                s += tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)),
                            input_precision="ieee")
            else:
                s += tl.dot(qt, tl.trans(kt.to(qt.dtype)))
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_a, tl.reduce(s, 1, _MAX))
        alpha = tl.exp(m_a - m_new)
        p = tl.exp(s - m_new[:, None])
        vt = tl.load(v_base + kpos[:, None] * s_vn + dv[None, :] * s_vd,
                     mask=ok[:, None] & dv_ok[None, :], other=0.0)
        if F32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        l_a = l_a * alpha + tl.reduce(p, 1, _SUM)
        acc_a = acc_a * alpha[:, None] + pv
        m_a = m_new

    # Window tokens t-window+1 .. t. `approx` continues the same softmax and skips tokens of
    # selected blocks (each token once); `nsa` starts a separate branch.
    if NSA:
        m_w = tl.full((M,), _M_INIT, dtype=tl.float32)
        l_w = tl.full((M,), 0.0, tl.float32)
        acc_w = tl.full((M, DV_PAD), 0.0, tl.float32)
    else:
        m_w = m_a
        l_w = l_a
        acc_w = acc_a
    w0 = tl.maximum(t - window + 1, 0)
    for p0 in range(w0, t + 1, BLOCK_W):
        kpos = p0 + tl.arange(0, BLOCK_W).to(tl.int64)
        ok = kpos <= t
        if not NSA:
            in_sel = tl.reduce(((kpos // SEL_BLOCK)[:, None] == sel[None, :]).to(tl.int32), 1, _SUM)
            ok = ok & (in_sel == 0)
        s = tl.full((M, BLOCK_W), 0.0, tl.float32)
        for d0 in range(0, DK, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            qt = tl.load(q_base + rows[:, None] * s_qh + d[None, :] * s_qd,
                         mask=row_ok[:, None] & (d < DK)[None, :], other=0.0)
            kt = tl.load(k_base + kpos[:, None] * s_kn + d[None, :] * s_kd,
                         mask=ok[:, None] & (d < DK)[None, :], other=0.0)
            if F32:
                s += tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)),
                            input_precision="ieee")
            else:
                s += tl.dot(qt, tl.trans(kt.to(qt.dtype)))
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_w, tl.reduce(s, 1, _MAX))
        alpha = tl.exp(m_w - m_new)
        p = tl.exp(s - m_new[:, None])
        vt = tl.load(v_base + kpos[:, None] * s_vn + dv[None, :] * s_vd,
                     mask=ok[:, None] & dv_ok[None, :], other=0.0)
        if F32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        l_w = l_w * alpha + tl.reduce(p, 1, _SUM)
        acc_w = acc_w * alpha[:, None] + pv
        m_w = m_new

    out_mask = row_ok[:, None] & dv_ok[None, :]
    o_w = acc_w / tl.where(l_w > 0, l_w, 1.0)[:, None]                   # no key: 0
    if NSA:
        o_a = acc_a / tl.where(l_a > 0, l_a, 1.0)[:, None]
        o_base = o_ptr + b * s_ob + tq * s_ot + (g * G) * s_oh
        tl.store(o_base + rows[:, None] * s_oh + dv[None, :] * s_od,
                 o_a.to(o_ptr.dtype.element_ty), mask=out_mask)
        w_base = w_ptr + b * s_wb + tq * s_wt + (g * G) * s_wh
        tl.store(w_base + rows[:, None] * s_wh + dv[None, :] * s_wd,
                 o_w.to(w_ptr.dtype.element_ty), mask=out_mask)
    else:
        o_base = o_ptr + b * s_ob + tq * s_ot + (g * G) * s_oh
        tl.store(o_base + rows[:, None] * s_oh + dv[None, :] * s_od,
                 o_w.to(o_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------------------------ wrappers

def _block_d(dk: int) -> int:
    """Key-dim chunk of the score dot: Dk itself up to 128 (one chunk), else 64 (576 = 9 x 64)."""
    return _pow2(dk) if dk <= 128 else 64


def _key_tile(dv: int) -> int:
    """Keys per attention tile: the [tile, Dv] value tile must fit in shared memory."""
    return 64 if dv <= 128 else 32 if dv <= 256 else 16


def _selection_rows() -> int:
    """Rows (tokens x heads) per importance program: larger tiles amortize the interpreter's
    per-op cost; on a GPU they would exceed shared memory in fp32."""
    return 64 if triton_interpret() else 16


def _tokens_per_program(n_q: int, lo: int, hi: int) -> int:
    """Query tokens per program: a power of two in lo .. hi, no more than the queries."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n_q))))


def _batched(*ts):
    """[T, ...] -> [1, T, ...] for unbatched inputs; returns (tensors, was_unbatched)."""
    if ts[0].dim() == 3:
        return tuple(t.unsqueeze(0) for t in ts), True
    return ts, False


def _use_f32(x: torch.Tensor) -> bool:
    return triton_interpret() or x.dtype == torch.float32


def _check(q, k, pos0, what):
    B, _, H, dk = q.shape
    if k.shape[0] != B or k.shape[-1] != dk:
        raise ValueError(f"{what}: q {tuple(q.shape)} and keys {tuple(k.shape)} disagree")
    if H % k.shape[2]:
        raise ValueError(f"{what}: {H} query heads are not a multiple of {k.shape[2]} KV heads")
    if pos0 < 0:
        raise ValueError(f"{what}: pos0 = {pos0} must be >= 0")


def block_importance(q: torch.Tensor, k_cmp: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                     scale: float, *, t_off: int = 0, n_q: int | None = None) -> torch.Tensor:
    """Selection-block importance fp32 [B, Hkv, n_q, Ns] of queries t_off .. t_off+n_q-1 of q
    [B, T, H, Dk] (positions pos0 + t_off ..) from compressed keys k_cmp [B, Nc, Hkv, Dk];
    -inf for ineligible blocks. Ns covers the cache after the whole call (L = pos0 + T)."""
    (q, k_cmp), flat = _batched(q, k_cmp)
    _check(q, k_cmp, pos0, "nsa block_importance")
    B, T, H, dk = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    G = H // hkv
    n_q = T - t_off if n_q is None else n_q
    ns = -(-(pos0 + T) // cfg.sel_block)
    imp = torch.full((B, hkv, n_q, ns), float("-inf"), dtype=torch.float32, device=q.device)
    if n_q == 0:
        return imp[0] if flat else imp
    r, c = cfg.sel_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    gp = triton.next_power_of_2(G)
    bt = _tokens_per_program(n_q, max(1, 16 // gp), _selection_rows() // gp)
    _importance_kernel[(triton.cdiv(n_q, bt), B * hkv)](
        q, *q.stride(), k_cmp, *k_cmp.stride(), imp, *imp.stride()[:3],
        hkv, pos0, t_off, n_q, nc, ns, float(scale),
        G=G, GP=gp, BT=bt, DK=dk, BLOCK_D=_block_d(dk), BLOCK_C=64, BLOCK_S=_SEL_CHUNK,
        SPAN=_pow2(r * _SEL_CHUNK + c - 1), CMP_BLOCK=cfg.cmp_block, CMP_STRIDE=cfg.cmp_stride,
        SEL_BLOCK=cfg.sel_block, R=r, C=c, F32=_use_f32(q), num_warps=4)
    return imp[0] if flat else imp


def minmax_importance(q: torch.Tensor, k: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                      scale: float, *, t_off: int = 0, n_q: int | None = None,
                      bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Quest-style importance fp32 [B, Hkv, n_q, Ns] (config.py, score "minmax") of queries
    t_off .. t_off+n_q-1 of q [B, T, H, Dk] over the keys k [B, L, Hkv, Dk]; -inf if
    ineligible. bounds: _running_block_minmax(k), when already computed."""
    (q, k), flat = _batched(q, k)
    _check(q, k, pos0, "nsa minmax_importance")
    B, T, H, dk = q.shape
    L, hkv = k.shape[1], k.shape[2]
    G = H // hkv
    n_q = T - t_off if n_q is None else n_q
    ns = -(-L // cfg.sel_block)
    imp = torch.full((B, hkv, n_q, ns), float("-inf"), dtype=torch.float32, device=q.device)
    if n_q:
        lo, hi = bounds if bounds is not None else _running_block_minmax(k, cfg.sel_block)
        _minmax_importance_kernel[(n_q, B * hkv)](
            q, *q.stride(), lo, hi, *lo.stride(), imp, *imp.stride()[:3],
            hkv, pos0, t_off, L, ns, float(scale),
            G=G, GP=triton.next_power_of_2(G), DK=dk, BLOCK_D=min(_block_d(dk), 64),
            BLOCK_S=_SEL_CHUNK, SEL_BLOCK=cfg.sel_block, num_warps=4)
    return imp[0] if flat else imp


def _running_block_minmax(k: torch.Tensor, sel_block: int):
    """Per key position, the min / max of its selection block's keys up to it (fp32)."""
    B, L, hkv, dk = k.shape
    ns = -(-L // sel_block)
    pad = torch.zeros(B, ns * sel_block - L, hkv, dk, dtype=torch.float32, device=k.device)
    blocks = torch.cat([k.float(), pad], dim=1).view(B, ns, sel_block, hkv, dk)
    lo = torch.cummin(blocks, dim=2).values.view(B, ns * sel_block, hkv, dk)[:, :L]
    hi = torch.cummax(blocks, dim=2).values.view(B, ns * sel_block, hkv, dk)[:, :L]
    return lo.contiguous(), hi.contiguous()


def topn_blocks(importance: torch.Tensor, pos0: int, cfg: SparseAttnConfig, *,
                t_off: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Top-n from importance [B, Hkv, Tc, Ns] (queries at pos0 + t_off ..) -> int32
    [B, Hkv, Tc, n], ascending, -1 padded; written into out[:, :, t_off:] when given."""
    flat = importance.dim() == 3
    if flat:
        importance = importance.unsqueeze(0)
    B, hkv, tc, ns = importance.shape
    if out is None:
        out = torch.empty(B, hkv, t_off + tc, cfg.top_n, dtype=torch.int32,
                          device=importance.device)
    if tc:
        ns_pad = _pow2(ns, 2)
        bt = _tokens_per_program(tc, 1, max(1, 4096 // ns_pad))
        _topn_kernel[(triton.cdiv(tc, bt), B * hkv)](
            importance, *importance.stride()[:3], out, *out.stride()[:3],
            hkv, pos0, t_off, tc, ns, cfg.n_init, cfg.n_local, BT=bt,
            TOPN=cfg.top_n, TOPN_PAD=_pow2(cfg.top_n, 2), NS_PAD=ns_pad,
            SEL_BLOCK=cfg.sel_block, num_warps=4)
    res = out[:, :, t_off:t_off + tc]
    return res[0] if flat else res


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                  scale: float) -> torch.Tensor:
    """Selected blocks int32 [B, Hkv, T, n] (ascending, -1 padded) for q [B, T, H, Dk] and
    compressed keys k_cmp [B, Nc, Hkv, Dk]; unbatched [T, H, Dk] gives [Hkv, T, n]."""
    (q, k_cmp), flat = _batched(q, k_cmp)
    out = _select_in_chunks(q, k_cmp.shape[2], pos0, cfg, lambda a, n: block_importance(
        q, k_cmp, pos0, cfg, scale, t_off=a, n_q=n))
    return out[0] if flat else out


def select_blocks_minmax(q: torch.Tensor, k: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                         scale: float) -> torch.Tensor:
    """Selected blocks int32 [B, Hkv, T, n] from the min/max bound of the keys k [B, L, Hkv, Dk]."""
    (q, k), flat = _batched(q, k)
    bounds = _running_block_minmax(k, cfg.sel_block)
    out = _select_in_chunks(q, k.shape[2], pos0, cfg, lambda a, n: minmax_importance(
        q, k, pos0, cfg, scale, t_off=a, n_q=n, bounds=bounds))
    return out[0] if flat else out


def _select_in_chunks(q, hkv, pos0, cfg, importance_of) -> torch.Tensor:
    """Top-n of importance_of(t_off, n_q) over query chunks that bound the scratch size."""
    B, T = q.shape[:2]
    ns = -(-(pos0 + T) // cfg.sel_block)
    out = torch.empty(B, hkv, T, cfg.top_n, dtype=torch.int32, device=q.device)
    step = max(1, _IMP_BUDGET // max(1, B * hkv * ns))
    for a in range(0, T, step):
        topn_blocks(importance_of(a, min(step, T - a)), pos0, cfg, t_off=a, out=out)
    return out


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           indices: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                           scale: float, *, branches: bool = False):
    """Attention of q [B, T, H, Dk] over the cache k [B, L, Hkv, Dk], v [B, L, Hkv, Dv]
    (L = pos0 + T; v may be a view of k, as MLA's latent) restricted to the selected blocks
    indices [B, Hkv, T, n] and the sliding window.

    branches=False: `approx`, one softmax over the union -> [B, T, H, Dv].
    branches=True: `nsa`, separate softmaxes -> (o_slc, o_win), each [B, T, H, Dv].
    Unbatched [T, H, D] inputs (indices [Hkv, T, n]) give unbatched outputs."""
    (q, k, v), flat = _batched(q, k, v)
    if flat:
        indices = indices.unsqueeze(0)
    _check(q, k, pos0, "nsa block_sparse_attention")
    B, T, H, dk = q.shape
    L, hkv, dv = v.shape[1], v.shape[2], v.shape[3]
    if L != pos0 + T or k.shape[1] != L:
        raise ValueError(f"nsa block_sparse_attention: cache holds {k.shape[1]} keys and "
                         f"{L} values but pos0 + T = {pos0} + {T} = {pos0 + T}")
    if tuple(indices.shape) != (B, hkv, T, cfg.top_n):
        raise ValueError(f"nsa block_sparse_attention: indices {tuple(indices.shape)}, "
                         f"expected {(B, hkv, T, cfg.top_n)}")
    G = H // hkv
    bn = _key_tile(dv)
    o = torch.empty(B, T, H, dv, dtype=q.dtype, device=q.device)
    w = torch.empty_like(o) if branches else o
    if T:
        _attn_kernel[(T, B * hkv)](
            q, *q.stride(), k, *k.stride(), v, *v.stride(), indices, *indices.stride()[:3],
            o, *o.stride(), w, *w.stride(), hkv, pos0, float(scale), cfg.window,
            G=G, M=_pow2(G), DK=dk, BLOCK_D=_block_d(dk), DV=dv, DV_PAD=_pow2(dv),
            SEL_BLOCK=cfg.sel_block, BLOCK_N=min(bn, _pow2(cfg.sel_block)),
            BLOCK_W=min(bn, _pow2(cfg.window)),
            TOPN=cfg.top_n, TOPN_PAD=_pow2(cfg.top_n, 2), NSA=branches, F32=_use_f32(q),
            num_warps=4)
    if flat:
        o, w = o[0], w[0]
    return (o, w) if branches else o


# -------------------------------------------------------------------------- whole layer (torch)

def _compress(x: torch.Tensor, cfg: SparseAttnConfig, weight=None, pe=None) -> torch.Tensor:
    """x [B, L, Hkv, D] -> [B, Nc, Hkv, D]: mean or phi over complete blocks (fp32)."""
    B, L, hkv, dim = x.shape
    nc = cfg.n_cmp(L - 1)
    tok = (torch.arange(nc, device=x.device)[:, None] * cfg.cmp_stride
           + torch.arange(cfg.cmp_block, device=x.device)[None, :])
    blocks = x.float()[:, tok]                                       # [B, Nc, l, Hkv, D]
    if weight is None:
        return blocks.mean(dim=2)
    blocks = blocks + pe.float()[None, None, :, None, :]
    flat = blocks.permute(0, 1, 3, 2, 4).reshape(B, nc, hkv, cfg.cmp_block * dim)
    return flat @ weight.float().T


def _cmp_attention(q, kc, vc, pos0, cfg, scale):
    """Compression branch: q [B, T, H, Dk] over kc [B, Nc, Hkv, Dk], vc -> fp32 [B, T, H, Dv]."""
    B, T, H, _ = q.shape
    nc, hkv = kc.shape[1], kc.shape[2]
    G = H // hkv
    t = torch.arange(pos0, pos0 + T, device=q.device)
    n_vis = torch.where(t + 1 >= cfg.cmp_block, (t + 1 - cfg.cmp_block) // cfg.cmp_stride + 1, 0)
    ok = torch.arange(nc, device=q.device)[None, :] < n_vis[:, None]          # [T, Nc]
    qg = q.float().view(B, T, hkv, G, -1)
    s = torch.einsum("btkgd,bnkd->bkgtn", qg, kc) * scale
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1)
    p = torch.where(ok, p, torch.zeros((), device=q.device))
    return torch.einsum("bkgtn,bnke->btkge", p, vc).reshape(B, T, H, -1)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int,
                     cfg: SparseAttnConfig, scale: float, weights=None,
                     x: torch.Tensor | None = None) -> torch.Tensor:
    """reference.sparse_attention on the Triton kernels, batched ([B, T, H, D]) or not:
    compression, the compression branch and the gates in torch; selection and block-sparse
    attention in Triton. `nsa` needs weights (reference.NSAWeights) and x [B, T, D]. Dense
    causal when the mode is off or L < cfg.min_len."""
    (q, k, v), flat = _batched(q, k, v)
    if flat and x is not None:
        x = x.unsqueeze(0)
    B, T, H, dk = q.shape
    L, hkv = k.shape[1], k.shape[2]
    if not cfg.enabled or L < cfg.min_len:
        # Dense causal: no selected block and a window covering the whole cache.
        none = torch.full((B, hkv, T, cfg.top_n), -1, dtype=torch.int32, device=q.device)
        o = block_sparse_attention(q, k, v, none, pos0, cfg.with_(window=max(1, L)), scale)
    elif cfg.mode == "approx":
        if cfg.score == "minmax":
            idx = select_blocks_minmax(q, k, pos0, cfg, scale)
        else:
            idx = select_blocks(q, _compress(k, cfg).to(q.dtype), pos0, cfg, scale)
        o = block_sparse_attention(q, k, v, idx, pos0, cfg, scale)
    elif cfg.mode == "nsa":
        if weights is None or x is None:
            raise ValueError("sparse_attn mode 'nsa' needs the layer's NSA weights and the "
                             "attention input x for the gates")
        weights.check(cfg, H, dk, v.shape[-1])
        kc = _compress(k, cfg, weights.cmp_k, weights.cmp_k_pe)
        vc = _compress(v, cfg, weights.cmp_v, weights.cmp_v_pe)
        idx = select_blocks(q, kc.to(q.dtype), pos0, cfg, scale)
        o_slc, o_win = block_sparse_attention(q, k, v, idx, pos0, cfg, scale, branches=True)
        o_cmp = _cmp_attention(q, kc, vc, pos0, cfg, scale)
        gates = torch.sigmoid(x.float() @ weights.gate.float().T).view(B, T, 3, H, 1)
        o = (gates[:, :, 0] * o_cmp + gates[:, :, 1] * o_slc.float()
             + gates[:, :, 2] * o_win.float()).to(q.dtype)
    else:
        raise ValueError(f"Triton nsa: unknown sparse_attn mode {cfg.mode!r}")
    return o[0] if flat else o
