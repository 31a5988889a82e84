"""Triton matmuls on GGUF block bytes: weights stay the file's own bytes (VRAM = file bytes, no
requantization) and are dequantized in registers, tile by tile.

Dimension key:
  T tokens (rows of x), N = n_out weight rows, K = n_in (a multiple of the type's block size QK)
  P = T * k_top (token, expert) pairs, E experts, S resident expert slots, D model dim, F = d_ff
  BM / BN / BK tile sizes over tokens / output columns / input columns (BK a multiple of QK)

Kernels (KERNEL_TABLE, keyed by (ggml type, T class), picks kernel and tiles, like ggml's
type_traits):
  _gemv          T <= 8: skinny GEMV, split-K, grid (N tiles, K splits); partial sums are
                 atomically added into a zeroed fp32 output
  _gemm          T > 8: tl.dot tiles, grid (T tiles, N tiles), T tiles fastest so consecutive
                 programs reuse one weight tile from L2
  _moe_gate_up   hot experts of one MoE layer in one launch: programs take (a tile of one slot's
                 sorted (token, k) pairs, an F tile); gate and up accumulate together, the program
                 stores silu(gate) * up
  _moe_down      the same row tiles times down, scaled by the routing weight, stored per pair
Every weight tile goes through one in-register dequantizer, _dequant_tile (a branch per type).

Modes: CUDA tensors run the compiled kernels; CPU tensors run Triton's interpreter. The mode is
picked per launch by _Kernel (triton.jit fixes it at import from TRITON_INTERPRET), so tests and
gpu="interpret" run without a GPU. The interpreter computes tiles in fp32 (its fp16/bf16 dot is
not exact); CUDA feeds tl.dot fp16 (see _gemm for the error).
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hetero_moe.config_env import triton_interpret
from hetero_moe.errors import UnsupportedError
from hetero_moe.quant import QUANT_TYPES, row_bytes, type_name

__all__ = ["KERNEL_TABLE", "SUPPORTED", "KernelEntry", "Tiles", "matmul", "moe_grouped",
           "supports"]

_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}   # F32, F16, BF16
_QUANT_IDS = (2, 3, 6, 7, 8, 12, 13, 14)     # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K
SUPPORTED: frozenset[int] = frozenset(_QUANT_IDS) | frozenset(_FLOAT_TYPES)
_GEMV_MAX_T = 8        # T class boundary: "gemv" for T <= 8, "dot" above
# Smallest K tile per type: a block, a 64-element group of a K-quant super-block (its
# sub-block pair), 16 for float weights (tl.dot's minimum).
_TILE_QK = {2: 32, 3: 32, 6: 32, 7: 32, 8: 32, 12: 64, 13: 64, 14: 64, 0: 16, 1: 16, 30: 16}

# Reductions name triton's combine function: the interpreter maps it to one numpy call, and it
# needs no nested jit call (tl.sum is a jit function, uncallable when interpreting without
# TRITON_INTERPRET set at import). Same reason for tl.full over tl.zeros, exp over tl.sigmoid.
_SUM = tl.standard._sum_combine


def supports(ggml_type: int) -> bool:
    return int(ggml_type) in SUPPORTED


# ------------------------------------------------------------------ dual-mode kernel launcher

def _rebind(fn: Callable, g: dict) -> Callable:
    """`fn` with globals `g` (same code, so inspect still finds its source)."""
    return types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)


class _Kernel:
    """A kernel both compiled (CUDA tensors) and interpreted (CPU tensors) in one process.

    `kernel[grid](*args)` picks by the device of the first tensor argument; TRITON_INTERPRET=1
    interprets CUDA tensors too. Each mode gets its own copy of this module's globals in which
    the jit helpers (_HELPERS) are bound as that mode's function objects, so a kernel calling
    _dequant_tile calls a JITFunction when compiled and an InterpretedFunction when interpreted.
    """
    _mode_globals: dict[str, dict] = {}

    def __init__(self, fn: Callable):
        self.fn = fn
        self._built: dict[str, object] = {}

    @staticmethod
    def _wrap(mode: str, fn: Callable):
        if mode == "interpret":
            from triton.runtime.interpreter import InterpretedFunction
            return InterpretedFunction(fn)
        return triton.runtime.jit.JITFunction(fn)

    def _get(self, mode: str):
        k = self._built.get(mode)
        if k is None:
            g = _Kernel._mode_globals.get(mode)
            if g is None:
                g = dict(self.fn.__globals__)
                for name in _HELPERS:
                    g[name] = self._wrap(mode, _rebind(g[name], g))
                _Kernel._mode_globals[mode] = g
            k = self._built[mode] = self._wrap(mode, _rebind(self.fn, g))
        return k

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            first = next(a for a in args if isinstance(a, torch.Tensor))
            interp = first.device.type != "cuda" or triton_interpret()
            return self._get("interpret" if interp else "compiled")[grid](*args, **kwargs)
        return launch


# ------------------------------------------------------------------ in-register dequantizer

def _dequant_tile(wb, wh, wi, row_off, k0, QT: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    """fp32 [BN, BK]: elements k0 .. k0+BK-1 of the rows starting at row_off [BN] (int64).
    wb / wh / wi: the weight bytes as uint8 / the f16 view (float types: the element view) /
    int8. k0 is a multiple of BK; BK a power of two >= _TILE_QK[QT] (K-quants: a tile is part
    of one super-block or whole ones). Quant types: row_off in bytes; float types: elements.
    Every f16 field of these blocks sits at an even byte offset, so wh[byte // 2] reads it.
    Float op order follows hetero_moe/quant/dequant.py (bit-exact with gguf.quants)."""
    if QT == 2:    # Q4_0, 18 bytes: d:f16 | qs[16]; elements l / 16+l: low / high nibble of qs[l]
        NB: tl.constexpr = BK // 32
        base = row_off[:, None] + (k0 // 32 + tl.arange(0, NB).to(tl.int64))[None, :] * 18
        d = tl.load(wh + base // 2).to(tl.float32)[:, :, None, None]          # [BN, NB, 1, 1]
        l4 = tl.arange(0, 16).to(tl.int64)[None, None, None, :]
        qs = tl.load(wb + base[:, :, None, None] + 2 + l4)                    # [BN, NB, 1, 16]
        hi = (tl.arange(0, 2) == 1)[None, None, :, None]
        q = tl.where(hi, qs >> 4, qs & 15)                                    # [BN, NB, 2, 16]
        w = tl.reshape((q.to(tl.float32) - 8.0) * d, (BN, BK))
    elif QT == 3 or QT == 6 or QT == 7:
        # Q4_1 (20 bytes): d m:f16 | qs[16];  Q5_0 (22): d:f16 | qh:u32 | qs[16];
        # Q5_1 (24): d m:f16 | qh:u32 | qs[16]. Element e = 16 h + l: nibble h of qs[l], and
        # (Q5) bit e of qh as bit 4. Q4_1 / Q5_1: d * q + m; Q5_0: d * (q - 16).
        TS: tl.constexpr = 20 if QT == 3 else (22 if QT == 6 else 24)
        QS: tl.constexpr = 4 if QT == 3 else (6 if QT == 6 else 8)
        NB: tl.constexpr = BK // 32
        base = row_off[:, None] + (k0 // 32 + tl.arange(0, NB).to(tl.int64))[None, :] * TS
        d = tl.load(wh + base // 2).to(tl.float32)[:, :, None, None]          # [BN, NB, 1, 1]
        l4 = tl.arange(0, 16).to(tl.int64)[None, None, None, :]
        h4 = tl.arange(0, 2).to(tl.int64)[None, None, :, None]
        b4 = base[:, :, None, None]
        qs = tl.load(wb + b4 + QS + l4)                                       # [BN, NB, 1, 16]
        q = tl.where(h4 == 1, qs >> 4, qs & 15)                               # [BN, NB, 2, 16]
        if QT != 3:
            e = 16 * h4 + l4                                                  # [1, 1, 2, 16]
            qh = tl.load(wb + b4 + (QS - 4) + e // 8)                         # [BN, NB, 2, 16]
            q = q | (((qh >> (e % 8)) & 1) << 4)
        if QT == 6:
            w = tl.reshape((q.to(tl.float32) - 16.0) * d, (BN, BK))
        else:
            m = tl.load(wh + base // 2 + 1).to(tl.float32)[:, :, None, None]
            w = tl.reshape(q.to(tl.float32) * d + m, (BN, BK))
    elif QT == 8:  # Q8_0, 34 bytes: d:f16 | qs:i8[32]
        NB: tl.constexpr = BK // 32
        base = row_off[:, None] + (k0 // 32 + tl.arange(0, NB).to(tl.int64))[None, :] * 34
        d = tl.load(wh + base // 2).to(tl.float32)[:, :, None]                # [BN, NB, 1]
        l3 = tl.arange(0, 32).to(tl.int64)[None, None, :]
        q = tl.load(wi + base[:, :, None] + 2 + l3)                           # [BN, NB, 32]
        w = tl.reshape(q.to(tl.float32) * d, (BN, BK))
    elif QT == 12 or QT == 13:
        # Q4_K (144 bytes): d dmin:f16 | scales[12] | qs[128]
        # Q5_K (176 bytes): d dmin:f16 | scales[12] | qh[32] | qs[128]
        # element 64 g + 32 h + l of a super-block is in sub-block s = 2 g + h: nibble h of
        # qs[32 g + l] (Q5_K: bit s of qh[l] is bit 4). The tile holds G groups g of NB blocks.
        TS: tl.constexpr = 144 + 32 * (QT - 12)
        NB: tl.constexpr = (BK + 255) // 256
        G: tl.constexpr = BK // NB // 64
        base = row_off[:, None] + (k0 // 256 + tl.arange(0, NB).to(tl.int64))[None, :] * TS
        d = tl.load(wh + base // 2).to(tl.float32)[:, :, None, None]          # [BN, NB, 1, 1]
        dmin = tl.load(wh + base // 2 + 1).to(tl.float32)[:, :, None, None]
        g = (k0 % 256) // 64 + tl.arange(0, G).to(tl.int64)[None, None, :, None]  # [1, 1, G, 1]
        h = tl.arange(0, 2).to(tl.int64)[None, None, None, :]                 # [1, 1, 1, 2]
        s = 2 * g + h
        # 6-bit scale and min of sub-block s (ggml get_scale_min_k4)
        sc = wb + base[:, :, None, None] + 4
        a = tl.load(sc + s)                                                   # [BN, NB, G, 2]
        b = tl.load(sc + s + 4)
        c = tl.load(sc + (s & 3))                                             # byte s-4 if s >= 4
        first = s < 4
        scale = tl.where(first, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(first, b & 63, (b >> 4) | ((a >> 6) << 4))
        dl = (d * scale.to(tl.float32))[:, :, :, :, None]                     # [BN, NB, G, 2, 1]
        ml = (dmin * mn.to(tl.float32))[:, :, :, :, None]
        l5 = tl.arange(0, 32).to(tl.int64)[None, None, None, None, :]
        b5 = base[:, :, None, None, None]
        qs = tl.load(wb + b5 + (TS - 128) + g[:, :, :, :, None] * 32 + l5)    # [BN, NB, G, 1, 32]
        q = tl.where(h[:, :, :, :, None] == 1, qs >> 4, qs & 15)              # [BN, NB, G, 2, 32]
        if QT == 13:
            qh = tl.load(wb + b5 + 16 + l5)                                   # [BN, NB, 1, 1, 32]
            q = q | (((qh >> s[:, :, :, :, None]) & 1) << 4)
        w = tl.reshape(q.to(tl.float32) * dl - ml, (BN, BK))
    elif QT == 14:
        # Q6_K (210 bytes): ql[128] | qh[64] | scales:i8[16] | d:f16. Element
        # 64 g + 32 c1 + l of a super-block (g = 2 half + hi): nibble hi of
        # ql[64 half + 32 c1 + l], high 2 bits: qh[32 half + l] >> (4 hi + 2 c1); scale j // 16.
        NB: tl.constexpr = (BK + 255) // 256
        G: tl.constexpr = BK // NB // 64
        base = row_off[:, None] + (k0 // 256 + tl.arange(0, NB).to(tl.int64))[None, :] * 210
        d = tl.load(wh + (base + 208) // 2).to(tl.float32)[:, :, None, None]  # [BN, NB, 1, 1]
        si = (k0 % 256) // 16 + tl.arange(0, 4 * G).to(tl.int64)[None, None, :, None]
        dl = d * tl.load(wi + base[:, :, None, None] + 192 + si).to(tl.float32)  # [BN,NB,4G,1]
        g = (k0 % 256) // 64 + tl.arange(0, G).to(tl.int64)[None, None, :, None, None]
        half = g // 2
        hi = g % 2
        c1 = tl.arange(0, 2).to(tl.int64)[None, None, None, :, None]
        l5 = tl.arange(0, 32).to(tl.int64)[None, None, None, None, :]
        b5 = base[:, :, None, None, None]
        ql = tl.load(wb + b5 + half * 64 + c1 * 32 + l5)                      # [BN, NB, G, 2, 32]
        qh = tl.load(wb + b5 + 128 + half * 32 + l5)                          # [BN, NB, G, 1, 32]
        q = tl.where(hi == 1, ql >> 4, ql & 15) | (((qh >> (4 * hi + 2 * c1)) & 3) << 4)
        q = tl.reshape(q.to(tl.float32) - 32.0, (BN, NB, 4 * G, 16))
        w = tl.reshape(dl * q, (BN, BK))
    else:          # F32 / F16 / BF16: wh is the element view, row_off counts elements
        kk = k0 + tl.arange(0, BK).to(tl.int64)
        w = tl.load(wh + row_off[:, None] + kk[None, :]).to(tl.float32)
    return w


_HELPERS = ("_dequant_tile",)


# ------------------------------------------------------------------ kernels

def _gemv(x_ptr, sx, wb, wh, wi, y_ptr, sy, T, n_out, row_stride, n_in, k_split,
          QT: tl.constexpr, TP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          ATOMIC: tl.constexpr, F32: tl.constexpr):
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)     # [BN] columns
    n_ok = rn < n_out
    row_off = tl.where(n_ok, rn, 0) * row_stride   # tail columns re-read row 0: no load masks
    tt = tl.arange(0, TP).to(tl.int64)                                          # [TP] tokens
    k_lo = tl.program_id(1).to(tl.int64) * k_split
    k_hi = tl.minimum(k_lo + k_split, n_in)
    acc = tl.full((TP, BN), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        w = _dequant_tile(wb, wh, wi, row_off, k0, QT, BN, BK)                  # [BN, BK]
        kk = k0 + tl.arange(0, BK).to(tl.int64)
        if F32:   # interpreter: one [TP, BN, BK] product, a handful of numpy calls
            xt = tl.load(x_ptr + tt[:, None] * sx + kk[None, :], mask=(tt < T)[:, None],
                         other=0.0).to(tl.float32)
            acc += tl.reduce(xt[:, None, :] * w[None, :, :], 2, _SUM)
        else:     # CUDA: token by token, so only the [BN, BK] tile is live in registers
            for t in tl.static_range(TP):
                xt = tl.load(x_ptr + t * sx + kk, mask=(kk < n_in) & (t < T),
                             other=0.0).to(tl.float32)
                part = tl.reduce(w * xt[None, :], 1, _SUM)                       # [BN]
                acc += tl.where(tt[:, None] == t, part[None, :], 0.0)
    y = y_ptr + tt[:, None] * sy + rn[None, :]
    ok = (tt < T)[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y, acc, mask=ok, sem="relaxed")
    else:
        tl.store(y, acc, mask=ok)


# CUDA: x and the dequantized tile are rounded to fp16 for tl.dot (fp32 accumulation): each
# product carries ~2^-11 relative error, so |y - y_exact| ~ 2^-11 * sqrt(K) * rms(x_k w_k),
# i.e. ~1e-3 of max|y| on random data; the interpreter (fp32) is ~1e-6.
def _gemm(x_ptr, sx, wb, wh, wi, y_ptr, sy, T, n_out, row_stride, n_in,
          QT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          F32: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)    # [BM] tokens
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)    # [BN] columns
    m_ok = rm < T
    n_ok = rn < n_out
    row_off = tl.where(n_ok, rn, 0) * row_stride
    x_rows = x_ptr + tl.where(m_ok, rm, 0)[:, None] * sx                        # [BM, 1]
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, n_in, BK):
        kk = k0 + tl.arange(0, BK).to(tl.int64)
        xt = tl.load(x_rows + kk[None, :])                                      # [BM, BK]
        w = _dequant_tile(wb, wh, wi, row_off, k0, QT, BN, BK)                  # [BN, BK]
        if F32:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)))
    tl.store(y_ptr + rm[:, None] * sy + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def _moe_gate_up(x_ptr, sx, order_ptr, tile_slot_ptr, tile_r0_ptr, tile_r1_ptr, k_top,
                 gb, gh, gi, g_row, g_slot, ub, uh, ui, u_row, u_slot, h_ptr, F, D,
                 GT: tl.constexpr, UT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, F32: tl.constexpr):
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)               # -1: a spare tile, no work
    rows = tl.load(tile_r0_ptr + tile).to(tl.int64) + tl.arange(0, BM).to(tl.int64)  # [BM]
    r_ok = rows < tl.load(tile_r1_ptr + tile).to(tl.int64)
    pair = tl.load(order_ptr + rows, mask=r_ok, other=0).to(tl.int64)            # (t, k) pair
    x_rows = x_ptr + (pair // k_top)[:, None] * sx                                # [BM, 1]
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)      # [BN] of F
    n_ok = rn < F
    nr = tl.where(n_ok, rn, 0)
    s = tl.maximum(slot, 0)
    g_off = s * g_slot + nr * g_row
    u_off = s * u_slot + nr * u_row
    acc_g = tl.full((BM, BN), 0.0, tl.float32)
    acc_u = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, tl.where(slot >= 0, D, 0), BK):
        kk = k0 + tl.arange(0, BK).to(tl.int64)
        xt = tl.load(x_rows + kk[None, :])                                       # [BM, BK]
        wg = _dequant_tile(gb, gh, gi, g_off, k0, GT, BN, BK)                    # [BN, BK]
        wu = _dequant_tile(ub, uh, ui, u_off, k0, UT, BN, BK)
        if F32:
            xt = xt.to(tl.float32)
            acc_g += tl.dot(xt, tl.trans(wg), input_precision="ieee")
            acc_u += tl.dot(xt, tl.trans(wu), input_precision="ieee")
        else:
            xt = xt.to(tl.float16)
            acc_g += tl.dot(xt, tl.trans(wg.to(tl.float16)))
            acc_u += tl.dot(xt, tl.trans(wu.to(tl.float16)))
    hv = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u                                  # silu(g) * u
    tl.store(h_ptr + rows[:, None] * F + rn[None, :], hv, mask=r_ok[:, None] & n_ok[None, :])


def _moe_down(h_ptr, order_ptr, tile_slot_ptr, tile_r0_ptr, tile_r1_ptr, wt_ptr,
              db, dh, di, d_row, d_slot, y_ptr, D, F,
              DT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              F32: tl.constexpr):
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    rows = tl.load(tile_r0_ptr + tile).to(tl.int64) + tl.arange(0, BM).to(tl.int64)  # [BM]
    r_ok = rows < tl.load(tile_r1_ptr + tile).to(tl.int64)
    pair = tl.load(order_ptr + rows, mask=r_ok, other=0).to(tl.int64)
    h_rows = h_ptr + tl.where(r_ok, rows, 0)[:, None] * F                         # [BM, 1]
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)      # [BN] of D
    n_ok = rn < D
    d_off = tl.maximum(slot, 0) * d_slot + tl.where(n_ok, rn, 0) * d_row
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, tl.where(slot >= 0, F, 0), BK):
        kk = k0 + tl.arange(0, BK).to(tl.int64)
        ht = tl.load(h_rows + kk[None, :])                                       # [BM, BK]
        w = _dequant_tile(db, dh, di, d_off, k0, DT, BN, BK)                     # [BN, BK]
        if F32:
            acc += tl.dot(ht, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(ht.to(tl.float16), tl.trans(w.to(tl.float16)))
    wt = tl.load(wt_ptr + pair, mask=r_ok, other=0.0)                             # [BM]
    tl.store(y_ptr + pair[:, None] * D + rn[None, :], acc * wt[:, None],
             mask=r_ok[:, None] & n_ok[None, :])


_GEMV = _Kernel(_gemv)
_GEMM = _Kernel(_gemm)
_MOE_GATE_UP = _Kernel(_moe_gate_up)
_MOE_DOWN = _Kernel(_moe_down)


# ------------------------------------------------------------------ kernel table

@dataclass(frozen=True)
class Tiles:
    block_m: int          # tokens per tile (gemv: unused, all T <= 8 tokens ride along)
    block_n: int          # output columns per program
    block_k: int          # largest K step; the launch uses the largest QK * 2^j <= it dividing K
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class KernelEntry:
    kind: str             # "gemv" | "dot" | "torch"
    run: Callable         # (x, w, ggml_type, n_out, n_in, out, entry) -> out
    cuda: Tiles | None    # compiled tiles
    interp: Tiles | None  # interpreter tiles: big, since its cost is per op, not per element


def _t_class(T: int) -> str:
    return "gemv" if T <= _GEMV_MAX_T else "dot"


def _is_interp(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" or triton_interpret()


def _row_stride(ggml_type: int, n_in: int) -> int:
    """Row pitch in the units _dequant_tile indexes: bytes (quant) or elements (float)."""
    qt = QUANT_TYPES[ggml_type]
    return n_in if ggml_type in _FLOAT_TYPES else n_in // qt.block_size * qt.type_size


def _block_k(n_in: int, qk: int, bk_max: int) -> int:
    bk = qk
    while bk * 2 <= bk_max and n_in % (bk * 2) == 0:
        bk *= 2
    return bk


def _views(w: torch.Tensor, ggml_type: int):
    """(uint8, f16-or-element view, int8) of the flat weight bytes."""
    wh = w.view(_FLOAT_TYPES.get(ggml_type, torch.float16))
    return w, wh, w.view(torch.int8)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _run_gemv(x, w, ggml_type, n_out, n_in, out, entry):
    T = x.shape[0]
    interp = _is_interp(x)
    tiles = entry.interp if interp else entry.cuda
    bk = _block_k(n_in, _TILE_QK[ggml_type], tiles.block_k)
    n_tiles = triton.cdiv(n_out, tiles.block_n)
    n_steps = n_in // bk
    if interp:   # two splits when possible, so tests cover the atomic path cheaply
        want = 2
    else:        # enough programs for ~2 waves of the SMs
        want = triton.cdiv(2 * _sm_count(x.device.index or 0), n_tiles)
    per_split = triton.cdiv(n_steps, max(1, min(want, n_steps)))
    n_split = triton.cdiv(n_steps, per_split)
    if n_split > 1:
        out.zero_()
    _GEMV[(n_tiles, n_split)](
        x, x.stride(0), *_views(w, ggml_type), out, out.stride(0), T, n_out,
        _row_stride(ggml_type, n_in), n_in, per_split * bk,
        QT=ggml_type, TP=triton.next_power_of_2(T), BN=tiles.block_n, BK=bk,
        ATOMIC=n_split > 1, F32=interp, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


def _run_gemm(x, w, ggml_type, n_out, n_in, out, entry):
    T = x.shape[0]
    interp = _is_interp(x)
    tiles = entry.interp if interp else entry.cuda
    bk = _block_k(n_in, _TILE_QK[ggml_type], tiles.block_k)
    grid = (triton.cdiv(T, tiles.block_m), triton.cdiv(n_out, tiles.block_n))
    _GEMM[grid](
        x, x.stride(0), *_views(w, ggml_type), out, out.stride(0), T, n_out,
        _row_stride(ggml_type, n_in), n_in,
        QT=ggml_type, BM=tiles.block_m, BN=tiles.block_n, BK=bk, F32=interp,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


def _run_torch(x, w, ggml_type, n_out, n_in, out, entry):
    W = w.view(_FLOAT_TYPES[ggml_type]).view(n_out, n_in)
    if x.device.type == "cuda" and ggml_type != 0:   # tensor cores, fp32 accumulation
        y = torch.nn.functional.linear(x.to(W.dtype), W)
    else:
        y = torch.nn.functional.linear(x.float(), W.float())
    return out.copy_(y)


# CUDA tiles are sized for registers (checked with ptxas for sm_90: no spills); interpreter
# tiles are big, since the interpreter's cost is per op, not per element.
_GEMV_TILES_CUDA = Tiles(block_m=1, block_n=32, block_k=64, num_warps=4, num_stages=2)
_GEMV_TILES_INTERP = Tiles(block_m=1, block_n=512, block_k=256)
_DOT_TILES_CUDA = Tiles(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=2)
_DOT_TILES_INTERP = Tiles(block_m=64, block_n=512, block_k=256)


def _table() -> dict[tuple[int, str], KernelEntry]:
    table = {}
    for t in _QUANT_IDS:
        table[(t, "gemv")] = KernelEntry("gemv", _run_gemv, _GEMV_TILES_CUDA, _GEMV_TILES_INTERP)
        table[(t, "dot")] = KernelEntry("dot", _run_gemm, _DOT_TILES_CUDA, _DOT_TILES_INTERP)
    for t in _FLOAT_TYPES:
        for cls in ("gemv", "dot"):
            table[(t, cls)] = KernelEntry("torch", _run_torch, None, None)
    return table


KERNEL_TABLE: dict[tuple[int, str], KernelEntry] = _table()

# Grouped MoE tiles (both stages): tl.dot needs >= 16 rows; decode routes ~1 row per expert.
_MOE_TILES_CUDA = Tiles(block_m=16, block_n=32, block_k=64, num_warps=8, num_stages=2)
_MOE_TILES_INTERP = Tiles(block_m=16, block_n=64, block_k=256)


# ------------------------------------------------------------------ checks

def _check_type(ggml_type) -> int:
    ggml_type = int(ggml_type)
    if ggml_type not in SUPPORTED:
        names = ", ".join(QUANT_TYPES[t].name for t in sorted(SUPPORTED))
        raise UnsupportedError(f"GPU kernels do not support {type_name(ggml_type)}; "
                               f"supported: {names}")
    return ggml_type


def _check_cols(ggml_type: int, n: int, what: str, qk: int | None = None) -> None:
    qk = qk or QUANT_TYPES[ggml_type].block_size
    if n <= 0 or n % qk:
        raise ValueError(f"{what} = {n} must be a positive multiple of {qk} "
                         f"({QUANT_TYPES[ggml_type].name} blocks)")


def _check_float(t, what: str, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{what} must have {dims} dims, got shape {list(t.shape)}")


def _check_bytes(w, what: str, lead: tuple[int, ...], n_bytes: int, device) -> torch.Tensor:
    """w: uint8 holding lead x n_bytes bytes, flat or [*lead, n_bytes]; returns it contiguous."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8 (the GGUF block bytes), got {w.dtype}")
    if w.device != device:
        raise ValueError(f"{what} is on {w.device} but x is on {device}")
    want = n_bytes
    for n in lead:
        want *= n
    if w.numel() != want:
        raise ValueError(f"{what} holds {w.numel()} bytes, expected {want} "
                         f"({' x '.join(map(str, (*lead, n_bytes)))})")
    if not w.is_contiguous():
        raise ValueError(f"{what} must be contiguous (strides {w.stride()})")
    if w.storage_offset() % 4:
        raise ValueError(f"{what} must start 4-byte aligned in its storage, offset "
                         f"{w.storage_offset()}")
    return w


