"""Sparse attention on the CPU: a fast decode path (T=1) that reads only the compressed keys, the
selected blocks and the window, and a masked batched path for prefill chunks (T>1) that gives the
same result row by row. The semantics are those of config.py's docstring.

Dimension key: T queries, H query heads, Hkv KV heads, G = H/Hkv query heads per KV head,
Dk/Dv key/value head dims, L cached positions, C compressed blocks, S selection blocks,
N gathered tokens, D model width.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .cache import SparseCache
from .config import SparseAttnConfig
from .reference import NSAWeights, minmax_importance

_NEG = float("-inf")


# -- selection --------------------------------------------------------------------------------
def eq9_kernel(cfg: SparseAttnConfig) -> tuple[torch.Tensor, int, int]:
    """Eq. 9 as a strided 1-D correlation: weights over compressed offsets o = m - n, the left
    pad (l/d - 1) and the stride (l'/d). out[j] = sum_k w[k] * p_cmp[stride*j + k - pad]."""
    r, c = cfg.sel_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    return _eq9_weights(r, c), c - 1, r


@functools.lru_cache(maxsize=16)
def _eq9_weights(r: int, c: int) -> torch.Tensor:
    w = torch.zeros(r + c - 1, dtype=torch.float32)
    for m in range(r):
        for n in range(c):
            w[m - n + c - 1] += 1.0        # pairs (m, n) with m - n = offset
    return w


def pool_eq9(p_cmp: torch.Tensor, cfg: SparseAttnConfig, n_sel: int) -> torch.Tensor:
    """Compressed-block probabilities [..., C] -> selection-block importance [..., n_sel]."""
    w, pad, stride = eq9_kernel(cfg)
    C = p_cmp.shape[-1]
    need = stride * (n_sel - 1) + w.numel()               # padded length for n_sel outputs
    x = F.pad(p_cmp, (pad, max(0, need - C - pad)))
    win = x.unfold(-1, w.numel(), stride)[..., :n_sel, :]  # [..., n_sel, K] strided view
    return win @ w.to(p_cmp.device, p_cmp.dtype)


def cmp_probs(q: torch.Tensor, kc: torch.Tensor, scale: float, t: torch.Tensor,
              cfg: SparseAttnConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Compression-branch scores and probabilities for queries q [Hkv, G, T, Dk] at positions
    t [T] over compressed keys kc [Hkv, C, Dk]. Returns (scores with future blocks at -inf
    [Hkv, G, T, C], softmax probabilities with empty rows at 0 [Hkv, G, T, C])."""
    Hkv, G, T, Dk = q.shape
    C = kc.shape[1]
    s = torch.matmul(q.reshape(Hkv, G * T, Dk), kc.transpose(1, 2)).view(Hkv, G, T, C) * scale
    if T > 1 or C != cfg.n_cmp(int(t[0])):
        n_vis = torch.clamp((t + 1 - cfg.cmp_block) // cfg.cmp_stride + 1, min=0)   # [T]
        vis = torch.arange(C, device=q.device)[None, :] < n_vis[:, None]             # [T, C]
        s = s.masked_fill(~vis, _NEG)
    p = torch.softmax(s, dim=-1)
    return s, torch.nan_to_num(p, nan=0.0) if C == 0 or T > 1 else p


def select_blocks(p_grp: torch.Tensor, t: torch.Tensor, cfg: SparseAttnConfig) -> torch.Tensor:
    """GQA-summed compressed probabilities [Hkv, T, C] for queries at positions t [T] ->
    selected block indices [Hkv, T, top_n] int32, ascending, padded with -1."""
    return topn(pool_eq9(p_grp, cfg, int(t.max()) // cfg.sel_block + 1), t, cfg)


def topn(imp: torch.Tensor, t: torch.Tensor, cfg: SparseAttnConfig) -> torch.Tensor:
    """Block importance [Hkv, T, S] -> the top_n eligible blocks [Hkv, T, top_n] int32 with the
    forced ones, ascending, padded with -1."""
    lp = cfg.sel_block
    n_sel = imp.shape[-1]
    j = torch.arange(n_sel, device=imp.device)[None, :]    # [1, S]
    cur = (t // lp)[:, None]                               # [T, 1] block holding t
    eligible = j <= cur
    forced = eligible & ((j < cfg.n_init) | (j > cur - cfg.n_local))
    imp = imp.masked_fill(forced, float("inf")).masked_fill(~eligible, _NEG)
    k = min(cfg.top_n, n_sel)
    # topk's order among equal scores is unspecified: keep every block above the k-th score,
    # then fill with the lowest-indexed blocks equal to it (ties -> lower index)
    kth = torch.topk(imp, k, dim=-1, sorted=True).values[..., -1:]      # [Hkv, T, 1]
    above = imp > kth
    tie = imp == kth
    take = above | (tie & (torch.cumsum(tie, dim=-1) <= k - above.sum(-1, keepdim=True)))
    take &= imp > _NEG                                     # never an ineligible block
    # the taken blocks in ascending order: the k largest of (S - j) over taken j
    key = torch.where(take, n_sel - j, 0)
    val = torch.topk(key, k, dim=-1, sorted=True).values
    idx = torch.where(val > 0, n_sel - val, -1).to(torch.int32)
    if k < cfg.top_n:
        idx = F.pad(idx, (0, cfg.top_n - k), value=-1)
    return idx


def _group_probs(q: torch.Tensor, sc_kc: torch.Tensor, scale: float, t: torch.Tensor,
                 cfg: SparseAttnConfig):
    s, p = cmp_probs(q, sc_kc, scale, t, cfg)
    return s, p, p.sum(dim=1)                              # [Hkv, T, C] summed over the group


# -- decode (T = 1) ---------------------------------------------------------------------------
def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [L, Hkv, D] (a view of the cache, position- or head-major), idx [Hkv, N] token
    positions -> [Hkv, N, D], reading only the selected rows."""
    Hkv, N = idx.shape
    L, _, D = x.shape
    sL, sH, sD = x.stride()
    heads = torch.arange(Hkv, device=idx.device)[:, None]
    if sD == 1 and sL % D == 0 and sH % D == 0:            # rows of D floats in the storage
        n_rows = ((L - 1) * sL + (Hkv - 1) * sH) // D + 1
        rows = torch.as_strided(x, (n_rows, D), (D, 1))
        flat = idx * (sL // D) + heads * (sH // D)
        return rows.index_select(0, flat.reshape(-1)).view(Hkv, N, -1)
    flat = idx * Hkv + heads
    return x.reshape(-1, D).index_select(0, flat.reshape(-1)).view(Hkv, N, -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """q [Hkv, G, Dk], k [Hkv, N, Dk], v [Hkv, N, Dv], bias [Hkv, 1, N] -> [Hkv, G, Dv]."""
    s = torch.bmm(q, k.transpose(1, 2)) * scale
    if bias is not None:
        s = s + bias
    return torch.bmm(torch.softmax(s, dim=-1), v)


def _block_tokens(sel: torch.Tensor, t: int, cfg: SparseAttnConfig, below: int):
    """Selected blocks [Hkv, n] -> token positions [Hkv, n*l'] and validity (position <= t,
    position < below, block not padding)."""
    lp = cfg.sel_block
    tok = (sel.long()[..., None] * lp + torch.arange(lp, device=sel.device)).flatten(1)
    ok = (tok >= 0) & (tok <= t) & (tok < below)
    return tok, ok


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sc: SparseCache,
           cfg: SparseAttnConfig, scale: float, gates: torch.Tensor | None = None
           ) -> torch.Tensor:
    """One query at position t = L-1. q [H, Dk], keys [L, Hkv, Dk], values [L, Hkv, Dv] (the
    cache; only the selected blocks and the window are read), sc holds the compressed keys up to
    t. gates [3, H] for `nsa`. Returns [H, Dv]."""
    L, Hkv, Dk = keys.shape
    H = q.shape[0]
    G = H // Hkv
    t = L - 1
    kc, vc = sc.update(keys, values)                       # [Hkv, C, Dk], [Hkv, C, Dv] | None
    qg = q.reshape(Hkv, G, Dk)
    tt = torch.tensor([t], device=q.device)
    if sc.use_minmax:                                      # kc is (kmin, kmax) [Hkv, S, Dk]
        lo, hi = kc
        u = torch.bmm(qg.clamp(min=0), hi.transpose(1, 2)) + \
            torch.bmm(qg.clamp(max=0), lo.transpose(1, 2))  # [Hkv, G, S] upper bounds
        imp = torch.softmax(u * scale, dim=-1).sum(dim=1, keepdim=True)
        sel = topn(imp, tt, cfg)[:, 0]
    else:
        _, p, pg = _group_probs(qg[:, :, None], kc, scale, tt, cfg)
        sel = select_blocks(pg, tt, cfg)[:, 0]             # [Hkv, top_n]
    ws = max(0, t - cfg.window + 1)
    if cfg.mode == "nsa":
        tok, ok = _block_tokens(sel, t, cfg, L)
        tok = torch.where(ok, tok, t)
        bias = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, _NEG)[:, None]
        o_slc = _attend(qg, _gather(keys, tok), _gather(values, tok), bias, scale)
        kw = keys[ws:].transpose(0, 1)
        o_win = _attend(qg, kw, values[ws:].transpose(0, 1), None, scale)
        out = gates[1].view(Hkv, G, 1) * o_slc + gates[2].view(Hkv, G, 1) * o_win
        if kc.shape[1]:
            out = out + gates[0].view(Hkv, G, 1) * torch.bmm(p[:, :, 0], vc)
        return out.reshape(H, -1)
    tok, ok = _block_tokens(sel, t, cfg, ws)               # window tokens come from the window
    idx = torch.where(ok, tok, t)                          # [Hkv, N] (masked ones read t)
    ks, vs = _gather(keys, idx), _gather(values, idx)      # [Hkv, N, Dk], [Hkv, N, Dv]
    kw, vw = keys[ws:].transpose(0, 1), values[ws:].transpose(0, 1)   # strided [Hkv, w, D]
    s = torch.cat((torch.bmm(qg, ks.transpose(1, 2)).masked_fill_(~ok[:, None], _NEG),
                   torch.bmm(qg, kw.transpose(1, 2))), dim=-1) * scale  # [Hkv, G, N + w]
    p = torch.softmax(s, dim=-1)
    n = idx.shape[1]
    return (torch.bmm(p[..., :n], vs) + torch.bmm(p[..., n:], vw)).reshape(H, -1)


# -- prefill (T > 1): masks over the whole cache ----------------------------------------------
def _masked_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q [Hkv, G, T, Dk], k [Hkv, L, Dk], v [Hkv, L, Dv], mask [Hkv, T, L] -> [Hkv, G, T, Dv];
    a row with no allowed key gives 0."""
    Hkv, G = q.shape[:2]
    L = k.shape[1]
    # SDPA's fused CPU kernel with a per-KV-head mask broadcast over the group (4x the speed of
    # spelling out the [Hkv, G, T, L] scores)
    o = F.scaled_dot_product_attention(q, k[:, None].expand(Hkv, G, L, k.shape[-1]),
                                       v[:, None].expand(Hkv, G, L, v.shape[-1]),
                                       attn_mask=mask[:, None], scale=scale)
    return torch.nan_to_num(o, nan=0.0)


def prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos0: int,
            sc: SparseCache, cfg: SparseAttnConfig, scale: float,
            gates: torch.Tensor | None = None) -> torch.Tensor:
    """Queries q [T, H, Dk] at positions pos0.. over the cache keys [L, Hkv, Dk] (L = pos0 + T),
    row i equal to decode() at position pos0 + i; rows whose attended length is below min_len
    are dense. gates [T, 3, H] for `nsa`. Returns [T, H, Dv]."""
    T, H, Dk = q.shape
    L, Hkv, _ = keys.shape
    G = H // Hkv
    dev = q.device
    kc, vc = sc.update(keys, values)
    qg = q.permute(1, 0, 2).reshape(Hkv, G, T, Dk)
    tt = torch.arange(pos0, pos0 + T, device=dev)                       # [T]
    if sc.use_minmax:                                   # per-row running bounds: the reference's
        sel = topn(minmax_importance(q, keys, pos0, cfg, scale), tt, cfg)
    else:
        _, p, pg = _group_probs(qg, kc, scale, tt, cfg)
        sel = select_blocks(pg, tt, cfg)                                # [Hkv, T, top_n]
    n_sel = (L - 1) // cfg.sel_block + 1
    blk = torch.zeros(Hkv, T, n_sel + 1, dtype=torch.bool, device=dev)
    blk.scatter_(2, torch.where(sel >= 0, sel, n_sel).long(), True)
    pos = torch.arange(L, device=dev)
    causal = pos[None, :] <= tt[:, None]                                # [T, L]
    in_sel = blk[..., :n_sel].repeat_interleave(cfg.sel_block, dim=2)[..., :L] & causal
    in_win = causal & (pos[None, :] > tt[:, None] - cfg.window)
    dense = (tt + 1 < cfg.min_len)[:, None]                             # [T, 1]
    kh, vh = keys.transpose(0, 1), values.transpose(0, 1)
    if cfg.mode == "nsa":
        o = gates[:, 1].T.reshape(Hkv, G, T, 1) * _masked_attn(qg, kh, vh, in_sel, scale)
        o = o + gates[:, 2].T.reshape(Hkv, G, T, 1) * _masked_attn(
            qg, kh, vh, in_win.expand(Hkv, T, L), scale)
        if kc.shape[1]:
            o = o + gates[:, 0].T.reshape(Hkv, G, T, 1) * torch.matmul(p, vc[:, None])
        if bool(dense.any()):
            full = _masked_attn(qg, kh, vh, causal.expand(Hkv, T, L), scale)
            o = torch.where(dense.view(1, 1, T, 1), full, o)
    else:
        mask = torch.where(dense, causal, in_sel | in_win)
        o = _masked_attn(qg, kh, vh, mask, scale)
    return o.reshape(H, T, -1).transpose(0, 1)


def forward(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos0: int,
            sc: SparseCache, cfg: SparseAttnConfig, scale: float,
            nsa: NSAWeights | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse attention for q [T, H, Dk] after the cache append -> [T, H*Dv]. `nsa` needs the
    layer's NSAWeights and the attention input x [T, D] for the gates."""
    T, H, _ = q.shape
    gates = None
    if cfg.mode == "nsa":
        gates = torch.sigmoid(x @ nsa.gate.T).view(T, 3, H)             # [T, 3, H]
    if T == 1 and keys.shape[0] >= cfg.min_len:
        return decode(q[0], keys, values, sc, cfg, scale,
                      None if gates is None else gates[0]).reshape(1, -1)
    return prefill(q, keys, values, pos0, sc, cfg, scale, gates).reshape(T, -1)


# -- model glue -------------------------------------------------------------------------------
NSA_TENSORS = ("nsa_cmp_k", "nsa_cmp_k_pe", "nsa_cmp_v", "nsa_cmp_v_pe", "nsa_gate")


def load_nsa_weights(get, prefix: str) -> NSAWeights | None:
    """One layer's NSA tensors through get(name) -> float32 tensor or None (absent); None when
    the layer has none of them. A partial set raises a KeyError naming the missing tensor."""
    found = {n: get(f"{prefix}{n}.weight") for n in NSA_TENSORS}
    if all(t is None for t in found.values()):
        return None
    for n, t in found.items():
        if t is None:
            raise KeyError(f"{prefix}{n}.weight")
    return NSAWeights(*(found[n] for n in NSA_TENSORS))


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos0: int, layer_cache,
           cfg: SparseAttnConfig, scale: float, nsa: NSAWeights | None = None,
           x: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse attention for a layer after its KV-cache append: q [T, H, Dk], keys/values the
    cache up to L -> [T, H*Dv]. Keeps the layer's SparseCache on layer_cache.sparse, rebuilding
    it (from the KV cache) when the call's block geometry differs from the one it holds."""
    sc = layer_cache.sparse
    if sc is None or sc.key != SparseCache.key_of(cfg, nsa):
        if cfg.mode == "nsa":
            if nsa is None:
                raise ValueError("sparse_attn mode 'nsa' needs the layer's NSA weights")
            nsa.check(cfg, q.shape[1], keys.shape[-1], values.shape[-1])
        sc = SparseCache(cfg, layer_cache.n_ctx, keys.shape[1], keys.shape[-1],
                         values.shape[-1], keys.device, nsa)
        layer_cache.sparse = sc
    sc.cfg = cfg                                          # same geometry; top_n etc. may differ
    return forward(q, keys, values, pos0, sc, cfg, scale, nsa, x)
