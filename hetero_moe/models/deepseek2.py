"""`deepseek2`: DeepSeek-V2 / V2-Lite / V3 / R1: Multi-head Latent Attention and DeepSeek MoE.

Attention compresses each token to a latent of C = kv_lora_rank dims plus R decoupled RoPE dims;
per-head keys/values come from the latent through k_b / v_b (or the legacy kv_b holding both).
MoE blocks follow `leading_dense_block_count` dense ones; routing is softmax (V2) or sigmoid with a
selection-only bias and group-limited top-k (V3); shared experts run on every token.

Keys and defaults follow llama.cpp's deepseek2 loader; the attention scale and RoPE magnitude follow
its YaRN handling (llama-context.cpp and the deepseek2 graph).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import MissingKeyError, UnsupportedError
from ..gguf import GGUFFile
from ..layers.rope_yarn import YarnParams
from .base import ROPE_NORM, ArchSpec, MetaReader, ModelConfig, moe_config, register

ARCH = "deepseek2"
GATING = {0: "softmax", 1: "softmax", 2: "sigmoid"}   # llama_expert_gating_func_type (0: unset)


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention shapes and the numbers llama.cpp derives from the YaRN keys."""
    q_lora: int             # Cq; 0: a single attn_q projection (V2-Lite)
    kv_lora: int            # C: latent width
    qk_nope: int            # N: per-head key dims without RoPE
    qk_rope: int            # R: RoPE dims, shared by all heads on the key side
    v_head: int             # Dv
    split: bool             # attn_k_b / attn_v_b; False: legacy attn_kv_b
    rope: YarnParams
    kq_scale: float         # softmax scale: mscale^2 / sqrt(N + R)

    @property
    def k_head(self) -> int:
        return self.qk_nope + self.qk_rope

    @property
    def latent_dim(self) -> int:
        """Cached floats per token and layer: the latent and the rotated key part."""
        return self.kv_lora + self.qk_rope


def cache_bytes_per_token(n_layer: int, kv_lora: int, qk_rope: int, elem_bytes: int = 2) -> int:
    """Latent KV cache: C + R values per token and layer, shared by all heads (f16 by default)."""
    return n_layer * (kv_lora + qk_rope) * elem_bytes


def mha_cache_bytes_per_token(n_layer: int, n_head: int, k_head: int, v_head: int,
                              elem_bytes: int = 2) -> int:
    """What a per-head K/V cache of the decompressed heads would hold, for comparison."""
    return n_layer * n_head * (k_head + v_head) * elem_bytes


def _get_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_and_scale(m: MetaReader, n_rot: int, k_head: int, n_ctx_train: int
                   ) -> tuple[YarnParams, float]:
    """RoPE parameters and the attention scale, as llama.cpp computes them for deepseek2."""
    path = m.g.path
    scaling = m.str("{arch}.rope.scaling.type", "linear")   # llama.cpp's default when absent
    if scaling not in ("none", "linear", "yarn"):
        raise UnsupportedError(f"{path}: {m.key('{arch}.rope.scaling.type')} = {scaling!r} is not "
                               f"supported for {ARCH} (supported: none, linear, yarn)")
    factor = m.float("{arch}.rope.scaling.factor", 0.0)
    if factor < 0 or not math.isfinite(factor):
        raise MissingKeyError(f"{path}: {m.key('{arch}.rope.scaling.factor')} = {factor} must be "
                              f">= 0")
    freq_scale = 1.0 / factor if factor > 0 and scaling != "none" else 1.0
    ext_factor = 1.0 if scaling == "yarn" else 0.0
    # the converter stores 0.1 * mscale_all_dim; llama.cpp divides it back out
    log_mul = m.float("{arch}.rope.scaling.yarn_log_multiplier", 0.0) / 0.1
    rope_attn = m.float("{arch}.rope.scaling.attn_factor", 1.0)
    n_ctx_orig = m.int("{arch}.rope.scaling.original_context_length", 0) or n_ctx_train
    attn_factor = 1.0
    if ext_factor != 0:
        f = 1.0 / freq_scale
        if log_mul != 0:
            # get_mscale(f, mscale) / get_mscale(f, mscale_all_dim): llama.cpp takes both from
            # the log multiplier for deepseek2, so the ratio is 1
            attn_factor = _get_mscale(f, log_mul) / _get_mscale(f, log_mul)
        else:
            attn_factor = _get_mscale(f, 1.0)
        attn_factor /= 1.0 + 0.1 * math.log(f)     # ggml's rope multiplies this back in
    attn_factor *= rope_attn
    rope = YarnParams(n_rot=n_rot, base=m.float("{arch}.rope.freq_base", 10000.0), kind=ROPE_NORM,
                      freq_scale=freq_scale, ext_factor=ext_factor, attn_factor=attn_factor,
                      n_ctx_orig=n_ctx_orig)
    # the graph undoes the rope cancel and applies DeepSeek's mscale to the softmax scale instead
    inv = math.log(1.0 / freq_scale)
    mscale = attn_factor * (1.0 + 0.1 * inv) * (1.0 + 0.1 * log_mul * inv)
    return rope, mscale * mscale / math.sqrt(k_head)


