"""Random-weight GGUF models in llama.cpp's exact layout, for tests and benchmarks.

The weights are written as F32 with gguf.GGUFWriter one tensor at a time (so even the Qwen3-30B-A3B
shapes never hold more than one float tensor in memory), then quantized by llama.cpp's own quantizer,
so the block mix (Q4_K / Q6_K / Q8_0 ...) is exactly what a real Q4_K_M file of that shape holds.
The tokenizer metadata is copied from SmolLM2-135M, so llama.cpp can tokenize and the vocab is 49152.

Dimension key (numpy order below is ggml's ``ne`` reversed):
    V  vocab (49152)           D  hidden (embedding_length)      L  layers
    H  query heads             Hk KV heads                       Dh head dim
    F  dense FFN width         E  routed experts                 K  experts used per token
    Fe routed-expert FFN width Fs shared-expert FFN width
    deepseek2 (MLA): Cq q LoRA rank, C kv LoRA rank, N no-rope head dim, R rope head dim, Dv value head dim
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import HeteroMoEError, UnsupportedError

# Bump when the bytes a given (arch, preset, layers, quant, seed) produce change; part of cache names.
FORMAT_VERSION = 1

# Every quantized row length in the llama/qwen presets is a multiple of 256 (QK_K), so K-quants apply as
# asked. The deepseek2 presets are not (k_b rows are N wide, V2-Lite's expert FFN is 1408): there llama.cpp
# falls back per tensor: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0 (F16 when the row is not
# a multiple of 32 either), and output.weight goes to Q8_0 instead of Q6_K.
QK_K = 256


@dataclass(frozen=True)
class Preset:
    """Shapes and hyper-parameters of one test model size."""
    hidden: int            # D
    n_head: int            # H
    n_head_kv: int         # Hk
    head_dim: int          # Dh (q projection is H*Dh wide, which need not equal D)
    n_layer: int           # default L; make_test_model(layers=...) overrides it
    ff: int                # F: dense FFN width (qwen MoE families store it as an unused intermediate_size)
    n_expert: int          # E
    n_expert_used: int     # K
    expert_ff: int         # Fe
    shared_ff: int         # Fs (qwen2moe only)
    context: int
    rope_base: float
    rms_eps: float
    tied: bool = False     # no output.weight: llama.cpp then reuses token_embd as the lm_head
    only: tuple[str, ...] = ()   # architectures this preset is meant for; empty means all
    mla: "MLAPreset | None" = None   # deepseek2 only
    yarn: tuple[float, int] | None = None   # (factor, original context): YaRN RoPE scaling


@dataclass(frozen=True)
class MLAPreset:
    """deepseek2 extras: Multi-head Latent Attention dims, DeepSeek MoE routing, YaRN.

    Fs (Preset.shared_ff) must be n_shared * Fe, as llama.cpp derives it."""
    q_lora: int            # Cq; 0: one attn_q projection (V2-Lite)
    kv_lora: int           # C
    qk_nope: int           # N
    qk_rope: int           # R
    v_head: int            # Dv
    n_shared: int          # shared experts
    dense_lead: int        # leading dense (non-MoE) blocks
    gating: str = "softmax"          # "softmax" (V2) or "sigmoid" (V3, with exp_probs_b)
    n_group: int = 0                 # expert groups (V3 group-limited top-k); 0: none
    n_group_used: int = 0
    weights_norm: bool = False
    weights_scale: float = 1.0
    yarn_factor: float = 0.0         # 0: no rope scaling
    yarn_orig_ctx: int = 0
    yarn_mscale_all_dim: float = 0.0  # written as yarn_log_multiplier = 0.1 * this, like the converter


_DEEPSEEK2 = ("deepseek2", "deepseek2-kvb")

PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden=256, n_head=4, n_head_kv=2, head_dim=64, n_layer=2, ff=512,
                   n_expert=8, n_expert_used=2, expert_ff=256, shared_ff=256,
                   context=4096, rope_base=10000.0, rms_eps=1e-5),
    "tiny-tied": Preset(hidden=256, n_head=4, n_head_kv=2, head_dim=64, n_layer=2, ff=512,
                        n_expert=0, n_expert_used=0, expert_ff=0, shared_ff=0,
                        context=4096, rope_base=10000.0, rms_eps=1e-5, tied=True,
                        only=("llama", "qwen3")),
    # "tiny" with YaRN context extension (factor 4 over an original 1024 positions), as the
    # long-context GGUFs of Qwen3 carry it.
    "tiny-yarn": Preset(hidden=256, n_head=4, n_head_kv=2, head_dim=64, n_layer=2, ff=512,
                        n_expert=8, n_expert_used=2, expert_ff=256, shared_ff=256,
                        context=4096, rope_base=10000.0, rms_eps=1e-5, yarn=(4.0, 1024),
                        only=("llama", "qwen3moe")),
    # Qwen3-30B-A3B layer shapes; only the layer count differs (48 in the real model).
    "qwen3moe-a3b": Preset(hidden=2048, n_head=32, n_head_kv=4, head_dim=128, n_layer=4, ff=6144,
                           n_expert=128, n_expert_used=8, expert_ff=768, shared_ff=0,
                           context=32768, rope_base=1_000_000.0, rms_eps=1e-6,
                           only=("qwen3moe",)),
    # DeepSeek-V2-Lite-like: no q LoRA, softmax gating, 2 shared experts, first block dense, YaRN.
    # The tiny deepseek2 presets have one dense and one MoE block by default: Q4_K_M noise through
    # a second MoE block flips enough routes that llama.cpp misses its own top-1 bar vs F32.
    "tiny-lite": Preset(hidden=256, n_head=4, n_head_kv=4, head_dim=96, n_layer=2, ff=512,
                        n_expert=8, n_expert_used=2, expert_ff=256, shared_ff=512,
                        context=16384, rope_base=10000.0, rms_eps=1e-6, only=_DEEPSEEK2,
                        mla=MLAPreset(q_lora=0, kv_lora=128, qk_nope=64, qk_rope=32, v_head=64,
                                      n_shared=2, dense_lead=1, yarn_factor=40.0,
                                      yarn_orig_ctx=4096, yarn_mscale_all_dim=0.707)),
    # DeepSeek-V3-like: q LoRA, sigmoid gating with exp_probs_b, group-limited top-k (4 groups of 3,
    # best 2 by their top-2 sum), scaled weights. Renormalised sigmoid weights make every routing
    # flip a jump; few experts per pick and a small scale (V3 uses 2.5) keep Q4_K_M's flips rare and
    # small enough for the parity bars (llama.cpp's own Q4_K_M vs F32 top-1 stays >= 99%).
    "tiny-v3": Preset(hidden=256, n_head=4, n_head_kv=4, head_dim=96, n_layer=2, ff=512,
                      n_expert=12, n_expert_used=3, expert_ff=128, shared_ff=128,
                      context=16384, rope_base=10000.0, rms_eps=1e-6, only=_DEEPSEEK2,
                      mla=MLAPreset(q_lora=96, kv_lora=128, qk_nope=64, qk_rope=32, v_head=64,
                                    n_shared=1, dense_lead=1, gating="sigmoid", n_group=4,
                                    n_group_used=2, weights_norm=True, weights_scale=0.5,
                                    yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0)),
    # DeepSeek-V2-Lite layer shapes; only the layer count differs (27 in the real model).
    "deepseek-v2-lite": Preset(hidden=2048, n_head=16, n_head_kv=16, head_dim=192, n_layer=4,
                               ff=10944, n_expert=64, n_expert_used=6, expert_ff=1408,
                               shared_ff=2816, context=163840, rope_base=10000.0, rms_eps=1e-6,
                               only=_DEEPSEEK2,
                               mla=MLAPreset(q_lora=0, kv_lora=512, qk_nope=128, qk_rope=64,
                                             v_head=128, n_shared=2, dense_lead=1, yarn_factor=40.0,
                                             yarn_orig_ctx=4096, yarn_mscale_all_dim=0.707)),
}


@dataclass(frozen=True)
class Shape:
    """A preset resolved for one architecture and layer count, plus the tokenizer's vocab size."""
    p: Preset
    n_layer: int
    n_head_kv: int
    vocab: int

    @property
    def q_dim(self) -> int:      # H*Dh
        return self.p.n_head * self.p.head_dim

    @property
    def kv_dim(self) -> int:     # Hk*Dh
        return self.n_head_kv * self.p.head_dim

    @property
    def m(self) -> MLAPreset:
        return self.p.mla

    @property
    def mla_q_dim(self) -> int:  # H*(N+R)
        return self.p.n_head * (self.m.qk_nope + self.m.qk_rope)


