"""Readable torch reference for sparse attention (NSA and its `approx` form).

It follows the semantics in config.py exactly and is the oracle the Triton kernels and the CPU
decode path are tested against. It favours clarity over speed: masks are materialized per query.
It computes in float64 (REF_DTYPE): sparse_attention and dense_attention return q's dtype, the
intermediate functions (compress, importances, masked_attention, nsa_branches) float64.

Dimension key:
  T  query tokens, at absolute positions pos0 .. pos0+T-1
  L  cache positions (L = pos0 + T: the cache after this call)
  H  query heads, Hkv KV heads, G = H // Hkv (query head h reads KV head h // G)
  Dk query/key dim, Dv value dim (MLA latent: Hkv = 1, Dk = 576, v = k[..., :512])
  Nc compressed blocks, Ns selection blocks, n = cfg.top_n
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SparseAttnConfig

NEG_INF = float("-inf")
# Everything is computed in float64, so results do not depend on reduction order or length
# (prefill and token-by-token decode agree bitwise after the final cast to q's dtype).
REF_DTYPE = torch.float64
# Query rows per chunk in masked_attention: bounds the [H, rows, L] score tensor.
_SCORE_BUDGET = 1 << 24


@dataclass
class NSAWeights:
    """The learned `nsa` tensors of one layer, in torch shapes (see config.py)."""
    cmp_k: torch.Tensor     # [Dk, l*Dk]  phi for keys
    cmp_k_pe: torch.Tensor  # [l, Dk]     intra-block position embedding for keys
    cmp_v: torch.Tensor     # [Dv, l*Dv]
    cmp_v_pe: torch.Tensor  # [l, Dv]
    gate: torch.Tensor      # [3*H, D]    rows: cmp heads 0..H-1, then slc, then win

    def check(self, cfg: SparseAttnConfig, n_heads: int, dk: int, dv: int) -> None:
        want = {"nsa_cmp_k": (self.cmp_k, (dk, cfg.cmp_block * dk)),
                "nsa_cmp_k_pe": (self.cmp_k_pe, (cfg.cmp_block, dk)),
                "nsa_cmp_v": (self.cmp_v, (dv, cfg.cmp_block * dv)),
                "nsa_cmp_v_pe": (self.cmp_v_pe, (cfg.cmp_block, dv))}
        for name, (t, shape) in want.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} "
                                 f"(cmp_block {cfg.cmp_block}, Dk {dk}, Dv {dv})")
        if self.gate.dim() != 2 or self.gate.shape[0] != 3 * n_heads:
            raise ValueError(f"nsa_gate has shape {tuple(self.gate.shape)}, expected "
                             f"[3*H = {3 * n_heads}, D]")


# ----------------------------------------------------------------------------------- geometry

def n_sel_blocks(cfg: SparseAttnConfig, length: int) -> int:
    """Selection blocks touching a cache of `length` positions (the last one may be partial)."""
    return -(-length // cfg.sel_block)


def query_positions(pos0: int, n_q: int) -> torch.Tensor:
    return torch.arange(pos0, pos0 + n_q)


def eq9_weights(cfg: SparseAttnConfig, n_sel: int, n_cmp: int) -> torch.Tensor:
    """Eq. 9 as a matrix W [n_sel, n_cmp]: p_slc = W @ p_cmp.

    W[j, i] counts the pairs (m < l'/d, n < l/d) with (l'/d)*j + m - n == i."""
    r, c = cfg.sel_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    j = torch.arange(n_sel)[:, None, None]
    m = torch.arange(r)[None, :, None]
    n = torch.arange(c)[None, None, :]
    i = (r * j + m - n).expand(n_sel, r, c)
    jj = j.expand(n_sel, r, c)
    ok = (i >= 0) & (i < n_cmp)
    w = torch.zeros(n_sel, n_cmp, dtype=REF_DTYPE)
    w.index_put_((jj[ok], i[ok]), torch.ones(int(ok.sum()), dtype=REF_DTYPE), accumulate=True)
    return w


def eq9_weights_bruteforce(cfg: SparseAttnConfig, n_sel: int, n_cmp: int) -> torch.Tensor:
    """(tokens compressed block i shares with selection block j) / d, counted token by token."""
    w = torch.zeros(n_sel, n_cmp, dtype=REF_DTYPE)
    for j in range(n_sel):
        sel = set(range(j * cfg.sel_block, (j + 1) * cfg.sel_block))
        for i in range(n_cmp):
            cmp = set(range(i * cfg.cmp_stride, i * cfg.cmp_stride + cfg.cmp_block))
            w[j, i] = len(sel & cmp) / cfg.cmp_stride
    return w


# -------------------------------------------------------------------------------- compression

def compress(x: torch.Tensor, cfg: SparseAttnConfig, weight: torch.Tensor | None = None,
             pe: torch.Tensor | None = None) -> torch.Tensor:
    """Compressed keys or values of every complete block: x [L, Hkv, D] -> [Nc, Hkv, D].

    Mean pooling when weight is None, else phi: W [D, l*D] @ flatten(x[block] + pe [l, D])."""
    L, hkv, dim = x.shape
    l, d = cfg.cmp_block, cfg.cmp_stride
    nc = cfg.n_cmp(L - 1)
    x = x.to(REF_DTYPE)
    if nc == 0:
        out_dim = dim if weight is None else weight.shape[0]
        return x.new_zeros(0, hkv, out_dim)
    tok = torch.arange(nc)[:, None] * d + torch.arange(l)[None, :]  # [Nc, l]
    blocks = x[tok]                                                  # [Nc, l, Hkv, D]
    if weight is None:
        return blocks.mean(dim=1)
    if pe is None:
        raise ValueError("compress: a learned phi weight needs its position embedding (pe)")
    blocks = blocks + pe.to(REF_DTYPE)[None, :, None, :]
    flat = blocks.permute(0, 2, 1, 3).reshape(nc, hkv, l * dim)     # token-major flatten
    return flat @ weight.to(REF_DTYPE).T


# ---------------------------------------------------------------------------------- selection

def cmp_probs(q: torch.Tensor, k_cmp: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
              scale: float) -> torch.Tensor:
    """Group-summed compression scores p_cmp [Hkv, T, Nc] (0 for blocks not yet complete)."""
    T, H, _ = q.shape
    nc, hkv = k_cmp.shape[:2]
    g = H // hkv
    kk = k_cmp.to(REF_DTYPE).repeat_interleave(g, dim=1)                           # [Nc, H, Dk]
    s = torch.einsum("thd,nhd->htn", q.to(REF_DTYPE), kk) * scale                  # [H, T, Nc]
    n_vis = torch.tensor([cfg.n_cmp(int(t)) for t in query_positions(pos0, T)])
    valid = torch.arange(nc)[None, :] < n_vis[:, None]                       # [T, Nc]
    p = torch.softmax(s.masked_fill(~valid, NEG_INF), dim=-1)
    p = torch.where(valid, p, torch.zeros(()))                               # rows with none: 0
    return p.view(hkv, g, T, nc).sum(dim=1)


def eligible_blocks(pos0: int, n_q: int, n_sel: int, cfg: SparseAttnConfig) -> torch.Tensor:
    """[T, Ns] bool: selection block j starts at or before the query (no future block)."""
    cur = query_positions(pos0, n_q) // cfg.sel_block
    return torch.arange(n_sel)[None, :] <= cur[:, None]


def block_importance(q: torch.Tensor, k_cmp: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                     scale: float) -> torch.Tensor:
    """Selection-block importance p_slc [Hkv, T, Ns] (Eq. 9); -inf for ineligible blocks."""
    T = q.shape[0]
    ns = n_sel_blocks(cfg, pos0 + T)
    p = cmp_probs(q, k_cmp, pos0, cfg, scale)                                # [Hkv, T, Nc]
    imp = p @ eq9_weights(cfg, ns, k_cmp.shape[0]).T                         # [Hkv, T, Ns]
    return imp.masked_fill(~eligible_blocks(pos0, T, ns, cfg)[None], NEG_INF)


def minmax_importance(q: torch.Tensor, k: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                      scale: float) -> torch.Tensor:
    """Quest-style importance [Hkv, T, Ns]: per head the upper bound
    scale * sum_c max(q_c * kmin_c, q_c * kmax_c) over each selection block's keys at positions
    <= t, softmaxed over the eligible blocks and summed over the GQA group; -inf if ineligible."""
    T, H, _ = q.shape
    L, hkv, _ = k.shape
    g, ls = H // hkv, cfg.sel_block
    ns = n_sel_blocks(cfg, L)
    tpos = query_positions(pos0, T)
    qf = q.to(REF_DTYPE).view(T, hkv, g, -1)
    u = torch.full((hkv, g, T, ns), NEG_INF, dtype=REF_DTYPE)
    for j in range(ns):
        blk = k[j * ls:min((j + 1) * ls, L)].to(REF_DTYPE)                   # [n_tok, Hkv, Dk]
        kmax = torch.cummax(blk, dim=0).values                               # running over tokens
        kmin = torch.cummin(blk, dim=0).values
        seen = tpos >= j * ls
        if not bool(seen.any()):
            continue
        last = (tpos[seen] - j * ls).clamp(max=blk.shape[0] - 1)             # last token <= t
        lo, hi = kmin[last], kmax[last]                                      # [t, Hkv, Dk]
        qs = qf[seen]                                                        # [t, Hkv, G, Dk]
        ub = torch.maximum(qs * lo[:, :, None], qs * hi[:, :, None]).sum(-1)  # [t, Hkv, G]
        u[:, :, seen, j] = ub.permute(1, 2, 0) * scale
    p = torch.softmax(u, dim=-1)                                 # block 0 is always eligible
    imp = p.sum(dim=1)
    return imp.masked_fill(~eligible_blocks(pos0, T, ns, cfg)[None], NEG_INF)


def topn_blocks(importance: torch.Tensor, pos0: int, cfg: SparseAttnConfig) -> torch.Tensor:
    """Top-n selection from importance [Hkv, T, Ns] -> int32 [Hkv, T, n], ascending, -1 padded.

    Forced: the first n_init and the n_local most recent eligible blocks. Ties: lower index."""
    hkv, T, ns = importance.shape
    cur = (query_positions(pos0, T) // cfg.sel_block)[:, None]               # [T, 1]
    j = torch.arange(ns)[None, :]
    eligible = j <= cur
    forced = eligible & ((j < cfg.n_init) | (j > cur - cfg.n_local))
    score = importance.to(REF_DTYPE).masked_fill(~eligible[None], NEG_INF)
    score = score.masked_fill(forced[None], float("inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :cfg.top_n]
    taken = torch.gather(score, -1, order) > NEG_INF
    big = torch.iinfo(torch.int64).max
    idx = torch.sort(torch.where(taken, order, big), dim=-1).values
    idx = torch.where(idx == big, -1, idx)
    if idx.shape[-1] < cfg.top_n:
        idx = torch.cat([idx, idx.new_full((hkv, T, cfg.top_n - idx.shape[-1]), -1)], dim=-1)
    return idx.to(torch.int32)


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                  scale: float) -> torch.Tensor:
    """Selected blocks int32 [Hkv, T, n] from compressed keys k_cmp [Nc, Hkv, Dk]."""
    return topn_blocks(block_importance(q, k_cmp, pos0, cfg, scale), pos0, cfg)


def select_blocks_minmax(q: torch.Tensor, k: torch.Tensor, pos0: int, cfg: SparseAttnConfig,
                         scale: float) -> torch.Tensor:
    """Selected blocks int32 [Hkv, T, n] from the min/max upper bound of the keys k [L, Hkv, Dk]."""
    return topn_blocks(minmax_importance(q, k, pos0, cfg, scale), pos0, cfg)


def selection(q: torch.Tensor, k: torch.Tensor, pos0: int, cfg: SparseAttnConfig, scale: float,
              weights: NSAWeights | None = None) -> torch.Tensor:
    """The selection `sparse_attention` uses: learned phi keys in `nsa` mode, else mean-pooled
    keys (score "mean") or the min/max bound (score "minmax"). -> int32 [Hkv, T, n]."""
    if cfg.mode == "nsa":
        if weights is None:
            raise ValueError("sparse_attn mode 'nsa' needs the layer's NSA weights")
        return select_blocks(q, compress(k, cfg, weights.cmp_k, weights.cmp_k_pe), pos0, cfg,
                             scale)
    if cfg.score == "minmax":
        return select_blocks_minmax(q, k, pos0, cfg, scale)
    return select_blocks(q, compress(k, cfg), pos0, cfg, scale)


# -------------------------------------------------------------------------------------- masks

def causal_mask(pos0: int, n_q: int, length: int) -> torch.Tensor:
    """[T, L] bool: key position <= query position."""
    return torch.arange(length)[None, :] <= query_positions(pos0, n_q)[:, None]


def window_mask(pos0: int, n_q: int, length: int, window: int) -> torch.Tensor:
    """[T, L] bool: key position in t-window+1 .. t."""
    t = query_positions(pos0, n_q)[:, None]
    pos = torch.arange(length)[None, :]
    return (pos <= t) & (pos > t - window)


def selected_token_mask(indices: torch.Tensor, pos0: int, length: int,
                        cfg: SparseAttnConfig) -> torch.Tensor:
    """[Hkv, T, L] bool: tokens of the selected blocks at positions <= t."""
    hkv, T, _ = indices.shape
    ns = n_sel_blocks(cfg, length)
    idx = indices.long()
    bm = torch.zeros(hkv, T, ns + 1, dtype=torch.bool)
    bm.scatter_(-1, torch.where(idx < 0, ns, idx), True)                     # -1 -> spare column
    tok_blk = torch.arange(length) // cfg.sel_block
    return bm[..., :ns][..., tok_blk] & causal_mask(pos0, T, length)[None]


# ---------------------------------------------------------------------------------- attention

def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v over the keys mask allows: q [T, H, Dk], k [L, Hkv, Dk],
    v [L, Hkv, Dv], mask [Hkv or 1, T, L] -> float64 [T, H, Dv]. A query with no key gets 0."""
    T, H, dk = q.shape
    L, hkv, dv = v.shape
    g = H // hkv
    qg = q.to(REF_DTYPE).view(T, hkv, g, dk)
    kf, vf = k.to(REF_DTYPE), v.to(REF_DTYPE)
    mask = mask.expand(hkv, T, L)
    out = q.new_zeros(T, H, dv, dtype=REF_DTYPE)
    step = max(1, _SCORE_BUDGET // max(1, H * L))
    for a in range(0, T, step):
        b = min(T, a + step)
        m = mask[:, None, a:b]                                               # [Hkv, 1, t, L]
        s = torch.einsum("tkgd,lkd->kgtl", qg[a:b], kf) * scale              # [Hkv, G, t, L]
        p = torch.softmax(s.masked_fill(~m, NEG_INF), dim=-1)
        p = torch.where(m, p, torch.zeros(()))                               # no key: 0, not NaN
        out[a:b] = torch.einsum("kgtl,lke->tkge", p, vf).reshape(b - a, H, dv)
    return out


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int,
                    scale: float) -> torch.Tensor:
    """Causal dense attention over the cache (L = pos0 + T) -> [T, H, Dv] in q's dtype."""
    mask = causal_mask(pos0, q.shape[0], k.shape[0])[None]
    return masked_attention(q, k, v, mask, scale).to(q.dtype)