def parse_config(g: GGUFFile) -> ModelConfig:
    m = MetaReader(g, ARCH)
    path = g.path
    if g.get(m.key("{arch}.attention.temperature_scale")) is not None:
        raise UnsupportedError(f"{path}: {m.key('{arch}.attention.temperature_scale')} "
                               f"(attention temperature tuning) is not supported")
    n_embd = m.positive("{arch}.embedding_length", m.int("{arch}.embedding_length"))
    n_head = m.positive("{arch}.attention.head_count", m.int("{arch}.attention.head_count"), 4096)
    n_layer = m.positive("{arch}.block_count", m.int("{arch}.block_count"), 4096)
    kv_lora = m.positive("{arch}.attention.kv_lora_rank", m.int("{arch}.attention.kv_lora_rank"))
    q_lora = m.int("{arch}.attention.q_lora_rank", 0)   # absent in V2-Lite files
    k_mla = m.int("{arch}.attention.key_length_mla", 0)
    v_mla = m.int("{arch}.attention.value_length_mla", 0)
    split = bool(k_mla and v_mla)
    if split:
        k_head, v_head = k_mla, v_mla
    else:   # legacy files: key/value_length are the decompressed head dims
        k_head = m.int("{arch}.attention.key_length", 0) or n_embd // n_head
        v_head = m.int("{arch}.attention.value_length", 0) or k_head
    m.positive("{arch}.attention.value_length" + ("_mla" if split else ""), v_head)
    n_rot = m.int("{arch}.rope.dimension_count", k_head)
    if n_rot <= 0 or n_rot % 2 or n_rot >= k_head:
        raise MissingKeyError(f"{path}: {m.key('{arch}.rope.dimension_count')} = {n_rot} must be "
                              f"even, positive and below the key head dim {k_head}")
    n_ctx_train = m.int("{arch}.context_length", 4096)
    rope, kq_scale = rope_and_scale(m, n_rot, k_head, n_ctx_train)
    mla = MLAConfig(q_lora=q_lora, kv_lora=kv_lora, qk_nope=k_head - n_rot, qk_rope=n_rot,
                    v_head=v_head, split=split, rope=rope, kq_scale=kq_scale)

    tok = g.get("tokenizer.ggml.tokens")
    n_vocab = m.int("{arch}.vocab_size", len(tok) if isinstance(tok, list) else 0)
    if n_vocab == 0:
        n_vocab = g.tensor("token_embd.weight").ne[1]
    kw = dict(
        arch=ARCH, name=g.get("general.name", "", str), n_layer=n_layer, n_embd=n_embd,
        n_head=n_head, n_head_kv=n_head, head_dim=k_head, n_vocab=n_vocab,
        n_ctx_train=n_ctx_train,
        rms_eps=m.float("{arch}.attention.layer_norm_rms_epsilon"),
        rope_base=rope.base, rope_type=ROPE_NORM, rope_dim=n_rot, rope_freq_scale=rope.freq_scale,
        n_ff=m.int("{arch}.feed_forward_length", 0),
        tied_embeddings="output.weight" not in g.tensors, mla=mla,
    )
    dense = m.int("{arch}.leading_dense_block_count", 0)
    if dense > n_layer:
        raise MissingKeyError(f"{path}: {m.key('{arch}.leading_dense_block_count')} = {dense} "
                              f"exceeds block_count {n_layer}")
    kw["n_layer_dense_lead"] = dense
    if dense and kw["n_ff"] == 0:
        raise MissingKeyError(f"{path}: {dense} dense block(s) but no "
                              f"{m.key('{arch}.feed_forward_length')}")
    if dense < n_layer:
        if m.int("{arch}.expert_count", 0) == 0:
            raise MissingKeyError(f"{path}: {m.key('{arch}.expert_count')} is missing or 0 but "
                                  f"blocks {dense}..{n_layer - 1} are MoE blocks")
        moe_config(m, kw)
        _routing(m, kw)
    return ModelConfig(**kw)


