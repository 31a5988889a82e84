// Kernel function tables: one per instruction-set variant, chosen once at load (see dispatch.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

#include "quant_blocks.h"

namespace hmoe {

// Most tokens one gemm call handles; drivers tile longer token lists.
constexpr int GEMM_MAX_TOKENS = 64;

// Quantize one row of n floats (n a multiple of the activation block; any n for F32, whose last
// block is zero-padded) into activation blocks placed block_stride bytes apart (the block size for a
// plain row; nt * block size inside a tile).
using QuantRowFn = void (*)(const float* x, uint8_t* y, int n, size_t block_stride);

// out[t*ldo + r] = dot(weight row r, activation row t) for r < nr, t < nt <= GEMM_MAX_TOKENS.
// Weight rows are w_row_bytes apart and n_cols long. The activations of the nt tokens form one
// block-major tile: block b of token t is at act + (b * nt + t) * activation block bytes, so the
// blocks that meet one weight block are contiguous.
using GemmFn = void (*)(const uint8_t* w, size_t w_row_bytes, int nr, int n_cols, const uint8_t* act, int nt,
                        float* out, size_t ldo);

// h[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i]
using SiluMulFn = void (*)(const float* g, const float* u, float* h, int n);

// Decode attention of one KV head over n cached positions (one split of flash-decoding):
// G query heads q [G, dk]; key l at k + l*ks, value l at v + l*vs (dk / dv elements each; strides in
// elements). The cache elements are float32, or f16 when f16 is set (widened exactly on load).
// Writes the split's softmax state: m[g] = max_l score, s[g] = sum_l exp(score - m[g]),
// o[g*dv + j] = sum_l exp(score - m[g]) v_l[j]; score = scale * <q_g, k_l>. p: [G * n] scratch.
using AttnPartFn = void (*)(const float* q, int G, int dk, int dv, const void* k, size_t ks, const void* v,
                            size_t vs, int n, float scale, float* p, float* m, float* s, float* o, bool f16);

// Prompt attention of one KV head for nt consecutive tokens at positions p0..p0+nt-1, causal (token t
// sees keys 0..p0+t): G query heads per token, head g of token t at q + t*qs + g*dk; key l at k + l*ks,
// value l at v + l*vs; the normalized output of head g of token t goes to o + t*os + g*dv, written
// after every read of q (o may be q when dv == dk). scratch: attn_prefill_scratch(G * nt, dk, dv) floats.
// window > 0: a sliding window, token t sees only keys p0+t-window+1 .. p0+t (0: every earlier key).
// Keys and values are float32, or f16 when f16 is set (strides in elements).
using AttnPrefillFn = void (*)(const float* q, size_t qs, int G, int nt, int p0, int dk, int dv, const void* k,
                               size_t ks, const void* v, size_t vs, float scale, float* o, size_t os,
                               float* scratch, int window, bool f16);
constexpr int ATTN_KEY_BLOCK = 32;
inline size_t attn_prefill_scratch(int rows, int dk, int dv) {
    return (size_t)rows * ATTN_KEY_BLOCK + (size_t)rows * dv + 2 * (size_t)rows + (size_t)ATTN_KEY_BLOCK * (dk + dv);
}

// y[i] = the f16 value h[i] as a float, i < n (an f16 cache read in blocks).
using F16RowFn = void (*)(const uint16_t* h, float* y, size_t n);
// h[i] = x[i] rounded to f16 (nearest, ties to even), i < n (an f16 cache written).
using F32ToF16Fn = void (*)(const float* x, uint16_t* h, size_t n);

// out[r] = <w + r*ldw, x> over n floats, r < nr: float32 rows (a router's, a head's small matrix).
using F32GemvFn = void (*)(const float* w, size_t ldw, int nr, int n, const float* x, float* out);

constexpr int MAX_TYPE_ID = 128;  // ggml ids (BF16 is 30) and the internal repacked ones (T_Q2_K_R16 .. T_IQ4_XS_R16)

struct KernelSet {
    const char* name;
    bool vnni;  // u8*s8 dot instructions (the set's integer dot kernels are built around them)
    QuantRowFn quant[ACT_COUNT];
    SiluMulFn silu_mul;
    AttnPartFn attn_part;
    AttnPrefillFn attn_prefill;
    F16RowFn f16_to_f32;
    F32ToF16Fn f32_to_f16;
    F32GemvFn f32_gemv;
    GemmFn gemm[MAX_TYPE_ID];  // indexed by ggml type id; nullptr when unsupported
};

const KernelSet* kernels_scalar();

// One row of n_cols values of a supported ggml type to floats (scalar; embedding lookups). False
// for an unsupported type. The caller checked n_cols against the block size and the row's bytes.
bool dequantize_row(int type, const uint8_t* w, int n_cols, float* out);
// Repacking at load: rows [r0, r1) (multiples of 16) of a Q4_K matrix with n_cols columns (a multiple
// of 256) into the Q4_K_R16 layout at dst (the same row offsets: 144 bytes per row and super-block),
// and back. The caller checked the sizes.
void repack_q4_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
void unpack_q4_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
// The same for Q6_K and Q6_K_R16 (210 bytes per row and super-block).
void repack_q6_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
void unpack_q6_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
// The same for Q3_K and Q3_K_R16 (110 bytes per row and super-block).
void repack_q3_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
void unpack_q3_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
// The same for Q2_K and Q2_K_R16 (84 bytes per row and super-block).
void repack_q2_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
void unpack_q2_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
// The same for IQ4_XS and IQ4_XS_R16 (136 bytes per row and super-block).
void repack_iq4_xs_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
void unpack_iq4_xs_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
// The same for Q4_0 / Q5_0 / Q8_0 (type: the plain one) and their _R16 layouts (the row bytes unchanged).
void repack_32_r16(int type, const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
void unpack_32_r16(int type, const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst);
// Software prefetch of the _R16 kernels: a call of at least this many tokens prefetches ahead while
// its first pass streams a 16-row group; fewer tokens (decode) leave the stream to the hardware
// prefetcher, which reads faster alone there (each layout is read front to back).
extern int r16_prefetch_min_tokens;
const KernelSet* kernels_avx2();    // nullptr if the compiler could not build it
const KernelSet* kernels_avx512();  // nullptr if the compiler could not build it

}  // namespace hmoe