# How each weight is initialised: std of a normal draw, or a norm weight near 1.
# Linear maps use 1/sqrt(fan_in) so activations stay O(1); the router gets a gain so top-k choices are
# rarely near-ties; the lm_head gets a gain so logits are spread out (std ~6) rather than flat.
ROUTER_GAIN = 2.0
LM_HEAD_GAIN = 6.0
NORM_JITTER = 0.05
BIAS_STD = 0.1


def _std(init: str, shape: tuple[int, ...]) -> float:
    fan_in = shape[-1]
    return {
        "embed": 1.0,
        "linear": 1.0 / np.sqrt(fan_in),
        "router": ROUTER_GAIN / np.sqrt(fan_in),
        "lm_head": LM_HEAD_GAIN / np.sqrt(fan_in),
        "bias": BIAS_STD,
        "norm": NORM_JITTER,
    }[init]


@dataclass(frozen=True)
class Role:
    """One tensor kind: its llama.cpp name (gguf.MODEL_TENSOR), suffix, numpy shape and init."""
    tensor: str                              # gguf.MODEL_TENSOR member name
    shape: Callable[[Shape], tuple[int, ...]]
    init: str
    suffix: str = "weight"


ROLES: dict[str, Role] = {
    # global
    "token_embd":  Role("TOKEN_EMBD", lambda s: (s.vocab, s.p.hidden), "embed"),          # [V, D]
    "output_norm": Role("OUTPUT_NORM", lambda s: (s.p.hidden,), "norm"),                  # [D]
    "output":      Role("OUTPUT", lambda s: (s.vocab, s.p.hidden), "lm_head"),            # [V, D]
    # attention
    "attn_norm":   Role("ATTN_NORM", lambda s: (s.p.hidden,), "norm"),
    "attn_q":      Role("ATTN_Q", lambda s: (s.q_dim, s.p.hidden), "linear"),             # [H*Dh, D]
    "attn_k":      Role("ATTN_K", lambda s: (s.kv_dim, s.p.hidden), "linear"),            # [Hk*Dh, D]
    "attn_v":      Role("ATTN_V", lambda s: (s.kv_dim, s.p.hidden), "linear"),            # [Hk*Dh, D]
    "attn_output": Role("ATTN_OUT", lambda s: (s.p.hidden, s.q_dim), "linear"),           # [D, H*Dh]
    "attn_q_bias": Role("ATTN_Q", lambda s: (s.q_dim,), "bias", "bias"),
    "attn_k_bias": Role("ATTN_K", lambda s: (s.kv_dim,), "bias", "bias"),
    "attn_v_bias": Role("ATTN_V", lambda s: (s.kv_dim,), "bias", "bias"),
    # q/k RMS norm per head (qwen3) or over the whole projection (olmoe)
    "attn_q_norm_head": Role("ATTN_Q_NORM", lambda s: (s.p.head_dim,), "norm"),           # [Dh]
    "attn_k_norm_head": Role("ATTN_K_NORM", lambda s: (s.p.head_dim,), "norm"),           # [Dh]
    "attn_q_norm_full": Role("ATTN_Q_NORM", lambda s: (s.q_dim,), "norm"),                # [H*Dh]
    "attn_k_norm_full": Role("ATTN_K_NORM", lambda s: (s.kv_dim,), "norm"),               # [Hk*Dh]
    # dense FFN
    "ffn_norm":    Role("FFN_NORM", lambda s: (s.p.hidden,), "norm"),
    "ffn_gate":    Role("FFN_GATE", lambda s: (s.p.ff, s.p.hidden), "linear"),            # [F, D]
    "ffn_up":      Role("FFN_UP", lambda s: (s.p.ff, s.p.hidden), "linear"),              # [F, D]
    "ffn_down":    Role("FFN_DOWN", lambda s: (s.p.hidden, s.p.ff), "linear"),            # [D, F]
    # routed experts
    "ffn_gate_inp":  Role("FFN_GATE_INP", lambda s: (s.p.n_expert, s.p.hidden), "router"),             # [E, D]
    "ffn_gate_exps": Role("FFN_GATE_EXP", lambda s: (s.p.n_expert, s.p.expert_ff, s.p.hidden), "linear"),  # [E, Fe, D]
    "ffn_up_exps":   Role("FFN_UP_EXP", lambda s: (s.p.n_expert, s.p.expert_ff, s.p.hidden), "linear"),    # [E, Fe, D]
    "ffn_down_exps": Role("FFN_DOWN_EXP", lambda s: (s.p.n_expert, s.p.hidden, s.p.expert_ff), "linear"),  # [E, D, Fe]
    # shared expert (qwen2moe): output scaled by sigmoid(ffn_gate_inp_shexp . x)
    "ffn_gate_inp_shexp": Role("FFN_GATE_INP_SHEXP", lambda s: (s.p.hidden,), "linear"),  # [D]
    "ffn_gate_shexp": Role("FFN_GATE_SHEXP", lambda s: (s.p.shared_ff, s.p.hidden), "linear"),  # [Fs, D]
    "ffn_up_shexp":   Role("FFN_UP_SHEXP", lambda s: (s.p.shared_ff, s.p.hidden), "linear"),    # [Fs, D]
    "ffn_down_shexp": Role("FFN_DOWN_SHEXP", lambda s: (s.p.hidden, s.p.shared_ff), "linear"),  # [D, Fs]
    # deepseek2: Multi-head Latent Attention
    "mla_q":        Role("ATTN_Q", lambda s: (s.mla_q_dim, s.p.hidden), "linear"),              # [H*(N+R), D]
    "mla_q_a":      Role("ATTN_Q_A", lambda s: (s.m.q_lora, s.p.hidden), "linear"),             # [Cq, D]
    "mla_q_a_norm": Role("ATTN_Q_A_NORM", lambda s: (s.m.q_lora,), "norm"),                     # [Cq]
    "mla_q_b":      Role("ATTN_Q_B", lambda s: (s.mla_q_dim, s.m.q_lora), "linear"),            # [H*(N+R), Cq]
    "mla_kv_a_mqa": Role("ATTN_KV_A_MQA", lambda s: (s.m.kv_lora + s.m.qk_rope, s.p.hidden), "linear"),  # [C+R, D]
    "mla_kv_a_norm": Role("ATTN_KV_A_NORM", lambda s: (s.m.kv_lora,), "norm"),                  # [C]
    "mla_k_b":      Role("ATTN_K_B", lambda s: (s.p.n_head, s.m.kv_lora, s.m.qk_nope), "linear"),  # [H, C, N]
    "mla_v_b":      Role("ATTN_V_B", lambda s: (s.p.n_head, s.m.v_head, s.m.kv_lora), "linear"),  # [H, Dv, C]
    "mla_kv_b":     Role("ATTN_KV_B", lambda s: (s.p.n_head * (s.m.qk_nope + s.m.v_head), s.m.kv_lora),
                         "linear"),                                                             # [H*(N+Dv), C]
    "mla_output":   Role("ATTN_OUT", lambda s: (s.p.hidden, s.p.n_head * s.m.v_head), "linear"),  # [D, H*Dv]
    "exp_probs_b":  Role("FFN_EXP_PROBS_B", lambda s: (s.p.n_expert,), "bias", "bias"),         # [E]
}

