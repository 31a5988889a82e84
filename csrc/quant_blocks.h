// GGUF/ggml quantized block layouts (weights) and the activation blocks they are paired with.
// Facts: little-endian, blocks packed without padding, scales in IEEE half unless noted.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace hmoe {

constexpr int QK_K = 256;  // elements per K-quant super-block
constexpr int QK32 = 32;   // elements per legacy block

// ggml type ids (the numbers stored in GGUF tensor infos).
enum GgmlType : int {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q8_1 = 9, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_Q8_K = 15,
    T_IQ4_NL = 20, T_IQ4_XS = 23, T_BF16 = 30,
    // Internal layouts made at load (never in a file; ids no ggml type uses): see the blocks below.
    T_Q2_K_R16 = 110, T_Q3_K_R16 = 111, T_Q4_K_R16 = 112, T_Q6_K_R16 = 114, T_Q4_0_R16 = 115, T_Q5_0_R16 = 116, T_Q8_0_R16 = 117, T_IQ4_NL_R16 = 120, T_IQ4_XS_R16 = 123,
};

// ---- weight blocks ----
struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };                   // q = nibble - 8
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[16]; };                // x = d*nibble + m
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };    // q = (nibble | bit<<4) - 16
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
// IQ4_NL: x = d * IQ4_VALUES[index], indices as Q4_0's nibbles (low: elements 0..15, high: 16..31).
struct BlockIQ4_NL { uint16_t d; uint8_t qs[16]; };
// IQ4_XS: 8 sub-blocks of 32 laid out like IQ4_NL's indices; sub-block j's 6-bit scale is the nibble
// (scales_l[j/2] >> 4(j%2)) & 15 with bits 2j..2j+1 of scales_h on top; x = d * (scale - 32) * value.
struct BlockIQ4_XS { uint16_t d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; };
// ggml's kvalues_iq4nl
constexpr int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
inline int iq4xs_scale(const BlockIQ4_XS& b, int j) {
    return (((b.scales_l[j / 2] >> (4 * (j % 2))) & 15) | (((b.scales_h >> (2 * j)) & 3) << 4)) - 32;
}
// Q2_K: 16 groups of 16; scales[g] = scale (low nibble) | min (high nibble); value 128h+32s+l is
// bits 2s..2s+1 of qs[32h+l]; x = d*scale*q - dmin*min.
struct BlockQ2_K { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; };
// Q3_K: 16 groups of 16 with 6-bit scales (minus 32) packed in 12 bytes (low nibbles in bytes 0-7,
// group g >= 8 in the high nibble of byte g-8; the top 2 bits of group g are bits 2(g/4).. of
// byte 8+g%4); value 128h+32s+l: low bits 2s..2s+1 of qs[32h+l], high bit 4h+s of hmask[l] (set:
// q = low, clear: q = low - 4); x = d*(scale-32)*q.
struct BlockQ3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; };
struct BlockQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct BlockQ5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct BlockQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };

