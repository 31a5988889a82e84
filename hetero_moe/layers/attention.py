"""RMSNorm, RoPE and grouped-query attention over a KV cache.

Dimension key: T tokens in this call, L cached positions after it, H query heads, Hkv KV heads,
Dh head dim, D model width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import ROPE_NEOX, ROPE_NORM, ModelConfig
from ..runtime.kv_cache import LayerCache
from ..runtime.workspace import Workspace
from .linear import QuantLinear, apply_group
from .sparse_attn import SparseAttnConfig
from .sparse_attn import cpu as sparse_cpu


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # x * rsqrt(mean(x^2) + eps) * w in one op (bit-identical to the spelled-out form)
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query token over the cache: q [H, Dk], keys [L, Hkv, Dk], values [L, Hkv, Dv] -> [H, Dv].

    The C++ op reads the cache in place on the kernels' thread pool (measured on 2 threads: equal
    to torch's single-thread matmuls at 512-2k cached positions, 14% faster at 8k, 5% faster
    decode end to end); torch's matmuls otherwise."""
    if CPP_DECODE_ATTENTION and q.is_cpu and q.dtype == torch.float32 \
            and keys.dtype in CPP_KV_DTYPES and values.dtype == keys.dtype and _cpu_attention():
        from .. import cpu_backend
        return cpu_backend.attn_decode(q.contiguous(), keys, values, scale)
    q, keys, values = same_dtype(q, keys, values)
    Hkv = keys.shape[1]
    qg = q.reshape(Hkv, q.shape[0] // Hkv, q.shape[1])                   # [Hkv, G, Dk]
    s = torch.bmm(qg, keys.permute(1, 2, 0)).float() * scale             # [Hkv, G, L]
    p = torch.softmax(s, dim=-1).to(values.dtype)                        # softmax in fp32
    return torch.bmm(p, values.transpose(0, 1)).reshape(q.shape[0], -1).float()


def same_dtype(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """q and the cache rows in one dtype: a float16 cache (the GPU tier's) is read as it is on
    CUDA (q rounded to it, fp32 accumulation); elsewhere its rows are widened to float32."""
    if keys.dtype == q.dtype:
        return q, keys, values
    if q.is_cuda:
        return q.to(keys.dtype), keys, values
    return q, keys.to(q.dtype), values.to(q.dtype)


CPP_DECODE_ATTENTION = True
CPP_KV_DTYPES = (torch.float32, torch.float16)   # cache element types the C++ ops read in place
CPP_ATTN_PREP = True      # also: prompts' attention through cpu_backend.attn_prefill      # q/k norms, RoPE and the cache write through cpu_backend.attn_prep
_CPU_ATTN: list[bool] = []


def _cpu_attention() -> bool:
    if not _CPU_ATTN:
        try:
            from .. import cpu_backend
            _CPU_ATTN.append(cpu_backend.available())
        except ImportError:
            _CPU_ATTN.append(False)
    return _CPU_ATTN[0]


class Rope:
    """Rotary embedding tables for positions [0, n_ctx), in llama.cpp's NORM or NEOX pairing."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, device: str, base: float | None = None,
                 freq_scale: float | None = None):
        """base, freq_scale: override the model's (a sliding-window layer's own RoPE)."""
        n_rot = cfg.rope_dim
        if cfg.rope_yarn is not None and base is None and freq_scale is None:
            # YaRN: ggml's blend of interpolated and original angles, cos/sin scaled by its mscale
            from .rope_yarn import yarn_angles
            ang, mag = yarn_angles(cfg.rope_yarn, n_ctx), cfg.rope_yarn.magnitude()
            self.cos = (ang.cos() * mag).float().to(device)
            self.sin = (ang.sin() * mag).float().to(device)
            self.n_rot, self.kind = n_rot, cfg.rope_type
            return
        base = cfg.rope_base if base is None else base
        freq_scale = cfg.rope_freq_scale if freq_scale is None else freq_scale
        inv = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
        pos = torch.arange(n_ctx, dtype=torch.float64) * freq_scale
        ang = torch.outer(pos, inv)                           # [n_ctx, n_rot/2]
        self.cos = ang.cos().float().to(device)
        self.sin = ang.sin().float().to(device)
        self.n_rot, self.kind = n_rot, cfg.rope_type
        if self.kind not in (ROPE_NORM, ROPE_NEOX):
            raise ValueError(f"unknown rope type {self.kind!r}")

    def __call__(self, x: torch.Tensor, pos0: int) -> torch.Tensor:  # x: [T, heads, Dh]
        T = x.shape[0]
        cos = self.cos[pos0:pos0 + T, None, :]                  # [T, 1, n_rot/2]
        sin = self.sin[pos0:pos0 + T, None, :]
        rot, rest = x[..., :self.n_rot], x[..., self.n_rot:]
        if self.kind == ROPE_NORM:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        else:
            h = self.n_rot // 2
            a, b = rot[..., :h], rot[..., h:]
            out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


_QK_KIND = {None: 0, "head": 1, "full": 2}


class Attention:
    """Multi-head / grouped-query attention with optional q/k norms and q/k/v biases."""

    def __init__(self, cfg: ModelConfig, q: QuantLinear, k: QuantLinear, v: QuantLinear,
                 o: QuantLinear, rope: Rope, q_norm: torch.Tensor | None = None,
                 k_norm: torch.Tensor | None = None):
        self.cfg = cfg
        self.q, self.k, self.v, self.o = q, k, v, o
        self.q_norm, self.k_norm = q_norm, k_norm
        self.rope = rope
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5
        self.window = 0            # > 0: a sliding-window layer (sees its last `window` positions)
        self.nsa: sparse_cpu.NSAWeights | None = None    # learned sparse-attention weights
        self._cpp_prep: bool | None = None

    def _prep_in_cpp(self, q: torch.Tensor, cache: LayerCache) -> bool:
        """Whether the C++ pass can prepare this call's q/k/v: CPU float32 tensors, a float32 or
        f16 cache and the kernels built (decided once per layer)."""
        if self._cpp_prep is None:
            self._cpp_prep = (CPP_ATTN_PREP and _cpu_attention()
                              and self.cfg.qk_norm in _QK_KIND
                              and getattr(cache, "k_store", None) is not None
                              and cache.k.dtype in CPP_KV_DTYPES and cache.k.is_cpu
                              and self.rope.cos.is_cpu)
        return self._cpp_prep and q.is_cpu and q.dtype == torch.float32

    def __call__(self, x: torch.Tensor, pos0: int, cache: LayerCache,
                 sparse: SparseAttnConfig | None = None, ws: Workspace | None = None
                 ) -> torch.Tensor:
        """ws: scratch for the large intermediates; with it the result may be written over x
        (the caller's normed input, spent by then)."""
        cfg = self.cfg
        T = x.shape[0]
        outs = None
        if ws is not None and self._prep_in_cpp(x, cache):
            outs = (ws.get("q", T, cfg.n_head * cfg.head_dim), None, None)
        q, k, v = apply_group([self.q, self.k, self.v], x, outs)  # [T, H*Dh], [T, Hkv*Dh] x2
        q = q.view(T, cfg.n_head, cfg.head_dim)
        k = k.view(T, cfg.n_head_kv, cfg.head_dim)
        v = v.view(T, cfg.n_head_kv, cfg.head_dim)
        if self._prep_in_cpp(q, cache):
            # norms, RoPE and the cache write in one C++ pass over the tokens (in place)
            cache.reserve(pos0, T)
            from .. import cpu_backend
            cpu_backend.attn_prep(q, k, v, cache.k_store, cache.v_store, pos0, q_norm=self.q_norm,
                                  k_norm=self.k_norm, qk_norm=_QK_KIND[cfg.qk_norm],
                                  cos=self.rope.cos, sin=self.rope.sin, n_rot=self.rope.n_rot,
                                  neox=self.rope.kind == ROPE_NEOX, eps=cfg.rms_eps)
            keys, values = cache.commit(pos0 + T)
        else:
            if cfg.qk_norm == "full":
                q = rms_norm(q.reshape(T, -1), self.q_norm, cfg.rms_eps).view(q.shape)
                k = rms_norm(k.reshape(T, -1), self.k_norm, cfg.rms_eps).view(k.shape)
            elif cfg.qk_norm == "head":
                q = rms_norm(q, self.q_norm, cfg.rms_eps)
                k = rms_norm(k, self.k_norm, cfg.rms_eps)
            q, k = self.rope(q, pos0), self.rope(k, pos0)
            keys, values = cache.append(k, v, pos0)             # [L, Hkv, Dh] each
        L = keys.shape[0]
        if cache.sparse is not None:            # rewritten positions void their compressed blocks
            cache.sparse.truncate(pos0)
        n_sparse = 0 if sparse is None else sparse.sparse_rows(T, L)
        if n_sparse and keys.dtype != q.dtype:   # sparse attention's torch ops read float32
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        if n_sparse == T:
            return self.o(sparse_cpu.attend(q, keys, values, pos0, cache, sparse, self.scale,
                                            self.nsa, x))
        qh = q.transpose(0, 1)                                  # [H, T, Dh]
        kh, vh = keys.transpose(0, 1), values.transpose(0, 1)   # [Hkv, L, Dh]
        if T == 1:
            lo = max(0, L - self.window) if self.window else 0   # the window's positions only
            out = decode_attention(q[0], keys[lo:], values[lo:], self.scale)  # [H, Dh]
            return self.o(out.reshape(1, cfg.n_head * cfg.head_dim))
        if self._prep_in_cpp(x, cache):
            # the C++ causal attention, written over q (each query block is read before it is
            # overwritten): 2x torch's SDPA here, and no output buffer
            from .. import cpu_backend
            if n_sparse:
                out = cpu_backend.attn_prefill(q, keys, values, pos0, self.scale,
                                               window=self.window).view(T, -1)
            else:
                out = cpu_backend.attn_prefill(q, keys, values, pos0, self.scale, out=q,
                                               window=self.window)
                return self.o(out.view(T, -1), out=x if ws is not None and x.is_contiguous()
                              else None)      # x (the layer's normed input) is spent by now
        else:
            j = torch.arange(L, device=x.device)
            i = torch.arange(pos0, pos0 + T, device=x.device)
            mask = j[None, :] <= i[:, None]                     # [T, L] causal
            if self.window:                                     # and inside the sliding window
                mask &= j[None, :] > i[:, None] - self.window
            # a batch dimension lets torch pick its fused CPU kernel (2-3x faster than 3-D)
            qh, kh, vh = same_dtype(qh, kh, vh)
            out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=mask,
                                                 scale=self.scale,
                                                 enable_gqa=cfg.n_head != cfg.n_head_kv)[0]
            out = out.transpose(0, 1).reshape(T, cfg.n_head * cfg.head_dim).float()
        if n_sparse:                                 # the prompt's last row: a decode step
            out[-n_sparse:] = sparse_cpu.attend(q[-n_sparse:], keys, values, pos0 + T - n_sparse,
                                                cache, sparse, self.scale, self.nsa,
                                                x[-n_sparse:])
        return self.o(out)
