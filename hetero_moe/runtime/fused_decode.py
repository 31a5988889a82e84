"""Whole-model decode step in C++ (csrc/decode.cpp): one call per generated token runs every layer
(norms, q/k/v, q/k norms, RoPE, the KV-cache write, attention, output projection, router, experts,
shared expert, final norm, lm_head) on the kernels' thread pool, without returning to Python
between ops. The per-op path in transformer.py stays the reference and serves everything the fused
step does not cover (prompts, GPU tiers, sparse attention, the torch kernels); both compute
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
        if net.embed.device != "cpu" or net.rope.cos.device.type != "cpu":
            raise Unsupported("a GPU tier")
        mla = cfg.mla
        rope = net.blocks[0].attn.rope if mla is not None else net.rope
        if mla is not None:
            lat = net.cache.layers[0].latent
            if lat.dtype not in (torch.float16, torch.float32) or lat.device.type != "cpu":
                raise Unsupported(f"a {lat.dtype} latent cache on {lat.device}")
            if any(b.attn.rope is not rope for b in net.blocks):
                raise Unsupported("per-layer RoPE tables with latent attention")
        n_rot = rope.n_rot
        head_dim = mla.k_head if mla is not None else cfg.head_dim
        ints += [cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, head_dim, net.n_ctx, n_rot,
                 cfg.n_vocab, int(rope.kind == ROPE_NEOX), cfg.n_expert, cfg.n_expert_used,
                 int(cfg.gating == "sigmoid"), int(cfg.norm_topk)]
        if mla is not None:
            ints += [1, mla.kv_lora, mla.qk_nope, mla.qk_rope, mla.v_head, mla.q_lora,
                     int(net.cache.layers[0].latent.dtype == torch.float16)]
        else:
            kd = net.cache.layers[0].k_store.dtype
            if kd not in (torch.float16, torch.float32):
                raise Unsupported(f"a {kd} KV cache")
            ints += [0] * 6 + [int(kd == torch.float16)]
        ints += [cfg.n_expert_groups if cfg.n_expert_groups > 1 else 0,
                 cfg.n_group_used if cfg.n_expert_groups > 1 else 0]
        ints += self._buf(rope.cos, "rope cos") + self._buf(rope.sin, "rope sin")
        ints += self._buf(net.out_norm, "output_norm")
        ints += self._mat(net.lm_head)
        scale = None
        for i, b in enumerate(net.blocks):
            a = b.attn
            a_scale = mla.kq_scale if mla is not None else a.scale
            if scale is None:
                scale = a_scale
            elif a_scale != scale:
                raise Unsupported("per-layer attention scales")
            ints += self._buf(b.attn_norm, f"blk.{i}.attn_norm")
            if mla is not None:
                ints += self._mla(i, a, net.cache.layers[i])
            else:
                ints += self._attn(i, a, net.cache.layers[i], cfg)
            ints += self._buf(b.ffn_norm, f"blk.{i}.ffn_norm")
            ints += [getattr(a, "window", 0)]                          # sliding window (0: none)
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
                ints += [1] + self._buf(ffn.router, f"blk.{i}.ffn_gate_inp")
                ints += self._buf(ffn.probs_bias, f"blk.{i}.exp_probs_b", optional=True)
                for s in (ffn.gate, ffn.up, ffn.down):
                    ints += [s.kraw.ctypes.data, s.kraw.nbytes, s.ktype, s.rows, s.cols]
                    self._keep.append(s.kraw)
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
        self._emb_src = self._embed_source(net)

    def _attn(self, i: int, a, c, cfg) -> list[int]:
        """A standard attention layer's part of the description."""
        ints: list[int] = []
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
        ints += self._buf(c.k_store, f"blk.{i} key cache", cache=True)     # [Hkv, n_ctx, Dh]
        ints += self._buf(c.v_store, f"blk.{i} value cache", cache=True)
        return ints

    def _mla(self, i: int, a, c) -> list[int]:
        """A latent attention layer's part: q (or q_a, its norm, q_b), kv_a, its norm, k_b and v_b
        (their GGUF blocks; the float32 copies for a legacy kv_b), o, the latent cache."""
        m = a.m
        ints: list[int] = []
        if m.q_lora:
            ints += self._mat(a.q_a) + self._buf(a.q_a_norm, f"blk.{i}.attn_q_a_norm") \
                + self._mat(a.q_b)
        else:
            ints += self._mat(a.q)
        ints += self._mat(a.kv_a) + self._buf(a.kv_a_norm, f"blk.{i}.attn_kv_a_norm")
        H = self.net.cfg.n_head
        for raw, f32, rows, cols, what in ((getattr(a, "k_b_raw", None), a.k_b, m.kv_lora,
                                            m.qk_nope, "attn_k_b"),
                                           (getattr(a, "v_b_raw", None), a.v_b, m.v_head,
                                            m.kv_lora, "attn_v_b")):
            if raw is not None:
                data = raw.data
                if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
                        and data.flags.c_contiguous):
                    raise Unsupported(f"blk.{i}.{what} is not a contiguous byte buffer")
                self._keep.append(data)
                ints += [data.ctypes.data, data.nbytes, raw.ggml_type, rows, cols]
            else:        # float32 [H, rows, cols] copies (a legacy kv_b)
                if tuple(f32.shape) != (H, rows, cols):
                    raise Unsupported(f"blk.{i}.{what}: float copy of shape {list(f32.shape)}")
                ints += self._buf(f32, f"blk.{i}.{what}")[:2] + [0, rows, cols]
        ints += self._mat(a.o)
        lat = c.latent
        if not lat.is_contiguous():
            raise Unsupported(f"blk.{i} latent cache is not contiguous")
        self._keep.append(lat)
        ints += [lat.data_ptr(), lat.numel() * lat.element_size()]
        return ints

    def _buf(self, t, what: str, optional: bool = False, cache: bool = False) -> list[int]:
        """cache: a KV cache (float32 or f16, the element type the description's header says)."""
        if t is None:
            if not optional:
                raise Unsupported(f"{what} is missing")
            return [0, 0]
        types = (torch.float32, torch.float16) if cache else (torch.float32,)
        if not isinstance(t, torch.Tensor) or t.dtype not in types or t.device.type != "cpu" \
                or not t.is_contiguous():
            raise Unsupported(f"{what} is not a contiguous float32 CPU tensor")
        self._keep.append(t)
        return [t.data_ptr(), t.numel() * t.element_size()]

    def _mat(self, lin: QuantLinear) -> list[int]:
        if not isinstance(lin.method, CpuKernelMethod):
            raise Unsupported(f"{lin.name} runs as {lin.method.name}")
        raw = lin.kraw
        if not (isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.flags.c_contiguous):
            raise Unsupported(f"{lin.name} is not a contiguous byte buffer")
        self._keep.append(raw)
        return [raw.ctypes.data, raw.nbytes, lin.ktype, lin.n_out, lin.n_in]

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x [1, D] float32 (the token's embedding; overwritten) at position pos -> logits [1, V].
        The caller has checked pos against the cache."""
        x = x.contiguous()
        self._lib.decode_step(self.plan, x.numpy(), pos, self.logits.numpy())
        return self.logits.clone()


    def token_step(self, tok: int, pos: int) -> torch.Tensor | None:
        """step() for token id tok, its embedding row read and scaled in C++ -> logits [1, V] (a
        new tensor), or None when the embedding table is not a file's rows the step can read
        (the caller then embeds and calls step()). The caller has checked pos and tok."""
        src = self._emb_src
        if src is None:
            return None
        logits = torch.empty(1, self.logits.shape[1], dtype=torch.float32)
        self._lib.decode_token(self.plan, src[0], src[1], src[2], src[3], src[4], tok, pos,
                               logits.numpy())
        return logits

    def _embed_source(self, net):
        """(fd, offset, n_rows, ggml type, scale) of the embedding table for token_step, or None."""
        from ..layers.linear import Embedding
        emb = net.embed
        if not isinstance(emb, Embedding) or emb.n_embd != net.cfg.n_embd:
            return None
        info = self._lib.type_info(emb.ggml_type)
        if info is None or info.get("group", 1) != 1:
            return None
        src = emb.file_source()
        if src is None:
            return None
        return (src[0], src[1], emb.n_vocab, emb.ggml_type, float(net.cfg.embd_scale or 0.0))

    def _addrs(self, cache) -> np.ndarray:
        """[n_layer, 4] int64: (k address, k bytes, v address, v bytes) of each layer of a KV cache,
        kept on the cache object (its buffers never move)."""
        a = getattr(cache, "_fused_addrs", None)
        if a is None:
            rows = []
            for i, c in enumerate(cache.layers):
                lat = getattr(c, "latent", None)
                if lat is not None:      # latent attention: one cache, named twice
                    if lat.device.type != "cpu" or not lat.is_contiguous():
                        raise Unsupported(f"blk.{i} latent cache is not a contiguous CPU tensor")
                    n = lat.numel() * lat.element_size()
                    rows.append([lat.data_ptr(), n, lat.data_ptr(), n])
                    continue
                for t, what in ((c.k_store, "key"), (c.v_store, "value")):
                    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32,
                                                                          torch.float16) or \
                            t.device.type != "cpu" or not t.is_contiguous():
                        raise Unsupported(f"blk.{i} {what} cache is not a contiguous float32 or "
                                          f"f16 CPU tensor")
                rows.append([c.k_store.data_ptr(), c.k_store.numel() * c.k_store.element_size(),
                             c.v_store.data_ptr(), c.v_store.numel() * c.v_store.element_size()])
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