def _routing(m: MetaReader, kw: dict) -> None:
    """Shared experts, gating function, weight norm/scale and expert groups, checked."""
    path, E, K = m.g.path, kw["n_expert"], kw["n_expert_used"]
    n_shared = m.int("{arch}.expert_shared_count")
    kw["n_ff_shexp"] = n_shared * kw["n_ff_exp"]
    func = m.int("{arch}.expert_gating_func", 0)
    if func not in GATING:
        raise UnsupportedError(f"{path}: {m.key('{arch}.expert_gating_func')} = {func} is not "
                               f"supported (1: softmax, 2: sigmoid)")
    kw["gating"] = GATING[func]
    kw["norm_topk"] = m.bool("{arch}.expert_weights_norm", False)
    scale = m.float("{arch}.expert_weights_scale", 0.0)
    if not math.isfinite(scale):
        raise MissingKeyError(f"{path}: {m.key('{arch}.expert_weights_scale')} = {scale}")
    kw["expert_weights_scale"] = scale
    groups = m.int("{arch}.expert_group_count", 0)
    used = m.int("{arch}.expert_group_used_count", 0)
    if groups > 1:
        if E % groups:
            raise MissingKeyError(f"{path}: {m.key('{arch}.expert_group_count')} = {groups} does "
                                  f"not divide expert_count {E}")
        if not 0 < used <= groups or used * (E // groups) < K:
            raise MissingKeyError(f"{path}: {m.key('{arch}.expert_group_used_count')} = {used} "
                                  f"must be in 1..{groups} and leave at least expert_used_count "
                                  f"({K}) experts to choose from")
        kw["n_expert_groups"], kw["n_group_used"] = groups, used


SPEC = register(ArchSpec(ARCH, parse_config, "DeepSeek-V2/V3 (MLA + DeepSeek MoE)"))


def build_blocks(cfg: ModelConfig, ts, lin, vec, plan, options, n_ctx: int, progress=None) -> list:
    """The decoder blocks of a deepseek2 file (the Transformer's per-architecture hook).

    ts/lin/vec are the Transformer's strict tensor getters; every tensor named here must exist
    with the shape the metadata implies."""
    from ..layers.linear import cpu_kernels_usable, float_tensor
    from ..layers.mla import MLAttention
    from ..layers.moe import DenseFFN, ExpertStack, MoE
    from ..layers.rope_yarn import YarnRope
    from .transformer import Block

    m, D, H = cfg.mla, cfg.n_embd, cfg.n_head
    C, N, R, Dv = m.kv_lora, m.qk_nope, m.qk_rope, m.v_head
    from ..runtime.placement import DEQUANT_DTYPE, Tier
    from .transformer import place_rope
    rope = place_rope(plan, YarnRope(m.rope, n_ctx, "cpu"))
    act_quant = options.act_quant and not plan.has_gpu     # the GPU tier keeps float activations

    def per_head(name, shape):   # k_b / v_b / kv_b: small, dequantized once (f16 on the GPU tier)
        t = ts.get(name, shape)
        tier = plan.tier_of(name)
        w = float_tensor(t)
        if tier is Tier.GPU:
            w = w.to(DEQUANT_DTYPE)
        return plan.put(name, w, tier), t.ggml_type

    def ffn(p, F):
        return DenseFFN(lin(p + "ffn_gate.weight", (F, D)), lin(p + "ffn_up.weight", (F, D)),
                        lin(p + "ffn_down.weight", (D, F)))

    blocks = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        q = q_a = q_a_norm = q_b = None
        if m.q_lora:
            q_a = lin(p + "attn_q_a.weight", (m.q_lora, D))
            q_a_norm = vec(p + "attn_q_a_norm.weight", m.q_lora)
            q_b = lin(p + "attn_q_b.weight", (H * m.k_head, m.q_lora))
        else:
            q = lin(p + "attn_q.weight", (H * m.k_head, D))
        kb_t = vb_t = None
        if m.split:
            kb_t, vb_t = ts.get(p + "attn_k_b.weight", (H, C, N)), ts.get(p + "attn_v_b.weight", (H, Dv, C))
        if m.split and not plan.has_gpu and cpu_kernels_usable(kb_t.ggml_type, options) \
                and cpu_kernels_usable(vb_t.ggml_type, options):
            # per head through the CPU kernels from the blocks themselves: no float copies
            k_b = v_b = None
            k_type, v_type = kb_t.ggml_type, vb_t.ggml_type
        elif m.split:
            k_b, k_type = per_head(p + "attn_k_b.weight", (H, C, N))      # [H, C, N]
            v_b, v_type = per_head(p + "attn_v_b.weight", (H, Dv, C))     # [H, Dv, C]
        else:
            kv_b, k_type = per_head(p + "attn_kv_b.weight", (H * (N + Dv), C))
            kv_b = kv_b.view(H, N + Dv, C)
            k_b, v_b, v_type = kv_b[:, :N].transpose(1, 2), kv_b[:, N:], k_type
            if not plan.has_gpu:         # the CPU path's layout; the GPU tier keeps views
                k_b, v_b = k_b.contiguous(), v_b.contiguous()
        attn = MLAttention(cfg, q, q_a, q_a_norm, q_b, lin(p + "attn_kv_a_mqa.weight", (C + R, D)),
                           vec(p + "attn_kv_a_norm.weight", C), k_b, v_b,
                           lin(p + "attn_output.weight", (D, H * Dv)), rope, k_type, v_type,
                           act_quant, transposed_copies=not plan.has_gpu,
                           k_b_blocks=kb_t if k_b is None else None,
                           v_b_blocks=vb_t if v_b is None else None)
        if i < cfg.n_layer_dense_lead:
            block_ffn = ffn(p, cfg.n_ff)
        else:
            E, Fe, Fs = cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp
            rname = p + "ffn_gate_inp.weight"
            router = plan.put(rname, float_tensor(ts.get(rname, (E, D))), plan.tier_of(rname))
            bias = ts.get(p + "exp_probs_b.bias", (E,), optional=True)
            shared = None
            if Fs:
                shared = DenseFFN(lin(p + "ffn_gate_shexp.weight", (Fs, D)),
                                  lin(p + "ffn_up_shexp.weight", (Fs, D)),
                                  lin(p + "ffn_down_shexp.weight", (D, Fs)))
            block_ffn = MoE(cfg, i, router,
                            ExpertStack(ts.get(p + "ffn_gate_exps.weight"), E, Fe, D),
                            ExpertStack(ts.get(p + "ffn_up_exps.weight"), E, Fe, D),
                            ExpertStack(ts.get(p + "ffn_down_exps.weight"), E, D, Fe),
                            options, shared,
                            probs_bias=None if bias is None else plan.put(
                                bias.name, float_tensor(bias), plan.tier_of(bias.name)))
            if plan.has_gpu:
                from ..runtime.hetero import HeteroMoE
                block_ffn = HeteroMoE(block_ffn, plan)
        blocks.append(Block(vec(p + "attn_norm.weight", D), attn, vec(p + "ffn_norm.weight", D),
                            block_ffn))
        if progress is not None:
            progress(i + 1, cfg.n_layer)
    return blocks
