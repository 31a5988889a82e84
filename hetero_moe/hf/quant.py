"""GPTQ and AWQ int4 checkpoints: their packing, exact dequantization, and a lossless repack into
the GGUF blocks the CPU/GPU kernels already run.

Both formats store, per linear layer W [out, in] (torch order) in groups of `group_size` input
columns, 4-bit codes q in 0..15, an fp16 scale s and a 4-bit zero point z per (group, output):
    W[o, i] = s[g(i), o] * (q[o, i] - z[g(i), o])
GPTQ (AutoGPTQ / GPTQModel):
    qweight int32 [in/8, out]: input column i in bits 4*(i%8).. of row i//8 (sequential nibbles)
    qzeros  int32 [groups, out/8]: output o in bits 4*(o%8).. of column o//8
    scales  fp16  [groups, out];  g_idx int32 [in]: group of each input column (i // group_size
            without act-order; a scatter with desc_act)
    "gptq" (v1) checkpoints store z - 1 (the code adds 1 back after unpacking); "gptq_v2" store z.
AWQ (AutoAWQ, GEMM version):
    qweight int32 [in, out/8]: nibble k of column c holds output c*8 + ORDER[k], ORDER =
            [0, 2, 4, 6, 1, 3, 5, 7]; qzeros int32 [groups, out/8] packed the same way; scales fp16
            [groups, out]; groups are contiguous (g = i // group_size), z stored as is.

Repack: with s exactly representable in fp16 and every aligned 32-column block inside one group,
    z == 8 everywhere -> Q4_0 (d = s, code q):       d * (q - 8)       == s * (q - z)   exactly
    otherwise         -> Q5_0 (d = s, code q-z+16):  d * (q - z + 16 - 16), q - z in [-16, 15]
Both are exact (the product of an fp16 and an integer of at most 5 bits fits float32), so our
kernels multiply the checkpoint's own weights; only the activations are quantized (q8_0), as for
every GGUF type.

Act-order (desc_act) checkpoints: g_idx scatters the groups over the input columns, so a 32-column
block mixes scales. Two ways out (see `contiguous_perm` and checkpoint.py):
  * a layer whose input vector is produced in one place by rows we own (a gated FFN's down_proj:
    its input is act(gate x) * (up x), row by row) has its columns sorted by group and the
    producing rows (gate and up) permuted alike; the product is unchanged and the layer is again
    an exact Q4_0/Q5_0;
  * any other layer (q/k/v/o, gate/up: their input is the normed residual stream, or the
    attention heads, shared by layers whose g_idx differ) is dequantized exactly and stored
    compactly instead of as F32: FFN layers (the bulk of an MoE) re-quantized into Q8_0 blocks
    (8.5 bits per weight; each weight moves by at most half a step of 1/127 of its block's
    largest, i.e. at most ~1/16 of the int4 step the checkpoint already rounded to), attention
    projections (a few percent of an MoE's weights, and where Q8_0's error showed most) as F16
    (16 bits; s * (q - z) rounded to 11 significant bits).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import GGUFFormatError, UnsupportedError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble k of a packed int32 holds column ORDER[k]
AWQ_UNORDER = tuple(int(i) for i in np.argsort(AWQ_ORDER))   # column j sits in nibble UNORDER[j]
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q5_0, GGML_Q8_0 = 0, 1, 2, 6, 8
TYPE_NAMES = {GGML_F32: "F32", GGML_F16: "F16", GGML_Q4_0: "Q4_0", GGML_Q5_0: "Q5_0",
              GGML_Q8_0: "Q8_0"}
QK = 32                                        # GGUF block width of Q4_0 / Q5_0


@dataclass(frozen=True)
class QuantSpec:
    """A checkpoint's int4 format, from `quantization_config` / quantize_config.json."""
    method: str            # "gptq" | "awq"
    group_size: int        # input columns per group; -1: one group over the whole row
    desc_act: bool = False
    sym: bool = True
    zero_plus_one: bool = True    # GPTQ v1 stores z - 1
    source: str = "?"

    def groups(self, n_in: int) -> int:
        return 1 if self.group_size == -1 else -(-n_in // self.group_size)

    def group_cols(self, n_in: int) -> int:
        return n_in if self.group_size == -1 else self.group_size


def quant_spec(folder: Path, config: dict) -> QuantSpec | None:
    """The folder's int4 format, or None for an unquantized checkpoint. Errors name the file and
    key of anything this loader cannot run."""
    qc, src = config.get("quantization_config"), f"{folder / 'config.json'}: quantization_config"
    if qc is None:
        for name in ("quantize_config.json", "quant_config.json"):
            p = folder / name
            if p.exists():
                try:
                    qc, src = json.loads(p.read_text("utf-8")), str(p)
                except json.JSONDecodeError as e:
                    raise GGUFFormatError(f"{p}: not valid JSON ({e})") from None
                break
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise GGUFFormatError(f"{src}: expected a JSON object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "gptq" if "desc_act" in qc else "awq"
                        if "zero_point" in qc else "")).lower()
    if method not in ("gptq", "awq"):
        raise UnsupportedError(f"{src}: quant_method {method!r} is not supported (supported: "
                               f"gptq, awq int4)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise UnsupportedError(f"{src}: bits = {bits!r}; only 4-bit {method.upper()} is supported")
    gs = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(gs, int) or not (gs == -1 or (gs > 0 and gs % QK == 0)):
        raise UnsupportedError(f"{src}: group_size = {gs!r}; supported: -1 or a positive "
                               f"multiple of {QK}")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedError(f"{src}: AWQ version {version!r} is not supported "
                                   f"(supported: gemm)")
        if not qc.get("zero_point", True):
            raise UnsupportedError(f"{src}: AWQ zero_point = false is not supported")
        return QuantSpec("awq", gs, sym=False, zero_plus_one=False, source=src)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedError(f"{src}: checkpoint_format {fmt!r} is not supported "
                               f"(supported: gptq, gptq_v2)")
    if qc.get("is_marlin_format"):
        raise UnsupportedError(f"{src}: is_marlin_format = true (Marlin-repacked) is not supported")
    return QuantSpec("gptq", gs, desc_act=bool(qc.get("desc_act", False)),
                     sym=bool(qc.get("sym", True)), zero_plus_one=fmt == "gptq", source=src)


# ---------------------------------------------------------------------------------------- unpack

def _nibbles(a: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> uint8 [..., n, 8]: nibble k of each word (bits 4k..4k+3)."""
    w = np.ascontiguousarray(a).view(np.uint32)
    sh = np.arange(0, 32, 4, dtype=np.uint32)
    return ((w[..., None] >> sh) & 0xF).astype(np.uint8)


@dataclass
class Unpacked:
    """One int4 linear layer in torch order: codes, per-(output, group) zero and scale, groups."""
    q: np.ndarray          # uint8 [out, in], 0..15
    zeros: np.ndarray      # int16 [out, groups], 0..16
    scales: np.ndarray     # float16 [out, groups] (or float32 when the file's scales are not fp16)
    g_idx: np.ndarray      # int64 [in]


def _check(name: str, what: str, arr: np.ndarray, shape: tuple, dtypes: tuple) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise GGUFFormatError(f"tensor {name!r}: {what} has shape {list(arr.shape)}, expected "
                              f"{list(shape)} from the config")
    if arr.dtype not in dtypes:
        raise GGUFFormatError(f"tensor {name!r}: {what} has dtype {arr.dtype}, expected "
                              f"{' or '.join(str(np.dtype(d)) for d in dtypes)}")


def unpack(spec: QuantSpec, name: str, n_out: int, n_in: int, qweight: np.ndarray,
           qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None) -> Unpacked:
    """A layer's qweight/qzeros/scales(/g_idx) -> Unpacked; shapes and dtypes checked against
    (n_out, n_in) from the model config (errors name the tensor)."""
    G = spec.groups(n_in)
    if n_in % 8 or n_out % 8:
        raise GGUFFormatError(f"tensor {name!r}: [{n_out}, {n_in}] is not packable in int32 "
                              f"words of 8 codes")
    int32 = (np.int32, np.uint32)
    fl = (np.float16, np.float32)
    _check(name, "scales", scales, (G, n_out), fl + (np.uint16,))
    if scales.dtype == np.uint16:       # BF16 bits
        scales = (scales.astype(np.uint32) << 16).view(np.float32)
    if spec.method == "gptq":
        _check(name, "qweight", qweight, (n_in // 8, n_out), int32)
        _check(name, "qzeros", qzeros, (G, n_out // 8), int32)
        q = _nibbles(qweight).transpose(0, 2, 1).reshape(n_in, n_out).T     # [out, in]
        z = _nibbles(qzeros).reshape(G, n_out).astype(np.int16)
        if spec.zero_plus_one:
            z = z + 1
        if g_idx is None:
            gi = np.arange(n_in, dtype=np.int64) // spec.group_cols(n_in)
        else:
            _check(name, "g_idx", g_idx, (n_in,), int32 + (np.int64,))
            gi = g_idx.astype(np.int64)
            if gi.size and (gi.min() < 0 or gi.max() >= G):
                raise GGUFFormatError(f"tensor {name!r}: g_idx holds group {int(gi.max())} or "
                                      f"{int(gi.min())}, outside 0..{G - 1}")
    else:
        _check(name, "qweight", qweight, (n_in, n_out // 8), int32)
        _check(name, "qzeros", qzeros, (G, n_out // 8), int32)
        q = _nibbles(qweight)[..., list(AWQ_UNORDER)].reshape(n_in, n_out).T
        z = _nibbles(qzeros)[..., list(AWQ_UNORDER)].reshape(G, n_out).astype(np.int16)
        gi = np.arange(n_in, dtype=np.int64) // spec.group_cols(n_in)
    return Unpacked(np.ascontiguousarray(q), np.ascontiguousarray(z.T),
                    np.ascontiguousarray(scales.T), gi)


def dequantize(u: Unpacked) -> torch.Tensor:
    """float32 [out, in]: s * (q - z), exact in float32."""
    s = torch.from_numpy(u.scales.astype(np.float32))[:, u.g_idx]          # [out, in]
    z = torch.from_numpy(u.zeros.astype(np.float32))[:, u.g_idx]
    return s * (torch.from_numpy(u.q).float() - z)


# ---------------------------------------------------------------------------------------- repack

def blockable(u: Unpacked) -> bool:
    """Whether every aligned 32-column block lies in one group and the scales are fp16 values."""
    n_in = u.q.shape[1]
    if n_in % QK:
        return False
    gb = u.g_idx.reshape(-1, QK)
    if not (gb == gb[:, :1]).all():
        return False
    s = u.scales
    return s.dtype == np.float16 or bool(
        (s.astype(np.float16).astype(np.float32) == s.astype(np.float32)).all()
        and np.isfinite(s).all())


def block_type(us: list[Unpacked], fallback: int = GGML_Q8_0) -> int:
    """Q4_0 when every zero point is 8, else Q5_0; `fallback` (Q8_0 or F16, re-quantized) when
    some layer is not blockable (F16 when its width is not a multiple of 32 either)."""
    if not all(blockable(u) for u in us):
        return fallback if us[0].q.shape[1] % QK == 0 else GGML_F16
    return GGML_Q4_0 if all((u.zeros == 8).all() for u in us) else GGML_Q5_0


def contiguous_perm(g_idx: np.ndarray) -> np.ndarray | None:
    """A column order that makes every aligned 32-column block lie in one group (columns sorted by
    group, stably), or None when g_idx already does or no order can (a group whose size is not a
    multiple of 32)."""
    n = g_idx.size
    if n % QK or (g_idx.reshape(-1, QK) == g_idx.reshape(-1, QK)[:, :1]).all():
        return None
    perm = np.argsort(g_idx, kind="stable")
    gb = g_idx[perm].reshape(-1, QK)
    return perm if (gb == gb[:, :1]).all() else None


def permute(u: Unpacked, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> Unpacked:
    """The layer with its output rows and/or input columns reordered (W[rows][:, cols])."""
    q, z, s, gi = u.q, u.zeros, u.scales, u.g_idx
    if rows is not None:
        q, z, s = q[rows], z[rows], s[rows]
    if cols is not None:
        q, gi = q[:, cols], gi[cols]
    return Unpacked(np.ascontiguousarray(q), np.ascontiguousarray(z), np.ascontiguousarray(s), gi)


def q8_0_blocks(w: np.ndarray) -> np.ndarray:
    """float32 [out, in] (in % 32 == 0) -> uint8 [out, in/32 * 34]: ggml's quantize_row_q8_0_ref
    (d = amax / 127 stored as fp16, q = round(x / d) with the float32 d, half away from zero)."""
    n_out, n_in = w.shape
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(n_out, n_in // QK, QK)
    d = np.abs(x).max(-1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = x * inv[..., None]
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)   # C's roundf
    out = np.empty((n_out, n_in // QK, 34), dtype=np.uint8)
    out[..., 0:2] = d.astype(np.float16).view(np.uint8).reshape(n_out, n_in // QK, 2)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(n_out, -1)


def to_blocks(u: Unpacked, ggml_type: int) -> np.ndarray:
    """uint8 [out, row bytes] of `ggml_type` holding W: exactly for Q4_0, Q5_0 and F32,
    rounded for F16 and Q8_0."""
    n_out, n_in = u.q.shape
    if ggml_type == GGML_F32:
        return dequantize(u).numpy().view(np.uint8).reshape(n_out, n_in * 4)
    if ggml_type == GGML_F16:
        return dequantize(u).half().numpy().view(np.uint8).reshape(n_out, n_in * 2)
    if ggml_type == GGML_Q8_0:
        return q8_0_blocks(dequantize(u).numpy())
    nb = n_in // QK
    gb = u.g_idx[::QK]                                           # group of each block [nb]
    d = np.ascontiguousarray(u.scales[:, gb].astype(np.float16))  # [out, nb]
    q = u.q.reshape(n_out, nb, QK)
    if ggml_type == GGML_Q4_0:
        out = np.empty((n_out, nb, 18), dtype=np.uint8)
        out[..., 0:2] = d.view(np.uint8).reshape(n_out, nb, 2)
        out[..., 2:] = q[..., :16] | (q[..., 16:] << 4)
        return out.reshape(n_out, nb * 18)
    if ggml_type != GGML_Q5_0:
        raise UnsupportedError(f"internal: no int4 repack into ggml type {ggml_type}")
    x = (q.astype(np.int16) - u.zeros[:, gb][..., None] + 16).astype(np.uint8)   # 0..31
    lo = x & 0xF
    hi = ((x >> 4) & 1).astype(np.uint32)
    qh = (hi << np.arange(QK, dtype=np.uint32)).sum(-1, dtype=np.uint32)          # [out, nb]
    out = np.empty((n_out, nb, 22), dtype=np.uint8)
    out[..., 0:2] = d.view(np.uint8).reshape(n_out, nb, 2)
    out[..., 2:6] = qh.astype("<u4").view(np.uint8).reshape(n_out, nb, 4)
    out[..., 6:] = lo[..., :16] | (lo[..., 16:] << 4)
    return out.reshape(n_out, nb * 22)


# ---------------------------------------------------------------------------------- lm_head

LM_HEAD_TYPES = ("q8_0",)


def quantize_lm_head(g, kind: str | None) -> str | None:
    """Opt-in: re-quantize a float (F32/F16/BF16) lm_head (`output.weight`, or the tied embedding
    table when there is none) into Q8_0 blocks held in memory, in place of the mapped tensor.
    GPTQ/AWQ tools leave the lm_head in fp16: read once per token, it can cost more than the
    layers' experts (Qwen3-30B-A3B: 151936 x 2048 fp16 = 622 MB per token). Q8_0 halves that;
    each weight moves by at most half a step of 1/127 of its block's largest. Returns a note of
    what changed, or None (kind None, no float lm_head, or a width not a multiple of 32)."""
    if kind is None:
        return None
    if kind not in LM_HEAD_TYPES:
        raise ValueError(f"lm_head must be None or one of {LM_HEAD_TYPES}, got {kind!r}")
    from ..gguf import TensorInfo
    from ..quant import dequantize_rows
    from ..runtime.memory import release
    name = "output.weight" if "output.weight" in g.tensors else "token_embd.weight"
    t = g.tensors.get(name)
    if t is None or t.ggml_type not in (GGML_F32, GGML_F16, 30) or len(t.shape) != 2 \
            or t.shape[1] % QK:
        return None
    n_out, n_in = t.shape
    out = np.empty((n_out, n_in // QK * 34), dtype=np.uint8)
    step = 4096
    for r in range(0, n_out, step):           # in row chunks: no full float32 copy
        e = min(n_out, r + step)
        w = dequantize_rows(t.data, t.ggml_type, n_in, r, e).float().numpy()
        out[r:e] = q8_0_blocks(w)
    release(g, [name])                        # the float pages leave the process
    g.tensors[name] = TensorInfo(name, t.ne, GGML_Q8_0, "Q8_0", 0, out.nbytes,
                                 f"{t.path} ({name} -> Q8_0 at load)", out.reshape(-1))
    if hasattr(g, "repacked"):
        g.repacked[name] = f"{t.type_name} -> Q8_0 (lm_head='q8_0')"
    return f"{name}: {t.type_name} {t.nbytes / 2**20:.1f} MiB -> Q8_0 {out.nbytes / 2**20:.1f} MiB"