_ATTN = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
_DENSE = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_MOE = ("ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_QK_HEAD = ("attn_q_norm_head", "attn_k_norm_head")
_QK_FULL = ("attn_q_norm_full", "attn_k_norm_full")
_QKV_BIAS = ("attn_q_bias", "attn_k_bias", "attn_v_bias")
_SHEXP = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
_DS_SHEXP = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")   # no sigmoid gate in deepseek2
_MLA_SPLIT = ("mla_k_b", "mla_v_b")
_MLA_ALL = ("attn_norm", "mla_q", "mla_q_a", "mla_q_a_norm", "mla_q_b", "mla_kv_a_mqa",
            "mla_kv_a_norm", "mla_kv_b", "mla_k_b", "mla_v_b", "mla_output")


def _deepseek2_block(split: bool) -> Callable[[Shape, int], tuple[str, ...]]:
    """Roles of block i: q LoRA or not, k_b/v_b (split) or kv_b, dense lead or MoE."""
    def roles(s: Shape, i: int) -> tuple[str, ...]:
        m = s.m
        q = ("mla_q_a", "mla_q_a_norm", "mla_q_b") if m.q_lora else ("mla_q",)
        attn = ("attn_norm",) + q + ("mla_kv_a_mqa", "mla_kv_a_norm") + \
            (_MLA_SPLIT if split else ("mla_kv_b",)) + ("mla_output",)
        if i < m.dense_lead:
            return attn + _DENSE
        bias = ("exp_probs_b",) if m.gating == "sigmoid" else ()
        return attn + _MOE + bias + _DS_SHEXP
    return roles


@dataclass(frozen=True)
class ArchSpec:
    """What llama.cpp expects of one architecture (src/models/<arch>.cpp) and what its converter writes.

    rope and topk_renorm are fixed by llama.cpp per architecture and are not stored in the file; they
    are recorded here for readers of the models.
    """
    gguf_arch: str                  # general.architecture
    layer_roles: tuple[str, ...]    # keys of ROLES present in every block
    moe: bool
    expert_ff_key: str | None       # key holding Fe: "feed_forward_length" or "expert_feed_forward_length"
    rope: str                       # "norm" (adjacent pairs) or "neox" (halves)
    topk_renorm: bool | None        # llama.cpp renormalises the top-k softmax weights; None when dense
    header_keys: tuple[str, ...] = ()   # optional keys: "vocab_size", "rope_dims", "head_dim"
    mha_only: bool = False          # q/k norm spans the whole projection, so K must be as wide as Q
    shared_expert: bool = False
    block_roles: Callable[[Shape, int], tuple[str, ...]] | None = None   # per-block roles (deepseek2)
    mla_split: bool | None = None   # deepseek2: k_b/v_b (True) or the legacy kv_b (False)


ARCHES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", _ATTN + _DENSE, moe=False, expert_ff_key=None, rope="norm",
                      topk_renorm=None, header_keys=("vocab_size", "rope_dims")),
    # Mixtral layout: llama with experts; Fe is stored as feed_forward_length.
    "llama-moe": ArchSpec("llama", _ATTN + _MOE, moe=True, expert_ff_key="feed_forward_length",
                          rope="norm", topk_renorm=True, header_keys=("vocab_size", "rope_dims")),
    "qwen3": ArchSpec("qwen3", _ATTN + _QK_HEAD + _DENSE, moe=False, expert_ff_key=None, rope="neox",
                      topk_renorm=None, header_keys=("head_dim",)),
    "qwen3moe": ArchSpec("qwen3moe", _ATTN + _QK_HEAD + _MOE, moe=True,
                         expert_ff_key="expert_feed_forward_length", rope="neox", topk_renorm=True,
                         header_keys=("head_dim",)),
    "qwen2moe": ArchSpec("qwen2moe", _ATTN + _QKV_BIAS + _MOE + _SHEXP, moe=True,
                         expert_ff_key="expert_feed_forward_length", rope="neox", topk_renorm=False,
                         shared_expert=True),
    "olmoe": ArchSpec("olmoe", _ATTN + _QK_FULL + _MOE, moe=True, expert_ff_key="feed_forward_length",
                      rope="neox", topk_renorm=False, mha_only=True),
    # DeepSeek-V2/V3: MLA with k_b/v_b split out of kv_b (what current converters write) ...
    "deepseek2": ArchSpec("deepseek2", _MLA_ALL + _DENSE + _MOE + ("exp_probs_b",) + _DS_SHEXP,
                          moe=True, expert_ff_key="expert_feed_forward_length", rope="norm",
                          topk_renorm=None, header_keys=("vocab_size",),
                          block_roles=_deepseek2_block(split=True), mla_split=True),
    # ... and the legacy layout with one attn_kv_b, which llama.cpp still loads (as plain MHA).
    "deepseek2-kvb": ArchSpec("deepseek2", _MLA_ALL + _DENSE + _MOE + ("exp_probs_b",) + _DS_SHEXP,
                              moe=True, expert_ff_key="expert_feed_forward_length", rope="norm",
                              topk_renorm=None, header_keys=("vocab_size",),
                              block_roles=_deepseek2_block(split=False), mla_split=False),
}