def nsa_gates(x: torch.Tensor, weights: NSAWeights, n_heads: int) -> torch.Tensor:
    """Branch gates [T, 3, H] (cmp, slc, win) = sigmoid(W_gate x_t)."""
    g = torch.sigmoid(x.to(REF_DTYPE) @ weights.gate.to(REF_DTYPE).T)
    return g.view(x.shape[0], 3, n_heads)


def nsa_branches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int,
                 cfg: SparseAttnConfig, scale: float, weights: NSAWeights,
                 indices: torch.Tensor | None = None):
    """The three NSA branch outputs (o_cmp, o_slc, o_win), each float64 [T, H, Dv]."""
    T, H, dk = q.shape
    L, _, dv = v.shape
    weights.check(cfg, H, dk, dv)
    kc = compress(k, cfg, weights.cmp_k, weights.cmp_k_pe)                   # [Nc, Hkv, Dk]
    vc = compress(v, cfg, weights.cmp_v, weights.cmp_v_pe)                   # [Nc, Hkv, Dv]
    n_vis = torch.tensor([cfg.n_cmp(int(t)) for t in query_positions(pos0, T)])
    cmp_mask = torch.arange(kc.shape[0])[None, :] < n_vis[:, None]           # [T, Nc]
    o_cmp = masked_attention(q, kc, vc, cmp_mask[None], scale)
    if indices is None:
        indices = select_blocks(q, kc, pos0, cfg, scale)
    o_slc = masked_attention(q, k, v, selected_token_mask(indices, pos0, L, cfg), scale)
    o_win = masked_attention(q, k, v, window_mask(pos0, T, L, cfg.window)[None], scale)
    return o_cmp, o_slc, o_win


