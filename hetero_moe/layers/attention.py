"""RMSNorm, RoPE and grouped-query attention over a KV cache.

Dimension key: T tokens in this call, L cached positions after it, H query heads, Hkv KV heads,
Dh head dim, D model width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import ROPE_NEOX, ROPE_NORM, ModelConfig
from ..runtime.kv_cache import LayerCache
from .linear import QuantLinear


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class Rope:
    """Rotary embedding tables for positions [0, n_ctx), in llama.cpp's NORM or NEOX pairing."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, device: str):
        n_rot = cfg.rope_dim
        inv = cfg.rope_base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
        pos = torch.arange(n_ctx, dtype=torch.float64) * cfg.rope_freq_scale
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


class Attention:
    """Multi-head / grouped-query attention with optional q/k norms and q/k/v biases."""

    def __init__(self, cfg: ModelConfig, q: QuantLinear, k: QuantLinear, v: QuantLinear,
                 o: QuantLinear, rope: Rope, q_norm: torch.Tensor | None = None,
                 k_norm: torch.Tensor | None = None):
        self.cfg = cfg
        self.q, self.k, self.v, self.o = q, k, v, o
        self.q_norm, self.k_norm = q_norm, k_norm
        self.rope = rope
        self.scale = cfg.head_dim ** -0.5

    def __call__(self, x: torch.Tensor, pos0: int, cache: LayerCache) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        q, k, v = self.q(x), self.k(x), self.v(x)               # [T, H*Dh], [T, Hkv*Dh] x2
        if cfg.qk_norm == "full":
            q = rms_norm(q, self.q_norm, cfg.rms_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_eps)
        q = q.view(T, cfg.n_head, cfg.head_dim)
        k = k.view(T, cfg.n_head_kv, cfg.head_dim)
        v = v.view(T, cfg.n_head_kv, cfg.head_dim)
        if cfg.qk_norm == "head":
            q = rms_norm(q, self.q_norm, cfg.rms_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_eps)
        q, k = self.rope(q, pos0), self.rope(k, pos0)
        keys, values = cache.append(k, v, pos0)                 # [L, Hkv, Dh] each
        L = keys.shape[0]
        qh = q.transpose(0, 1)                                  # [H, T, Dh]
        kh, vh = keys.transpose(0, 1), values.transpose(0, 1)   # [Hkv, L, Dh]
        if T == 1:                                              # decode: small matmuls beat SDPA
            G = cfg.n_head // cfg.n_head_kv
            qg = q.view(cfg.n_head_kv, G, cfg.head_dim)         # [Hkv, G, Dh]
            s = torch.bmm(qg, kh.transpose(1, 2)) * self.scale  # [Hkv, G, L]
            out = torch.bmm(torch.softmax(s, dim=-1), vh)       # [Hkv, G, Dh]
            return self.o(out.reshape(1, cfg.n_head * cfg.head_dim))
        else:
            j = torch.arange(L, device=x.device)
            i = torch.arange(pos0, pos0 + T, device=x.device)
            mask = j[None, :] <= i[:, None]                     # [T, L] causal
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale,
                                             enable_gqa=cfg.n_head != cfg.n_head_kv)
        out = out.transpose(0, 1).reshape(T, cfg.n_head * cfg.head_dim)
        return self.o(out)
