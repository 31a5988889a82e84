"""A Hugging Face checkpoint folder presented as a GGUFFile: config.json as `{arch}.*` metadata,
tokenizer.json as `tokenizer.*` keys, and the safetensors tensors under llama.cpp's names (with
llama.cpp's shapes and row order), so the registry, the decoder and the planner run it unchanged.

Float tensors (F32/F16/BF16) are zero-copy views of the mapped shards. GPTQ/AWQ layers are repacked
once at load into Q4_0/Q5_0 blocks (exact, see hf/quant.py); per-expert tensors are stacked into
one [E, rows, cols] tensor, as GGUF stores them. Those tensors live in memory, not in the map.
Act-order layers: a gated FFN's down_proj gets its columns sorted by group and its gate/up rows
permuted alike (exact Q4_0/Q5_0); other scattered layers are re-quantized (FFN: Q8_0, attention:
F16).

Dimension key: E experts, D hidden, F ffn width, H heads, Dh head dim.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GGUFFormatError, MissingKeyError, UnsupportedError
from ..gguf import GGUFFile, TensorInfo
from . import quant as hq
from .safetensors_io import STensor, open_shards
from .tokenizer import tokenizer_metadata

FLOAT_TYPES = {"F32": (0, "F32"), "F16": (1, "F16"), "BF16": (30, "BF16")}
_QSUFFIX = ("qweight", "qzeros", "scales", "g_idx")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def is_hf_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists()


# -------------------------------------------------------------------------------- config.json

@dataclass(frozen=True)
class Layout:
    """How one HF architecture maps: its GGUF arch and the HF -> GGUF tensor names."""
    gguf_arch: str
    moe: str | None          # HF module of the routed experts ("mlp", "block_sparse_moe") or None
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    permute_qk: bool = False  # llama.cpp's NORM RoPE wants q/k rows interleaved per head


LAYOUTS = {
    "Qwen3MoeForCausalLM": Layout("qwen3moe", "mlp"),
    "Qwen2MoeForCausalLM": Layout("qwen2moe", "mlp"),
    "MixtralForCausalLM": Layout("llama", "block_sparse_moe", ("w1", "w3", "w2"), True),
    "LlamaForCausalLM": Layout("llama", None, permute_qk=True),
    "DeepseekV3ForCausalLM": Layout("deepseek2", "mlp"),
    "DeepseekV2ForCausalLM": Layout("deepseek2", "mlp"),
}


class _Cfg:
    """Typed config.json access; errors name the file and the key."""

    def __init__(self, cfg: dict, path: Path):
        self.cfg, self.path = cfg, path

    def get(self, key, default=None, kind=(int, float)):
        v = self.cfg.get(key, default)
        if v is None and default is None:
            raise MissingKeyError(f"{self.path}: required key {key!r} is missing")
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise MissingKeyError(f"{self.path}: key {key!r} = {v!r} has the wrong type")
        return v


def _f32(v) -> float:
    """GGUF stores these as float32: round like the converter so both runtimes see one value."""
    return float(np.float32(v))


def gguf_metadata(cfg: dict, path: Path) -> tuple[Layout, dict]:
    """config.json -> (Layout, the `{arch}.*` keys llama.cpp's converter would write)."""
    archs = cfg.get("architectures") or []
    name = archs[0] if archs else None
    if name not in LAYOUTS:
        raise UnsupportedError(f"{path}: architecture {name!r} is not supported (supported: "
                               f"{', '.join(LAYOUTS)})")
    lay, c = LAYOUTS[name], _Cfg(cfg, path)
    a = lay.gguf_arch
    D, H = c.get("hidden_size", kind=int), c.get("num_attention_heads", kind=int)
    md = {
        "general.architecture": a, "general.name": cfg.get("_name_or_path", "") or path.parent.name,
        f"{a}.embedding_length": D,
        f"{a}.block_count": c.get("num_hidden_layers", kind=int),
        f"{a}.attention.head_count": H,
        f"{a}.attention.head_count_kv": c.get("num_key_value_heads", H, int),
        f"{a}.context_length": c.get("max_position_embeddings", 4096, int),
        f"{a}.attention.layer_norm_rms_epsilon": _f32(c.get("rms_norm_eps")),
        f"{a}.rope.freq_base": _f32(c.get("rope_theta", 10000.0)),
        f"{a}.vocab_size": c.get("vocab_size", kind=int),
    }
    head_dim = cfg.get("head_dim") or D // H
    if head_dim != D // H or a == "qwen3moe":
        md[f"{a}.attention.key_length"] = md[f"{a}.attention.value_length"] = head_dim
    if a == "llama":
        md[f"{a}.rope.dimension_count"] = head_dim
    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "linear":
            md[f"{a}.rope.scaling.type"] = "linear"
            md[f"{a}.rope.scaling.factor"] = _f32(rs.get("factor", 1.0))
        elif kind == "yarn":        # the keys llama.cpp's converter writes
            for k in ("factor", "original_max_position_embeddings"):
                if not isinstance(rs.get(k), (int, float)) or rs[k] <= 0:
                    raise MissingKeyError(f"{path}: rope_scaling (yarn) needs a positive {k!r}, "
                                          f"got {rs.get(k)!r}")
            md[f"{a}.rope.scaling.type"] = "yarn"
            md[f"{a}.rope.scaling.factor"] = _f32(rs["factor"])
            md[f"{a}.rope.scaling.original_context_length"] = int(
                rs["original_max_position_embeddings"])
            if rs.get("attention_factor") is not None:
                # HF's attention_factor is the cos/sin multiplier itself; ggml multiplies
                # attn_factor by 1 + 0.1 ln(factor) on its own
                md[f"{a}.rope.scaling.attn_factor"] = _f32(
                    rs["attention_factor"] / (1.0 + 0.1 * math.log(rs["factor"])))
        elif kind != "default":
            raise UnsupportedError(f"{path}: rope_scaling type {kind!r} is not supported "
                                   f"(supported: linear, yarn)")
    if a == "deepseek2":
        _deepseek_metadata(cfg, c, md, path)
    elif lay.moe is None:
        md[f"{a}.feed_forward_length"] = c.get("intermediate_size", kind=int)
    elif name == "MixtralForCausalLM":
        md[f"{a}.expert_count"] = c.get("num_local_experts", kind=int)
        md[f"{a}.expert_used_count"] = c.get("num_experts_per_tok", kind=int)
        md[f"{a}.feed_forward_length"] = c.get("intermediate_size", kind=int)
    else:
        md[f"{a}.expert_count"] = c.get("num_experts", kind=int)
        md[f"{a}.expert_used_count"] = c.get("num_experts_per_tok", kind=int)
        md[f"{a}.expert_feed_forward_length"] = c.get("moe_intermediate_size", kind=int)
        md[f"{a}.feed_forward_length"] = c.get("intermediate_size", 0, int)
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedError(f"{path}: dense layers inside an MoE model (mlp_only_layers / "
                                   f"decoder_sparse_step) are not supported")
        norm = bool(cfg.get("norm_topk_prob", a == "qwen3moe"))
        if a == "qwen3moe":
            md[f"{a}.expert_weights_norm"] = norm
        else:
            if norm:
                raise UnsupportedError(f"{path}: norm_topk_prob = true is not supported for "
                                       f"{name} (llama.cpp's qwen2moe does not renormalise)")
            md[f"{a}.expert_shared_feed_forward_length"] = c.get(
                "shared_expert_intermediate_size", kind=int)
    return lay, md


def _deepseek_metadata(cfg: dict, c: _Cfg, md: dict, path: Path) -> None:
    """DeepSeek-V2/V3 config keys -> the deepseek2 keys llama.cpp's converter writes (the
    attn_kv_b layout: key/value_length are the decompressed head dims)."""
    a = "deepseek2"
    H = md[f"{a}.attention.head_count"]
    md[f"{a}.attention.head_count_kv"] = H                 # MLA: every head reads the latent
    if cfg.get("q_lora_rank"):
        md[f"{a}.attention.q_lora_rank"] = c.get("q_lora_rank", kind=int)
    else:
        md[f"{a}.attention.q_lora_rank"] = 0
    N, R = c.get("qk_nope_head_dim", kind=int), c.get("qk_rope_head_dim", kind=int)
    md[f"{a}.attention.kv_lora_rank"] = c.get("kv_lora_rank", kind=int)
    md[f"{a}.attention.key_length"] = N + R
    md[f"{a}.attention.value_length"] = c.get("v_head_dim", kind=int)
    md[f"{a}.rope.dimension_count"] = R
    if cfg.get("moe_layer_freq", 1) != 1:
        raise UnsupportedError(f"{path}: moe_layer_freq = {cfg.get('moe_layer_freq')!r} is not "
                               f"supported (every block after first_k_dense_replace is MoE)")
    md[f"{a}.leading_dense_block_count"] = c.get("first_k_dense_replace", 0, int)
    md[f"{a}.feed_forward_length"] = c.get("intermediate_size", kind=int)
    md[f"{a}.expert_feed_forward_length"] = c.get("moe_intermediate_size", kind=int)
    md[f"{a}.expert_count"] = c.get("n_routed_experts", kind=int)
    md[f"{a}.expert_used_count"] = c.get("num_experts_per_tok", kind=int)
    md[f"{a}.expert_shared_count"] = c.get("n_shared_experts", 0, int)
    md[f"{a}.expert_weights_scale"] = _f32(c.get("routed_scaling_factor", 1.0))
    md[f"{a}.expert_weights_norm"] = bool(cfg.get("norm_topk_prob", False))
    scoring = cfg.get("scoring_func", "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise UnsupportedError(f"{path}: scoring_func {scoring!r} is not supported (softmax, "
                               f"sigmoid)")
    md[f"{a}.expert_gating_func"] = 2 if scoring == "sigmoid" else 1
    groups = cfg.get("n_group") or 1
    if groups > 1:
        md[f"{a}.expert_group_count"] = int(groups)
        md[f"{a}.expert_group_used_count"] = c.get("topk_group", kind=int)
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "yarn":
        md[f"{a}.rope.scaling.yarn_log_multiplier"] = _f32(0.1 * rs.get("mscale_all_dim", 0.0))


# -------------------------------------------------------------------------------- tensor names

def _gguf_base(hf: str, lay: Layout) -> tuple[str, int | None] | None:
    """HF module name -> (GGUF base name, expert index or None); None when unknown."""
    fixed = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if hf in fixed:
        return fixed[hf], None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if not m:
        return None
    i, rest = m.group(1), m.group(2)
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj":
            "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
        "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
        # DeepSeek: Multi-head Latent Attention, shared experts (plural)
        "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
        "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
        "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
        "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj":
            "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp",
    }
    if lay.moe is not None:
        per_layer[f"{lay.moe}.gate"] = "ffn_gate_inp"
        e = re.fullmatch(re.escape(lay.moe) + r"\.experts\.(\d+)\.(\w+)", rest)
        if e and e.group(2) in lay.experts:
            kind = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")[lay.experts.index(e.group(2))]
            return f"blk.{i}.{kind}", int(e.group(1))
    if rest in per_layer:
        return f"blk.{i}.{per_layer[rest]}", None
    return None


def _permute_rows(n_out: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives q/k (NORM RoPE): within each head, row 2j+s of the
    GGUF tensor is row s*Dh/2 + j of the HF one."""
    dh = n_out // n_head
    r = np.arange(n_out).reshape(n_head, 2, dh // 2).transpose(0, 2, 1)
    return r.reshape(-1)


# -------------------------------------------------------------------------------- the adapter

class HFCheckpoint(GGUFFile):
    """A Hugging Face folder with the GGUFFile interface (metadata, tensors, require/get)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        try:
            self.config = json.loads(cfg_path.read_text("utf-8"))
        except json.JSONDecodeError as e:
            raise GGUFFormatError(f"{cfg_path}: not valid JSON ({e})") from None
        self.layout, md = gguf_metadata(self.config, cfg_path)
        self.qspec = hq.quant_spec(self.folder, self.config)
        md.update(tokenizer_metadata(self.folder, self.config))
        self.metadata = md
        self.value_types: dict = {}
        self.version = 3
        self._parts, st = open_shards(self.folder)
        self.paths = [Path(p.path) for p in self._parts]
        self.repacked: dict[str, str] = {}     # GGUF name -> what it was made from
        self.tensors = self._tensors(st)

    @property
    def path(self) -> str:
        return str(self.folder)

    # -- tensors -------------------------------------------------------------------------------
    def _tensors(self, st: dict[str, STensor]) -> dict[str, TensorInfo]:
        lay, cfg = self.layout, self.config
        tied = bool(cfg.get("tie_word_embeddings", False))
        groups: dict[str, dict[str, STensor]] = {}
        for name, t in st.items():
            if _IGNORED.match(name) or (tied and name == "lm_head.weight"):
                continue
            base, _, suffix = name.rpartition(".")
            groups.setdefault(base, {})[suffix] = t
        self._row_perm, self._col_perm = self._act_order_perms(groups)
        out: dict[str, TensorInfo] = {}
        experts: dict[str, dict[int, dict[str, STensor]]] = {}
        for base, parts in groups.items():
            mapped = _gguf_base(base, lay)
            if mapped is None:
                raise GGUFFormatError(f"{next(iter(parts.values())).path}: tensor "
                                      f"{base + '.' + next(iter(parts))!r} has no place in a "
                                      f"{cfg['architectures'][0]} model")
            gbase, e = mapped
            if e is not None:
                experts.setdefault(gbase, {})[e] = parts
                continue
            if gbase.endswith(".ffn_gate_inp") and "e_score_correction_bias" in parts:
                # DeepSeek-V3's selection bias: llama.cpp's exp_probs_b
                parts = dict(parts)
                bname = gbase.rsplit(".", 1)[0] + ".exp_probs_b.bias"
                out[bname] = self._float(bname, parts.pop("e_score_correction_bias"))
            for suffix in parts:
                if suffix not in ("weight", "bias") + _QSUFFIX:
                    raise GGUFFormatError(f"{parts[suffix].path}: tensor {base}.{suffix} is not "
                                          f"a weight, bias or GPTQ/AWQ part")
            if "qweight" in parts:
                out[gbase + ".weight"] = self._quantized(gbase + ".weight", base, parts)
            elif "weight" in parts:
                out[gbase + ".weight"] = self._float(gbase + ".weight", parts["weight"])
            if "bias" in parts:
                out[gbase + ".bias"] = self._float(gbase + ".bias", parts["bias"])
        n_exp = self.metadata.get(f"{lay.gguf_arch}.expert_count", 0)
        for gname, by_e in experts.items():
            missing = [e for e in range(n_exp) if e not in by_e]
            if missing or len(by_e) != n_exp:
                raise GGUFFormatError(f"{self.folder}: {gname} needs experts 0..{n_exp - 1}; "
                                      f"missing {missing[:4] or sorted(set(by_e) - set(range(n_exp)))}")
            out[gname + ".weight"] = self._stack(gname + ".weight", [by_e[e] for e in range(n_exp)])
        return out

    def _act_order_perms(self, groups: dict[str, dict[str, STensor]]) -> tuple[dict, dict]:
        """For each act-order down_proj whose g_idx scatters inside 32-column blocks: the column
        order that makes its groups contiguous (as `_col_perm[down]`) and the same order for the
        rows of its gate and up projections (`_row_perm[gate]`, `_row_perm[up]`). The FFN's
        output is unchanged: down[:, p] @ (act(gate[p] x) * up[p] x) == down @ (act(gate x) *
        up x). Only where gate and up are GPTQ layers of the same module (their rows are
        repacked here anyway)."""
        rows: dict[str, np.ndarray] = {}
        cols: dict[str, np.ndarray] = {}
        if self.qspec is None or self.qspec.method != "gptq":
            return rows, cols
        gate, up, down = self.layout.experts if self.layout.moe else ("gate_proj", "up_proj",
                                                                      "down_proj")
        names = {(gate, up, down), ("gate_proj", "up_proj", "down_proj")}
        for base, parts in groups.items():
            head, _, leaf = base.rpartition(".")
            trio = next((t for t in names if t[2] == leaf), None)
            if trio is None or "g_idx" not in parts or "qweight" not in parts:
                continue
            sib = [f"{head}.{trio[0]}", f"{head}.{trio[1]}"]
            if not all("qweight" in groups.get(b, {}) for b in sib):
                continue
            perm = hq.contiguous_perm(np.asarray(parts["g_idx"].array()).astype(np.int64))
            if perm is None:
                continue
            cols[base] = perm
            for b in sib:
                rows[b] = perm
        return rows, cols

    def _info(self, name: str, shape, ggml_type: int, tname: str, data: np.ndarray, path: str,
              offset: int = 0) -> TensorInfo:
        return TensorInfo(name, tuple(reversed(tuple(shape))), ggml_type, tname, offset,
                          data.nbytes, path, data.reshape(-1))

    def _float(self, name: str, t: STensor) -> TensorInfo:
        if t.dtype not in FLOAT_TYPES:
            raise GGUFFormatError(f"{t.path}: tensor {t.name!r} has dtype {t.dtype}; a float "
                                  f"weight must be F32, F16 or BF16")
        gt, tname = FLOAT_TYPES[t.dtype]
        shape = t.shape
        if name.endswith("ffn_gate_inp_shexp.weight") and len(shape) == 2 and shape[0] == 1:
            shape = shape[1:]                                    # [1, D] -> [D]
        perm = self._qk_perm(name, shape[0])
        if perm is not None:
            rows = t.data.reshape(shape[0], -1)[perm]
            self.repacked[name] = f"{t.name} (rows permuted)"
            return self._info(name, shape, gt, tname, rows, f"{t.path}:{t.name}")
        return self._info(name, shape, gt, tname, t.data, t.path, t.offset)      # zero copy

    def _qk_perm(self, name: str, n_out: int) -> np.ndarray | None:
        if not self.layout.permute_qk:
            return None
        a = self.layout.gguf_arch
        for kind, heads in (("attn_q.", "head_count"), ("attn_k.", "head_count_kv")):
            if kind in name:
                return _permute_rows(n_out, self.metadata[f"{a}.attention.{heads}"])
        return None

    def _unpack(self, name: str, hf: str, parts: dict[str, STensor]) -> hq.Unpacked:
        if self.qspec is None:
            raise GGUFFormatError(f"{parts['qweight'].path}: tensor {hf}.qweight is quantized but "
                                  f"{self.folder} has no quantization_config")
        for s in ("qzeros", "scales"):
            if s not in parts:
                raise GGUFFormatError(f"{parts['qweight'].path}: tensor {hf}.{s} is missing "
                                      f"(GPTQ/AWQ layers need qweight, qzeros and scales)")
        qw = parts["qweight"].array()
        if self.qspec.method == "gptq":
            n_in, n_out = qw.shape[0] * 8, qw.shape[1]
        else:
            n_in, n_out = qw.shape[0], qw.shape[1] * 8
        gi = parts["g_idx"].array() if "g_idx" in parts else None
        try:
            u = hq.unpack(self.qspec, hf, n_out, n_in, qw, parts["qzeros"].array(),
                          parts["scales"].array(), gi)
        except GGUFFormatError as e:
            raise GGUFFormatError(f"{parts['qweight'].path}: {e}") from None
        perm = self._qk_perm(name, n_out)
        if perm is not None:
            u = hq.Unpacked(u.q[perm], u.zeros[perm], u.scales[perm], u.g_idx)
        rows, cols = self._row_perm.get(hf), self._col_perm.get(hf)
        if rows is not None or cols is not None:
            u = hq.permute(u, rows, cols)
        return u

    def _quantized(self, name: str, hf: str, parts: dict[str, STensor]) -> TensorInfo:
        u = self._unpack(name, hf, parts)
        gt = hq.block_type([u], self._fallback(name))
        blocks = hq.to_blocks(u, gt)
        tname = hq.TYPE_NAMES[gt]
        self.repacked[name] = f"{hf} ({self.qspec.method} -> {tname}{self._how(hf)})"
        return self._info(name, u.q.shape, gt, tname, blocks,
                          f"{parts['qweight'].path}:{hf}.qweight")

    @staticmethod
    def _fallback(name: str) -> int:
        """The type of a layer whose groups cannot be blocked (see hf/quant.py)."""
        return hq.GGML_F16 if ".attn_" in name else hq.GGML_Q8_0

    def _how(self, hf: str) -> str:
        if hf in self._col_perm:
            return ", act-order columns sorted by group"
        if hf in self._row_perm:
            return ", rows permuted like its down_proj's columns"
        return ""

    def _stack(self, name: str, per_expert: list[dict[str, STensor]]) -> TensorInfo:
        """Per-expert tensors -> one [E, rows, cols] tensor (GGUF's ffn_*_exps)."""
        lay = self.layout
        first = per_expert[0]
        src = f"{next(iter(first.values())).path}:{next(iter(first.values())).name}"
        if "qweight" in first:
            hfs = [next(iter(p.values())).name.rpartition(".")[0] for p in per_expert]
            us = [self._unpack(name, h, p) for h, p in zip(hfs, per_expert)]
            shapes = {u.q.shape for u in us}
            if len(shapes) != 1:
                raise GGUFFormatError(f"{src}: experts of {name} differ in shape: {sorted(shapes)}")
            gt = hq.block_type(us, self._fallback(name))
            rows = [hq.to_blocks(u, gt) for u in us]
            shape = (len(us),) + us[0].q.shape
            tname = hq.TYPE_NAMES[gt]
            self.repacked[name] = f"{len(us)} experts ({self.qspec.method} -> {tname}" \
                                  f"{self._how(hfs[0])})"
        else:
            ws = []
            for p in per_expert:
                if set(p) != {"weight"}:
                    raise GGUFFormatError(f"{src}: expert tensors of {name} must be plain "
                                          f"weights or GPTQ/AWQ parts, got {sorted(p)}")
                ws.append(p["weight"])
            dts = {w.dtype for w in ws}
            shapes = {w.shape for w in ws}
            if len(dts) != 1 or len(shapes) != 1 or ws[0].dtype not in FLOAT_TYPES:
                raise GGUFFormatError(f"{src}: experts of {name} must share one float dtype and "
                                      f"shape, got {sorted(dts)} {sorted(shapes)}")
            gt, tname = FLOAT_TYPES[ws[0].dtype]
            rows = [w.data for w in ws]
            shape = (len(ws),) + ws[0].shape
            self.repacked[name] = f"{len(ws)} experts stacked"
        data = np.concatenate([r.reshape(-1) for r in rows])
        del lay
        return self._info(name, shape, gt, tname, data, f"{src} (experts stacked)")

    def close(self) -> None:
        super().close()