# Name -> llama_ftype (include/llama.h; the same numbers are general.file_type). None: keep F32.
# The IQ1/IQ2/IQ3 types are left out: llama.cpp wants an importance matrix for them (IQ4 does not).
QUANT_FTYPES: dict[str, int | None] = {
    "F32": None, "F16": 1, "BF16": 32, "Q8_0": 7,
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ4_NL": 25, "IQ4_XS": 30,
}

PROGRESS_MIN_BYTES = 256 << 20   # show a bar only when the F32 file is at least this big


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]      # numpy order
    init: str

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape))


# ---------------------------------------------------------------------------------------------------
# validation and planning


def _check_choice(kind: str, value: str, table: dict) -> None:
    if value not in table:
        raise UnsupportedError(f"unknown {kind} {value!r}; choose one of: {', '.join(table)}")


def resolve_shape(arch: str, preset: str = "tiny", layers: int | None = None, vocab: int = 49152) -> Shape:
    """Check (arch, preset, layers) and return the concrete shape the model will have."""
    _check_choice("architecture", arch, ARCHES)
    _check_choice("preset", preset, PRESETS)
    spec, p = ARCHES[arch], PRESETS[preset]
    if p.only and arch not in p.only:
        raise UnsupportedError(f"preset {preset!r} is for {', '.join(p.only)}, not {arch!r}")
    if spec.moe and p.n_expert == 0:
        raise UnsupportedError(f"preset {preset!r} has no experts, architecture {arch!r} needs them")
    if p.tied and spec.moe:
        raise UnsupportedError(f"preset {preset!r} ties the lm_head to token_embd; {arch!r} "
                               f"models are built untied")
    n_layer = p.n_layer if layers is None else layers
    if not isinstance(n_layer, int) or n_layer < 1:
        raise UnsupportedError(f"layers must be a positive integer, got {layers!r}")
    # llama.cpp's olmoe normalises K over a width-D vector, so K (Hk*Dh) must be D wide: MHA only.
    n_head_kv = p.n_head if spec.mha_only else p.n_head_kv
    if spec.mla_split is not None:
        if p.mla is None:
            raise UnsupportedError(f"preset {preset!r} has no MLA dimensions; {arch!r} needs a "
                                   f"deepseek2 preset ({', '.join(n for n, q in PRESETS.items() if q.mla)})")
        if p.shared_ff != p.mla.n_shared * p.expert_ff:
            raise UnsupportedError(f"preset {preset!r}: shared_ff {p.shared_ff} must be n_shared "
                                   f"({p.mla.n_shared}) x expert_ff ({p.expert_ff})")
        # the converter writes MLA files as MQA over the latent (one KV head), legacy ones as MHA
        n_head_kv = 1 if spec.mla_split else p.n_head
    s = Shape(p=p, n_layer=n_layer, n_head_kv=n_head_kv, vocab=vocab)
    if spec.mla_split is None and "head_dim" not in spec.header_keys and s.q_dim != p.hidden:
        raise UnsupportedError(f"{arch!r} derives the head dim as hidden/heads, so heads*head_dim "
                               f"({s.q_dim}) must equal hidden ({p.hidden}) in preset {preset!r}")
    return s


