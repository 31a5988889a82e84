"""Sparse attention settings (DeepSeek Native Sparse Attention, arXiv 2502.11089) and the exact
semantics every implementation (torch reference, Triton, CPU decode) follows.

Positions are absolute and 0-based; a query at position t sees keys 0..t.

- Compressed block i covers tokens [i*d, i*d + l) (l = cmp_block, d = cmp_stride). It exists for a
  query at t only when complete: i*d + l - 1 <= t, so n_cmp(t) = max(0, (t + 1 - l) // d + 1).
  Its key/value is the mean of the block's (RoPE'd) keys/values ("mean" pooling), or, in `nsa`
  mode with learned weights, phi(block + intra-block position embedding).
- Compression scores: p_cmp[h, i] = softmax_i(scale * q_h . kc_i) over the existing blocks; a GQA
  group's score is the sum over its query heads, so the whole group shares one selection.
- Selection block j covers tokens [j*l', (j+1)*l') (l' = sel_block); it is eligible for a query at t
  when j*l' <= t (no future block). Its importance is
      p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d)*j + m - n]
  (indices outside 0..n_cmp(t)-1 contribute 0), i.e. each compressed block weighted by
  (tokens it shares with selection block j) / d.
- Top-n (n = top_n) eligible blocks, counting the forced ones: the first n_init blocks and the
  n_local most recent blocks (the one holding t and those before it) are always kept. Ties go to
  the lower block index. Indices are int32, sorted ascending, padded with -1 to top_n.
  Selected tokens are the tokens of the selected blocks with position <= t (the partial current
  block is causally masked).
- Window: tokens max(0, t - window + 1) .. t.
- `approx` mode: one softmax over the union of the selected tokens and the window tokens (each
  token once). With every block selected it is dense causal attention exactly.
  Its selection uses mean-pooled compressed keys (score "mean", as above), or with score
  "minmax" skips compression: u_h[j] = scale * sum_c max(q_c * kmin_c, q_c * kmax_c), min/max
  over the keys of selection block j at positions <= t, then p = softmax_j(u_h) over eligible
  blocks, summed over the group, and the same top-n. In `nsa` mode selection uses phi keys.
- `nsa` mode: o_h = g_cmp * attn(q_h, compressed kv) + g_slc * attn(q_h, selected tokens)
  + g_win * attn(q_h, window tokens), gates = sigmoid(W_gate x_t) per head; a branch with no keys
  contributes 0.
- `nsa` weights per layer (GGUF names; torch shapes, ggml `ne` is reversed): compression
  `blk.{i}.nsa_cmp_k.weight` [Dk, l*Dk] and `blk.{i}.nsa_cmp_k_pe.weight` [l, Dk], likewise
  `nsa_cmp_v` [Dv, l*Dv] / `nsa_cmp_v_pe` [l, Dv]: kc_i = W_k @ flatten(K[block] + pe_k), shared
  by all KV heads; gates `blk.{i}.nsa_gate.weight` [3*H, D], rows branch-major (cmp for heads
  0..H-1, then slc, then win), applied to the attention input x_t (after attn_norm).
- Sparse attention applies when the attended length (cache length after this call) is
  >= min_len; below that attention is dense.
- `prefill` decides what a call of several tokens (a prompt) does: "dense" (the default) runs all
  its rows but the last with dense attention, and the last row (whose logits pick the first
  generated token) like a decode step, so a prompt equals a dense prompt of its first T-1 tokens
  followed by one decode step; "sparse" applies the sparse rule to every row. Measured on SmolLM2 (needle in a
  haystack, 8k tokens): running all 30 layers of an 8k prompt sparsely compounds the
  approximation until the needle is lost, while a dense prompt with sparse decode retrieves it;
  decode is where sparse attention saves time, since dense attention reads the whole cache for
  every generated token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

MODES = ("off", "approx", "nsa")
PREFILLS = ("dense", "sparse")
SCORES = ("mean", "minmax")


@dataclass(frozen=True)
class SparseAttnConfig:
    mode: str = "off"          # off | approx | nsa
    cmp_block: int = 32        # l: compression block length
    cmp_stride: int = 16       # d: compression stride
    sel_block: int = 64        # l': selection block length
    top_n: int = 16            # n: selected blocks, counting the forced ones
    n_init: int = 1            # forced initial blocks
    n_local: int = 2           # forced most recent blocks
    window: int = 512          # w: sliding window
    min_len: int = 2048        # below this attended length attention stays dense
    score: str = "mean"        # approx block scores: mean-pooled keys or per-channel min/max
    prefill: str = "dense"     # multi-token calls: dense attention, or the sparse rule per row

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"sparse_attn mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.score not in SCORES:
            raise ValueError(f"sparse_attn score {self.score!r} is not one of {', '.join(SCORES)}")
        if self.prefill not in PREFILLS:
            raise ValueError(f"sparse_attn prefill {self.prefill!r} is not one of "
                             f"{', '.join(PREFILLS)}")
        for name in ("cmp_block", "cmp_stride", "sel_block", "top_n", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"sparse_attn {name} = {getattr(self, name)} must be >= 1")
        if self.min_len < 0 or self.n_init < 0 or self.n_local < 0:
            raise ValueError("sparse_attn min_len, n_init and n_local must be >= 0")
        if self.cmp_block % self.cmp_stride or self.sel_block % self.cmp_stride:
            raise ValueError(f"sparse_attn cmp_block ({self.cmp_block}) and sel_block "
                             f"({self.sel_block}) must be multiples of cmp_stride "
                             f"({self.cmp_stride})")
        if self.n_init + self.n_local > self.top_n:
            raise ValueError(f"sparse_attn n_init + n_local ({self.n_init + self.n_local}) exceeds "
                             f"top_n ({self.top_n})")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def sparse_rows(self, n_tokens: int, attended: int) -> int:
        """How many trailing rows of a call of n_tokens queries over `attended` cache positions
        (after its append) take the sparse path: 0, 1 (a prompt under prefill "dense": its last
        row, which predicts the first generated token, is a decode step) or all of them (rows
        below min_len inside them still decide dense for themselves)."""
        if not self.enabled or attended < self.min_len:
            return 0
        return n_tokens if n_tokens == 1 or self.prefill == "sparse" else 1

    def with_(self, **kw) -> "SparseAttnConfig":
        return replace(self, **kw)

    def n_cmp(self, t: int) -> int:
        """Complete compressed blocks visible to a query at position t."""
        return max(0, (t + 1 - self.cmp_block) // self.cmp_stride + 1)


def resolve(value, base: SparseAttnConfig | None = None) -> SparseAttnConfig:
    """A `sparse_attn=` argument -> SparseAttnConfig: None keeps `base`, a mode name switches
    `base`'s settings to that mode, a SparseAttnConfig is taken as is."""
    base = base or SparseAttnConfig()
    if value is None:
        return base
    if isinstance(value, SparseAttnConfig):
        return value
    if isinstance(value, str):
        return base.with_(mode=value)
    raise TypeError(f"sparse_attn must be None, one of {', '.join(MODES)} or a "
                    f"SparseAttnConfig, got {type(value).__name__}")