// Q4_K_R16: one super-block (256 columns) of sixteen consecutive Q4_K rows, interleaved so that one
// int32 lane of a vector is one row: the same 4 quant bytes of all sixteen rows are 64 consecutive
// bytes (one 512-bit register, two 256-bit ones), met by one 4-byte activation broadcast in a u8 x s8
// dot. Row i: d[i], dmin[i]; sc[b][i] = byte b of the row's 12 packed 6-bit scales and mins (Q4_K's
// own packing, one byte of every row side by side); qs[k][c][i][e] = byte 32k+4c+e of the row's
// Q4_K qs, whose low nibble is value 64k+4c+e (sub-block 2k) and high nibble value 64k+32+4c+e
// (sub-block 2k+1); x = d[i]*scale*q - dmin[i]*min, as Q4_K. A matrix of R rows (R a multiple of
// 16) is R/16 groups, each its super-blocks in order: 144 bytes per row and super-block, as Q4_K.
struct BlockQ4_K_R16 { uint16_t d[16], dmin[16]; uint8_t sc[12][16]; uint8_t qs[4][8][16][4]; };
// Q6_K_R16: one super-block of sixteen consecutive Q6_K rows, interleaved as Q4_K_R16 (int32 lane i
// = row i): d[i]; scales[p][i][e] = the row's scale of 16-value group 2p+e; ql(n, h, c, i)[e] = byte
// 64n+32h+4c+e of the row's ql, qh(n, c, i)[e] = byte 32n+4c+e of its qh. Value 128n+32m+l (l < 32)
// is code (ql(n, m%2, l/4, i)[l%4] >> 4(m/2)) & 15 | ((qh(n, l/4, i)[l%4] >> 2m) & 3) << 4, and
// x = d[i] * scale(group (128n+32m+l)/16) * (code - 32), as Q6_K. 210 bytes per row and super-block.
// The codes lie in the order the kernels read them (per n, per half c/4, per c: ql(n, 0, c), qh(n, c),
// ql(n, 1, c), each 16 rows x 4 bytes): a one-token GEMV streams the block front to back, which the
// hardware prefetchers follow (the earlier ql-then-qh order read 1.3-1.4x slower from memory).
struct BlockQ6_K_R16 {
    uint16_t d[16];
    int8_t scales[8][16][2];
    uint8_t q[2][2][4][3][16][4];  // [n][c / 4][c % 4][ql(n, 0, c), qh(n, c), ql(n, 1, c)][i][e]
    uint8_t* ql(int n, int h, int c, int i) { return q[n][c / 4][c % 4][2 * h][i]; }
    const uint8_t* ql(int n, int h, int c, int i) const { return q[n][c / 4][c % 4][2 * h][i]; }
    uint8_t* qh(int n, int c, int i) { return q[n][c / 4][c % 4][1][i]; }
    const uint8_t* qh(int n, int c, int i) const { return q[n][c / 4][c % 4][1][i]; }
};
// Q3_K_R16: one super-block of sixteen consecutive Q3_K rows, interleaved as Q4_K_R16 (int32 lane i =
// row i): d[i]; sc[b][i] = byte b of the row's 12 packed scale bytes (Q3_K's own packing);
// hm(c, i)[e] = byte 4c+e of the row's hmask, qs(h, c, i)[e] = byte 32h+4c+e of its qs. Value
// 128h+32s+l (l = 4c+e < 32) is code ((qs(h, c, i)[e] >> 2s) & 3) | ((hm(c, i)[e] >> (4h+s)) & 1) << 2
// in 0..7, and x = d[i] * scale(group 8h+2s+l/16) * (code - 4), as Q3_K. In the kernels' read order
// (for h = 0 each c's hm then qs, then h = 1's qs): 110 bytes per row and super-block, as Q3_K.
struct BlockQ3_K_R16 {
    uint16_t d[16];
    uint8_t sc[12][16];
    uint8_t q0[8][2][16][4];  // [c][hm(c), qs(0, c)][i][e]
    uint8_t q1[8][16][4];     // qs(1, c)
    uint8_t* hm(int c, int i) { return q0[c][0][i]; }
    const uint8_t* hm(int c, int i) const { return q0[c][0][i]; }
    uint8_t* qs(int h, int c, int i) { return h ? q1[c][i] : q0[c][1][i]; }
    const uint8_t* qs(int h, int c, int i) const { return h ? q1[c][i] : q0[c][1][i]; }
};
// Q2_K_R16: one super-block of sixteen consecutive Q2_K rows, interleaved as Q4_K_R16 (int32 lane i =
// row i): d[i], dmin[i]; sc[g][i] = the row's scales[g] (scale: low nibble, min: high nibble);
// qs(h, c, i)[e] = byte 32h+4c+e of its qs. Value 128h+32s+l (l = 4c+e < 32) is code
// (qs(h, c, i)[e] >> 2s) & 3, and x = d[i]*scale_g*code - dmin[i]*min_g with g = 8h+2s+l/16, as
// Q2_K. 84 bytes per row and super-block, as Q2_K.
struct BlockQ2_K_R16 {
    uint16_t d[16], dmin[16];
    uint8_t sc[16][16];
    uint8_t q[2][8][16][4];
    uint8_t* qs(int h, int c, int i) { return q[h][c][i]; }
    const uint8_t* qs(int h, int c, int i) const { return q[h][c][i]; }
};
// IQ4_XS_R16: one super-block of sixteen consecutive IQ4_XS rows, interleaved as Q4_K_R16 (int32 lane
// i = row i): d[i], sh[i] = the row's scales_h, sl[k][i] = its scales_l[k]; qs[j][c][i][e] = byte
// 16j+4c+e of its qs, whose low nibble indexes value 32j+4c+e and high nibble value 32j+16+4c+e;
// x = d[i] * (scale_j - 32) * IQ4_VALUES[index], as IQ4_XS. 136 bytes per row and super-block.
struct BlockIQ4_XS_R16 { uint16_t d[16], sh[16]; uint8_t sl[4][16]; uint8_t qs[8][4][16][4]; };
// The 32-value types with sixteen rows interleaved: per block of 32 columns d[i] (row i), then the
// codes as unsigned bytes u, value = u - OFF, 4 per row in each int32 lane. Q8_0_R16: qs[c][i][e] =
// q + 128 of value 4c+e (OFF 128). Q4_0_R16: qs[c][i][e] = byte 4c+e of the row's qs (low nibble:
// value 4c+e, high nibble: value 16+4c+e; OFF 8). Q5_0_R16: as Q4_0_R16 (OFF 16), the fifth bits in
// hb[c][h]: bit 4i+e = that of value 16h+4c+e of row i (the byte order of a code vector).
// IQ4_NL_R16: Q4_0_R16's layout (the same bytes: d[16], then qs[c][i][e] = byte 4c+e of row i), each
// nibble an index into IQ4_VALUES.
struct BlockQ4_0_R16 { uint16_t d[16]; uint8_t qs[4][16][4]; };
struct BlockQ5_0_R16 { uint16_t d[16]; uint64_t hb[4][2]; uint8_t qs[4][16][4]; };
struct BlockQ8_0_R16 { uint16_t d[16]; uint8_t qs[8][16][4]; };