def tensor_plan(arch: str, s: Shape) -> list[TensorPlan]:
    """Every tensor of the model in file order (token_embd, blocks, output_norm, output)."""
    import gguf

    spec = ARCHES[arch]

    def plan(role_key: str, bid: int | None = None) -> TensorPlan:
        role = ROLES[role_key]
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[role.tensor]]
        name = (base.format(bid=bid) if bid is not None else base) + "." + role.suffix
        init = "lm_head" if (role_key == "token_embd" and s.p.tied) else role.init
        return TensorPlan(name, role.shape(s), init)

    out = [plan("token_embd")]
    for i in range(s.n_layer):
        roles = spec.block_roles(s, i) if spec.block_roles else spec.layer_roles
        out += [plan(r, i) for r in roles]
    out.append(plan("output_norm"))
    if not s.p.tied:
        out.append(plan("output"))
    return out


def _init_tensor(t: TensorPlan, seed: int) -> np.ndarray:
    # One generator per tensor name: a tensor's values do not depend on the layer count or file order.
    rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
    a = rng.standard_normal(t.shape, dtype=np.float32)
    a *= np.float32(_std(t.init, t.shape))   # np.float32 scalar: keeps the array float32 under NumPy 2
    if t.init == "norm":
        a += np.float32(1.0)
    if a.dtype != np.float32:
        raise HeteroMoEError(f"internal: tensor {t.name} came out {a.dtype}, expected float32")
    return a


# ---------------------------------------------------------------------------------------------------
# metadata


TOKENIZER_CACHE = "smollm2-tokenizer-v1.json"


