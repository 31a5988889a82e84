"""Split a model's layers into contiguous pipeline stages, from the GGUF header alone.

The byte accounting is the planner's (runtime/planner.py): a tensor costs its file bytes in host
RAM (GGUF blocks, read in place), the KV cache costs `cache_bytes_per_token` per position, and
decode reads the dense tensors whole and K/E of each routed expert stack per token. Stage 0 also
holds the embedding table, the last stage the output norm and lm_head (a tied lm_head is the
embedding table again, so that stage counts it too).

Dimension key: L layers, S stages, D n_embd.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.planner import (CACHE_READ_FRACTION, PlanError, cache_bytes_per_token, fmt_bytes,
                               group_of, layer_of, parse_size)

HIDDEN_BYTES = 4            # float32 per hidden-state element sent between stages


@dataclass
class StageSpec:
    """One stage: layers [first, last) of n_layer, and whether it embeds / runs the lm_head."""
    index: int
    n_stages: int
    first: int
    last: int
    n_layer: int
    weight_bytes: int = 0          # host RAM its tensors take (file bytes)
    cache_bytes: int = 0           # its layers' KV cache for the planned context and sequences
    read_bytes: float = 0.0        # bytes decode reads per token

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes

    def layers(self) -> str:
        return f"blk {self.first}-{self.last - 1}" if self.last - self.first > 1 else \
            f"blk {self.first}"

    def owns(self, name: str) -> bool:
        """Whether tensor `name` belongs to this stage (the tied lm_head: see stage_tensors)."""
        i = layer_of(name)
        if i is not None:
            return self.first <= i < self.last
        if name.startswith("token_embd."):
            return self.is_first
        return self.is_last          # output norm, lm_head, anything else outside the blocks


@dataclass
class StageSplit:
    """The split of one model over S stages, with each stage's bytes."""
    model: str
    arch: str
    n_layer: int
    n_embd: int
    stages: list[StageSpec]
    n_ctx: int
    sequences: int
    cache_type: str
    ram_per_host: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.ram_per_host is None or all(s.total_bytes <= self.ram_per_host
                                                for s in self.stages)

    def summary(self) -> str:
        """The split, one line per stage (printed by load(stages=...) and `plan --stages`)."""
        lines = [f"pipeline split of {self.model} ({self.arch}, {self.n_layer} layers) over "
                 f"{len(self.stages)} stage(s); KV cache for {self.sequences} sequence(s) x "
                 f"{self.n_ctx} tokens ({self.cache_type})"]
        for s in self.stages:
            extra = " + embeddings" if s.is_first else ""
            extra += " + output" if s.is_last else ""
            room = ""
            if self.ram_per_host is not None:
                room = (f" | fits {fmt_bytes(self.ram_per_host)}" if s.total_bytes <=
                        self.ram_per_host else f" | does NOT fit {fmt_bytes(self.ram_per_host)}")
            lines.append(f"  stage {s.index}: {s.layers()}{extra}: weights "
                         f"{fmt_bytes(s.weight_bytes)}, KV cache {fmt_bytes(s.cache_bytes)}, "
                         f"reads {fmt_bytes(s.read_bytes)}/token{room}")
        lines.append(f"  between stages: the hidden state, {self.n_embd} x {HIDDEN_BYTES} = "
                     f"{fmt_bytes(self.n_embd * HIDDEN_BYTES)} per token per hop")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "arch": self.arch, "n_layer": self.n_layer,
                "n_ctx": self.n_ctx, "sequences": self.sequences, "cache_type": self.cache_type,
                "ram_per_host": self.ram_per_host, "fits": self.fits,
                "hidden_bytes_per_token": self.n_embd * HIDDEN_BYTES,
                "stages": [{"index": s.index, "first_layer": s.first, "last_layer": s.last - 1,
                            "weight_bytes": s.weight_bytes, "cache_bytes": s.cache_bytes,
                            "read_bytes_per_token": int(s.read_bytes)} for s in self.stages]}