def _check_shapes(q, k, v, pos0):
    T, H, dk = q.shape
    L, hkv, kdk = k.shape
    if kdk != dk or v.shape[:2] != (L, hkv):
        raise ValueError(f"sparse attention shapes disagree: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % hkv:
        raise ValueError(f"{H} query heads are not a multiple of {hkv} KV heads")
    if L != pos0 + T:
        raise ValueError(f"cache holds {L} positions but pos0 + T = {pos0} + {T} = {pos0 + T}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int,
                     cfg: SparseAttnConfig, scale: float, weights: NSAWeights | None = None,
                     x: torch.Tensor | None = None,
                     indices: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse attention of T queries at positions pos0.. over the cache k, v (L = pos0 + T).

    q [T, H, Dk], k [L, Hkv, Dk], v [L, Hkv, Dv] -> [T, H, Dv] in q's dtype (computed in float64).
    Prefill and decode (T = 1) are the same call. `nsa` mode needs weights and x [T, D] (the
    attention input, for the gates). indices [Hkv, T, n] overrides the block selection.
    Dense causal attention when the mode is off or L < cfg.min_len."""
    _check_shapes(q, k, v, pos0)
    T, H, _ = q.shape
    L = k.shape[0]
    if not cfg.enabled or L < cfg.min_len:
        return dense_attention(q, k, v, pos0, scale)
    if cfg.mode == "approx":
        if indices is None:
            indices = selection(q, k, pos0, cfg, scale)
        mask = selected_token_mask(indices, pos0, L, cfg) | window_mask(pos0, T, L, cfg.window)
        return masked_attention(q, k, v, mask, scale).to(q.dtype)
    if weights is None or x is None:
        raise ValueError("sparse_attn mode 'nsa' needs the layer's NSA weights and the "
                         "attention input x [T, D] for the gates")
    o_cmp, o_slc, o_win = nsa_branches(q, k, v, pos0, cfg, scale, weights, indices)
    gates = nsa_gates(x, weights, H)                                         # [T, 3, H]
    out = (gates[:, 0, :, None] * o_cmp + gates[:, 1, :, None] * o_slc
           + gates[:, 2, :, None] * o_win)
    return out.to(q.dtype)
