"""Torch reference dequantizers, one per GGUF block format.

Each takes uint8 blocks [n_blocks, type_size] and returns float32 [n_blocks, block_size]. The float
operations (which products and sums, in which order) mirror `gguf.quants`, so results are bit-exact
against it; every step is a separate eager op, so nothing is fused into an FMA. Integer steps are
exact, so they may be regrouped: bit fields are unpacked 8 bytes at a time on int64 words.

Block layouts (bytes, in order), QK_K = 256:
  Q4_0  d:f16 | qs[16]                      Q4_1  d:f16 m:f16 | qs[16]
  Q5_0  d:f16 | qh[4] qs[16]                Q5_1  d:f16 m:f16 | qh[4] qs[16]
  Q8_0  d:f16 | qs:i8[32]
  Q2_K  scales[16] qs[64] d:f16 dmin:f16    Q3_K  hmask[32] qs[64] scales[12] d:f16
  Q4_K  d:f16 dmin:f16 scales[12] qs[128]   Q5_K  d:f16 dmin:f16 scales[12] qh[32] qs[128]
  Q6_K  ql[128] qh[64] scales:i8[16] d:f16  Q8_K  d:f32 qs:i8[256] bsums:i16[16]
"""
from __future__ import annotations

import functools

import torch

QK_K = 256
_ONES = 0x0101010101010101  # one 0x01 in each byte of an int64 word


