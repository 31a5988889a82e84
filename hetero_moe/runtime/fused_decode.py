"""Whole-model decode step in C++ (csrc/decode.cpp): one call per generated token runs every layer
(norms, q/k/v, q/k norms, RoPE, the KV-cache write, attention, output projection, router, experts,
shared expert, final norm, lm_head) on the kernels' thread pool, without returning to Python
between ops. The per-op path in transformer.py stays the reference and serves everything the fused
step does not cover (prompts, MLA, GPU tiers, sparse attention, the torch kernels); both compute
the same math with the same kernels, so they agree to float rounding.

The plan holds raw addresses of the model's buffers (mmap'd weights, norm vectors, the KV cache,
RoPE tables): this object keeps every one of them referenced for as long as the plan lives.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..layers.linear import CpuKernelMethod, QuantLinear
from ..models.base import ROPE_NEOX


def enabled_by_env() -> bool:
    """HETERO_MOE_FUSED_DECODE=0 sends decode steps through the per-op path."""
    return os.environ.get("HETERO_MOE_FUSED_DECODE", "1") != "0"


class Unsupported(Exception):
    """The model has a part the fused step does not cover (the message says which)."""


class FusedDecode:
    def __init__(self, net):
        from .. import cpu_backend
        self._lib = cpu_backend._lib()
        self.net = net
        self._keep: list = []
        ints: list[int] = []
        cfg = net.cfg
        if cfg.mla is not None:
            raise Unsupported("Multi-head Latent Attention")
        if cfg.n_expert_groups > 1:
            raise Unsupported("group-limited routing")
        if net.embed.device != "cpu" or net.rope.cos.device.type != "cpu":
            raise Unsupported("a GPU tier")
        rope = net.rope
        n_rot = rope.n_rot
        ints += [cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, net.n_ctx, n_rot,
                 cfg.n_vocab, int(rope.kind == ROPE_NEOX), cfg.n_expert, cfg.n_expert_used,
                 int(cfg.gating == "sigmoid"), int(cfg.norm_topk)]
        ints += self._buf(rope.cos, "rope cos") + self._buf(rope.sin, "rope sin")
        ints += self._buf(net.out_norm, "output_norm")
        ints += self._mat(net.lm_head)
        scale = None
        for i, b in enumerate(net.blocks):
            a = b.attn
            if scale is None:
                scale = a.scale
            elif a.scale != scale:
                raise Unsupported("per-layer attention scales")
            ints += self._buf(b.attn_norm, f"blk.{i}.attn_norm")
            for lin in (a.q, a.k, a.v, a.o):
                ints += self._mat(lin)
            for lin in (a.q, a.k, a.v, a.o):
                ints += self._buf(lin.bias, lin.name + " bias", optional=True)
            kind = {None: 0, "head": 1, "full": 2}.get(cfg.qk_norm)
            if kind is None:
                raise Unsupported(f"qk_norm {cfg.qk_norm!r}")
            ints += [kind]
            ints += self._buf(a.q_norm, f"blk.{i}.attn_q_norm", optional=kind == 0)
            ints += self._buf(a.k_norm, f"blk.{i}.attn_k_norm", optional=kind == 0)
            c = net.cache.layers[i]
            ints += self._buf(c.k_store, f"blk.{i} key cache")         # [Hkv, n_ctx, Dh]
            ints += self._buf(c.v_store, f"blk.{i} value cache")
            ints += self._buf(b.ffn_norm, f"blk.{i}.ffn_norm")
            ints += [a.window]                                         # sliding window (0: none)
            if a.rope is rope:
                ints += [0, 0, 0, 0]                                   # the model's RoPE tables
            else:
                if a.rope.n_rot != n_rot or a.rope.kind != rope.kind:
                    raise Unsupported(f"blk.{i}: RoPE dimensions or pairing of its own")
                ints += self._buf(a.rope.cos, f"blk.{i} rope cos")
                ints += self._buf(a.rope.sin, f"blk.{i} rope sin")
            ints += self._buf(getattr(b, "post_attn_norm", None), f"blk.{i}.post_attention_norm",
                              optional=True)
            ints += self._buf(getattr(b, "post_ffn_norm", None), f"blk.{i}.post_ffw_norm",
                              optional=True)
            ffn = b.ffn
            act = getattr(ffn, "act", "silu")
            if act not in ("silu", "gelu"):
                raise Unsupported(f"blk.{i}: FFN activation {act!r}")
            ints += [int(act == "gelu")]
            if hasattr(ffn, "router"):
                if not ffn.use_kernel:
                    raise Unsupported("experts outside the CPU kernels")
                if ffn.probs_bias is not None:
                    raise Unsupported("a routing bias")
                ints += [1] + self._buf(ffn.router, f"blk.{i}.ffn_gate_inp")
                for s in (ffn.gate, ffn.up, ffn.down):
                    ints += [s.raw.ctypes.data, s.raw.nbytes, s.ggml_type, s.rows, s.cols]
                    self._keep.append(s.raw)
                if ffn.shared is not None:
                    for lin in (ffn.shared.gate, ffn.shared.up, ffn.shared.down):
                        ints += self._mat(lin)
                else:
                    ints += [0, 0, -1, 0, cfg.n_embd] * 3
                ints += self._buf(ffn.shared_gate, f"blk.{i}.ffn_gate_inp_shexp", optional=True)
            else:
                ints += [0]
                for lin in (ffn.gate, ffn.up, ffn.down):
                    ints += self._mat(lin)
        floats = [cfg.rms_eps, float(scale or 1.0), float(cfg.expert_weights_scale)]
        self._ints = np.asarray(ints, dtype=np.int64)
        self._floats = np.asarray(floats, dtype=np.float64)
        self.plan = self._lib.decode_plan(self._ints, self._floats)
        self.logits = torch.empty(1, cfg.n_vocab, dtype=torch.float32)

    def _buf(self, t, what: str, optional: bool = False) -> list[int]:
        if t is None:
            if not optional:
                raise Unsupported(f"{what} is missing")
            return [0, 0]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" \
                or not t.is_contiguous():
            raise Unsupported(f"{what} is not a contiguous float32 CPU tensor")
        self._keep.append(t)
        return [t.data_ptr(), t.numel() * 4]

    def _mat(self, lin: QuantLinear) -> list[int]:
        if not isinstance(lin.method, CpuKernelMethod):
            raise Unsupported(f"{lin.name} runs as {lin.method.name}")
        raw = lin.raw
        if not (isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.flags.c_contiguous):
            raise Unsupported(f"{lin.name} is not a contiguous byte buffer")
        self._keep.append(raw)
        return [raw.ctypes.data, raw.nbytes, lin.ggml_type, lin.n_out, lin.n_in]

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x [1, D] float32 (the token's embedding; overwritten) at position pos -> logits [1, V].
        The caller has checked pos against the cache."""
        x = x.contiguous()
        self._lib.decode_step(self.plan, x.numpy(), pos, self.logits.numpy())
        return self.logits.clone()


    def _addrs(self, cache) -> np.ndarray:
        """[n_layer, 4] int64: (k address, k bytes, v address, v bytes) of each layer of a KV cache,
        kept on the cache object (its buffers never move)."""
        a = getattr(cache, "_fused_addrs", None)
        if a is None:
            rows = []
            for i, c in enumerate(cache.layers):
                for t, what in ((c.k_store, "key"), (c.v_store, "value")):
                    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or \
                            t.device.type != "cpu" or not t.is_contiguous():
                        raise Unsupported(f"blk.{i} {what} cache is not a contiguous float32 CPU "
                                          f"tensor")
                rows.append([c.k_store.data_ptr(), c.k_store.numel() * 4,
                             c.v_store.data_ptr(), c.v_store.numel() * 4])
            a = cache._fused_addrs = np.asarray(rows, dtype=np.int64)
        return a

    def steps(self, x: torch.Tensor, positions, caches) -> torch.Tensor:
        """One token of each of B sequences: x [B, D] float32 (the tokens' embeddings; overwritten),
        row b at positions[b] of caches[b] (KV caches shaped like the model's) -> logits [B, V].
        Projections, experts and lm_head run over the B rows together; attention per row. The
        caller has checked each position against its cache."""
        B = x.shape[0]
        x = x.contiguous()
        pos = np.asarray(positions, dtype=np.int32)
        addrs = np.ascontiguousarray(np.stack([self._addrs(c) for c in caches]))
        logits = torch.empty(B, self.logits.shape[1], dtype=torch.float32)
        self._lib.decode_steps(self.plan, x.numpy(), pos, addrs, logits.numpy())
        return logits


def build(net) -> FusedDecode | None:
    """The fused step for this model, or None (with the reason on net.fused_reason) when a part
    of it is not covered."""
    try:
        from .. import cpu_backend
        if not cpu_backend.available():
            net.fused_reason = "the CPU kernels are not built"
            return None
        return FusedDecode(net)
    except Unsupported as e:
        net.fused_reason = str(e)
        return None