def _check_out(out, shape: tuple[int, ...], device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        raise TypeError(f"out must be a float32 tensor, got "
                        f"{getattr(out, 'dtype', type(out).__name__)}")
    if tuple(out.shape) != shape or out.device != device:
        raise ValueError(f"out must be {list(shape)} on {device}, got {list(out.shape)} "
                         f"on {out.device}")
    if out.stride(-1) != 1:
        raise ValueError(f"out rows must be contiguous, got strides {out.stride()}")
    return out


# ------------------------------------------------------------------ public API

def matmul(x: torch.Tensor, w: torch.Tensor, ggml_type: int, n_out: int, n_in: int,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for W [n_out, n_in] stored as GGUF rows of `ggml_type`.

    x: float [T, n_in] on w's device; w: uint8 [n_out * row_bytes] or [n_out, row_bytes].
    Returns float32 [T, n_out] (written into `out` when given)."""
    ggml_type = _check_type(ggml_type)
    n_out, n_in = int(n_out), int(n_in)
    _check_cols(ggml_type, n_in, "n_in")
    if n_out <= 0:
        raise ValueError(f"n_out = {n_out} must be positive")
    _check_float(x, "x", 2)
    if x.shape[1] != n_in:
        raise ValueError(f"x has {x.shape[1]} columns, expected n_in = {n_in}")
    w = _check_bytes(w, "w", (n_out,), row_bytes(ggml_type, n_in), x.device).reshape(-1)
    T = x.shape[0]
    out = _check_out(out, (T, n_out), x.device)
    if T == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    entry = KERNEL_TABLE[(ggml_type, _t_class(T))]
    return entry.run(x, w, ggml_type, n_out, n_in, out, entry)


def _tile_table(slot_of, ids, S: int, BM: int):
    """Group (token, k) pairs by resident slot, without a host sync (CUDA-graph friendly).

    Returns order [P] (pair ids, sorted by slot, non-resident last) and per tile of up to BM
    sorted rows: slot (-1 for spare tiles), first row, end row; n_tiles is the bound
    cdiv(P, BM) + min(S, P), so the grid does not depend on the routing."""
    dev = ids.device
    flat = ids.reshape(-1).long()                                                # [P]
    P = flat.numel()
    sl = slot_of.long()[flat]
    key = torch.where(sl >= 0, sl, S)                                            # [P] in 0..S
    order = torch.sort(key, stable=True).indices                                # [P]
    counts = torch.zeros(S + 1, dtype=torch.long, device=dev).scatter_add_(
        0, key, torch.ones_like(key))[:S]                                        # [S]
    n_t = (counts + BM - 1) // BM
    last_t = torch.cumsum(n_t, 0)                                                # [S] inclusive
    first_row = torch.cumsum(counts, 0) - counts                                 # [S]
    n_tiles = triton.cdiv(P, BM) + min(S, P)
    i = torch.arange(n_tiles, device=dev)
    ts = torch.searchsorted(last_t, i, right=True)                               # slot of tile i
    valid = ts < S
    sc = ts.clamp(max=S - 1)
    r0 = first_row[sc] + (i - (last_t[sc] - n_t[sc])) * BM
    r1 = torch.where(valid, first_row[sc] + counts[sc], r0)
    slot = torch.where(valid, ts, -1)
    return order, slot.to(torch.int32), r0, r1, n_tiles


def moe_grouped(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                slot_of: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                gate_type: int, up_type: int, down_type: int, d_ff: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The resident ("hot") experts of one MoE layer, one launch per projection stage.

    x [T, D] float; ids [T, K] expert ids in 0..E-1; weights [T, K]; slot_of int32 [E] (slot or
    -1); gate, up: uint8 [S, d_ff * row_bytes(type, D)]; down: uint8 [S, D * row_bytes(type,
    d_ff)]. Returns float32 [T, D]: sum over pairs with a resident expert of
    weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t); other pairs add 0."""
    gate_type, up_type, down_type = (_check_type(t) for t in (gate_type, up_type, down_type))
    _check_float(x, "x", 2)
    T, D = x.shape
    F = int(d_ff)
    qk_in = max(_TILE_QK[gate_type], _TILE_QK[up_type])
    for t, n, what in ((gate_type, D, "D (gate)"), (up_type, D, "D (up)"),
                       (down_type, F, "d_ff (down)")):
        _check_cols(t, n, what, max(QUANT_TYPES[t].block_size, _TILE_QK[t]))
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() != 2 \
            or ids.shape[0] != T:
        raise TypeError(f"ids must be an integer tensor [T={T}, K], got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)} "
                        f"{list(getattr(ids, 'shape', []))}")
    K = ids.shape[1]
    if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point \
            or tuple(weights.shape) != (T, K):
        raise TypeError(f"weights must be a float tensor [{T}, {K}], got "
                        f"{getattr(weights, 'dtype', type(weights).__name__)} "
                        f"{list(getattr(weights, 'shape', []))}")
    if not isinstance(slot_of, torch.Tensor) or slot_of.dtype != torch.int32 \
            or slot_of.dim() != 1:
        raise TypeError(f"slot_of must be int32 [E], got "
                        f"{getattr(slot_of, 'dtype', type(slot_of).__name__)}")
    for t, what in ((ids, "ids"), (weights, "weights"), (slot_of, "slot_of")):
        if t.device != x.device:
            raise ValueError(f"{what} is on {t.device} but x is on {x.device}")
    if not isinstance(gate, torch.Tensor) or gate.dim() != 2:
        raise TypeError(f"gate must be a uint8 tensor [S, bytes], got "
                        f"{list(getattr(gate, 'shape', [])) or type(gate).__name__}")
    S = gate.shape[0]
    gate = _check_bytes(gate, "gate", (S, F), row_bytes(gate_type, D), x.device).reshape(-1)
    up = _check_bytes(up, "up", (S, F), row_bytes(up_type, D), x.device).reshape(-1)
    down = _check_bytes(down, "down", (S, D), row_bytes(down_type, F), x.device).reshape(-1)
    g_row, u_row = _row_stride(gate_type, D), _row_stride(up_type, D)
    d_row = _row_stride(down_type, F)
    out = _check_out(out, (T, D), x.device)
    P = T * K
    if P == 0 or S == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()

    interp = _is_interp(x)
    tiles = _MOE_TILES_INTERP if interp else _MOE_TILES_CUDA
    BM, BN = tiles.block_m, tiles.block_n
    order, tile_slot, r0, r1, n_tiles = _tile_table(slot_of, ids, S, BM)
    h = torch.empty((P, F), dtype=torch.float32, device=x.device)     # [P, F] by sorted row
    y = torch.zeros((P, D), dtype=torch.float32, device=x.device)     # [P, D] by pair
    kw = dict(F32=interp, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    _MOE_GATE_UP[(n_tiles, triton.cdiv(F, BN))](
        x, x.stride(0), order, tile_slot, r0, r1, K,
        *_views(gate, gate_type), g_row, F * g_row, *_views(up, up_type), u_row, F * u_row,
        h, F, D, GT=gate_type, UT=up_type, BM=BM, BN=BN,
        BK=_block_k(D, qk_in, tiles.block_k), **kw)
    _MOE_DOWN[(n_tiles, triton.cdiv(D, BN))](
        h, order, tile_slot, r0, r1, weights.reshape(-1).float().contiguous(),
        *_views(down, down_type), d_row, D * d_row, y, D, F,
        DT=down_type, BM=BM, BN=BN, BK=_block_k(F, _TILE_QK[down_type], tiles.block_k), **kw)
    return torch.sum(y.view(T, K, D), dim=1, out=out)
