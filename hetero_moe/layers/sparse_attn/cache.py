"""The compressed-key cache of one layer, kept in step with its KV cache.

Compressed block i covers tokens [i*d, i*d + l); it is computed once, when the KV cache first
holds all its tokens, and appended. Layout [Hkv, C, Dk] so scoring is one batched matmul over
KV heads. Truncation (a reused prompt prefix) drops the blocks that reach past the new length.

Dimension key: L cached positions, Hkv KV heads, Dk/Dv key/value head dims, C compressed blocks,
l block length, d stride.
"""
from __future__ import annotations

import torch

from .config import SparseAttnConfig


def compress(x: torch.Tensor, cfg: SparseAttnConfig, first: int, last: int,
             w: torch.Tensor | None = None, pe: torch.Tensor | None = None) -> torch.Tensor:
    """Compressed blocks first..last-1 of x [L, Hkv, D] -> [Hkv, last-first, D]: the block mean,
    or with learned weights w [D, l*D] and pe [l, D]: w @ flatten(block + pe)."""
    l, d = cfg.cmp_block, cfg.cmp_stride
    seg = x[first * d:(last - 1) * d + l]                 # [(n-1)*d + l, Hkv, D]
    blocks = seg.unfold(0, l, d)                           # [n, Hkv, D, l]
    if w is None:
        return blocks.mean(-1).transpose(0, 1)
    n, Hkv, D, _ = blocks.shape
    flat = (blocks.transpose(2, 3) + pe).reshape(n * Hkv, l * D)
    return (flat @ w.T).view(n, Hkv, -1).transpose(0, 1)


class SparseCache:
    """Compressed keys (and, in `nsa` mode, compressed values) of one layer; with the `minmax`
    score instead the per-channel key min/max of each selection block ([Hkv, S, Dk]).

    `update(keys, values)` brings it up to the KV cache's length; `truncate(pos)` forgets blocks
    that reach position pos or later. `key` names the geometry it was built for, so a call with
    other block sizes rebuilds it instead of misreading it.
    """

    def __init__(self, cfg: SparseAttnConfig, n_ctx: int, n_head_kv: int, dk: int, dv: int,
                 device, nsa=None):
        self.cfg = cfg
        self.key = self.key_of(cfg, nsa)
        self.nsa = nsa if cfg.mode == "nsa" else None
        self.use_minmax = cfg.mode == "approx" and cfg.score == "minmax"
        cap = 0 if self.use_minmax else max(1, cfg.n_cmp(n_ctx - 1))
        # torch.empty: pages are only touched as blocks are appended
        self.kc = torch.empty(n_head_kv, cap, dk, dtype=torch.float32, device=device)
        self.vc = torch.empty(n_head_kv, cap, dv, dtype=torch.float32, device=device) \
            if self.nsa is not None else None
        self.n = 0                                          # compressed blocks held
        n_s = -(-n_ctx // cfg.sel_block) if self.use_minmax else 0
        self.kmin = torch.empty(n_head_kv, n_s, dk, dtype=torch.float32, device=device)
        self.kmax = torch.empty(n_head_kv, n_s, dk, dtype=torch.float32, device=device)
        self.n_full = 0                                     # complete selection blocks held

    @staticmethod
    def key_of(cfg: SparseAttnConfig, nsa=None) -> tuple:
        learned = cfg.mode == "nsa"
        if not learned and cfg.score == "minmax":
            return ("minmax", cfg.sel_block)
        return (cfg.cmp_block, cfg.cmp_stride, learned, id(nsa) if learned else None)

    def truncate(self, pos: int) -> None:
        """Forget blocks that hold any position >= pos."""
        self.n = min(self.n, self.cfg.n_cmp(pos - 1))
        self.n_full = min(self.n_full, pos // self.cfg.sel_block)

    def update(self, keys: torch.Tensor, values: torch.Tensor):
        """keys [L, Hkv, Dk], values [L, Hkv, Dv] (the KV cache up to L) -> compressed keys
        [Hkv, C, Dk] and values [Hkv, C, Dv] (None unless `nsa`), C = n_cmp(L-1)."""
        if self.use_minmax:
            return self._update_minmax(keys), None
        C = self.cfg.n_cmp(keys.shape[0] - 1)
        if C > self.n:
            w = self.nsa
            self.kc[:, self.n:C] = compress(keys, self.cfg, self.n, C,
                                            *((w.cmp_k, w.cmp_k_pe) if w else ()))
            if w is not None:
                self.vc[:, self.n:C] = compress(values, self.cfg, self.n, C, w.cmp_v, w.cmp_v_pe)
        self.n = C
        return self.kc[:, :C], None if self.vc is None else self.vc[:, :C]

    def _update_minmax(self, keys: torch.Tensor):
        """Key bounds (min, max) [Hkv, S, Dk] of every selection block up to L; the last block's
        bounds cover its tokens so far (kept in the slot the complete block will own)."""
        L, Hkv, Dk = keys.shape
        ls = self.cfg.sel_block
        full = L // ls
        if full > self.n_full:
            blk = keys[self.n_full * ls:full * ls].reshape(full - self.n_full, ls, Hkv, Dk)
            self.kmin[:, self.n_full:full] = blk.amin(1).transpose(0, 1)
            self.kmax[:, self.n_full:full] = blk.amax(1).transpose(0, 1)
            self.n_full = full
        n_s = full
        if L > full * ls:                                   # partial block holding t
            part = keys[full * ls:L]
            self.kmin[:, full] = part.amin(0)
            self.kmax[:, full] = part.amax(0)
            n_s += 1
        return self.kmin[:, :n_s], self.kmax[:, :n_s]

    def nbytes(self) -> int:
        per = self.kc.shape[0] * self.kc.shape[2] + (0 if self.vc is None else
                                                     self.vc.shape[0] * self.vc.shape[2])
        return 4 * per * self.n