def _costs(g, cfg, cache_type: str, n_ctx: int, sequences: int):
    """Per-layer (weight bytes, read bytes per token), and the extras of stage 0 / the last
    stage."""
    L = cfg.n_layer
    w = [0] * L
    rd = [0.0] * L
    first_w = last_w = 0
    first_r = last_r = 0.0
    frac = (cfg.n_expert_used / cfg.n_expert) if cfg.n_expert else 1.0
    for t in g.tensors.values():
        i = layer_of(t.name)
        if i is not None:
            if i >= L:
                raise PlanError(f"{g.path}: tensor {t.name!r} is in layer {i}, but the model has "
                                f"{L} layers")
            w[i] += t.nbytes
            rd[i] += t.nbytes * (frac if group_of(t.name) == "experts" else 1.0)
        elif t.name.startswith("token_embd."):
            first_w += t.nbytes
            first_r += t.nbytes / t.ne[-1]               # one row per token
        else:
            last_w += t.nbytes
            last_r += t.nbytes
    if cfg.tied_embeddings:                              # the lm_head is the embedding table
        emb = g.tensors["token_embd.weight"]
        last_w += emb.nbytes
        last_r += emb.nbytes
    per_layer_cache = cache_bytes_per_token(cfg, cache_type) // L
    cache = [per_layer_cache * n_ctx * sequences] * L
    read_cache = [per_layer_cache * n_ctx * CACHE_READ_FRACTION] * L
    rd = [r + c for r, c in zip(rd, read_cache)]
    return w, rd, cache, (first_w, first_r), (last_w, last_r)


