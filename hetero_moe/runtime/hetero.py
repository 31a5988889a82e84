"""The heterogeneous step: dense layers and hot experts on the GPU tier, cold experts on the CPU,
overlapped.

Per MoE layer (`HeteroMoE`):
  1. route on the GPU tier (router and activations live there);
  2. split the K picks per token: hot (a GPU slot holds the expert) and cold;
  3. submit the cold pairs to the C++ pool FIRST (x, ids, weights copied to host memory, pinned on
     CUDA; hot pairs are passed as id -1 and skipped by the CPU kernel);
  4. meanwhile on the GPU tier: the shared expert, then one grouped launch over the hot experts
     (gate+up with SiLU fused, down, weighted combine; experts without tokens are skipped);
  5. wait for the CPU, copy its result to the device, add.
Prompts of at least `stream_min_tokens` tokens instead upload the hit cold experts' blocks to the
GPU (STREAM_GROUP at a time) and run them there (llama.cpp's op offload; the rule is at STREAM_TOKENS_PER_EXPERT).
Under gpu="interpret" the GPU tier is CPU tensors run by Triton's interpreter while the C++ pool
works on its own threads, so the same order and the same overlap are exercised without a GPU.

Hot experts sit in fixed slots: per layer uint8 stacks [S, bytes of one expert] and `slot_of`
[E] (slot or -1). Moving an expert in or out is a copy into a slot and one entry of `slot_of`:
addresses stay fixed, so a captured decode graph would stay valid.

CUDA graphs are not used yet: each MoE layer needs its routed ids on the host to start the CPU
experts (a device-to-host sync per layer), which a graph could only express with host callbacks.

Dimension key: T tokens, D model width, E routed experts, K experts per token, F expert FFN
width, S hot-expert slots of a layer.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .. import quant
from ..layers.attention import rms_norm
from .placement import DEQUANT_DTYPE, PlacementPlan, experts_as_blocks
from .planner import STREAM_GROUP         # experts uploaded at a time (the plan's buffer)


# Streaming a layer's hit cold experts to the GPU pays when a prompt gives each of them enough
# tokens: with T tokens an expert gets ~T*K/E of them; from 32 each on, the upload (its bytes at
# PCIe speed) costs less than the CPU computing it (ik_llama.cpp's rule; llama.cpp streams from
# 32 tokens per batch). load(..., stream_min_tokens=N) overrides (E/K)*32; 0 turns it off.
STREAM_TOKENS_PER_EXPERT = 32


class EventLog:
    """The executor's order of work, for tests and debugging: (what, layer, time)."""

    def __init__(self):
        self.events: list[tuple[str, int, float]] = []

    def __call__(self, what: str, layer: int) -> None:
        self.events.append((what, layer, time.perf_counter()))

    def of_layer(self, layer: int) -> list[str]:
        return [w for w, l, _ in self.events if l == layer]


