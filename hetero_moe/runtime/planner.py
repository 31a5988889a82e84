"""The placement planner: which tensors a GPU of a given size holds, from the GGUF header alone.

Order of filling (each step only if everything before it fits):
  1. dense weights: attention / MLA, norms, routers, shared experts, leading dense FFN blocks,
     lm_head (embeddings stay on the CPU: one row per token), plus any expert stack a user rule
     pins to the GPU;
  2. the KV (or MLA latent) cache for n_ctx positions;
  3. scratch for one prompt chunk;
  4. hot routed experts, one (layer, expert) at a time: by a routing profile's frequency when one
     is given, else round-robin from the last MoE layer down (one expert per layer per round).
Bytes are the file's own block bytes: the GPU tier keeps GGUF blocks as they are.

Only the header is read (tensor names, types, shapes, metadata): planning a 400 GB file reads
a few MB. Dimension key: L layers, E routed experts, K experts per token.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import HeteroMoEError
from .placement import expert_gpu_bytes, gpu_resident_bytes

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_VRAM = 24 * GiB           # without a CUDA device (and no --vram)
DEFAULT_MARGIN = 1 * GiB          # CUDA context + allocator slack, kept free
DEFAULT_CHUNK = 512               # prompt tokens per forward pass (api.PREFILL_CHUNK)
CACHE_TYPES = {"f16": 2, "bf16": 2, "f32": 4}
GROUPS = ("attention", "shared_experts", "dense_ffn", "router", "norms", "output", "embeddings",
          "hot_experts", "kv_cache", "scratch")
# decode reads of the cache are counted at this fraction of n_ctx (a generation that fills the
# window reads on average half of it per token)
CACHE_READ_FRACTION = 0.5
# query rows per block of prompt attention, so a chunk's score matrix stays bounded
# (layers/mla.py QUERY_BLOCK; CUDA's fused attention for GQA holds less)
ATTN_QUERY_BLOCK = 128

STREAM_GROUP = 8        # cold experts a large prompt streams to the GPU at a time (hetero.py)

# Memory bandwidth of common cards, GB/s (vendor specifications).
GPU_BANDWIDTH_GBPS = {
    "RTX 3090": 936.0, "RTX 4090": 1008.0, "RTX 5090": 1792.0, "A6000": 768.0, "L40S": 864.0,
    "A100": 2039.0, "H100": 3350.0, "H200": 4800.0,
}
ASSUMED_GPU = "RTX 4090"
NO_DEVICE = "cuda (planned; none here)"   # gpu="auto" on a machine without CUDA


class PlanError(HeteroMoEError):
    """A plan cannot be made or read (bad option, unreadable profile or plan file)."""


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10 ** 3, "m": MiB, "mib": MiB,
          "mb": 10 ** 6, "g": GiB, "gib": GiB, "gb": 10 ** 9, "t": 1 << 40, "tib": 1 << 40,
          "tb": 10 ** 12}


def parse_size(v: str | int | float, what: str = "size") -> int:
    """'24GiB', '24G' (GiB), '24GB' (10^9), '512MiB', 1234 (bytes) -> bytes."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v < 0:
            raise PlanError(f"{what} must not be negative, got {v}")
        return int(v)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"{what} {v!r} is not a size (examples: 24GiB, 24G, 24GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# ------------------------------------------------------------------------------------------------
# tensor groups

_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def group_of(name: str) -> str:
    """The planner's group of a tensor name ('experts' for routed expert stacks)."""
    if name.startswith("token_embd."):
        return "embeddings"
    if name.startswith("output."):
        return "output"
    if name == "output_norm.weight" or name.endswith("_norm.weight"):
        return "norms"
    if _EXPERT_RE.match(name):
        return "experts"
    if ".ffn_gate_inp" in name or ".exp_probs_b." in name:     # routers (+ shared-expert gate)
        return "router"
    if "_shexp." in name:
        return "shared_experts"
        return "router"
    if ".attn_" in name or ".nsa_" in name:
        return "attention"
    if ".ffn_" in name:
        return "dense_ffn"
    return "other"


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass
class Override:
    """A user rule: tensors whose name matches `pattern` (re.search) go to `tier`."""
    pattern: str
    tier: str

    @staticmethod
    def parse(rule: str) -> "Override":
        pat, sep, tier = rule.rpartition("=")
        tier = tier.strip().lower()
        if not sep or not pat or tier not in ("gpu", "cpu"):
            raise PlanError(f"override {rule!r} must be REGEX=gpu or REGEX=cpu "
                            f"(e.g. 'blk\\.[0-9]+\\.ffn_.*_exps=cpu')")
        try:
            re.compile(pat)
        except re.error as e:
            raise PlanError(f"override {rule!r}: bad regular expression: {e}") from None
        return Override(pat, tier)

    def __str__(self) -> str:
        return f"{self.pattern}={self.tier}"


