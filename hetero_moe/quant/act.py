"""Activation quantization as the CPU kernels (and llama.cpp) apply it before a quantized matmul.

The torch reference path quantizes and dequantizes activations the same way, so that both paths
compute the same numbers: x ~= q * d per block, q int8.
  q8_0: blocks of 32, d = amax / 127 stored as f16, q = round(x / d)
  q8_K: blocks of 256, d = -max / 127 (max = the signed value of largest magnitude), f32,
        q = min(127, round(x / d))
  f16:  activations rounded to half precision (for F16 weights)
  bf16: activations rounded to bfloat16 (for BF16 weights)
The f16/bf16 roundings model llama.cpp (its F16/BF16 dot products convert the activations); the C++
kernels keep F16/BF16 activations in f32 (exact), which differs from them by ~3e-4 (f16) relative.
"""
from __future__ import annotations

import torch


def _blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[-1] % n:
        raise ValueError(f"activation row of {x.shape[-1]} is not a multiple of block size {n}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // n, n)


def fake_quant_q8_0(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x.float(), 32)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv)
    return (q * d.half().float()).reshape(x.shape)


def fake_quant_q8_k(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x.float(), 256)
    idx = xb.abs().argmax(-1, keepdim=True)
    mx = torch.gather(xb, -1, idx)
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.clamp(torch.round(xb * iscale), max=127.0)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(x.shape)


def fake_quant_f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


ACT_FAKE_QUANT = {
    "q8_0": fake_quant_q8_0,
    "q8_K": fake_quant_q8_k,
    "f16": fake_quant_f16,
}


def fake_quant_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


ACT_FAKE_QUANT["bf16"] = fake_quant_bf16
_FLOAT_ACT = {"F16": "f16", "BF16": "bf16"}


def act_type_for(ggml_type: int) -> str | None:
    """Activation format paired with a weight type (None: activations stay f32)."""
    from . import QUANT_TYPES
    qt = QUANT_TYPES[ggml_type]
    return qt.act_type or _FLOAT_ACT.get(qt.name)


def fake_quant(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """x quantized and dequantized in the activation format its weight type pairs with."""
    act = act_type_for(ggml_type)
    return ACT_FAKE_QUANT[act](x) if act else x