@functools.lru_cache(maxsize=1)
def _tokenizer_kv() -> tuple[tuple[str, Any, int, int | None], ...]:
    """All tokenizer.* keys of SmolLM2-135M as (key, value, type, array item type).

    GGUFReader takes seconds on 100k strings, so the keys are kept as JSON next to the test models.
    """
    from ..config_env import cache_dir

    cached = cache_dir() / "test-models" / TOKENIZER_CACHE
    if cached.exists():
        return tuple((k, v, t, sub) for k, v, t, sub in json.loads(cached.read_text("utf-8")))

    import gguf

    from ..assets import smollm2_path

    path = smollm2_path()
    reader = gguf.GGUFReader(path)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = int(field.types[0])
        sub = int(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise HeteroMoEError(f"{path} has no tokenizer.ggml.tokens")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, ensure_ascii=False), "utf-8")
    os.replace(tmp, cached)
    return tuple(out)


def _vocab_size() -> int:
    for key, value, *_ in _tokenizer_kv():
        if key == "tokenizer.ggml.tokens":
            return len(value)
    raise AssertionError("unreachable")


def _add_metadata(w, arch: str, preset: str, s: Shape, seed: int) -> None:
    import gguf

    w.add_type("model")
    w.add_name(f"hetero-moe test {arch} {preset} L{s.n_layer} seed{seed}")
    add_arch_metadata(w, arch, s)
    w.add_file_type(0)   # LLAMA_FTYPE_ALL_F32; the quantizer rewrites it
    for k, value, vtype, sub in _tokenizer_kv():
        sub_type = None if sub is None else gguf.GGUFValueType(sub)
        w.add_key_value(k, value, gguf.GGUFValueType(vtype), sub_type=sub_type)


def add_arch_metadata(w, arch: str, s: Shape) -> None:
    """The `{arch}.*` hyper-parameter keys of shape `s`, as convert_hf_to_gguf.py writes them."""
    import gguf

    spec, p = ARCHES[arch], s.p
    a = spec.gguf_arch
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope

    def key(template: str) -> str:
        return template.format(arch=a)

    w.add_uint32(key(K.CONTEXT_LENGTH), p.context)
    w.add_uint32(key(K.EMBEDDING_LENGTH), p.hidden)
    w.add_uint32(key(K.BLOCK_COUNT), s.n_layer)
    ff = p.expert_ff if spec.expert_ff_key == "feed_forward_length" else p.ff
    w.add_uint32(key(K.FEED_FORWARD_LENGTH), ff)
    w.add_uint32(key(A.HEAD_COUNT), p.n_head)
    w.add_uint32(key(A.HEAD_COUNT_KV), s.n_head_kv)
    w.add_float32(key(R.FREQ_BASE), p.rope_base)
    if p.yarn:
        w.add_string(key(R.SCALING_TYPE), "yarn")
        w.add_float32(key(R.SCALING_FACTOR), p.yarn[0])
        w.add_uint32(key(R.SCALING_ORIG_CTX_LEN), p.yarn[1])
    w.add_float32(key(A.LAYERNORM_RMS_EPS), p.rms_eps)
    if spec.moe:
        w.add_uint32(key(K.EXPERT_COUNT), p.n_expert)
        w.add_uint32(key(K.EXPERT_USED_COUNT), p.n_expert_used)
        if spec.expert_ff_key == "expert_feed_forward_length":
            w.add_uint32(key(K.EXPERT_FEED_FORWARD_LENGTH), p.expert_ff)
    if spec.shared_expert:
        w.add_uint32(key(K.EXPERT_SHARED_FEED_FORWARD_LENGTH), p.shared_ff)
    if "vocab_size" in spec.header_keys:
        w.add_uint32(key(K.VOCAB_SIZE), s.vocab)
    if "rope_dims" in spec.header_keys:
        w.add_uint32(key(R.DIMENSION_COUNT), p.head_dim)
    if "head_dim" in spec.header_keys:
        w.add_uint32(key(A.KEY_LENGTH), p.head_dim)
        w.add_uint32(key(A.VALUE_LENGTH), p.head_dim)
    if spec.mla_split is not None:
        _add_mla_metadata(w, key, s, spec.mla_split)


# llama.cpp's llama_expert_gating_func_type
GATING_FUNC = {"softmax": 1, "sigmoid": 2}
# llama.cpp treats a deepseek2 file of this many blocks as "lite" and then does not read q_lora_rank
LITE_LAYER_COUNTS = (26, 27)


