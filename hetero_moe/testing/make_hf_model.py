"""Random-weight Hugging Face checkpoints in GPTQ or AWQ int4, laid out as AutoGPTQ/GPTQModel and
AutoAWQ write them, plus the same weights dequantized as an F32 GGUF with llama.cpp's names (the
"twin" llama.cpp runs as the reference).

The weights are make_model's (same seed, same names, same values before quantization). Linear
layers inside the blocks are quantized (routers and the shared-expert gate stay float, as the
tools leave them); embeddings, norms, routers and the lm_head are stored as fp16. The twin holds
exactly what the checkpoint means: s * (q - z) per weight, and the fp16 values of the rest.

Formats (see hetero_moe/hf/quant.py for the bit layout):
  gptq: qweight [in/8, out], qzeros [G, out/8] (v1: z - 1 stored), scales [G, out] fp16,
        g_idx [in]; symmetric (z = 8) or asymmetric (z in 1..15, so z - 1 never wraps, which
        AutoGPTQ's v1 packing cannot represent); desc_act draws a random column order whose
        consecutive runs of group_size columns form the groups.
  awq:  qweight [in, out/8], qzeros [G, out/8], nibble order [0, 2, 4, 6, 1, 3, 5, 7], scales.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import UnsupportedError
from ..hf.checkpoint import _permute_rows
from ..hf.quant import AWQ_ORDER
from . import make_model as mm

HF_ARCH = {   # make_model arch -> (architectures[0], model_type, experts module, expert names)
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "llama-moe": ("MixtralForCausalLM", "mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
    "llama": ("LlamaForCausalLM", "llama", None, None),
    "deepseek2-kvb": ("DeepseekV3ForCausalLM", "deepseek_v3", "mlp",
                      ("gate_proj", "up_proj", "down_proj")),
}
FORMATS = ("gptq", "awq")
QUANTIZED = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
             "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
             "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
             "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b")


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    fmt: str = "gptq"
    group_size: int = 128
    sym: bool = True             # gptq only; awq is always asymmetric
    desc_act: bool = False       # gptq only
    v2: bool = False             # gptq checkpoint_format "gptq_v2" (zeros stored as is)
    lm_head: bool = False        # quantize the lm_head too (GPTQModel's `lm_head: true`)


# ---------------------------------------------------------------------------------- quantize

def quantize(w: np.ndarray, o: QuantOptions, rng: np.random.Generator):
    """float32 [out, in] -> (q uint8 [out, in], zeros int [out, G], scales fp16 [out, G],
    g_idx int32 [in]) the way GPTQ/AWQ's min-max quantizers pick scales and zeros."""
    n_out, n_in = w.shape
    gs = o.group_size
    G = n_in // gs
    perm = rng.permutation(n_in) if o.desc_act else np.arange(n_in)
    g_idx = np.empty(n_in, dtype=np.int32)
    g_idx[perm] = np.arange(n_in) // gs
    wg = w[:, perm].reshape(n_out, G, gs)                            # [out, G, gs]
    if o.fmt == "gptq" and o.sym:
        xmax = np.abs(wg).max(-1)
        scale = (2 * xmax / 15).astype(np.float16)
        zero = np.full((n_out, G), 8, dtype=np.int16)
    else:
        xmin, xmax = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
        scale = ((xmax - xmin) / 15).astype(np.float16)
        lo = 0 if o.fmt == "awq" or o.v2 else 1
        zero = np.clip(np.round(-xmin / scale.astype(np.float32)), lo, 15).astype(np.int16)
    s32 = scale.astype(np.float32)
    qg = np.clip(np.round(wg / s32[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    q = np.empty((n_out, n_in), dtype=np.uint8)
    q[:, perm] = qg.reshape(n_out, n_in)
    return q, zero, scale, g_idx


def dequantized(q, zero, scale, g_idx) -> np.ndarray:
    """s * (q - z) in float32 (exact), [out, in]."""
    return scale.astype(np.float32)[:, g_idx] * (q.astype(np.float32) - zero[:, g_idx])


def _pack_rows(a: np.ndarray, order=(0, 1, 2, 3, 4, 5, 6, 7)) -> np.ndarray:
    """uint8 [..., n] (values 0..15) -> int32 [..., n/8]: nibble k of word c holds a[..., 8c+order[k]]."""
    a8 = a.reshape(*a.shape[:-1], -1, 8).astype(np.uint32)
    word = np.zeros(a8.shape[:-1], dtype=np.uint32)
    for k, j in enumerate(order):
        word |= a8[..., j] << np.uint32(4 * k)
    return word.view(np.int32)


def pack(q, zero, scale, g_idx, o: QuantOptions) -> dict[str, np.ndarray]:
    """The layer's tensors by suffix, as the tool writes them."""
    if o.fmt == "gptq":
        z = zero - (0 if o.v2 else 1)
        if z.min() < 0:
            raise UnsupportedError("GPTQ v1 cannot store a zero point of 0")
        return {"qweight": _gptq_qweight(q),
                "qzeros": _pack_rows(np.ascontiguousarray(z.T).astype(np.uint8)),
                "scales": np.ascontiguousarray(scale.T), "g_idx": g_idx}
    return {"qweight": _pack_rows(np.ascontiguousarray(q.T), AWQ_ORDER),
            "qzeros": _pack_rows(np.ascontiguousarray(zero.T).astype(np.uint8), AWQ_ORDER),
            "scales": np.ascontiguousarray(scale.T)}


def _gptq_qweight(q: np.ndarray) -> np.ndarray:
    """[out, in] codes -> int32 [in/8, out]: input column i in nibble i%8 of row i//8."""
    n_out, n_in = q.shape
    qt = q.T.reshape(n_in // 8, 8, n_out).astype(np.uint32)         # [in/8, 8, out]
    word = np.zeros((n_in // 8, n_out), dtype=np.uint32)
    for k in range(8):
        word |= qt[:, k, :] << np.uint32(4 * k)
    return word.view(np.int32)


# ---------------------------------------------------------------------------------- folder files

def hf_config(arch: str, s: mm.Shape, o: QuantOptions | None) -> dict:
    """config.json as transformers writes it for this shape."""
    name, model_type, _, _ = HF_ARCH[arch]
    p = s.p
    c = {"architectures": [name], "model_type": model_type, "hidden_size": p.hidden,
         "num_hidden_layers": s.n_layer, "num_attention_heads": p.n_head,
         "num_key_value_heads": s.n_head_kv, "max_position_embeddings": p.context,
         "rms_norm_eps": p.rms_eps, "rope_theta": p.rope_base, "vocab_size": s.vocab,
         "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "silu",
         "bos_token_id": 1, "eos_token_id": 2}
    if arch == "qwen3moe":
        c.update(head_dim=p.head_dim, intermediate_size=p.ff, moe_intermediate_size=p.expert_ff,
                 num_experts=p.n_expert, num_experts_per_tok=p.n_expert_used,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    elif arch == "qwen2moe":
        c.update(intermediate_size=p.ff, moe_intermediate_size=p.expert_ff,
                 shared_expert_intermediate_size=p.shared_ff, num_experts=p.n_expert,
                 num_experts_per_tok=p.n_expert_used, norm_topk_prob=False,
                 decoder_sparse_step=1, mlp_only_layers=[])
    elif arch == "llama-moe":
        c.update(intermediate_size=p.expert_ff, num_local_experts=p.n_expert,
                 num_experts_per_tok=p.n_expert_used)
    elif arch == "deepseek2-kvb":
        m = s.m
        c.update(num_key_value_heads=p.n_head, q_lora_rank=m.q_lora or None,
                 kv_lora_rank=m.kv_lora, qk_nope_head_dim=m.qk_nope, qk_rope_head_dim=m.qk_rope,
                 v_head_dim=m.v_head, intermediate_size=p.ff, moe_intermediate_size=p.expert_ff,
                 n_routed_experts=p.n_expert, num_experts_per_tok=p.n_expert_used,
                 n_shared_experts=m.n_shared, first_k_dense_replace=m.dense_lead,
                 moe_layer_freq=1, norm_topk_prob=m.weights_norm,
                 routed_scaling_factor=m.weights_scale, scoring_func=m.gating,
                 topk_method="noaux_tc" if m.gating == "sigmoid" else "greedy",
                 n_group=m.n_group or 1, topk_group=m.n_group_used or 1,
                 attention_bias=False)
        if m.yarn_factor:
            c["rope_scaling"] = {"type": "yarn", "factor": m.yarn_factor,
                                 "original_max_position_embeddings": m.yarn_orig_ctx,
                                 "mscale": m.yarn_mscale_all_dim,
                                 "mscale_all_dim": m.yarn_mscale_all_dim,
                                 "beta_fast": 32, "beta_slow": 1}
    else:
        c.update(intermediate_size=p.ff)
    if o is not None:
        c["quantization_config"] = quant_config(o)
    return c


def quant_config(o: QuantOptions) -> dict:
    if o.fmt == "gptq":
        return {"bits": 4, "group_size": o.group_size, "damp_percent": 0.01,
                "desc_act": o.desc_act, "static_groups": False, "sym": o.sym,
                "true_sequential": True, "model_name_or_path": None, "lm_head": o.lm_head,
                "model_file_base_name": "model", "quant_method": "gptq",
                "checkpoint_format": "gptq_v2" if o.v2 else "gptq"}
    return {"quant_method": "awq", "zero_point": True, "group_size": o.group_size, "bits": 4,
            "version": "gemm", "modules_to_not_convert": None}


def tokenizer_files() -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json of the test models' tokenizer (SmolLM2's), as
    published on the Hub: byte-level BPE, digits split one by one, 17 special tokens."""
    kv = {k: v for k, v, *_ in mm._tokenizer_kv()}
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    special = [i for i, t in enumerate(types) if t == 3]
    tj = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[0],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(kv["tokenizer.ggml.merges"])},
    }
    tc = {"add_prefix_space": False, "bos_token": tokens[kv["tokenizer.ggml.bos_token_id"]],
          "eos_token": tokens[kv["tokenizer.ggml.eos_token_id"]],
          "unk_token": tokens[kv["tokenizer.ggml.unknown_token_id"]],
          "pad_token": tokens[kv["tokenizer.ggml.padding_token_id"]],
          "clean_up_tokenization_spaces": False, "model_max_length": 8192,
          "tokenizer_class": "GPT2Tokenizer", "chat_template": kv["tokenizer.chat_template"],
          "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False,
                                            "normalized": False, "rstrip": False,
                                            "single_word": False, "special": True}
                                   for i in special}}
    return tj, tc


SPM_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few "
    "of many feed-forward networks; only those run, so a large model decodes like a small one. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159. Code: def f(x):\n    return x * 2\n"
    "Unicode: café naïve über straße, 日本語のテキスト, Ελληνικά, русский текст, emoji 🙂🚀. "
    "Tabs\tand  double  spaces,   leading and trailing spaces.  "
)


def spm_tokenizer_files(vocab_size: int = 600, scheme: str = "prepend") -> tuple[dict, dict]:
    """tokenizer.json / tokenizer_config.json in the SentencePiece style Llama-2, Mistral and
    Mixtral ship: ids 0-2 <unk> <s> </s>, 3-258 the byte pieces <0x00>..<0xFF>, then BPE pieces
    over "\u2581"-joined words (trained by `tokenizers`' BpeTrainer on a small built-in corpus),
    byte_fallback; spaces by the legacy normalizer Prepend("\u2581") + Replace(" ", "\u2581")
    (scheme "prepend"), or by a Metaspace pre-tokenizer with prepend_scheme "first"/"always"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    sp = "\u2581"
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # pieces within words, "\u2581" leading, as SentencePiece learns them
    base.pre_tokenizer = pre_tokenizers.Metaspace(sp, prepend_scheme="always", split=True)
    trainer = BpeTrainer(vocab_size=vocab_size - 259, special_tokens=[], show_progress=False,
                         min_frequency=1)
    base.train_from_iterator([SPM_CORPUS] * 4, trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    if scheme == "prepend":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(sp),
                                               normalizers.Replace(" ", sp)])
        tok.decoder = decoders.Sequence([decoders.Replace(sp, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(sp, prepend_scheme=scheme, split=False)
        tok.decoder = decoders.Sequence([decoders.Metaspace(sp, prepend_scheme=scheme,
                                                            split=False),
                                         decoders.ByteFallback(), decoders.Fuse()])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tj = json.loads(tok.to_str())
    tc = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
          "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False,
          "legacy": scheme == "prepend", "model_max_length": 32768,
          "tokenizer_class": "LlamaTokenizer",
          "chat_template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                           "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
                           "{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
          "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False,
                                            "special": True}
                                   for i, t in enumerate(("<unk>", "<s>", "</s>"))}}
    return tj, tc


def _hf_names(arch: str, gguf_name: str) -> list[str] | str | None:
    """GGUF tensor name -> HF module name (a list for ffn_*_exps: one per expert, filled later)."""
    _, _, moe, exp = HF_ARCH[arch]
    fixed = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    base, suffix = gguf_name.rsplit(".", 1)
    if base in fixed:
        return fixed[base] + "." + suffix
    _, i, kind = base.split(".", 2)
    L = f"model.layers.{i}."
    m = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
         "ffn_up_shexp": "mlp.shared_expert.up_proj",
         "ffn_down_shexp": "mlp.shared_expert.down_proj",
         "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
         "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
         "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
         "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj"}
    if arch.startswith("deepseek2"):
        for k in ("gate", "up", "down"):
            m[f"ffn_{k}_shexp"] = f"mlp.shared_experts.{k}_proj"
    if kind == "exp_probs_b":
        return f"{L}{moe}.gate.e_score_correction_bias"
    if kind == "ffn_gate_inp":
        return f"{L}{moe}.gate.{suffix}"
    if kind.endswith("_exps"):
        e = exp[("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps").index(kind)]
        return f"{L}{moe}.experts.{{e}}.{e}"
    return f"{L}{m[kind]}.{suffix}"


def make_hf_test_model(arch: str, out_dir: str | os.PathLike, quant: QuantOptions | None,
                       preset: str = "tiny", layers: int | None = None, seed: int = 0,
                       twin: str | os.PathLike | None = None, shards: int = 2,
                       write_twin: bool = True, tokenizer: str = "bpe") -> tuple[Path, Path | None]:
    """Write the checkpoint folder and its F32 GGUF twin (default: `<out_dir>.f32.gguf`; not
    written with write_twin=False, e.g. for benchmark-size models). quant None writes an
    unquantized fp16 checkpoint. tokenizer: "bpe" (SmolLM2's byte-level BPE, the twin's) or
    "spm" / "spm-first" (a small SentencePiece-style vocabulary, see spm_tokenizer_files; the
    twin keeps the byte-level one: token ids, not text, are compared). Returns (folder, twin
    path or None)."""
    if tokenizer not in ("bpe", "spm", "spm-first", "spm-always"):
        raise UnsupportedError(f"tokenizer {tokenizer!r}; choose bpe, spm, spm-first or "
                               f"spm-always")
    import gguf
    from safetensors.numpy import save_file

    if arch not in HF_ARCH:
        raise UnsupportedError(f"architecture {arch!r} has no Hugging Face layout here "
                               f"(choose one of: {', '.join(HF_ARCH)})")
    if quant is not None and quant.fmt not in FORMATS:
        raise UnsupportedError(f"format {quant.fmt!r}; choose one of: {', '.join(FORMATS)}")
    s = mm.resolve_shape(arch, preset, layers)
    s = dataclasses.replace(s, vocab=mm._vocab_size())
    out = Path(out_dir)
    twin = Path(twin) if twin else out.with_name(out.name + ".f32.gguf")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng([seed, 7])
    plan = mm.tensor_plan(arch, s)
    hf: dict[str, np.ndarray] = {}
    twin_values: dict[str, np.ndarray] = {}
    n_head, n_kv = s.p.n_head, s.n_head_kv
    for t in plan:
        w = mm._init_tensor(t, seed)
        base, suffix = t.name.rsplit(".", 1)
        kind = base.split(".")[-1]
        name = _hf_names(arch, t.name)
        perm = None
        if HF_ARCH[arch][0] in ("MixtralForCausalLM", "LlamaForCausalLM") and \
                kind in ("attn_q", "attn_k"):
            perm = _permute_rows(w.shape[0], n_head if kind == "attn_q" else n_kv)
            w = w[np.argsort(perm)]                       # HF row order
        quantize_it = kind in QUANTIZED or (kind == "output" and quant is not None
                                             and quant.lm_head)
        if quant is not None and w.shape[-1] % quant.group_size:
            quantize_it = False      # the tools leave a layer whose width no group divides
        if quant is not None and quantize_it and suffix == "weight":
            mats = w if kind.endswith("_exps") else w[None]
            deq = np.empty_like(mats)
            for e, m in enumerate(mats):
                q, z, sc, gi = quantize(m, quant, rng)
                deq[e] = dequantized(q, z, sc, gi)
                mod = name.format(e=e) if kind.endswith("_exps") else name.rsplit(".", 1)[0]
                for sfx, arr in pack(q, z, sc, gi, quant).items():
                    hf[f"{mod}.{sfx}"] = arr
            w = deq if kind.endswith("_exps") else deq[0]
        else:
            w16 = w.astype(np.float16)
            if kind == "ffn_gate_inp_shexp":
                hf[name] = w16[None]                          # HF: Linear(D, 1) weight [1, D]
            elif kind.endswith("_exps"):
                for e in range(w.shape[0]):
                    hf[name.format(e=e) + ".weight"] = w16[e]
            else:
                hf[name] = w16
            w = w16.astype(np.float32)
        if perm is not None:
            w = w[perm]                                        # back to llama.cpp's row order
        if write_twin:
            twin_values[t.name] = np.ascontiguousarray(w, dtype=np.float32)
    # shards (with the index file when more than one), as save_pretrained splits them
    names = list(hf)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        chunk = names[k * per:(k + 1) * per]
        fname = "model.safetensors" if shards == 1 else \
            f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: np.ascontiguousarray(hf[n]) for n in chunk}, str(tmp / fname),
                  metadata={"format": "pt"})
        for n in chunk:
            weight_map[n] = fname
            total += hf[n].nbytes
    if shards > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config(arch, s, quant), indent=2))
    if quant is not None:
        extra = "quantize_config.json" if quant.fmt == "gptq" else "quant_config.json"
        qc = quant_config(quant) if quant.fmt == "gptq" else {
            "zero_point": True, "q_group_size": quant.group_size, "w_bit": 4, "version": "GEMM"}
        (tmp / extra).write_text(json.dumps(qc, indent=2))
    tj, tc = tokenizer_files() if tokenizer == "bpe" else spm_tokenizer_files(
        scheme={"spm": "prepend", "spm-first": "first", "spm-always": "always"}[tokenizer])
    (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if not write_twin:
        return out, None
    # the F32 twin: make_model's metadata, these values
    twin_tmp = twin.with_name(f".{twin.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(twin_tmp, mm.ARCHES[arch].gguf_arch)
    mm._add_metadata(w, arch, preset, s, seed)
    for t in plan:
        w.add_tensor(t.name, twin_values[t.name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(twin_tmp, twin)
    return out, twin


def cached_hf_test_model(arch: str, quant: QuantOptions | None, preset: str = "tiny",
                         layers: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(folder, twin) under cache_dir()/test-models/, built on first use."""
    from ..config_env import cache_dir
    s = mm.resolve_shape(arch, preset, layers)
    q = "f16" if quant is None else (
        f"{quant.fmt}-g{quant.group_size}" + ("-sym" if quant.sym and quant.fmt == "gptq" else "")
        + ("-act" if quant.desc_act else "") + ("-v2" if quant.v2 else ""))
    out = cache_dir() / "test-models" / f"hf-{arch}-{preset}-L{s.n_layer}-{q}-s{seed}-v1"
    twin = out.with_name(out.name + ".f32.gguf")
    if out.exists() and twin.exists():
        return out, twin
    return make_hf_test_model(arch, out, quant, preset, layers, seed, twin)