def _copy(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes [start, stop) of every block as fresh contiguous (so aligned) uint8 [n, stop-start]."""
    out = torch.empty((blocks.shape[0], stop - start), dtype=torch.uint8, device=blocks.device)
    return out.copy_(blocks[:, start:stop])


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Contiguous uint8 [n, 2k] -> float32 [n, k]."""
    return raw.view(torch.float16).float()


def _unpack(blocks: torch.Tensor, start: int, stop: int, groups: int, shifts: tuple[int, ...],
            mask: int) -> torch.Tensor:
    """Bytes [start, stop) split into `groups` runs of L bytes; each run is read once per shift as
    (byte >> shift) & mask. Returns uint8 [n, groups, len(shifts), L]. Needs L % 8 == 0."""
    n = blocks.shape[0]
    w = _copy(blocks, start, stop).view(torch.int64).view(n, groups, -1)  # [n, g, L/8]
    m = mask * _ONES
    parts = [(w >> s).bitwise_and_(m) if s else w & m for s in shifts]
    return torch.stack(parts, dim=2).view(torch.uint8)  # [n, g, S, L]


@functools.cache
def _bit16_lut(device: torch.device) -> torch.Tensor:
    """int64 [256]: byte k of entry v is 0x10 if bit k of v is set (Q5 high bits, pre-shifted)."""
    v = torch.arange(256, dtype=torch.int64, device=device)
    return sum((((v >> k) & 1) << 4) << (8 * k) for k in range(8))


def _high32(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Q5_0/Q5_1 qh: 4 bytes (little-endian u32) -> uint8 [n, 32], element j = bit j << 4."""
    qh = _copy(blocks, start, start + 4).long()  # [n, 4]
    return _bit16_lut(blocks.device)[qh].view(torch.uint8).view(blocks.shape[0], 32)


# --- float types (block_size 1) -------------------------------------------------------------

def _aligned(t: torch.Tensor, size: int) -> torch.Tensor:
    """Contiguous uint8 whose address and storage offset allow a view as a `size`-byte dtype."""
    t = t.contiguous()
    if t.data_ptr() % size or t.storage_offset() % size:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    # always a copy: the input may be a read-only mmap nobody must write through
    return _aligned(blocks, 4).view(torch.float32).clone()


def dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _aligned(blocks, 2).view(torch.float16).float()


def dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bf16 -> f32 is a 16-bit left shift of the bits: exact for every value, NaN payloads included
    return _aligned(blocks, 2).view(torch.bfloat16).float()


# --- 32-element blocks -----------------------------------------------------------------------

def _nibbles32(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """16 bytes -> uint8 [n, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return _unpack(blocks, start, start + 16, 1, (0, 4), 0x0F).view(blocks.shape[0], 32)


def dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(_copy(blocks, 0, 2))  # [n, 1]
    return _nibbles32(blocks, 2).float().sub_(8).mul_(d)  # d * (q - 8)


def dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    dm = _f16(_copy(blocks, 0, 4))  # [n, 2]: d, m
    return _nibbles32(blocks, 4).float().mul_(dm[:, 0:1]).add_(dm[:, 1:2])  # d * q + m


def dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(_copy(blocks, 0, 2))
    q = _nibbles32(blocks, 6).bitwise_or_(_high32(blocks, 2))
    return q.float().sub_(16).mul_(d)  # d * (q - 16)


def dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    dm = _f16(_copy(blocks, 0, 4))
    q = _nibbles32(blocks, 8).bitwise_or_(_high32(blocks, 4))
    return q.float().mul_(dm[:, 0:1]).add_(dm[:, 1:2])  # d * q + m


def dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(_copy(blocks, 0, 2))
    return blocks[:, 2:34].view(torch.int8).float().mul_(d)


# --- 256-element super-blocks (K-quants) -----------------------------------------------------

def dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = _copy(blocks, 0, 16)
    dd = _f16(_copy(blocks, 80, 84))                          # [n, 2]: d, dmin
    dl = (dd[:, 0:1] * (scales & 0x0F).float()).view(n, 16, 1)  # sub-block scale
    ml = (dd[:, 1:2] * (scales >> 4).float()).view(n, 16, 1)    # sub-block min
    # two halves of 128; each half's 32 bytes are read at shifts 0, 2, 4, 6
    q = _unpack(blocks, 16, 80, 2, (0, 2, 4, 6), 0x03).view(n, 16, 16)
    return q.float().mul_(dl).sub_(ml).view(n, QK_K)  # dl * q - ml


def _q3_k_scales(blocks: torch.Tensor) -> torch.Tensor:
    """Bytes 96..108: sixteen 6-bit scales -> float32 [n, 16] in -32..31. Scale 8i+j has its low
    4 bits in byte j >> 4i; scale 4i+j has its high 2 bits in byte 8+j >> 2i."""
    lo = _copy(blocks, 96, 104).view(torch.int64)   # [n, 1]
    hi = _copy(blocks, 104, 108).view(torch.int32)  # [n, 1]
    m4, m2 = 0x0F * _ONES, 0x03030303
    low = torch.cat([lo & m4, (lo >> 4) & m4], dim=1).view(torch.uint8)  # [n, 16]
    high = torch.cat([hi & m2, (hi >> 2) & m2, (hi >> 4) & m2, (hi >> 6) & m2], dim=1)
    return low.bitwise_or_(high.view(torch.uint8) << 4).float().sub_(32)


def dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(_copy(blocks, 108, 110))
    dl = (d * _q3_k_scales(blocks)).view(n, 16, 1)
    low = _unpack(blocks, 32, 96, 2, (0, 2, 4, 6), 0x03).view(n, 16, 16)
    high = _unpack(blocks, 0, 32, 1, tuple(range(8)), 0x01).view(n, 16, 16)
    # q = low - 4 * (1 - hbit) = (low | hbit << 2) - 4: a set hmask bit means "no offset"
    q = low.bitwise_or_(high << 2)
    return q.float().sub_(4).mul_(dl).view(n, QK_K)  # dl * q


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K head -> (d * scale, dmin * min), each float32 [n, 8, 1]."""
    n = blocks.shape[0]
    dd = _f16(_copy(blocks, 0, 4))  # [n, 2]: d, dmin
    # words a, b, c (4 bytes each): scale j / min j (j < 4) are the low 6 bits of a / b byte j;
    # scale / min 4+j are the low / high nibble of c byte j, plus the top 2 bits of a / b byte j
    a, b, c = _copy(blocks, 4, 16).view(torch.int32).unbind(1)
    m6, m4, m2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x30303030
    packed = torch.stack([a & m6, (c & m4) | ((a >> 2) & m2),
                          b & m6, ((c >> 4) & m4) | ((b >> 2) & m2)], dim=1)  # [n, 4] int32
    sm = packed.view(torch.uint8).float().view(n, 2, 8)
    return (dd[:, 0:1] * sm[:, 0]).view(n, 8, 1), (dd[:, 1:2] * sm[:, 1]).view(n, 8, 1)


def dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    # 4 runs of 32 bytes; low nibbles form one 32-element sub-block, high nibbles the next
    q = _unpack(blocks, 16, 144, 4, (0, 4), 0x0F).view(n, 8, 32)
    return q.float().mul_(dl).sub_(ml).view(n, QK_K)  # dl * q - ml


def dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    low = _unpack(blocks, 48, 176, 4, (0, 4), 0x0F).view(n, 8, 32)
    high = _unpack(blocks, 16, 48, 1, tuple(range(8)), 0x01).view(n, 8, 32)  # bit i -> sub-block i
    q = low.bitwise_or_(high << 4)
    return q.float().mul_(dl).sub_(ml).view(n, QK_K)


def dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(_copy(blocks, 208, 210))
    dl = (d * _copy(blocks, 192, 208).view(torch.int8).float()).view(n, 16, 1)
    # per half of 128: 64 ql bytes (low nibbles, then high) and 32 qh bytes of four 2-bit fields
    low = _unpack(blocks, 0, 128, 2, (0, 4), 0x0F).view(n, 8, 32)
    high = _unpack(blocks, 128, 192, 2, (0, 2, 4, 6), 0x03).view(n, 8, 32)
    q = low.bitwise_or_(high << 4)
    return q.view(n, 16, 16).float().sub_(32).mul_(dl).view(n, QK_K)  # dl * (q - 32)


def dequant_q8_k(blocks: torch.Tensor) -> torch.Tensor:
    d = _copy(blocks, 0, 4).view(torch.float32)  # [n, 1]
    return blocks[:, 4:260].view(torch.int8).float().mul_(d)


# --- non-linear 4-bit (IQ4_NL, IQ4_XS): 4-bit indices into one fixed table of 16 int8 values ---

# ggml's kvalues_iq4nl
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@functools.cache
def _iq4_table(device) -> torch.Tensor:
    return torch.tensor(IQ4_VALUES, dtype=torch.float32, device=device)


def dequant_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks of 32: d (f16), 16 bytes of indices (low nibbles: elements 0..15, high: 16..31)."""
    d = _f16(_copy(blocks, 0, 2))
    return _iq4_table(blocks.device)[_nibbles32(blocks, 2).long()].mul_(d)


def dequant_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """Super-blocks of 256: d (f16), scales_h (u16: 2 high bits per sub-block), scales_l (4 bytes:
    a low nibble per sub-block), then 8 sub-blocks of 16 index bytes laid out like IQ4_NL's;
    sub-block j's scale is d * (6-bit scale_j - 32)."""
    n = blocks.shape[0]
    d = _f16(_copy(blocks, 0, 2))                                        # [n, 1]
    sh = _copy(blocks, 2, 4).long()
    sh = sh[:, 0] | (sh[:, 1] << 8)                                      # [n]
    sl = _copy(blocks, 4, 8).long()                                      # [n, 4]
    j = torch.arange(8, device=blocks.device)
    low = (sl[:, j // 2] >> (4 * (j % 2))) & 0x0F                        # [n, 8]
    high = (sh[:, None] >> (2 * j)) & 0x03
    dl = d * ((low | (high << 4)) - 32).float()                          # [n, 8]
    q = _unpack(blocks, 8, 136, 8, (0, 4), 0x0F).view(n, 8, 32)          # [n, 8, 32]
    return _iq4_table(blocks.device)[q.long()].mul_(dl[:, :, None]).view(n, QK_K)