def _add_mla_metadata(w, key: Callable[[str], str], s: Shape, split: bool) -> None:
    """deepseek2 keys as convert_hf_to_gguf.py writes them."""
    import gguf

    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    m = s.m
    if m.q_lora or s.n_layer not in LITE_LAYER_COUNTS:
        w.add_uint32(key(A.Q_LORA_RANK), m.q_lora)   # 0 = no q LoRA when not recognised as lite
    w.add_uint32(key(A.KV_LORA_RANK), m.kv_lora)
    if split:    # MLA files: K/V "heads" are the latent (C+R / C), the real head dims go to *_mla
        w.add_uint32(key(A.KEY_LENGTH), m.kv_lora + m.qk_rope)
        w.add_uint32(key(A.VALUE_LENGTH), m.kv_lora)
        w.add_uint32(key(A.KEY_LENGTH_MLA), m.qk_nope + m.qk_rope)
        w.add_uint32(key(A.VALUE_LENGTH_MLA), m.v_head)
    else:
        w.add_uint32(key(A.KEY_LENGTH), m.qk_nope + m.qk_rope)
        w.add_uint32(key(A.VALUE_LENGTH), m.v_head)
    w.add_uint32(key(R.DIMENSION_COUNT), m.qk_rope)
    w.add_uint32(key(K.LEADING_DENSE_BLOCK_COUNT), m.dense_lead)
    w.add_uint32(key(K.EXPERT_SHARED_COUNT), m.n_shared)
    w.add_float32(key(K.EXPERT_WEIGHTS_SCALE), m.weights_scale)
    w.add_bool(key(K.EXPERT_WEIGHTS_NORM), m.weights_norm)
    w.add_uint32(key(K.EXPERT_GATING_FUNC), GATING_FUNC[m.gating])
    if m.n_group:
        w.add_uint32(key(K.EXPERT_GROUP_COUNT), m.n_group)
        w.add_uint32(key(K.EXPERT_GROUP_USED_COUNT), m.n_group_used)
    if m.yarn_factor:
        w.add_string(key(R.SCALING_TYPE), "yarn")
        w.add_float32(key(R.SCALING_FACTOR), m.yarn_factor)
        w.add_uint32(key(R.SCALING_ORIG_CTX_LEN), m.yarn_orig_ctx)
        w.add_float32(key(R.SCALING_YARN_LOG_MUL), 0.1 * m.yarn_mscale_all_dim)


# ---------------------------------------------------------------------------------------------------
# writing and quantizing


def _write_f32(path: Path, arch: str, preset: str, s: Shape, seed: int, progress: bool) -> None:
    import gguf

    plan = tensor_plan(arch, s)
    w = gguf.GGUFWriter(path, ARCHES[arch].gguf_arch)
    _add_metadata(w, arch, preset, s, seed)
    for t in plan:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes)
    total = sum(t.nbytes for t in plan)
    bar = None
    if progress and total >= PROGRESS_MIN_BYTES:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing F32 {path.name}")
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            w.write_tensor_data(_init_tensor(t, seed))
            if bar is not None:
                bar.update(t.nbytes)
    finally:
        w.close()
        if bar is not None:
            bar.close()


def _quantize(src: Path, dst: Path, quant: str, nthread: int, verbose: bool) -> None:
    try:
        import llama_cpp
        from llama_cpp._logger import logger as llama_logger
    except ImportError as e:
        raise HeteroMoEError(f"quantizing to {quant} needs llama-cpp-python (pip install "
                             f"llama-cpp-python); quant='F32' works without it") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = nthread
    # llama.cpp logs one line per tensor: progress for big models, noise for small ones.
    level = llama_logger.level
    llama_logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_logger.setLevel(level)
    if rc != 0:
        raise HeteroMoEError(f"llama.cpp failed to quantize {src} to {quant} "
                             f"(llama_model_quantize returned {rc}; its error log above says why)")


def f32_size(arch: str, preset: str = "tiny", layers: int | None = None) -> int:
    """Bytes of tensor data in the F32 intermediate file."""
    s = resolve_shape(arch, preset, layers)
    return sum(t.nbytes for t in tensor_plan(arch, s))


def make_test_model(arch: str, out_path: str | os.PathLike, preset: str = "tiny",
                    layers: int | None = None, quant: str = "Q4_K_M", seed: int = 0,
                    progress: bool = True) -> Path:
    """Write a random-weight GGUF model of `arch` with the shapes of `preset` to `out_path`.

    quant names a llama.cpp file type (see QUANT_FTYPES); "F32" skips quantization. The file appears
    at out_path only when complete (built under a temporary name, then renamed).
    """
    _check_choice("quant", quant, QUANT_FTYPES)
    if not isinstance(seed, int) or seed < 0:
        raise UnsupportedError(f"seed must be a non-negative integer, got {seed!r}")
    s = resolve_shape(arch, preset, layers)    # validates before the tokenizer is fetched
    s = dataclasses.replace(s, vocab=_vocab_size())
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    need = sum(t.nbytes for t in tensor_plan(arch, s))
    need += need // 3 if QUANT_FTYPES[quant] is not None else 0   # room for the quantized copy
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise HeteroMoEError(f"building {arch}/{preset} with {s.n_layer} layers needs about "
                             f"{need / 2**30:.1f} GiB free in {out.parent}, only {free / 2**30:.1f} GiB")

    tag = f".{out.name}.{os.getpid()}"
    f32_tmp = out.with_name(tag + ".f32.tmp")
    final_tmp = out.with_name(tag + ".tmp")
    t0 = time.perf_counter()
    try:
        if QUANT_FTYPES[quant] is None:
            _write_f32(final_tmp, arch, preset, s, seed, progress)
        else:
            _write_f32(f32_tmp, arch, preset, s, seed, progress)
            big = progress and need >= PROGRESS_MIN_BYTES
            if big:
                print(f"quantizing to {quant} with llama.cpp ...", file=sys.stderr, flush=True)
            from ..config_env import default_threads
            _quantize(f32_tmp, final_tmp, quant, default_threads(), verbose=big)
        os.replace(final_tmp, out)
    finally:
        for tmp in (f32_tmp, final_tmp):
            tmp.unlink(missing_ok=True)
    if progress and need >= PROGRESS_MIN_BYTES:
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    return out