def _write_json(path: str, obj, indent: int | None = None) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read {what} {path}: {e}") from None


# ------------------------------------------------------------------------------------------------
# routing profiles


@dataclass
class Profile:
    """Routing counts per MoE layer and expert over real prompts (`hetero-moe profile`)."""
    counts: dict[int, list[int]]        # layer -> [E] picks
    tokens: int = 0
    model: str = ""

    def to_dict(self) -> dict:
        return {"format": "hetero-moe-profile/1", "model": self.model, "tokens": self.tokens,
                "counts": {str(k): v for k, v in sorted(self.counts.items())}}

    def save(self, path: str) -> None:
        _write_json(path, self.to_dict())

    @staticmethod
    def load(path: str) -> "Profile":
        d = _read_json(path, "routing profile")
        if not isinstance(d, dict) or not isinstance(d.get("counts"), dict):
            raise PlanError(f"{path}: not a routing profile (no 'counts' object)")
        try:
            counts = {int(k): [int(c) for c in v] for k, v in d["counts"].items()}
        except (TypeError, ValueError) as e:
            raise PlanError(f"{path}: bad 'counts' entry: {e}") from None
        return Profile(counts, int(d.get("tokens", 0)), str(d.get("model", "")))


# ------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    """What goes where, in bytes. `placement`: tensor name -> 'gpu' | 'cpu', and for routed
    expert stacks the sorted list of expert ids held on the GPU ([] = all on the CPU)."""
    model: str
    arch: str
    fits: bool
    reason: str
    n_ctx: int
    chunk: int
    cache_type: str
    gpu_device: str                    # "cuda:0", "interpret" or "none" (CPU only)
    gpu_budget: int
    margin: int
    gpu_groups: dict[str, int]
    cpu_groups: dict[str, int]
    cache_bytes_per_token: int
    hot_per_layer: dict[int, list[int]]
    placement: dict[str, Any]
    n_expert: int = 0
    n_expert_used: int = 0
    moe_layers: list[int] = field(default_factory=list)
    expert_bytes: dict[int, int] = field(default_factory=dict)     # layer -> one expert's bytes
    expert_gpu_bytes: dict[int, int] = field(default_factory=dict)  # ... as the GPU tier holds it
    ram_budget: int = 0
    ram_note: str = ""
    overrides: list[str] = field(default_factory=list)
    profile: str = ""
    max_ctx: int | None = None         # largest context whose dense part fits (when not fitting)
    predicted: dict[str, Any] = field(default_factory=dict)

    # -- totals ----------------------------------------------------------------------------
    @property
    def gpu_total(self) -> int:
        return sum(self.gpu_groups.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu_groups.values())

    @property
    def hot_count(self) -> int:
        return sum(len(v) for v in self.hot_per_layer.values())

    @property
    def has_gpu(self) -> bool:
        return self.gpu_device != "none"

    def tier_of(self, name: str) -> str:
        """'gpu' or 'cpu' for a tensor name ('split' for an expert stack partly on the GPU)."""
        p = self.placement.get(name, "cpu")
        if isinstance(p, list):
            return "gpu" if len(p) == self.n_expert and p else ("split" if p else "cpu")
        return p

    def experts_on_gpu(self, layer: int) -> list[int]:
        return self.hot_per_layer.get(layer, [])

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "hetero-moe-plan/1",
            "model": self.model, "arch": self.arch, "fits": self.fits, "reason": self.reason,
            "n_ctx": self.n_ctx, "chunk": self.chunk, "cache_type": self.cache_type,
            "gpu": {"device": self.gpu_device, "budget_bytes": self.gpu_budget,
                    "margin_bytes": self.margin, "total_bytes": self.gpu_total,
                    "free_bytes": self.gpu_budget - self.margin - self.gpu_total,
                    "groups": dict(self.gpu_groups)},
            "cpu": {"total_bytes": self.cpu_total, "groups": dict(self.cpu_groups),
                    "ram_budget_bytes": self.ram_budget, "ram_note": self.ram_note},
            "kv_cache": {"bytes_per_token": self.cache_bytes_per_token,
                         "bytes": self.gpu_groups.get("kv_cache", 0)
                         or self.cpu_groups.get("kv_cache", 0),
                         "tier": "gpu" if self.gpu_groups.get("kv_cache") else "cpu"},
            "hot_experts": {"count": self.hot_count,
                            "per_layer": {str(k): len(v) for k, v in
                                          sorted(self.hot_per_layer.items())},
                            "ids": {str(k): v for k, v in sorted(self.hot_per_layer.items())},
                            "expert_bytes": {str(k): v for k, v in
                                             sorted(self.expert_bytes.items())},
                            "expert_gpu_bytes": {str(k): v for k, v in
                                                 sorted(self.expert_gpu_bytes.items())}},
            "experts": {"count": self.n_expert, "used": self.n_expert_used,
                        "moe_layers": self.moe_layers},
            "placement": self.placement,
            "overrides": self.overrides, "profile": self.profile, "max_ctx": self.max_ctx,
            "predicted": self.predicted,
        }

    @staticmethod
    def from_dict(d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != "hetero-moe-plan/1":
            raise PlanError("not a hetero-moe plan (expected \"format\": \"hetero-moe-plan/1\")")
        try:
            return Plan(
                model=d["model"], arch=d["arch"], fits=bool(d["fits"]), reason=d["reason"],
                n_ctx=int(d["n_ctx"]), chunk=int(d["chunk"]), cache_type=d["cache_type"],
                gpu_device=d["gpu"]["device"], gpu_budget=int(d["gpu"]["budget_bytes"]),
                margin=int(d["gpu"]["margin_bytes"]),
                gpu_groups={k: int(v) for k, v in d["gpu"]["groups"].items()},
                cpu_groups={k: int(v) for k, v in d["cpu"]["groups"].items()},
                cache_bytes_per_token=int(d["kv_cache"]["bytes_per_token"]),
                hot_per_layer={int(k): [int(e) for e in v]
                               for k, v in d["hot_experts"]["ids"].items()},
                placement=d["placement"], n_expert=int(d["experts"]["count"]),
                n_expert_used=int(d["experts"]["used"]),
                moe_layers=[int(x) for x in d["experts"]["moe_layers"]],
                expert_bytes={int(k): int(v) for k, v in
                              d["hot_experts"]["expert_bytes"].items()},
                expert_gpu_bytes={int(k): int(v) for k, v in
                                  d["hot_experts"]["expert_gpu_bytes"].items()},
                ram_budget=int(d["cpu"].get("ram_budget_bytes", 0)),
                ram_note=d["cpu"].get("ram_note", ""), overrides=list(d.get("overrides", [])),
                profile=d.get("profile", ""), max_ctx=d.get("max_ctx"),
                predicted=dict(d.get("predicted", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"plan is missing or has a bad field: {e!r}") from None

    def save(self, path: str) -> None:
        _write_json(path, self.to_dict(), indent=1)

    @staticmethod
    def load(path: str) -> "Plan":
        d = _read_json(path, "plan")
        try:
            return Plan.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None

    # -- text --------------------------------------------------------------------------------
    def summary(self) -> str:
        """One line: what sits where and the predicted decode speed."""
        if not self.has_gpu:
            return (f"plan: CPU only ({fmt_bytes(self.cpu_total)} on the CPU tier)")
        if not self.fits:
            return f"plan: does NOT fit: {self.reason}"
        p = self.predicted
        tps = f", predicted decode ~{p['decode_tok_s']:.1f} tok/s" if p.get("decode_tok_s") else ""
        return (f"plan: GPU {fmt_bytes(self.gpu_total)} of {fmt_bytes(self.gpu_budget)} "
                f"(dense + cache {self.n_ctx} ctx + {self.hot_count} hot experts), CPU "
                f"{fmt_bytes(self.cpu_total)}{tps}")

    def table(self) -> str:
        lines = [f"model: {self.model} ({self.arch})",
                 f"GPU budget {fmt_bytes(self.gpu_budget)} ({self.gpu_device}), margin "
                 f"{fmt_bytes(self.margin)}; context {self.n_ctx} tokens ({self.cache_type} "
                 f"cache, {self.cache_bytes_per_token / 1024:.1f} KiB/token); prompt chunk "
                 f"{self.chunk}", ""]
        lines.append(f"{'group':<16}{'GPU':>14}{'CPU':>14}")
        for g in GROUPS + ("experts",):
            a, b = self.gpu_groups.get(g, 0), self.cpu_groups.get(g, 0)
            if a or b:
                name = "cold experts" if g == "experts" else g
                lines.append(f"{name:<16}{fmt_bytes(a) if a else '-':>14}"
                             f"{fmt_bytes(b) if b else '-':>14}")
        lines.append(f"{'total':<16}{fmt_bytes(self.gpu_total):>14}"
                     f"{fmt_bytes(self.cpu_total):>14}")
        free = self.gpu_budget - self.margin - self.gpu_total
        lines.append(f"{'GPU free':<16}{fmt_bytes(free):>14}")
        if self.moe_layers:
            per = [len(self.hot_per_layer.get(l, [])) for l in self.moe_layers]
            lines.append("")
            lines.append(f"hot experts: {self.hot_count} of {self.n_expert * len(self.moe_layers)}"
                         f" ({self.n_expert} per layer x {len(self.moe_layers)} MoE layers)")
            lines.append("  per layer " + _runs(self.moe_layers, per))
        if self.ram_note:
            lines.append(f"RAM: {self.ram_note}")
        if self.overrides:
            lines.append("overrides: " + ", ".join(self.overrides))
        p = self.predicted
        if p:
            lines.append("")
            lines.append(f"predicted decode (a roofline, not a measurement): "
                         f"{p['decode_tok_s']:.1f} tok/s; per token GPU reads "
                         f"{fmt_bytes(p['gpu_bytes_per_token'])} at {p['gpu_gbps']:.0f} GB/s "
                         f"({p['gpu_bandwidth_source']}), CPU reads "
                         f"{fmt_bytes(p['cpu_bytes_per_token'])} at {p['cpu_gbps']:.1f} GB/s "
                         f"({p['cpu_bandwidth_source']}); hot-expert hit rate "
                         f"{p['hit_rate']:.1%}")
        lines.append("")
        lines.append("fits: yes" if self.fits else f"fits: NO: {self.reason}")
        return "\n".join(lines)


def _runs(layers: list[int], values: list[int]) -> str:
    """'blk 3-10: 5, blk 11-60: 6' from per-layer values."""
    out, start = [], 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or values[i] != values[start]:
            a, b = layers[start], layers[i - 1]
            out.append(f"blk {a}{'-%d' % b if b != a else ''}: {values[start]}")
            start = i
    return ", ".join(out)


# ------------------------------------------------------------------------------------------------
# sizes that are not tensors


def cache_bytes_per_token(cfg, cache_type: str = "f16") -> int:
    """KV cache bytes per position over all layers: K and V per KV head, or the MLA latent."""
    if cache_type not in CACHE_TYPES:
        raise PlanError(f"cache type {cache_type!r} is not one of {', '.join(CACHE_TYPES)}")
    b = CACHE_TYPES[cache_type]
    if cfg.mla is not None:
        return cfg.n_layer * cfg.mla.latent_dim * b
    return cfg.n_layer * 2 * cfg.n_head_kv * cfg.head_dim * b


def rope_table_bytes(cfg, n_ctx: int) -> int:
    """The RoPE cos and sin tables, float32 [n_ctx, n_rot / 2] each."""
    n_rot = cfg.mla.qk_rope if cfg.mla is not None else cfg.rope_dim
    return 2 * 4 * n_ctx * (n_rot // 2)


def scratch_bytes(cfg, chunk: int, n_ctx: int) -> int:
    """Activations of one prompt chunk of `chunk` tokens (float32), the largest a layer holds at
    once, plus the last row's logits: residual, normed input, q/k/v (or MLA q, latent and the
    absorbed query), attention output, one query block's scores over the context, the FFN's
    gate/up/hidden (the widest FFN), the MoE's routing and combine buffers."""
    T, D = chunk, cfg.n_embd
    if cfg.mla is not None:
        m = cfg.mla
        attn = cfg.n_head * (m.k_head + m.kv_lora + m.v_head) + m.latent_dim + (m.q_lora or 0)
    else:
        attn = cfg.n_head * cfg.head_dim * 2 + 2 * cfg.n_head_kv * cfg.head_dim
    ffn = max(cfg.n_ff, cfg.n_ff_shexp, cfg.n_ff_exp * max(1, cfg.n_expert_used))
    per_token = 4 * (3 * D + attn + 3 * ffn + 2 * max(1, cfg.n_expert))
    scores = 4 * cfg.n_head * min(T, ATTN_QUERY_BLOCK) * n_ctx
    return T * per_token + scores + 4 * cfg.n_vocab