class HeteroMoE:
    """One MoE layer split between the GPU tier (hot experts, shared expert) and the CPU."""

    def __init__(self, moe, plan: PlacementPlan):
        self.moe, self.plan = moe, plan
        self.layer = moe.layer
        self.log: EventLog | None = None
        c = moe.cfg
        E = c.n_expert
        hot = list(plan.experts_on_gpu(moe.layer))
        self.hot = hot
        dev = plan.gpu_device
        slot_of = torch.full((E,), -1, dtype=torch.int32)
        for s, e in enumerate(hot):
            slot_of[e] = s
        self.slot_of = slot_of.to(dev)
        self.stacks = None
        self.as_blocks = experts_as_blocks(st.ggml_type for st in (moe.gate, moe.up, moe.down))
        if hot:
            self.stacks = [self._resident(st, hot) for st in (moe.gate, moe.up, moe.down)]
        self.n_hot = len(hot)
        E, K = c.n_expert, c.n_expert_used
        # prompts of at least this many tokens stream their hit cold experts to the GPU instead
        # of running them on the CPU (only when every stack has a Triton kernel)
        rule = plan.stream_min_tokens
        self.stream_min = (E // max(1, K)) * STREAM_TOKENS_PER_EXPERT if rule is None else rule
        if not self.as_blocks:
            self.stream_min = 0

    def _resident(self, st, hot: list[int]):
        """GPU copies of the hot experts of one stack: blocks as stored [S, expert_bytes], or a
        float16 [S, rows, cols] for a type without a Triton kernel."""
        name = st.name
        if self.as_blocks:
            raw = quant._as_bytes(st.raw).view(-1, st.expert_bytes)          # [E, bytes]
            return self.plan.put(name, raw[hot])
        w = torch.stack([st.dequantize(e) for e in hot]).to(DEQUANT_DTYPE)  # [S, rows, cols]
        return self.plan.put(name, w)

    # -- the GPU side -------------------------------------------------------------------------
    def _hot_experts(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        m = self.moe
        gate, up, down = self.stacks
        if self.as_blocks:
            from ..kernels.triton import gguf as gk
            return gk.moe_grouped(x.float().contiguous(), ids, w.float().contiguous(),
                                  self.slot_of, gate, up, down, m.gate.ggml_type,
                                  m.up.ggml_type, m.down.ggml_type, m.cfg.n_ff_exp)
        return self._hot_experts_dense(x, w, ids)

    def _hot_experts_dense(self, x, w, ids) -> torch.Tensor:
        """Hot experts kept in float16 (types without a Triton kernel): per-expert matmuls."""
        out = torch.zeros_like(x, dtype=torch.float32)
        slots = self.slot_of[ids.long()]                       # [T, K]
        for s in torch.unique(slots[slots >= 0]).tolist():
            t_idx, k_idx = (slots == s).nonzero(as_tuple=True)
            xe = x[t_idx].float()
            g, u, d = (st[s].float() for st in self.stacks)
            y = (F.silu(xe @ g.T) * (xe @ u.T)) @ d.T
            out.index_add_(0, t_idx, y * w[t_idx, k_idx, None])
        return out

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.moe
        if m.shared is None:
            return None
        s = m.shared(x)
        if m.shared_gate is not None:
            s = s * torch.sigmoid(x @ m.shared_gate)[:, None]
        return s

    def _stream_cold(self, x, w, ids, cold_ids) -> torch.Tensor:
        """Large prompts: upload the hit cold experts' blocks, STREAM_GROUP at a time (the
        planner's stream buffer), and run them with the grouped kernel like hot ones."""
        from ..kernels.triton import gguf as gk
        m, dev = self.moe, self.plan.gpu_device
        hit = torch.unique(cold_ids[cold_ids >= 0]).tolist()
        out = None
        for i in range(0, len(hit), STREAM_GROUP):
            group = hit[i:i + STREAM_GROUP]
            slot_of = torch.full((m.cfg.n_expert,), -1, dtype=torch.int32)
            slot_of[group] = torch.arange(len(group), dtype=torch.int32)
            stacks = [quant._as_bytes(st.raw).view(-1, st.expert_bytes)[group].to(dev)
                      for st in (m.gate, m.up, m.down)]
            y = gk.moe_grouped(x.float().contiguous(), ids, w.float().contiguous(),
                               slot_of.to(dev), *stacks, m.gate.ggml_type, m.up.ggml_type,
                               m.down.ggml_type, m.cfg.n_ff_exp)
            out = y if out is None else out + y
        return out

    # -- the step -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, ws=None) -> torch.Tensor:   # [T, D] -> [T, D]
        """ws: the CPU path's scratch (unused: the GPU tier allocates its own)."""
        log, L = self.log or (lambda what, layer: None), self.layer
        w, ids = self.moe.route(x)                               # [T, K] each, on the device
        log("route", L)
        cold_ids = ids.masked_fill(self.slot_of[ids] >= 0, -1) if self.n_hot else ids
        n_cold = int((cold_ids >= 0).sum()) if self.n_hot else ids.numel()   # host sync
        out = handle = None
        if n_cold and 0 < self.stream_min <= x.shape[0]:
            out = self._stream_cold(x, w, ids, cold_ids)
            log("gpu_stream", L)
        elif n_cold:
            handle = self._submit_cpu(x, cold_ids, w)            # first: the CPU starts now
            log("cpu_submit", L)
        s = self._shared(x)
        if s is not None:
            out = s if out is None else out + s
            log("gpu_shared", L)
        if n_cold < ids.numel():
            y = self._hot_experts(x, w, ids)
            out = y if out is None else out + y
            log("gpu_hot", L)
        if handle is not None:
            y = handle.wait()
            log("cpu_wait", L)
            y = y.to(x.device, non_blocking=True)
            out = y if out is None else out + y
        log("combine", L)
        return out if out is not None else torch.zeros_like(x)

    def _submit_cpu(self, x, cold_ids, w):
        """Start the cold experts on the C++ pool (the torch reference, synchronously, when the
        kernels are not built) -> a handle whose wait() gives [T, D] on the host."""
        m = self.moe
        xh = x.detach().float()
        if xh.is_cuda:                                  # pinned: the copy is a DMA
            buf = torch.empty(xh.shape, dtype=torch.float32, pin_memory=True)
            buf.copy_(xh)
            xh = buf
        else:
            xh = xh.contiguous()
        ids_h = cold_ids.to("cpu", torch.int32).contiguous()
        w_h = w.detach().to("cpu", torch.float32).contiguous()
        if m.use_kernel:
            c = m.cfg
            from .. import cpu_backend
            return cpu_backend.moe_ffn_submit(
                xh, ids_h, w_h, m.gate.kraw, m.up.kraw, m.down.kraw, gate_type=m.gate.ktype,
                up_type=m.up.ktype, down_type=m.down.ktype, n_expert=c.n_expert,
                d_model=c.n_embd, d_ff=c.n_ff_exp)
        y = m.experts_torch(xh, w_h * (ids_h >= 0), ids_h.clamp_min(0).long())
        return _Done(y)


class _Done:
    """A finished result with the CPU pool handle's interface."""

    def __init__(self, y: torch.Tensor):
        self.y = y

    def wait(self) -> torch.Tensor:
        return self.y


class HeteroExecutor:
    """Runs a Transformer whose placement has a GPU tier: embeddings from the CPU, every layer's
    attention and dense FFN on the GPU tier, MoE layers through HeteroMoE, lm_head on its tier."""

    def __init__(self, net):
        self.net = net
        self.log: EventLog | None = None

    def record(self, on: bool = True) -> EventLog | None:
        """Start (or stop) logging the order of work in every MoE layer; returns the log."""
        self.log = EventLog() if on else None
        for b in self.net.blocks:
            if isinstance(b.ffn, HeteroMoE):
                b.ffn.log = self.log
        return self.log

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos0: int, all_logits: bool = True,
                sparse=None) -> torch.Tensor:
        net = self.net
        cfg = net.cfg
        sp = net.sparse if sparse is None else sparse
        if sp.enabled:
            from ..errors import UnsupportedError
            raise UnsupportedError("sparse attention runs on the CPU-only path; load with "
                                   "gpu='none' to use it")
        from ..models.transformer import _post
        dev = net.plan.gpu_device
        x = net._embed(ids).to(dev)                             # [T, D]
        for i, b in enumerate(net.blocks):
            x = x + _post(b.attn(rms_norm(x, b.attn_norm, cfg.rms_eps), pos0, net.cache.layers[i]),
                          b.post_attn_norm, cfg.rms_eps)
            x = x + _post(b.ffn(rms_norm(x, b.ffn_norm, cfg.rms_eps)), b.post_ffn_norm, cfg.rms_eps)
        if not all_logits:
            x = x[-1:]
        net.cache.pos = pos0 + ids.shape[0]
        return net._logits(x).cpu()

    def memory(self) -> dict:
        """Bytes the GPU tier holds, by the planner's groups, next to what the plan said."""
        from .planner import group_of
        plan = self.net.plan
        groups: dict[str, int] = {}
        for name, n in plan.held.items():
            if name.startswith("kv_cache."):
                g = "kv_cache"
            elif name.startswith("rope."):
                g = "attention"
            else:
                g = group_of(name)
                g = "hot_experts" if g == "experts" else g
            groups[g] = groups.get(g, 0) + n
        p = plan.plan
        planned = {k: v for k, v in p.gpu_groups.items() if k != "scratch"}
        out = {"mode": plan.mode, "device": plan.gpu_device, "held_bytes": sum(groups.values()),
               "held_groups": groups, "planned_bytes": sum(planned.values()),
               "planned_groups": planned,
               "scratch_reserved_bytes": p.gpu_groups.get("scratch", 0)}
        if plan.mode == "cuda":
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        return out


__all__ = ["EventLog", "HeteroExecutor", "HeteroMoE"]