def cache_name(arch: str, preset: str = "tiny", quant: str = "Q4_K_M", layers: int | None = None,
               seed: int = 0) -> str:
    """File name under which cached_test_model stores this model; it encodes every parameter."""
    _check_choice("quant", quant, QUANT_FTYPES)
    s = resolve_shape(arch, preset, layers)
    return f"{arch}-{preset}-L{s.n_layer}-{quant}-s{seed}-v{FORMAT_VERSION}.gguf"


def cached_test_model(arch: str, preset: str = "tiny", quant: str = "Q4_K_M",
                      layers: int | None = None, seed: int = 0) -> Path:
    """Path of the model in cache_dir()/test-models/, built on first use and reused after."""
    from ..config_env import cache_dir

    path = cache_dir() / "test-models" / cache_name(arch, preset, quant, layers, seed)
    if path.exists():
        return path
    return make_test_model(arch, path, preset=preset, layers=layers, quant=quant, seed=seed)


# ---------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="make_test_model.py",
        description="Write a random-weight GGUF model in llama.cpp's layout (SmolLM2 tokenizer), "
                    "quantized with llama.cpp's own quantizer.",
        epilog="presets: " + "; ".join(
            f"{n} (D={p.hidden}, L={p.n_layer}, E={p.n_expert}"
            + (f", only {'/'.join(p.only)}" if p.only else "") + ")" for n, p in PRESETS.items()))
    from .shape_only import SHAPE_PRESETS
    ap.add_argument("--arch", choices=list(ARCHES),
                    help="architecture (required unless --shape-only, whose presets imply it)")
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS) + list(SHAPE_PRESETS),
                    help="shapes (default tiny); " + ", ".join(SHAPE_PRESETS) + " need --shape-only")
    dest = ap.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, help="output .gguf path")
    dest.add_argument("--cache", action="store_true",
                      help="build into the hetero-moe cache (test-models/) unless already there")
    ap.add_argument("--layers", type=int, default=None, help="number of blocks (default: the preset's)")
    ap.add_argument("--quant", default="Q4_K_M", choices=list(QUANT_FTYPES),
                    help="llama.cpp file type (default Q4_K_M; F32 skips quantization)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--format", choices=("gguf", "gptq", "awq", "hf"), default="gguf",
                    help="gguf (default); gptq/awq: a Hugging Face int4 checkpoint folder at --out "
                         "plus its F32 GGUF twin at OUT.f32.gguf; hf: the same folder in fp16")
    ap.add_argument("--group-size", type=int, default=128, help="gptq/awq group size (default 128)")
    ap.add_argument("--asym", action="store_true", help="gptq: asymmetric zero points")
    ap.add_argument("--desc-act", action="store_true", help="gptq: act-order (g_idx scatter)")
    ap.add_argument("--tokenizer", choices=("bpe", "spm", "spm-first", "spm-always"),
                    default="bpe",
                    help="gptq/awq/hf folders: bpe (byte-level, default) or a small "
                         "SentencePiece-style tokenizer.json (byte_fallback, \u2581; spm: the "
                         "Llama-2/Mixtral Prepend normalizer, spm-first/-always: Metaspace)")
    ap.add_argument("--shape-only", action="store_true",
                    help="a real model's metadata and Q4_K_M tensor table with a sparse, empty data "
                         "region (presets " + ", ".join(SHAPE_PRESETS) + ")")
    return ap


def main(argv: list[str] | None = None) -> int:
    from . import shape_only
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.shape_only or args.preset in shape_only.SHAPE_PRESETS:
        if not args.shape_only:
            ap.error(f"preset {args.preset!r} is shape-only: add --shape-only")
        sp = shape_only.SHAPE_PRESETS.get(args.preset)
        if sp is None:
            ap.error(f"--shape-only needs one of the presets {', '.join(shape_only.SHAPE_PRESETS)}")
        if args.arch not in (None, sp.arch):
            ap.error(f"preset {args.preset!r} is a {sp.arch} model, not {args.arch!r}")
        if args.layers is not None or args.quant != "Q4_K_M":
            ap.error("--shape-only files have the real layer count and are Q4_K_M")
        return shape_only.main_shape_only(args.preset, args.out, args.cache)
    if args.arch is None:
        ap.error("--arch is required")
    if args.format != "gguf":
        from .make_hf_model import QuantOptions, make_hf_test_model
        if args.out is None:
            ap.error(f"--format {args.format} writes a folder: give --out")
        q = None if args.format == "hf" else QuantOptions(
            args.format, args.group_size, sym=not args.asym, desc_act=args.desc_act)
        try:
            folder, twin = make_hf_test_model(args.arch, args.out, q, preset=args.preset,
                                              layers=args.layers, seed=args.seed,
                                              tokenizer=args.tokenizer)
        except HeteroMoEError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{folder}\n{twin}")
        return 0
    t0 = time.perf_counter()
    try:
        if args.cache:
            path = cached_test_model(args.arch, args.preset, args.quant, args.layers, args.seed)
        else:
            path = make_test_model(args.arch, args.out, preset=args.preset, layers=args.layers,
                                   quant=args.quant, seed=args.seed, progress=not args.no_progress)
    except HeteroMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB  {time.perf_counter() - t0:.1f} s")
    return 0
