"""GGUF tensor formats: one table keyed by ggml type id (ggml's type_traits idea).

Each row says how big a block is, how to dequantize it with torch (bit-exact with `gguf.quants`),
which activation format the CPU kernel pairs it with, and holds slots for the CPU/GPU kernels.

Shapes here are in torch order: (rows..., cols), cols contiguous, i.e. GGUF `ne` reversed.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GGUFFormatError, UnsupportedError
from . import dequant as _dq

__all__ = ["QUANT_TYPES", "QuantType", "dequantize", "dequantize_rows", "quant_type", "row_bytes",
           "set_kernels", "type_name"]


@dataclass(frozen=True)
class QuantType:
    name: str            # "Q4_K"
    ggml_type: int       # gguf.GGMLQuantizationType value
    block_size: int      # elements per block (1 for float types)
    type_size: int       # bytes per block
    # uint8 [n_blocks, type_size] -> float32 [n_blocks, block_size]
    dequantize: Callable[[torch.Tensor], torch.Tensor]
    act_type: str | None  # activation format the CPU kernel pairs it with; None for float types
    cpu_kernel: object = None  # filled by hetero_moe._cpu when built
    gpu_kernel: object = None  # filled by the Triton kernels when available


# (name, ggml type id, block_size, type_size, dequantizer, activation type)
_ROWS = [
    ("F32", 0, 1, 4, _dq.dequant_f32, None),
    ("F16", 1, 1, 2, _dq.dequant_f16, None),
    ("BF16", 30, 1, 2, _dq.dequant_bf16, None),
    ("Q4_0", 2, 32, 18, _dq.dequant_q4_0, "q8_0"),
    ("Q4_1", 3, 32, 20, _dq.dequant_q4_1, "q8_0"),
    ("Q5_0", 6, 32, 22, _dq.dequant_q5_0, "q8_0"),
    ("Q5_1", 7, 32, 24, _dq.dequant_q5_1, "q8_0"),
    ("Q8_0", 8, 32, 34, _dq.dequant_q8_0, "q8_0"),
    ("Q2_K", 10, 256, 84, _dq.dequant_q2_k, "q8_K"),
    ("Q3_K", 11, 256, 110, _dq.dequant_q3_k, "q8_K"),
    ("Q4_K", 12, 256, 144, _dq.dequant_q4_k, "q8_K"),
    ("Q5_K", 13, 256, 176, _dq.dequant_q5_k, "q8_K"),
    ("Q6_K", 14, 256, 210, _dq.dequant_q6_k, "q8_K"),
    ("Q8_K", 15, 256, 292, _dq.dequant_q8_k, None),  # an activation format itself
    ("IQ4_NL", 20, 32, 18, _dq.dequant_iq4_nl, "q8_0"),
    ("IQ4_XS", 23, 256, 136, _dq.dequant_iq4_xs, "q8_K"),
]

QUANT_TYPES: dict[int, QuantType] = {r[1]: QuantType(*r) for r in _ROWS}

# Names of ggml types we do not support, so errors can say what the file holds.
_OTHER_NAMES = {
    9: "Q8_1", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S",
    22: "IQ2_S", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}


def type_name(ggml_type: int) -> str:
    """'Q4_K (type 12)', 'F64 (type 28)', 'unknown (type 999)'."""
    ggml_type = int(ggml_type)
    qt = QUANT_TYPES.get(ggml_type)
    name = qt.name if qt else _OTHER_NAMES.get(ggml_type, "unknown")
    return f"{name} (type {ggml_type})"


def _where(tensor: str, file: str) -> str:
    """"tensor 'x' in f.gguf: " with whichever of the two is known."""
    parts = [f"tensor {tensor!r}"] if tensor != "?" else []
    parts += [f"in {file}"] if file != "?" else []
    return " ".join(parts) + ": " if parts else ""


def quant_type(ggml_type: int, *, tensor: str = "?", file: str = "?") -> QuantType:
    """The table row for `ggml_type`; UnsupportedError naming the type, tensor and file."""
    qt = QUANT_TYPES.get(int(ggml_type))
    if qt is None:
        supported = ", ".join(q.name for q in QUANT_TYPES.values())
        raise UnsupportedError(f"{_where(tensor, file)}tensor type {type_name(ggml_type)} is not "
                               f"supported; supported types: {supported}")
    return qt


def set_kernels(ggml_type: int, *, cpu_kernel: object = None,
                gpu_kernel: object = None) -> QuantType:
    """Fill a row's kernel slots (None keeps the current value); returns the new row."""
    qt = quant_type(ggml_type)
    qt = dataclasses.replace(
        qt, cpu_kernel=cpu_kernel if cpu_kernel is not None else qt.cpu_kernel,
        gpu_kernel=gpu_kernel if gpu_kernel is not None else qt.gpu_kernel)
    QUANT_TYPES[ggml_type] = qt
    return qt


