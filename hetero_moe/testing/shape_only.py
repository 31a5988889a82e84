"""Shape-only GGUF files of real MoE models: the real metadata and tensor table, no weights.

A shape-only file is what a Q4_K_M file of DeepSeek-R1 / Qwen3-235B-A22B / Qwen3-30B-A3B looks like
to anything that reads its header: every `{arch}.*` key the converter writes, every tensor with its
real name, shape and the ggml type llama.cpp's quantizer gives it, laid out at the offsets llama.cpp
would use. The data region is a hole: the header is written, then the file is extended to its full
logical size with truncate (hundreds of GB logical, a few MB on disk). Planners, `inspect` and
loaders' strict checks can run on real shapes without the real download; reading weights reads zeros.

The type of each tensor is predicted by `q4_k_m_type`, a transcription of the Q4_K_M branches of
llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp); tests/test_shape_only.py checks it against
llama.cpp's own quantizer on small models, tensor by tensor.

Dimension key: as in make_model.py (D hidden, L layers, E experts, Fe expert FFN width, C kv LoRA
rank, N no-rope head dim, R rope head dim, Dv value head dim); ne0 is a tensor's row length (numpy's
last dimension).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import HeteroMoEError, UnsupportedError
from . import make_model as mm

# Bump when the bytes written for a preset change; part of cache names.
FORMAT_VERSION = 1

ALIGNMENT = 32              # GGUF_DEFAULT_ALIGNMENT, what llama-quantize writes with
FTYPE_Q4_K_M = 15           # LLAMA_FTYPE_MOSTLY_Q4_K_M (general.file_type)
GGML_QNT_VERSION = 2        # general.quantization_version, set by llama-quantize
QK_K = 256                  # K-quant super-block


@dataclass(frozen=True)
class ShapePreset:
    """One real model: its make_model architecture and shapes, and what its tokenizer declares."""
    arch: str                  # make_model.ARCHES key
    p: mm.Preset
    title: str                 # general.name
    vocab: int
    tokenizer_pre: str         # tokenizer.ggml.pre
    bos: int
    eos: int
    yarn_beta: tuple[float, float] | None = None   # rope_scaling beta_fast / beta_slow in config.json


# Shapes from the models' config.json on Hugging Face.
SHAPE_PRESETS: dict[str, ShapePreset] = {
    # deepseek-ai/DeepSeek-R1 (DeepseekV3ForCausalLM; the MTP block 61 is not converted)
    "deepseek-r1": ShapePreset(
        "deepseek2",
        mm.Preset(hidden=7168, n_head=128, n_head_kv=128, head_dim=192, n_layer=61, ff=18432,
                  n_expert=256, n_expert_used=8, expert_ff=2048, shared_ff=2048, context=163840,
                  rope_base=10000.0, rms_eps=1e-6, only=("deepseek2",),
                  mla=mm.MLAPreset(q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64, v_head=128,
                                   n_shared=1, dense_lead=3, gating="sigmoid", n_group=8,
                                   n_group_used=4, weights_norm=True, weights_scale=2.5,
                                   yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0)),
        title="DeepSeek R1", vocab=129280, tokenizer_pre="deepseek-v3", bos=0, eos=1,
        yarn_beta=(32.0, 1.0)),
    # Qwen/Qwen3-235B-A22B
    "qwen3-235b-a22b": ShapePreset(
        "qwen3moe",
        mm.Preset(hidden=4096, n_head=64, n_head_kv=4, head_dim=128, n_layer=94, ff=12288,
                  n_expert=128, n_expert_used=8, expert_ff=1536, shared_ff=0, context=40960,
                  rope_base=1_000_000.0, rms_eps=1e-6, only=("qwen3moe",)),
        title="Qwen3 235B A22B", vocab=151936, tokenizer_pre="qwen2", bos=151643, eos=151645),
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": ShapePreset(
        "qwen3moe",
        mm.Preset(hidden=2048, n_head=32, n_head_kv=4, head_dim=128, n_layer=48, ff=6144,
                  n_expert=128, n_expert_used=8, expert_ff=768, shared_ff=0, context=40960,
                  rope_base=1_000_000.0, rms_eps=1e-6, only=("qwen3moe",)),
        title="Qwen3 30B A3B", vocab=151936, tokenizer_pre="qwen2", bos=151643, eos=151645),
}


def resolve(preset: str) -> tuple[ShapePreset, mm.Shape]:
    """The preset and its concrete shape; unknown names fail with the choices."""
    if preset not in SHAPE_PRESETS:
        raise UnsupportedError(f"unknown shape-only preset {preset!r}; choose one of: "
                               f"{', '.join(SHAPE_PRESETS)}")
    sp = SHAPE_PRESETS[preset]
    # like mm.resolve_shape: MLA files are MQA over the latent (one KV head)
    n_head_kv = 1 if mm.ARCHES[sp.arch].mla_split else sp.p.n_head_kv
    return sp, mm.Shape(p=sp.p, n_layer=sp.p.n_layer, n_head_kv=n_head_kv, vocab=sp.vocab)


# ---------------------------------------------------------------------------------------------------
# Q4_K_M type selection, after llama.cpp src/llama-quant.cpp (llama_tensor_get_type and helpers)


def _ggml_types():
    import gguf
    return gguf.GGMLQuantizationType


# Substrings that tensor_allows_quantization() keeps in their source type, for any architecture
# (besides 1-D tensors, names not ending in "weight", and norms).
_NEVER_QUANTIZED = (
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")

# tensor_get_category(): exact names first, then the first substring that matches, in this order
# ("attn_k_b.weight", "attn_q_a.weight" ... match none of them and are "other").
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
    ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)
# category_is_attn_v(): the tensors that share attn_v's counter and rules
ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")


def category(name: str) -> str:
    """llama.cpp's tensor_category for `name`, as a short string ("other" when none applies)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return "other"


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing ne of 1 do not count (numpy order: leading 1s)."""
    ne = list(reversed(shape))
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return len(ne)


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization() with default params (quantize_output_tensor on)."""
    if _n_dims(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    return name not in _NEVER_QUANTIZED_EXACT and not any(s in name for s in _NEVER_QUANTIZED)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _fallback(t, ne0: int):
    """tensor_type_fallback(): a row that is not whole blocks of the type takes a 32-block type,
    and F16 when it is not whole 32-blocks either."""
    import gguf
    T = _ggml_types()
    if ne0 % gguf.GGML_QUANT_SIZES[t][0] == 0:
        return t
    fb = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(t, t)
    return fb if ne0 % gguf.GGML_QUANT_SIZES[fb][0] == 0 else T.F16


def q4_k_m_type(name: str, shape: Sequence[int], n_layer: int, n_expert: int, *,
                tied: bool = False, attn_v: tuple[int, int] = (0, 1), ffn_down_index: int = 0,
                source=None):
    """The ggml type llama.cpp's quantizer gives tensor `name` (numpy `shape`) in a Q4_K_M file.

    n_layer:  block count (llama.cpp's n_layer_all);  n_expert: expert_count (0 for dense models).
    tied:     the file has no output.weight, so token_embd doubles as the lm_head.
    attn_v:   (index, count) of this tensor among the file's attn_v / attn_qkv / attn_kv_b tensors
              in quantizer order (qs.i_attention_wv, qs.n_attention_wv).
    ffn_down_index: how many ffn_down tensors came before it (dense models only: MoE models take
              the layer from the name).
    source:   the type in the converted file, kept by tensors that are never quantized (F32).
    """
    T = _ggml_types()
    if not quantizable(name, shape):
        return T.F32 if source is None else source
    ne0, cat = shape[-1], category(name)
    t = T.Q4_K                   # llama_ftype_get_default_type(Q4_K_M)
    # llama_tensor_get_type_impl, the branches that apply to Q4_K_M:
    if cat == "output" or (tied and cat == "token_embd"):
        # output (or tied embedding): Q8_0 when the row is not whole Q4_K blocks, else Q6_K
        t = T.Q8_0 if ne0 % QK_K else T.Q6_K
    elif cat == "token_embd":
        pass                     # untied embeddings stay at the default type
    elif cat in ATTN_V_LIKE:
        i, n = attn_v
        if use_more_bits(i, n):
            t = T.Q6_K           # Q4_K_M/Q5_K_M: more bits on attn_v in the chosen layers
        # (a LLM_TYPE_70B model would bump Q4_K -> Q5_K here; no MoE model has that type)
        if n_expert == 8:
            t = T.Q8_0           # 8-expert models (Mixtral): attn_v to Q8_0
    elif cat == "attn_k":
        if n_expert == 8:
            t = T.Q8_0           # 8-expert models: attn_k to Q8_0
    elif cat == "ffn_down":
        # layer_info(): MoE models parse the layer from the name, dense ones count ffn_down tensors
        i = int(name.split(".")[1]) if max(1, n_expert) > 1 else ffn_down_index
        if use_more_bits(i, n_layer):
            t = T.Q6_K           # Q4_K_M (not Falcon): ffn_down (and _exps/_shexp) in chosen layers
    elif cat == "attn_output":
        if n_expert == 8:
            t = T.Q5_K           # 8-expert models: attn_output to Q5_K for Q4_K_M
    elif cat == "attn_qkv":
        t = T.Q5_K
    # attn_q, ffn_gate*, ffn_up* and "other" (attn_q_a/_b, attn_kv_a_mqa, attn_k_b, attn_v_b) keep
    # the default; then tensor_type_fallback() for rows that are not whole blocks
    return _fallback(t, ne0)


def weight_order(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: the order llama-quantize reads and writes tensors
    (non-block tensors first, then by block number, then by name)."""
    parts = name.split(".")
    layer = int(parts[1]) if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() else -1
    return layer, name


def q4_k_m_types(tensors: Iterable[tuple[str, Sequence[int]]], n_layer: int, n_expert: int
                 ) -> dict[str, object]:
    """name -> ggml type for a whole file, with llama-quantize's counters (attn_v, dense ffn_down)."""
    ordered = sorted(tensors, key=lambda t: weight_order(t[0]))
    names = [n for n, _ in ordered]
    tied = "output.weight" not in names
    n_attn_v = sum(category(n) in ATTN_V_LIKE for n in names)   # init_quantize_state_counters
    i_attn_v = i_ffn_down = 0
    out = {}
    for name, shape in ordered:
        out[name] = q4_k_m_type(name, shape, n_layer, n_expert, tied=tied,
                                attn_v=(i_attn_v, n_attn_v), ffn_down_index=i_ffn_down)
        if quantizable(name, shape):   # the counters move only where the type rules ran
            i_attn_v += category(name) in ATTN_V_LIKE
            i_ffn_down += category(name) == "ffn_down"
    return out


# ---------------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]      # numpy order
    ggml_type: object           # gguf.GGMLQuantizationType
    offset: int                 # from the start of the data region, a multiple of ALIGNMENT
    nbytes: int

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return self.shape[:-1] + (self.nbytes // math.prod(self.shape[:-1]),)


def _pad(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def tensor_nbytes(shape: Sequence[int], ggml_type) -> int:
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % block:
        raise HeteroMoEError(f"row of {shape[-1]} elements is not whole {ggml_type.name} blocks "
                             f"of {block}")
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def plan(preset: str) -> list[PlannedTensor]:
    """Every tensor of the preset's Q4_K_M file in llama-quantize's order, with type, offset, size."""
    sp, s = resolve(preset)
    return q4_k_m_layout([(t.name, t.shape) for t in mm.tensor_plan(sp.arch, s)],
                         s.n_layer, sp.p.n_expert)


def q4_k_m_layout(tensors: Sequence[tuple[str, Sequence[int]]], n_layer: int, n_expert: int
                  ) -> list[PlannedTensor]:
    """The tensor table llama-quantize writes for a Q4_K_M file of these tensors."""
    types = q4_k_m_types(tensors, n_layer, n_expert)
    out, offset = [], 0
    for name, shape in sorted(tensors, key=lambda t: weight_order(t[0])):
        nbytes = tensor_nbytes(shape, types[name])
        out.append(PlannedTensor(name, tuple(shape), types[name], offset, nbytes))
        offset += _pad(nbytes)    # GGUFWriter and gguf.c both pad every tensor, the last one too
    return out


def data_size(tensors: Sequence[PlannedTensor]) -> int:
    return tensors[-1].offset + _pad(tensors[-1].nbytes)


# ---------------------------------------------------------------------------------------------------
# writing


def _add_metadata(w, sp: ShapePreset, s: mm.Shape) -> None:
    import gguf

    w.add_type("model")
    w.add_name(sp.title)
    mm.add_arch_metadata(w, sp.arch, s)
    if sp.yarn_beta is not None:
        a, R = mm.ARCHES[sp.arch].gguf_arch, gguf.Keys.Rope
        w.add_float32(R.SCALING_YARN_BETA_FAST.format(arch=a), sp.yarn_beta[0])
        w.add_float32(R.SCALING_YARN_BETA_SLOW.format(arch=a), sp.yarn_beta[1])
    w.add_file_type(FTYPE_Q4_K_M)
    w.add_quantization_version(GGML_QNT_VERSION)
    w.add_custom_alignment(ALIGNMENT)
    # placeholder vocabulary of the real size; no merges, so the header stays a few MB
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(sp.tokenizer_pre)
    w.add_token_list([f"<t{i}>" for i in range(sp.vocab)])
    special = {sp.bos, sp.eos}
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for i in range(sp.vocab)])
    w.add_bos_token_id(sp.bos)
    w.add_eos_token_id(sp.eos)


def write_shape_only(preset: str, out_path: str | os.PathLike) -> Path:
    """Write the shape-only Q4_K_M file of `preset` to out_path (sparse; appears only when done)."""
    import gguf
    import numpy as np

    sp, s = resolve(preset)
    tensors = plan(preset)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(tmp, mm.ARCHES[sp.arch].gguf_arch)
        _add_metadata(w, sp, s)
        for t in tensors:
            w.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.ggml_type)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            header = w.fout[0].tell()
        finally:
            w.close()
        # the data region is a hole: the padding after the header and every tensor read as zeros
        os.truncate(tmp, _pad(header) + data_size(tensors))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def cache_name(preset: str) -> str:
    resolve(preset)
    return f"shape-only-{preset}-Q4_K_M-v{FORMAT_VERSION}.gguf"


def shape_only_model(preset: str) -> Path:
    """Path of the shape-only file in cache_dir()/test-models/, written on first use."""
    from ..config_env import cache_dir

    path = cache_dir() / "test-models" / cache_name(preset)
    if path.exists():
        return path
    return write_shape_only(preset, path)


def main_shape_only(preset: str, out: Path | None, cache: bool) -> int:
    """The --shape-only branch of scripts/make_test_model.py."""
    t0 = time.perf_counter()
    try:
        path = shape_only_model(preset) if cache else write_shape_only(preset, out)
    except HeteroMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = path.stat()
    print(f"{path}  {st.st_size / 1e9:.1f} GB logical, {st.st_blocks * 512 / 2**20:.1f} MiB on disk  "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
