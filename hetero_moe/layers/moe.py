"""Feed-forward blocks: dense SwiGLU FFN and the MoE layer (route -> place -> experts -> combine).

Dimension key: T tokens, D model width, E routed experts, K experts per token (top-k),
F expert FFN width.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .. import quant
from ..errors import GGUFFormatError
from ..gguf import TensorInfo
from ..models.base import ModelConfig
from ..quant.act import fake_quant
from .linear import KernelOptions, QuantLinear, apply_group, cpu_kernels_usable


def gelu_ggml(g: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) as ggml's CPU backend computes it, which llama.cpp's GeGLU uses: the input
    rounded to f16, the result read from a table of f16 values, 0 below -10 and x above 10."""
    y = F.gelu(g.half().float(), approximate="tanh").half().float()
    return torch.where(g <= -10.0, torch.zeros_like(g), torch.where(g >= 10.0, g, y))


def _gelu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gelu_ggml(g) * u: in C++ (a table, on the pool) for contiguous float32 CPU tensors, in
    place in g; else in torch."""
    from .. import cpu_backend
    if g.is_cpu and g.dtype == torch.float32 and u.dtype == torch.float32 and g.is_contiguous() \
            and u.is_contiguous() and cpu_backend.available():
        return cpu_backend.gelu_mul(g, u, out=g)
    return gelu_ggml(g) * u


class DenseFFN:
    """down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or GELU (GeGLU); also used for shared
    experts."""

    def __init__(self, gate: QuantLinear, up: QuantLinear, down: QuantLinear, act: str = "silu"):
        if act not in ("silu", "gelu"):
            raise ValueError(f"FFN activation {act!r} is not supported (silu, gelu)")
        self.gate, self.up, self.down = gate, up, down
        self.act = act

    def __call__(self, x: torch.Tensor, ws=None) -> torch.Tensor:   # [T, D] -> [T, D]
        """ws: scratch for the large intermediates (the result may be in ws "q" then)."""
        if ws is None:
            g, u = apply_group([self.gate, self.up], x)
            if self.act == "gelu":
                return self.down(_gelu_mul(g, u))
            return self.down(F.silu(g) * u)
        T, Fd = x.shape[0], self.gate.n_out
        g, u = apply_group([self.gate, self.up], x, (ws.get("g", T, Fd), ws.get("u", T, Fd)))
        h = F.silu(g, inplace=True).mul_(u) if self.act == "silu" else _gelu_mul(g, u)
        return self.down(h, out=ws.get("q", T, self.down.n_out))   # q: spent by now


def group_limited(scores: torch.Tensor, n_group: int, n_used: int) -> torch.Tensor:
    """Scores [T, E] with every expert outside the n_used best groups set to -inf; a group's score
    is the sum of its two best experts (DeepSeek-V3)."""
    T, E = scores.shape
    g = scores.view(T, n_group, E // n_group)                  # [T, G, E/G]
    group_score = torch.topk(g, min(2, g.shape[-1]), dim=-1).values.sum(-1)   # [T, G]
    keep = torch.topk(group_score, n_used, dim=-1).indices     # [T, n_used]
    mask = torch.zeros(T, n_group, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, keep, True)
    return g.masked_fill(~mask[:, :, None], float("-inf")).view(T, E)


class ExpertStack:
    """One projection of all routed experts, [E, rows, cols] in GGUF blocks, never copied."""

    def __init__(self, t: TensorInfo, n_expert: int, rows: int, cols: int):
        want = (n_expert, rows, cols)
        if t.shape != want:
            raise GGUFFormatError(f"{t.path}: tensor {t.name!r} has shape {list(t.shape)}, "
                                  f"expected {list(want)}")
        quant.quant_type(t.ggml_type, tensor=t.name, file=t.path)
        self.name, self.raw, self.ggml_type = t.name, t.data, t.ggml_type
        self.rows, self.cols = rows, cols
        self.expert_bytes = rows * quant.row_bytes(t.ggml_type, cols)
        self.n_expert = n_expert
        self.kraw, self.ktype = self.raw, self.ggml_type   # what the C++ kernels multiply

    def prepare_kernels(self, options) -> None:
        """The C++ kernels' copy (linear.kernel_weights): every expert's rows as one matrix."""
        from .linear import kernel_weights
        self.kraw, self.ktype = kernel_weights(self.name, self.raw, self.ggml_type,
                                               self.n_expert * self.rows, self.cols, options)

    def dequantize(self, e: int) -> torch.Tensor:               # -> [rows, cols] float32
        raw = self.raw[e * self.expert_bytes:(e + 1) * self.expert_bytes]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quant.dequantize(raw, self.ggml_type, (self.rows, self.cols))


class MoE:
    """Routed experts (+ optional shared expert).

    route: softmax over E router logits, top-K, optional renormalisation;
    experts: all on the CPU tier here (runtime/hetero.py's HeteroMoE splits them between the
    GPU tier's hot experts and the CPU);
    combine: weighted sum of expert outputs (+ sigmoid-gated shared expert).
    """

    def __init__(self, cfg: ModelConfig, layer: int, router: torch.Tensor, gate: ExpertStack,
                 up: ExpertStack, down: ExpertStack, options: KernelOptions,
                 shared: DenseFFN | None = None, shared_gate: torch.Tensor | None = None,
                 probs_bias: torch.Tensor | None = None):
        self.cfg, self.layer = cfg, layer
        self.router = router                                   # [E, D] float32
        self.probs_bias = probs_bias                           # [E]: added for choosing only
        self.gate, self.up, self.down = gate, up, down
        self.shared, self.shared_gate = shared, shared_gate    # shared_gate: [D]
        self.act_quant = options.act_quant
        self.margin_log: list | None = None    # set to a list to record routing margins
        self.counts: torch.Tensor | None = None   # set to zeros [E] to count routing picks
        self.use_kernel = (options.cpu_kernels != "torch" and all(
            cpu_kernels_usable(s.ggml_type, options) for s in (gate, up, down)))
        if self.use_kernel:
            for s in (gate, up, down):
                s.prepare_kernels(options)

    def route(self, x: torch.Tensor):
        """-> (weights [T, K] float32, ids [T, K] int64).

        Experts are chosen on probs (+ probs_bias, within the best groups when grouped); their
        weights are the unbiased probs, optionally renormalised and scaled."""
        c = self.cfg
        logits = x @ self.router.T                             # [T, E]
        probs = torch.sigmoid(logits) if c.gating == "sigmoid" else torch.softmax(logits, dim=-1)
        select = probs if self.probs_bias is None else probs + self.probs_bias
        if c.n_expert_groups > 1:
            select = group_limited(select, c.n_expert_groups, c.n_group_used)
        k = c.n_expert_used
        if self.margin_log is not None and k < c.n_expert:
            top = torch.topk(select, k + 1, dim=-1).values         # [T, K+1]
            self.margin_log.append(top[:, k - 1] - top[:, k])     # gap of the last pick
        w, ids = torch.topk(select, k, dim=-1)
        if self.counts is not None:
            self.counts += torch.bincount(ids.flatten(), minlength=c.n_expert).to(self.counts)
        if select is not probs:
            w = probs.gather(1, ids)
        if c.norm_topk:
            # llama.cpp floors the sum at the smallest normal f16 so all-zero weights stay finite
            w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
        if c.expert_weights_scale not in (0.0, 1.0):
            w = w * c.expert_weights_scale
        return w, ids

    def experts_torch(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Reference CPU tier: dequantize each hit expert, SwiGLU, weighted scatter-add."""
        out = torch.zeros_like(x)
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.cfg.n_expert).tolist()
        tok = (order // ids.shape[1])
        wts = w.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            t_idx = tok[start:start + n]
            xe = x[t_idx]                                      # [n, D]
            xg = fake_quant(xe, self.gate.ggml_type) if self.act_quant else xe
            xu = fake_quant(xe, self.up.ggml_type) if self.act_quant else xe
            h = F.silu(xg @ self.gate.dequantize(e).T) * (xu @ self.up.dequantize(e).T)
            if self.act_quant:
                h = fake_quant(h, self.down.ggml_type)
            y = h @ self.down.dequantize(e).T                  # [n, D]
            out.index_add_(0, t_idx, y * wts[start:start + n, None])
            start += n
        return out

    def experts_kernel(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        kernel = quant.QUANT_TYPES[self.gate.ggml_type].cpu_kernel
        return kernel.moe_ffn(
            x.contiguous(), ids.to(torch.int32).contiguous(), w.float().contiguous(),
            self.gate.kraw, self.up.kraw, self.down.kraw,
            gate_type=self.gate.ktype, up_type=self.up.ktype,
            down_type=self.down.ktype, n_expert=c.n_expert, d_model=c.n_embd,
            d_ff=c.n_ff_exp, out=out)

    def __call__(self, x: torch.Tensor, ws=None) -> torch.Tensor:   # [T, D] -> [T, D]
        """ws: scratch for the large intermediates (the result may be in ws "q" then)."""
        w, ids = self.route(x)
        if self.use_kernel:
            out = self.experts_kernel(x, w, ids, None if ws is None   # q: spent by now
                                      else ws.get("q", x.shape[0], self.cfg.n_embd))
        else:
            out = self.experts_torch(x, w, ids)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = s * torch.sigmoid(x @ self.shared_gate)[:, None]
            out = out + s
        return out