def row_bytes(ggml_type: int, n_cols: int, *, tensor: str = "?", file: str = "?") -> int:
    """Bytes in one row of `n_cols` elements; GGUFFormatError unless whole blocks."""
    qt = quant_type(ggml_type, tensor=tensor, file=file)
    if n_cols < 0 or n_cols % qt.block_size:
        raise GGUFFormatError(f"{_where(tensor, file)}{qt.name} rows must hold a multiple of "
                              f"{qt.block_size} elements, got {n_cols} columns")
    return n_cols // qt.block_size * qt.type_size


def _as_bytes(raw) -> torch.Tensor:
    """Flat uint8 torch view of `raw` (numpy array, buffer or tensor); copies only if strided."""
    if isinstance(raw, torch.Tensor):
        t = raw if raw.is_contiguous() else raw.contiguous()
        t = t.reshape(-1)
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    arr = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    # Read-only mmaps are fine: every dequantizer reads its input and writes only fresh tensors.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(arr)


def _decode(qt: QuantType, data: torch.Tensor) -> torch.Tensor:
    """Flat uint8 holding whole blocks -> flat float32."""
    n_blocks = data.numel() // qt.type_size
    if n_blocks == 0:
        return torch.empty(0, dtype=torch.float32, device=data.device)
    return qt.dequantize(data.view(n_blocks, qt.type_size)).reshape(-1)


def dequantize(raw, ggml_type: int, shape: tuple[int, ...], *, tensor: str = "?",
               file: str = "?") -> torch.Tensor:
    """Whole tensor: raw bytes -> float32 of `shape` (torch order, last dim contiguous)."""
    qt = quant_type(ggml_type, tensor=tensor, file=file)
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1] if shape else 1
    expected = math.prod(shape[:-1]) * row_bytes(ggml_type, n_cols, tensor=tensor, file=file)
    data = _as_bytes(raw)
    if data.numel() != expected:
        raise GGUFFormatError(f"{_where(tensor, file)}{qt.name} tensor of shape {list(shape)} "
                              f"needs {expected} bytes, got {data.numel()}")
    return _decode(qt, data).view(shape)


def dequantize_rows(raw, ggml_type: int, n_cols: int, row_start: int, row_end: int, *,
                    tensor: str = "?", file: str = "?") -> torch.Tensor:
    """Rows [row_start, row_end) of a tensor whose rows hold `n_cols` elements (all leading dims
    flattened, e.g. one expert of [n_expert, n_ff, n_embd]).
    Returns float32 [row_end - row_start, n_cols]."""
    qt = quant_type(ggml_type, tensor=tensor, file=file)
    rb = row_bytes(ggml_type, n_cols, tensor=tensor, file=file)
    data = _as_bytes(raw)
    n_bytes = data.numel()
    if rb == 0 or n_bytes % rb:
        raise GGUFFormatError(f"{_where(tensor, file)}{n_bytes} bytes is not a whole number of "
                              f"{qt.name} rows of {n_cols} columns ({rb} bytes each)")
    n_rows = n_bytes // rb
    if not 0 <= row_start <= row_end <= n_rows:
        raise GGUFFormatError(f"{_where(tensor, file)}rows [{row_start}, {row_end}) out of range "
                              f"for a tensor of {n_rows} rows")
    return _decode(qt, data[row_start * rb:row_end * rb]).view(row_end - row_start, n_cols)