# ------------------------------------------------------------------------------------------------
# bandwidths


def gpu_bandwidth(name: str | None, given: float | None) -> tuple[float, str]:
    """(GB/s, where the number comes from) for the card called `name`."""
    if given:
        return float(given), "given"
    if name:
        for card, bw in sorted(GPU_BANDWIDTH_GBPS.items(), key=lambda kv: -len(kv[0])):
            if card.lower() in name.lower():
                return bw, f"{card} spec"
    return GPU_BANDWIDTH_GBPS[ASSUMED_GPU], f"assumed {ASSUMED_GPU}"


def measure_cpu_bandwidth(threads: int | None = None, mib: int = 256) -> float:
    """DRAM read GB/s: numpy sums of a buffer larger than the caches, best of 3, threads in
    parallel (numpy releases the GIL in the reduction)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from ..config_env import default_threads
    n = threads or default_threads()
    buf = np.ones(mib * MiB // 8, dtype=np.float64)
    parts = np.array_split(buf, n)
    best = float("inf")
    with ThreadPoolExecutor(n) as ex:
        for _ in range(3):
            t0 = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def cuda_budget() -> tuple[int | None, str | None]:
    """(free bytes, device name) of CUDA device 0, or (None, None) without one."""
    try:
        import torch
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(0)
            return int(free), torch.cuda.get_device_name(0)
    except Exception:   # a broken driver plans like no GPU
        pass
    return None, None


def available_ram() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------------
# planning


def _cpu_moe_rules(n: int, moe_layers: list[int]) -> list[Override]:
    """llama.cpp's --n-cpu-moe N: the first N MoE layers' experts on the CPU, the rest's on the
    GPU (whole layers)."""
    if n < 0:
        raise PlanError(f"cpu_moe must be >= 0, got {n}")
    cpu = [l for l in moe_layers[:n]]
    gpu = [l for l in moe_layers[n:]]
    rules = []
    if cpu:
        rules.append(Override(r"^blk\.(%s)\.ffn_(gate|up|down)_exps\." % "|".join(map(str, cpu)),
                              "cpu"))
    if gpu:
        rules.append(Override(r"^blk\.(%s)\.ffn_(gate|up|down)_exps\." % "|".join(map(str, gpu)),
                              "gpu"))
    return rules


def make_plan(g, cfg=None, *, vram: str | int | None = None, ram: str | int | None = None,
              n_ctx: int = 4096, chunk: int = DEFAULT_CHUNK, cache_type: str = "f16",
              margin: str | int | None = None, overrides: list[str] | None = None,
              cpu_moe: int | None = None, profile: Profile | str | None = None,
              gpu: str = "auto", gpu_bandwidth_gbps: float | None = None,
              cpu_bandwidth_gbps: float | None = None, threads: int | None = None) -> Plan:
    """Plan an opened GGUFFile `g` (config parsed from it unless given); see `plan()`."""
    from ..models.base import config_from_gguf
    cfg = cfg or config_from_gguf(g)
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise PlanError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise PlanError(f"chunk must be a positive integer, got {chunk!r}")
    bpt = cache_bytes_per_token(cfg, cache_type)

    # the GPU: a CUDA device, Triton's interpreter (a CPU stand-in with the same budget), or none
    # the GPU: a CUDA device, the card the user plans for (none here), Triton's interpreter (a
    # CPU stand-in with the same budget), or none (CPU only)
    free, card = cuda_budget() if gpu in ("auto", "cuda") else (None, None)
    if gpu == "cuda" and free is None:
        raise PlanError("gpu='cuda' was asked for but torch sees no CUDA device")
    if gpu == "auto":
        device = "cuda:0" if free is not None else NO_DEVICE
    else:
        device = {"cuda": "cuda:0", "interpret": "interpret", "none": "none",
                  "cpu": "none"}.get(gpu)
    if device is None:
        raise PlanError(f"gpu must be 'auto', 'cuda', 'interpret' or 'none', got {gpu!r}")
    if vram is not None:
        budget = parse_size(vram, "vram")
    elif device == "cuda:0":
        budget = free
    else:
        budget = DEFAULT_VRAM
    margin_b = DEFAULT_MARGIN if margin is None else parse_size(margin, "margin")
    if device == "interpret" and margin is None:
        margin_b = 0                   # no CUDA context to keep room for
    ram_b = parse_size(ram, "ram") if ram is not None else available_ram()

    prof = Profile.load(profile) if isinstance(profile, str) else profile
    rules = [Override.parse(r) for r in (overrides or [])]

    # routed-expert stacks per layer; a layer's gate/up/down move together
    stacks: dict[int, list] = {}
    for t in g:
        m = _EXPERT_RE.match(t.name)
        if m:
            stacks.setdefault(int(m.group(1)), []).append(t)
    moe_layers = sorted(stacks)
    E = cfg.n_expert
    if cpu_moe is not None:
        rules = _cpu_moe_rules(cpu_moe, moe_layers) + rules
    expert_bytes = {l: sum(t.nbytes // E for t in ts) for l, ts in stacks.items()}
    # what one expert costs on the GPU tier (blocks as stored, or float16 without a kernel)
    expert_gpu = {l: expert_gpu_bytes(ts, E) for l, ts in stacks.items()}

    def rule_for(name: str) -> str | None:
        for r in rules:
            if re.search(r.pattern, name):
                return r.tier
        return None

    forced_layer: dict[int, str] = {}
    for l, ts in stacks.items():
        tiers = {t.name: rule_for(t.name) for t in ts}
        if len(set(tiers.values())) > 1:
            some = [n for n, v in tiers.items() if v == sorted(filter(None, tiers.values()))[0]]
            other = [n for n in tiers if n not in some]
            raise PlanError(f"overrides send {some[0]} and {other[0]} to different tiers: a "
                            f"layer's routed-expert stacks (gate/up/down) move together; write "
                            f"a rule that matches all three (e.g. 'blk\\.{l}\\.ffn_.*_exps')")
        v = next(iter(tiers.values()))
        if v is not None:
            forced_layer[l] = v

    placement: dict[str, Any] = {}
    gpu_groups = {k: 0 for k in GROUPS}
    cpu_groups: dict[str, int] = {}
    hot: dict[int, list[int]] = {}
    use_gpu = device != "none"
    tied = "output.weight" not in g.tensors
    for t in g:
        grp = group_of(t.name)
        if grp == "experts":
            continue
        default = "gpu" if use_gpu and grp != "embeddings" else "cpu"
        owner = t.name[:-len(".bias")] + ".weight" if t.name.endswith(".bias") else None
        if owner in g.tensors and len(g.tensors[owner].ne) >= 2:
            tier_name = owner                 # a bias goes where its matrix goes
        else:
            tier_name = t.name
        tier = (rule_for(tier_name) or default) if use_gpu else "cpu"
        if use_gpu and tier == "cpu" and rule_for(tier_name) and grp in ("norms", "router"):
            raise PlanError(f"override {next(str(r) for r in rules if re.search(r.pattern, tier_name))!r} "
                            f"sends {t.name} ({grp}) to the CPU: norms and routers stay on the "
                            f"GPU tier with the activations (they are small); narrow the rule to "
                            f"matrices, e.g. 'attn_(q|k|v|output)\\.weight=cpu'")
        if use_gpu and grp == "embeddings" and tier == "gpu":
            raise PlanError(f"{t.name} stays on the CPU (one row is read per token); the "
                            f"lm_head is output.weight")
        placement[t.name] = tier
        if tier == "gpu":
            gpu_groups[grp] += gpu_resident_bytes(t.name, t.ggml_type, t.ne, t.nbytes)
        else:
            cpu_groups[grp] = cpu_groups.get(grp, 0) + t.nbytes
    if tied and use_gpu:              # the lm_head is token_embd: a GPU copy unless pinned
        tier = rule_for("output.weight") or "gpu"
        placement["output.weight"] = tier
        if tier == "gpu":
            e = g.tensors["token_embd.weight"]
            gpu_groups["output"] += gpu_resident_bytes("output.weight", e.ggml_type, e.ne,
                                                       e.nbytes)
    if use_gpu:                       # RoPE tables (cos, sin) sit next to attention
        gpu_groups["attention"] += rope_table_bytes(cfg, n_ctx)
    for l in moe_layers:
        pinned = forced_layer.get(l) == "gpu" and use_gpu
        hot[l] = list(range(E)) if pinned else []
        if pinned:
            gpu_groups["hot_experts"] += expert_gpu[l] * E
    dense = sum(gpu_groups.values())
    cache = bpt * n_ctx
    scratch = scratch_bytes(cfg, min(chunk, n_ctx), n_ctx) if use_gpu else 0
    if use_gpu and moe_layers:        # the buffer large prompts stream cold experts through
        scratch += STREAM_GROUP * max(expert_gpu.values())
    fits, reason, max_ctx = True, "", None
    if use_gpu:
        gpu_groups["kv_cache"] = cache
        gpu_groups["scratch"] = scratch
        room = budget - margin_b
        if dense + cache + scratch > room:
            fits = False
            parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(
                gpu_groups.items(), key=lambda kv: -kv[1]) if v and k not in
                ("kv_cache", "scratch"))
            # the largest context whose cache and scratch fit next to the dense weights
            lo, hi = 0, n_ctx
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if dense - rope_table_bytes(cfg, n_ctx) + rope_table_bytes(cfg, mid) + \
                        bpt * mid + scratch - scratch_bytes(cfg, min(chunk, n_ctx), n_ctx) + \
                        scratch_bytes(cfg, min(chunk, mid), mid) <= room:
                    lo = mid
                else:
                    hi = mid - 1
            max_ctx = lo
            need = dense + cache + scratch
            reason = (f"the GPU part needs {fmt_bytes(need)} (weights that must be on the GPU "
                      f"{fmt_bytes(dense)}: {parts}; {cache_type} cache for {n_ctx} tokens "
                      f"{fmt_bytes(cache)}; scratch {fmt_bytes(scratch)}) but the budget is "
                      f"{fmt_bytes(budget)} less a {fmt_bytes(margin_b)} margin = "
                      f"{fmt_bytes(room)}; ")
            if max_ctx >= 1:
                reason += f"the largest context that fits is {max_ctx} tokens"
            else:
                reason += ("no context fits: the weights alone exceed it; move matrices to the "
                           "CPU with overrides (e.g. '^output\\.weight$=cpu', "
                           "'_shexp\\.weight$=cpu') or use a larger GPU")
        else:
            free_b = room - dense - cache - scratch
            order = _hot_order(moe_layers, E, prof, cfg.n_layer)
            for l, e in order:
                if l in forced_layer:
                    continue
                if expert_gpu[l] <= free_b:
                    hot[l].append(e)
                    free_b -= expert_gpu[l]
                    gpu_groups["hot_experts"] += expert_gpu[l]
    else:
        cpu_groups["kv_cache"] = cache
    for l in moe_layers:
        hot[l].sort()
        cold = E - len(hot[l])
        if cold:
            cpu_groups["experts"] = cpu_groups.get("experts", 0) + expert_bytes[l] * cold
        for t in stacks[l]:
            placement[t.name] = list(hot[l])
    if not use_gpu:
        gpu_groups = {}
    cpu_weights = sum(v for k, v in cpu_groups.items() if k != "kv_cache")
    if cpu_weights > ram_b:
        ram_note = (f"the CPU tier's weights ({fmt_bytes(cpu_weights)}) exceed the RAM budget "
                    f"({fmt_bytes(ram_b)}): the file is memory-mapped, so cold experts will be "
                    f"read from disk on every miss (decode becomes disk-bound)")
    else:
        ram_note = (f"CPU tier {fmt_bytes(cpu_weights)} of {fmt_bytes(ram_b)} "
                    f"{'given' if ram is not None else 'available'}: fits in RAM")
    p = Plan(model=os.path.basename(g.path), arch=cfg.arch, fits=fits, reason=reason,
             n_ctx=n_ctx, chunk=chunk, cache_type=cache_type, gpu_device=device,
             gpu_budget=budget if use_gpu else 0, margin=margin_b if use_gpu else 0,
             gpu_groups={k: v for k, v in gpu_groups.items()},
             cpu_groups=cpu_groups, cache_bytes_per_token=bpt,
             hot_per_layer={l: v for l, v in hot.items()}, placement=placement,
             n_expert=E, n_expert_used=cfg.n_expert_used, moe_layers=moe_layers,
             expert_bytes=expert_bytes, expert_gpu_bytes=expert_gpu, ram_budget=ram_b, ram_note=ram_note,
             overrides=[str(r) for r in rules], profile=(profile if isinstance(profile, str)
                                                          else ("given" if prof else "")),
             max_ctx=max_ctx)
    if fits:
        p.predicted = _predict(p, g, prof, card, gpu_bandwidth_gbps, cpu_bandwidth_gbps, threads)
    return p


def _hot_order(moe_layers: list[int], E: int, prof: Profile | None, n_layer: int):
    """(layer, expert) pairs in the order they become hot."""
    if prof is not None:
        pairs = []
        for l in moe_layers:
            c = prof.counts.get(l)
            if c is None:
                continue
            if len(c) != E:
                raise PlanError(f"routing profile has {len(c)} experts for layer {l}, the model "
                                f"{E}")
            tot = sum(c) or 1
            pairs += [(-c[e] / tot, -l, e) for e in range(E) if c[e] > 0]
        pairs.sort()
        order = [(-nl, e) for _, nl, e in pairs]
        seen = set(order)
        # experts the profile never saw come after, in the default order
        return order + [x for x in _hot_order(moe_layers, E, None, n_layer) if x not in seen]
    return [(l, e) for e in range(E) for l in reversed(moe_layers)]


def _predict(p: Plan, g, prof, card, gpu_bw_given, cpu_bw_given, threads) -> dict:
    """Decode bytes read per token on each tier and the roofline tok/s they allow."""
    K = p.n_expert_used
    gpu_b = cpu_b = 0.0
    hits = []
    for l in p.moe_layers:
        nh = len(p.hot_per_layer.get(l, []))
        if prof is not None and sum(prof.counts.get(l, [])) > 0:
            c = prof.counts[l]
            hit = sum(c[e] for e in p.hot_per_layer.get(l, [])) / sum(c)
        else:
            hit = nh / p.n_expert
        hits.append(hit)
        gpu_b += K * hit * p.expert_gpu_bytes[l]
        cpu_b += K * (1 - hit) * p.expert_bytes[l]
    for name, tier in p.placement.items():
        if isinstance(tier, list) or name == "token_embd.weight":
            continue
        t = g.tensors.get(name) or g.tensors["token_embd.weight"]      # tied lm_head
        if tier == "gpu":
            gpu_b += gpu_resident_bytes(name, t.ggml_type, t.ne, t.nbytes)
        else:
            cpu_b += t.nbytes
    emb = g.tensors["token_embd.weight"]
    cpu_b += emb.nbytes / emb.ne[1]                      # one embedding row
    cache_read = p.cache_bytes_per_token * p.n_ctx * CACHE_READ_FRACTION
    if p.has_gpu:
        gpu_b += cache_read
    else:
        cpu_b += cache_read * 2                          # CPU cache is f32
    gbw, gsrc = gpu_bandwidth(card, gpu_bw_given)
    if cpu_bw_given:
        cbw, csrc = float(cpu_bw_given), "given"
    else:
        cbw, csrc = measure_cpu_bandwidth(threads), "measured"
    t = (gpu_b / (gbw * 1e9) if p.has_gpu else 0.0) + cpu_b / (cbw * 1e9)
    return {"decode_tok_s": 1.0 / t if t > 0 else 0.0, "gpu_bytes_per_token": int(gpu_b),
            "cpu_bytes_per_token": int(cpu_b), "gpu_gbps": gbw, "gpu_bandwidth_source": gsrc,
            "cpu_gbps": cbw, "cpu_bandwidth_source": csrc,
            "hit_rate": sum(hits) / len(hits) if hits else 1.0,
            "cache_read_at": f"{CACHE_READ_FRACTION:g} x n_ctx",
            "note": "a prediction (roofline from bandwidths), not a measurement"}


def plan(path, vram: str | int | None = None, ram: str | int | None = None, n_ctx: int = 4096,
         **kw) -> Plan:
    """Plan where a GGUF model's tensors go, from its header alone (no tensor data is read).

    Args:
        path: the .gguf file (first part of a split model).
        vram: GPU memory budget ('24GiB', bytes); default: the CUDA device's free memory, else
            24 GiB.
        ram: host RAM budget; default: available RAM.
        n_ctx: context length the KV/latent cache is sized for.
        chunk: prompt tokens per forward pass (scratch is sized for one chunk; default 512).
        cache_type: 'f16' (default), 'bf16' or 'f32'.
        margin: kept free on the GPU for the CUDA context and allocator (default 1 GiB; 0 for
            gpu='interpret').
        overrides: ordered 'REGEX=gpu|cpu' rules on tensor names (first match wins).
        cpu_moe: the first N MoE layers' experts on the CPU, the others' on the GPU.
        profile: a routing profile (path or Profile) that decides which experts are hot.
        gpu: 'auto' (CUDA when present, else none), 'cuda', 'interpret' or 'none'.
        gpu_bandwidth_gbps / cpu_bandwidth_gbps: for the prediction (default: the card's
            specification / a quick measurement).
    Returns:
        Plan (plan.to_dict() is `hetero-moe plan --json`).
    """
    from ..hf import open_model
    g = open_model(path)               # a .gguf file or a Hugging Face folder
    try:
        return make_plan(g, vram=vram, ram=ram, n_ctx=n_ctx, **kw)
    finally:
        g.close()
