"""Model configuration and the architecture registry.

Each architecture file turns GGUF metadata into a `ModelConfig` and registers itself under its
`general.architecture` name. The decoder in `transformer.py` builds any registered architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import MissingKeyError, UnsupportedError
from ..gguf import GGUFFile

ROPE_NORM = "norm"   # rotate adjacent pairs (2i, 2i+1): llama.cpp LLAMA_ROPE_TYPE_NORM
ROPE_NEOX = "neox"   # rotate halves (i, i + d/2): llama.cpp LLAMA_ROPE_TYPE_NEOX


@dataclass
class ModelConfig:
    """Typed hyper-parameters of a decoder-only (MoE) transformer, read from GGUF metadata."""
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_type: str
    rope_dim: int
    rope_freq_scale: float = 1.0
    rope_yarn: Any = None             # layers.rope_yarn.YarnParams when the file asks for YaRN
    n_ff: int = 0                     # dense FFN width (0: no dense FFN layers)
    n_expert: int = 0                 # routed experts per MoE layer (0: dense model)
    n_expert_used: int = 0            # top-k
    n_ff_exp: int = 0                 # routed expert FFN width
    n_ff_shexp: int = 0               # shared expert FFN width (0: none)
    norm_topk: bool = False           # renormalise the top-k routing weights to sum to 1
    shexp_gate: bool = False          # shared expert output scaled by sigmoid(x . w_gate)
    qk_norm: str | None = None        # None | "head" (per head, over head_dim) | "full" (over all heads)
    attn_bias: bool = False           # q/k/v projections have biases
    tied_embeddings: bool = False
    n_layer_dense_lead: int = 0       # leading blocks with a dense FFN in an MoE model
    gating: str = "softmax"           # router: "softmax" or "sigmoid" over the E logits
    n_expert_groups: int = 0          # > 1: top-k only among the best n_group_used groups
    n_group_used: int = 0
    expert_weights_scale: float = 0.0  # routing weights multiplied by this (0 or 1: unscaled)
    mla: Any = None                   # deepseek2.MLAConfig: Multi-head Latent Attention
    ffn_act: str = "silu"             # dense FFN gate activation: "silu" (SwiGLU) or "gelu" (GeGLU, tanh)
    post_norms: bool = False          # RMSNorm on the attention and FFN outputs before each residual add
    embd_scale: float = 0.0           # token embeddings multiplied by this (0: unscaled)
    attn_scale: float = 0.0           # softmax scale of q.k (0: 1/sqrt(head_dim))
    swa_window: int = 0               # positions a sliding-window layer sees, itself included (0: none)
    swa_layers: tuple = ()            # per layer: True where it is a sliding-window (local) layer
    rope_base_swa: float = 10000.0    # RoPE base of the sliding-window layers (unscaled)
    final_softcap: float = 0.0        # logits -> c * tanh(logits / c) (0: none)
    chat_template: str | None = None  # the architecture's template when the file has none
    name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def window_of(self, layer: int) -> int:
        """Sliding window of a layer (0: it attends to every earlier position)."""
        return self.swa_window if self.swa_layers and self.swa_layers[layer] else 0


class MetaReader:
    """Typed access to `{arch}.*` keys with errors that name the key and the file."""

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.arch = g, arch

    def key(self, k: str) -> str:
        return k.replace("{arch}", self.arch)

    def int(self, k: str, default=None) -> int:
        k = self.key(k)
        if default is None:
            v = self.g.require(k, int)
        else:
            v = self.g.get(k, default, int)
        if v < 0:
            raise MissingKeyError(f"{self.g.path}: key {k!r} = {v} must not be negative")
        return v

    def float(self, k: str, default=None) -> float:
        k = self.key(k)
        return float(self.g.require(k, float) if default is None else self.g.get(k, default, float))

    def bool(self, k: str, default: bool) -> bool:
        return bool(self.g.get(self.key(k), default, bool))

    def str(self, k: str, default=None) -> str:
        k = self.key(k)
        return self.g.require(k, str) if default is None else self.g.get(k, default, str)

    def positive(self, k: str, value: int, limit: int = 1 << 20) -> int:
        if not 0 < value <= limit:
            raise MissingKeyError(f"{self.g.path}: key {self.key(k)!r} = {value} is out of range "
                                  f"(1..{limit})")
        return value


def common_config(g: GGUFFile, arch: str, rope_type: str) -> tuple[MetaReader, dict]:
    """Keys shared by every llama-like architecture, checked for sanity."""
    m = MetaReader(g, arch)
    n_embd = m.positive("{arch}.embedding_length", m.int("{arch}.embedding_length"))
    n_head = m.positive("{arch}.attention.head_count", m.int("{arch}.attention.head_count"), 4096)
    n_head_kv = m.int("{arch}.attention.head_count_kv", n_head)
    m.positive("{arch}.attention.head_count_kv", n_head_kv, n_head)
    if n_head % n_head_kv:
        raise MissingKeyError(f"{g.path}: head_count {n_head} is not a multiple of "
                              f"head_count_kv {n_head_kv}")
    head_dim = m.int("{arch}.attention.key_length", 0) or n_embd // n_head
    v_dim = m.int("{arch}.attention.value_length", 0) or head_dim
    if v_dim != head_dim:
        raise UnsupportedError(f"{g.path}: value_length {v_dim} != key_length {head_dim} is not "
                               f"supported for architecture {arch!r}")
    rope_dim = m.int("{arch}.rope.dimension_count", head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise MissingKeyError(f"{g.path}: rope.dimension_count {rope_dim} must be even and <= "
                              f"head dim {head_dim}")
    scaling = m.str("{arch}.rope.scaling.type", "none")
    freq_scale = 1.0
    yarn = None
    if scaling == "linear":
        factor = m.float("{arch}.rope.scaling.factor", 1.0)
        freq_scale = 1.0 / factor if factor > 0 else 1.0
    elif scaling == "yarn":
        yarn = _yarn(m, rope_dim, rope_type, m.float("{arch}.rope.freq_base", 10000.0),
                     m.int("{arch}.context_length", 4096))
        freq_scale = yarn.freq_scale
    elif scaling not in ("none", ""):
        raise UnsupportedError(f"{g.path}: rope scaling {scaling!r} is not supported for "
                               f"architecture {arch!r} (supported: none, linear, yarn)")
    n_vocab = m.int("{arch}.vocab_size", g.array_len("tokenizer.ggml.tokens") or 0)
    if n_vocab == 0:
        n_vocab = g.tensor("token_embd.weight").ne[1]
    kw = dict(
        arch=arch,
        name=g.get("general.name", "", str),
        n_layer=m.positive("{arch}.block_count", m.int("{arch}.block_count"), 4096),
        n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_vocab=n_vocab,
        n_ctx_train=m.int("{arch}.context_length", 4096),
        rms_eps=m.float("{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=m.float("{arch}.rope.freq_base", 10000.0),
        rope_type=rope_type, rope_dim=rope_dim, rope_freq_scale=freq_scale, rope_yarn=yarn,
        n_ff=m.int("{arch}.feed_forward_length", 0),
        tied_embeddings="output.weight" not in g.tensors,
    )
    return m, kw


def _yarn(m: MetaReader, n_rot: int, kind: str, base: float, n_ctx_train: int):
    """YaRN RoPE parameters as llama.cpp sets them for architectures without DeepSeek's log
    multiplier: ext_factor 1, attn_factor rope.scaling.attn_factor (llama.cpp's mscale and its
    cancellation of ggml's own factor multiply to 1), the ramp from the original context."""
    import math

    from ..layers.rope_yarn import YarnParams
    path = m.g.path
    factor = m.float("{arch}.rope.scaling.factor", 0.0)
    if not (factor > 0 and math.isfinite(factor)):
        raise MissingKeyError(f"{path}: {m.key('{arch}.rope.scaling.factor')} = {factor}: YaRN "
                              f"needs a positive factor")
    if m.float("{arch}.rope.scaling.yarn_log_multiplier", 0.0) != 0.0:
        raise UnsupportedError(f"{path}: {m.key('{arch}.rope.scaling.yarn_log_multiplier')} is "
                               f"only supported for deepseek2")
    mscale = 1.0 if factor <= 1 else 1.0 + 0.1 * math.log(factor)      # get_mscale(factor, 1)
    attn = mscale / (1.0 + 0.1 * math.log(factor)) * m.float("{arch}.rope.scaling.attn_factor", 1.0)
    return YarnParams(n_rot=n_rot, base=base, kind=kind, freq_scale=1.0 / factor, ext_factor=1.0,
                      attn_factor=attn,
                      n_ctx_orig=m.int("{arch}.rope.scaling.original_context_length", 0)
                      or n_ctx_train)


def moe_config(m: MetaReader, kw: dict, *, ff_key="{arch}.expert_feed_forward_length") -> None:
    """Routed-expert keys, filled into `kw`."""
    n_expert = m.int("{arch}.expert_count", 0)
    if n_expert == 0:
        return
    used = m.int("{arch}.expert_used_count")
    if not 0 < used <= n_expert:
        raise MissingKeyError(f"{m.g.path}: {m.key('{arch}.expert_used_count')} = {used} must be "
                              f"in 1..expert_count ({n_expert})")
    kw["n_expert"] = n_expert
    kw["n_expert_used"] = used
    n_ff_exp = m.int(ff_key, 0)
    if n_ff_exp == 0:  # older files: experts share the dense width
        n_ff_exp = kw.get("n_ff", 0)
    if n_ff_exp == 0:
        raise MissingKeyError(f"{m.g.path}: no expert FFN width: key {m.key(ff_key)!r} missing")
    kw["n_ff_exp"] = n_ff_exp


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: how to read its config."""
    name: str
    parse_config: Callable[[GGUFFile], ModelConfig]
    description: str = ""


REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    REGISTRY[spec.name] = spec
    return spec


def _load_all() -> None:
    from . import deepseek2, gemma3, llama, olmoe, qwen2moe, qwen3moe  # noqa: F401  (they register themselves)


def get_arch(name: str, path: str = "?") -> ArchSpec:
    _load_all()
    spec = REGISTRY.get(name)
    if spec is None:
        raise UnsupportedError(f"{path}: architecture {name!r} is not supported (supported: "
                               f"{', '.join(sorted(REGISTRY))})")
    return spec


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    return get_arch(g.architecture, g.path).parse_config(g)