def _partition(cost: list[int], first_extra: int, last_extra: int, n: int) -> list[int]:
    """Boundaries b_0=0 < b_1 < ... < b_n=L of n contiguous non-empty stages that minimise the
    largest stage cost (stage 0 pays first_extra, stage n-1 last_extra). Exact, O(n L^2)."""
    L = len(cost)
    pre = [0]
    for c in cost:
        pre.append(pre[-1] + c)

    def seg(i, j, k):      # layers [i, j) as stage k
        return pre[j] - pre[i] + (first_extra if k == 0 else 0) + \
            (last_extra if k == n - 1 else 0)
    INF = float("inf")
    best = [[INF] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, L - (n - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == INF:
                    continue
                v = max(best[k - 1][i], seg(i, j, k - 1))
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    bounds = [L]
    j = L
    for k in range(n, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    return bounds[::-1]


def split_stages(g, cfg, n_stages: int, *, n_ctx: int = 4096, sequences: int = 1,
                 cache_type: str = "f32", ram_per_host=None, layers: list[int] | None = None
                 ) -> StageSplit:
    """Split the model's layers into `n_stages` contiguous stages that balance host RAM
    (weights + KV cache). layers: explicit boundaries [0, b1, ..., L] instead.

    cache_type: the KV cache's element type on the stages (pipeline.stage_cache_type: f16, f32
    K/V on the torch path)."""
    import os
    L = cfg.n_layer
    if not isinstance(n_stages, int) or isinstance(n_stages, bool) or n_stages < 1:
        raise PlanError(f"stages must be a positive integer, got {n_stages!r}")
    if n_stages > L:
        raise PlanError(f"stages = {n_stages} exceeds the model's {L} layers (a stage needs at "
                        f"least one layer)")
    if n_ctx < 1 or sequences < 1:
        raise PlanError(f"n_ctx ({n_ctx}) and sequences ({sequences}) must be >= 1")
    ram = parse_size(ram_per_host, "ram per host") if ram_per_host is not None else None
    w, rd, cache, (fw, fr), (lw, lr) = _costs(g, cfg, cache_type, n_ctx, sequences)
    if layers is None:
        bounds = _partition([a + b for a, b in zip(w, cache)], fw, lw, n_stages)
    else:
        bounds = list(layers)
        if len(bounds) != n_stages + 1 or bounds[0] != 0 or bounds[-1] != L or \
                any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise PlanError(f"stage boundaries {bounds} must rise strictly from 0 to {L} with "
                            f"{n_stages + 1} entries")
    stages = []
    for k in range(n_stages):
        a, b = bounds[k], bounds[k + 1]
        s = StageSpec(k, n_stages, a, b, L, sum(w[a:b]), sum(cache[a:b]), sum(rd[a:b]))
        if s.is_first:
            s.weight_bytes += fw
            s.read_bytes += fr
        if s.is_last:
            s.weight_bytes += lw
            s.read_bytes += lr
        stages.append(s)
    return StageSplit(os.path.basename(g.path), cfg.arch, L, cfg.n_embd, stages, n_ctx,
                      sequences, cache_type, ram)


@dataclass
class ClusterPrediction:
    """Per-token decode time of a pipeline over hosts: each stage's roofline (bytes read per
    token / the host's memory bandwidth) plus the hops between stages."""
    split: StageSplit
    cpu_gbps: float
    network_gbps: float
    hop_latency_ms: float
    stage_ms: list[float]
    transfer_ms: float               # all hops of one token (size / bandwidth + latency)

    @property
    def token_ms(self) -> float:
        """One stream: the stages run one after another for each token."""
        return sum(self.stage_ms) + self.transfer_ms

    @property
    def pipeline_tok_s(self) -> float:
        """Many streams (at least one micro-batch per stage in flight): the slowest stage (with
        its outgoing hop) bounds the rate, one token per micro-batch of one sequence."""
        hop = self.transfer_ms / max(1, len(self.stage_ms) - 1) if len(self.stage_ms) > 1 \
            else 0.0
        slowest = max(ms + (hop if i < len(self.stage_ms) - 1 else 0.0)
                      for i, ms in enumerate(self.stage_ms))
        return 1000.0 / slowest if slowest > 0 else 0.0

    def summary(self) -> str:
        n = len(self.stage_ms)
        hop_bytes = self.split.n_embd * HIDDEN_BYTES
        per = ", ".join(f"{ms:.1f}" for ms in self.stage_ms)
        return "\n".join([
            self.split.summary(),
            f"predicted decode (a roofline, not a measurement): host memory {self.cpu_gbps:g} "
            f"GB/s, network {self.network_gbps:g} Gb/s, {self.hop_latency_ms:g} ms per hop",
            f"  stages' compute: {per} ms per token; transfers: {n - 1} hop(s) x "
            f"{fmt_bytes(hop_bytes)} = {self.transfer_ms:.3f} ms",
            f"  one stream: {self.token_ms:.1f} ms/token = {1000.0 / self.token_ms:.2f} tok/s; "
            f"{n} or more streams in flight (a full pipeline): up to "
            f"{self.pipeline_tok_s:.2f} tok/s in all"])

    def to_dict(self) -> dict:
        return {**self.split.to_dict(), "cpu_gbps": self.cpu_gbps,
                "network_gbps": self.network_gbps, "hop_latency_ms": self.hop_latency_ms,
                "stage_ms": self.stage_ms, "transfer_ms": self.transfer_ms,
                "token_ms": self.token_ms, "one_stream_tok_s": 1000.0 / self.token_ms,
                "pipeline_tok_s": self.pipeline_tok_s,
                "note": "a prediction (roofline from bandwidths), not a measurement"}


DEFAULT_HOP_LATENCY_MS = 0.5     # a Ray actor call between hosts, software included (assumed)


def predict_cluster(split: StageSplit, cpu_gbps: float, network_gbps: float,
                    hop_latency_ms: float = DEFAULT_HOP_LATENCY_MS) -> ClusterPrediction:
    """The per-token time of `split` on hosts with `cpu_gbps` of memory bandwidth each, linked by
    `network_gbps` (gigabits per second)."""
    if cpu_gbps <= 0 or network_gbps <= 0 or hop_latency_ms < 0:
        raise PlanError(f"bandwidths must be > 0 and the hop latency >= 0 (got cpu "
                        f"{cpu_gbps} GB/s, network {network_gbps} Gb/s, hop "
                        f"{hop_latency_ms} ms)")
    stage_ms = [s.read_bytes / (cpu_gbps * 1e9) * 1e3 for s in split.stages]
    hop_s = split.n_embd * HIDDEN_BYTES * 8 / (network_gbps * 1e9)
    transfer_ms = (len(split.stages) - 1) * (hop_s * 1e3 + hop_latency_ms)
    return ClusterPrediction(split, cpu_gbps, network_gbps, hop_latency_ms, stage_ms,
                             transfer_ms)


def plan_stages(path, n_stages: int, *, ram_per_host=None, network_gbps: float = 25.0,
                cpu_gbps: float | None = None, hop_latency_ms: float = DEFAULT_HOP_LATENCY_MS,
                n_ctx: int = 4096, sequences: int = 1, cache_type: str = "f16",
                threads: int | None = None) -> ClusterPrediction:
    """`hetero-moe plan --stages N`: the split and its predicted per-token time, from the header
    alone. cpu_gbps: each host's memory bandwidth (default: measured here)."""
    from ..gguf import GGUFFile
    from ..models.base import config_from_gguf
    from ..runtime.planner import measure_cpu_bandwidth
    g = GGUFFile(path)
    try:
        cfg = config_from_gguf(g)
        split = split_stages(g, cfg, n_stages, n_ctx=n_ctx, sequences=sequences,
                             cache_type=cache_type, ram_per_host=ram_per_host)
    finally:
        g.close()
    bw = cpu_gbps if cpu_gbps else measure_cpu_bandwidth(threads)
    return predict_cluster(split, bw, network_gbps, hop_latency_ms)