// ---- activation blocks ----
// Q8_K: per 256 values one f32 scale, int8 values, and int16 sums per 16 values (ggml's block), followed
// by d * (sum of 32 values) as f32 per 32: the min terms of Q4_K/Q5_K become one float FMA.
struct BlockQ8_K { float d; int8_t qs[256]; int16_t bsums[16]; float sums32[8]; };
// Q8_1 (internal layout): Q8_0 plus s = d * sum(qs), used with the weight types that carry a min.
struct BlockQ8_1 { uint16_t d, s; int8_t qs[32]; };

static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 layout");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 layout");
static_assert(sizeof(BlockQ5_0) == 22, "Q5_0 layout");
static_assert(sizeof(BlockQ5_1) == 24, "Q5_1 layout");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 layout");
static_assert(sizeof(BlockIQ4_NL) == 18, "IQ4_NL layout");
static_assert(sizeof(BlockIQ4_XS) == 136, "IQ4_XS layout");
static_assert(sizeof(BlockQ2_K) == 84, "Q2_K layout");
static_assert(sizeof(BlockQ3_K) == 110, "Q3_K layout");
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K layout");
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K layout");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K layout");
static_assert(sizeof(BlockQ4_K_R16) == 16 * 144, "Q4_K_R16 layout");
static_assert(sizeof(BlockQ6_K_R16) == 16 * 210, "Q6_K_R16 layout");
static_assert(sizeof(BlockQ3_K_R16) == 16 * 110, "Q3_K_R16 layout");
static_assert(sizeof(BlockQ2_K_R16) == 16 * 84, "Q2_K_R16 layout");
static_assert(sizeof(BlockIQ4_XS_R16) == 16 * 136, "IQ4_XS_R16 layout");
static_assert(sizeof(BlockQ4_0_R16) == 16 * 18 && sizeof(BlockQ5_0_R16) == 16 * 22 && sizeof(BlockQ8_0_R16) == 16 * 34,
              "32-value R16 layouts");
static_assert(sizeof(BlockQ8_K) == 324, "Q8_K layout");
static_assert(sizeof(BlockQ8_1) == 36, "Q8_1 layout");

// F32 (for F16/BF16 weights): the activations themselves, in blocks of 8 floats; a row's last block
// is zero-padded, so float weights of any width (llama.cpp's fallback for rows that are not whole
// quant blocks) run on the kernels. Exact, and converting the weights costs one instruction per 8.
constexpr int F32_ACT_BLOCK = 8;
struct BlockF32 { float v[F32_ACT_BLOCK]; };
static_assert(sizeof(BlockF32) == 32, "F32 activation block");

// Which activation format a weight type's dot product consumes.
enum ActKind : int { ACT_Q8_0 = 0, ACT_Q8_1 = 1, ACT_Q8_K = 2, ACT_F32 = 3, ACT_COUNT = 4 };

struct TypeInfo {
    int type;          // ggml id
    const char* name;
    int block;         // elements per block
    int bytes;         // bytes per block
    ActKind act;       // activation format
    int group = 1;     // rows interleaved together (a matrix's row count is a multiple of it)
};

// Data table of supported weight types; nullptr when unsupported.
const TypeInfo* type_info(int ggml_type);
inline int act_block(ActKind a) { return a == ACT_Q8_K ? QK_K : a == ACT_F32 ? F32_ACT_BLOCK : QK32; }
inline int act_bytes(ActKind a) {
    return a == ACT_Q8_K ? (int)sizeof(BlockQ8_K)
           : a == ACT_Q8_1 ? (int)sizeof(BlockQ8_1)
           : a == ACT_F32  ? (int)sizeof(BlockF32)
                           : (int)sizeof(BlockQ8_0);
}
// Activation blocks per row of n values: whole blocks, except F32's padded last block.
inline int act_blocks(ActKind a, int n) {
    return a == ACT_F32 ? (n + F32_ACT_BLOCK - 1) / F32_ACT_BLOCK : n / act_block(a);
}
const char* act_name(ActKind a);

// ---- half precision (portable; SIMD files use F16C) ----
inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do { man <<= 1; ++e; } while (!(man & 0x400));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Round-to-nearest-even f32 -> f16 (same result as the F16C instruction in its default mode).
inline uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // rounds to inf
    if (ax < 0x38800000) {                                    // subnormal or zero in f16
        if (ax < 0x33000000) return (uint16_t)sign;
        const uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        const int shift = 126 - (int)e;  // 14..24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) ++r;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((ax >> 13) - ((127 - 15) << 10));
    const uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
    return (uint16_t)(sign | r);
}

}  // namespace hmoe
