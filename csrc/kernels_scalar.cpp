// Portable reference kernels: the readable twin of every SIMD kernel, and the fallback on CPUs
// without AVX2. Integer sums are exact; only the float accumulation order differs from SIMD.
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace hmoe {
namespace {

inline float half(uint16_t h) { return fp16_to_fp32(h); }

// Blocks `stride` bytes apart (activation tiles are block-major: see kernels.h).
template <class B>
struct Strided {
    uint8_t* p;
    size_t stride;
    B& operator[](int i) const { return *reinterpret_cast<B*>(p + i * stride); }
};
template <class B>
struct CStrided {
    const uint8_t* p;
    size_t stride;
    const B& operator[](int i) const { return *reinterpret_cast<const B*>(p + i * stride); }
};

// ---- activation quantization: symmetric int8, d = amax / 127, q = round_half_even(x / d) ----

float row_amax(const float* x, int n) {
    float m = 0.f;
    for (int i = 0; i < n; ++i) m = std::fmax(m, std::fabs(x[i]));
    return m;
}

inline int8_t q8(float v) {
    long r = std::lrint(v);  // default rounding mode: nearest, ties to even (same as cvtps2dq)
    return (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
}

void quant_q8_0(const float* x, uint8_t* y, int n, size_t bs) {
    Strided<BlockQ8_0> b{y, bs};
    for (int i = 0; i < n / QK32; ++i, x += QK32) {
        const float d = row_amax(x, QK32) / 127.f;
        const float id = d != 0.f ? 1.f / d : 0.f;
        b[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK32; ++j) b[i].qs[j] = q8(x[j] * id);
    }
}

void quant_q8_1(const float* x, uint8_t* y, int n, size_t bs) {
    Strided<BlockQ8_1> b{y, bs};
    for (int i = 0; i < n / QK32; ++i, x += QK32) {
        const float d = row_amax(x, QK32) / 127.f;
        const float id = d != 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int j = 0; j < QK32; ++j) {
            b[i].qs[j] = q8(x[j] * id);
            sum += b[i].qs[j];
        }
        b[i].d = fp32_to_fp16(d);
        b[i].s = fp32_to_fp16(d * (float)sum);
    }
}

void quant_q8_K(const float* x, uint8_t* y, int n, size_t bs) {
    Strided<BlockQ8_K> b{y, bs};
    for (int i = 0; i < n / QK_K; ++i, x += QK_K) {
        const float d = row_amax(x, QK_K) / 127.f;
        const float id = d != 0.f ? 1.f / d : 0.f;
        b[i].d = d;
        for (int j = 0; j < QK_K; ++j) b[i].qs[j] = q8(x[j] * id);
        for (int g = 0; g < 16; ++g) {
            int s = 0;
            for (int j = 0; j < 16; ++j) s += b[i].qs[16 * g + j];
            b[i].bsums[g] = (int16_t)s;
        }
        for (int j = 0; j < 8; ++j) b[i].sums32[j] = d * (float)(b[i].bsums[2 * j] + b[i].bsums[2 * j + 1]);
    }
}

// F32 (F16/BF16 weights): the values as they are, in 8-float blocks; the last one zero-padded.
void quant_f32(const float* x, uint8_t* y, int n, size_t bs) {
    Strided<BlockF32> b{y, bs};
    for (int i = 0; i * F32_ACT_BLOCK < n; ++i)
        for (int j = 0; j < F32_ACT_BLOCK; ++j) b[i].v[j] = i * F32_ACT_BLOCK + j < n ? x[i * F32_ACT_BLOCK + j] : 0.f;
}

// ---- dot products: one weight row (nb blocks) with one activation row ----

float dot_q4_0(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ4_0*>(w);
    CStrided<BlockQ8_0> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        int s = 0;
        for (int j = 0; j < 16; ++j) {
            s += ((x[i].qs[j] & 0xf) - 8) * y[i].qs[j];
            s += ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + 16];
        }
        acc += half(x[i].d) * half(y[i].d) * (float)s;
    }
    return acc;
}

float dot_iq4_nl(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockIQ4_NL*>(w);
    CStrided<BlockQ8_0> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        int s = 0;
        for (int j = 0; j < 16; ++j) {
            s += IQ4_VALUES[x[i].qs[j] & 0xf] * y[i].qs[j];
            s += IQ4_VALUES[x[i].qs[j] >> 4] * y[i].qs[j + 16];
        }
        acc += half(x[i].d) * half(y[i].d) * (float)s;
    }
    return acc;
}

float dot_iq4_xs(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockIQ4_XS*>(w);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        int sumi = 0;
        for (int j = 0; j < 8; ++j) {
            const uint8_t* q = x[i].qs + 16 * j;
            const int8_t* yq = y[i].qs + 32 * j;
            int s = 0;
            for (int l = 0; l < 16; ++l) s += IQ4_VALUES[q[l] & 0xf] * yq[l] + IQ4_VALUES[q[l] >> 4] * yq[l + 16];
            sumi += iq4xs_scale(x[i], j) * s;
        }
        acc += half(x[i].d) * y[i].d * (float)sumi;
    }
    return acc;
}

float dot_q4_1(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ4_1*>(w);
    CStrided<BlockQ8_1> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        int s = 0;
        for (int j = 0; j < 16; ++j) {
            s += (x[i].qs[j] & 0xf) * y[i].qs[j];
            s += (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        }
        acc += half(x[i].d) * half(y[i].d) * (float)s + half(x[i].m) * half(y[i].s);
    }
    return acc;
}

inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

float dot_q5_0(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ5_0*>(w);
    CStrided<BlockQ8_0> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        const uint32_t qh = load_u32(x[i].qh);
        int s = 0;
        for (int j = 0; j < 16; ++j) {
            const int lo = (x[i].qs[j] & 0xf) | ((qh >> j) & 1) << 4;
            const int hi = (x[i].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
            s += (lo - 16) * y[i].qs[j] + (hi - 16) * y[i].qs[j + 16];
        }
        acc += half(x[i].d) * half(y[i].d) * (float)s;
    }
    return acc;
}

float dot_q5_1(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ5_1*>(w);
    CStrided<BlockQ8_1> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        const uint32_t qh = load_u32(x[i].qh);
        int s = 0;
        for (int j = 0; j < 16; ++j) {
            const int lo = (x[i].qs[j] & 0xf) | ((qh >> j) & 1) << 4;
            const int hi = (x[i].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
            s += lo * y[i].qs[j] + hi * y[i].qs[j + 16];
        }
        acc += half(x[i].d) * half(y[i].d) * (float)s + half(x[i].m) * half(y[i].s);
    }
    return acc;
}

float dot_q8_0(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ8_0*>(w);
    CStrided<BlockQ8_0> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        int s = 0;
        for (int j = 0; j < QK32; ++j) s += x[i].qs[j] * y[i].qs[j];
        acc += half(x[i].d) * half(y[i].d) * (float)s;
    }
    return acc;
}

// 6-bit scale and min j (0..7) of a Q4_K/Q5_K super-block.
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Shared by Q4_K and Q5_K once the 256 quants are unpacked: d*sum_j sc_j*<q_j,a_j> - dmin*sum_j m_j*sum(a_j).
inline float kquant_sum(const uint8_t* q, const uint8_t* scales, float d, float dmin, const BlockQ8_K& y) {
    int sumi = 0, summ = 0;
    for (int j = 0; j < 8; ++j) {
        int sc, m;
        scale_min_k4(j, scales, sc, m);
        int s = 0;
        for (int l = 0; l < 32; ++l) s += q[32 * j + l] * y.qs[32 * j + l];
        sumi += sc * s;
        summ += m * (y.bsums[2 * j] + y.bsums[2 * j + 1]);
    }
    return y.d * (d * (float)sumi - dmin * (float)summ);
}

float dot_q4_K(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ4_K*>(w);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    uint8_t q[QK_K];
    for (int i = 0; i < nb; ++i) {
        for (int j = 0; j < 4; ++j)
            for (int l = 0; l < 32; ++l) {
                q[64 * j + l] = x[i].qs[32 * j + l] & 0xf;
                q[64 * j + 32 + l] = x[i].qs[32 * j + l] >> 4;
            }
        acc += kquant_sum(q, x[i].scales, half(x[i].d), half(x[i].dmin), y[i]);
    }
    return acc;
}

float dot_q5_K(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ5_K*>(w);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    uint8_t q[QK_K];
    for (int i = 0; i < nb; ++i) {
        for (int j = 0; j < 4; ++j)
            for (int l = 0; l < 32; ++l) {
                const int h = x[i].qh[l];
                q[64 * j + l] = (x[i].qs[32 * j + l] & 0xf) | ((h >> (2 * j)) & 1) << 4;
                q[64 * j + 32 + l] = (x[i].qs[32 * j + l] >> 4) | ((h >> (2 * j + 1)) & 1) << 4;
            }
        acc += kquant_sum(q, x[i].scales, half(x[i].d), half(x[i].dmin), y[i]);
    }
    return acc;
}

float dot_q6_K(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ6_K*>(w);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    int8_t q[QK_K];
    for (int i = 0; i < nb; ++i) {
        for (int n = 0; n < 2; ++n) {  // two halves of 128
            const uint8_t* ql = x[i].ql + 64 * n;
            const uint8_t* qh = x[i].qh + 32 * n;
            int8_t* o = q + 128 * n;
            for (int l = 0; l < 32; ++l) {
                o[l] = (int8_t)(((ql[l] & 0xf) | ((qh[l] >> 0) & 3) << 4) - 32);
                o[l + 32] = (int8_t)(((ql[l + 32] & 0xf) | ((qh[l] >> 2) & 3) << 4) - 32);
                o[l + 64] = (int8_t)(((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32);
                o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32);
            }
        }
        int sumi = 0;
        for (int g = 0; g < 16; ++g) {  // one scale per 16 values
            int s = 0;
            for (int l = 0; l < 16; ++l) s += q[16 * g + l] * y[i].qs[16 * g + l];
            sumi += x[i].scales[g] * s;
        }
        acc += half(x[i].d) * y[i].d * (float)sumi;
    }
    return acc;
}

// 2-bit field of value v (0..255) of a Q2_K/Q3_K block: bits 2s..2s+1 of qs[32h+l], v = 128h+32s+l.
inline int low2(const uint8_t* qs, int v) { return (qs[32 * (v / 128) + v % 32] >> (2 * ((v % 128) / 32))) & 3; }

// Q3_K value v: the low 2 bits, minus 4 unless its hmask bit (4h+s) is set.
inline int q3_value(const BlockQ3_K& x, int v) {
    const int hb = (x.hmask[v % 32] >> (v / 32)) & 1;
    return low2(x.qs, v) - (hb ? 0 : 4);
}

// Signed scale of group g (0..15) of a Q3_K block (6 bits, minus 32).
inline int q3_scale(const uint8_t* s, int g) {
    const int lo = g < 8 ? s[g] & 0xf : s[g - 8] >> 4;
    const int hi = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
    return (lo | hi << 4) - 32;
}

// Q2_K: d*sum_g sc_g*<q_g,a_g> - dmin*sum_g m_g*sum(a_g), 16 groups of 16.
float dot_q2_K(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ2_K*>(w);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        int sumi = 0, summ = 0;
        for (int g = 0; g < 16; ++g) {
            int s = 0;
            for (int l = 0; l < 16; ++l) s += low2(x[i].qs, 16 * g + l) * y[i].qs[16 * g + l];
            sumi += (x[i].scales[g] & 0xf) * s;
            summ += (x[i].scales[g] >> 4) * y[i].bsums[g];
        }
        acc += y[i].d * (half(x[i].d) * (float)sumi - half(x[i].dmin) * (float)summ);
    }
    return acc;
}

float dot_q3_K(const uint8_t* w, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ3_K*>(w);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
        int sumi = 0;
        for (int g = 0; g < 16; ++g) {
            int s = 0;
            for (int l = 0; l < 16; ++l) s += q3_value(x[i], 16 * g + l) * y[i].qs[16 * g + l];
            sumi += q3_scale(x[i].scales, g) * s;
        }
        acc += half(x[i].d) * y[i].d * (float)sumi;
    }
    return acc;
}

inline float bf16_to_fp32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Float weights (F16/BF16, n values) with F32 activation blocks `as` bytes apart.
template <float (*CVT)(uint16_t)>
float dot_float(const uint8_t* w, const uint8_t* a, int n, size_t as) {
    CStrided<BlockF32> y{a, as};
    float acc = 0.f;
    for (int j = 0; j < n; ++j) {
        uint16_t h;
        std::memcpy(&h, w + 2 * j, 2);
        acc += CVT(h) * y[j / F32_ACT_BLOCK].v[j % F32_ACT_BLOCK];
    }
    return acc;
}

// ---- dequantization of whole rows (embedding lookups): the formats above, to floats ----

void dequant_q2_K(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockQ2_K*>(w);
    for (int i = 0; i < nb; ++i, o += QK_K) {
        const float d = half(x[i].d), dmin = half(x[i].dmin);
        for (int g = 0; g < 16; ++g) {
            const float dl = d * (float)(x[i].scales[g] & 0xf), ml = dmin * (float)(x[i].scales[g] >> 4);
            for (int v = 16 * g; v < 16 * g + 16; ++v) o[v] = dl * (float)low2(x[i].qs, v) - ml;
        }
    }
}

void dequant_q3_K(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockQ3_K*>(w);
    for (int i = 0; i < nb; ++i, o += QK_K) {
        const float d = half(x[i].d);
        for (int g = 0; g < 16; ++g) {
            const float dl = d * (float)q3_scale(x[i].scales, g);
            for (int v = 16 * g; v < 16 * g + 16; ++v) o[v] = dl * (float)q3_value(x[i], v);
        }
    }
}

template <float (*CVT)(uint16_t)>
void dequant_float(const uint8_t* w, int n, float* o) {
    for (int j = 0; j < n; ++j) {
        uint16_t h;
        std::memcpy(&h, w + 2 * j, 2);
        o[j] = CVT(h);
    }
}


void dequant_q4_0(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockQ4_0*>(w);
    for (int i = 0; i < nb; ++i, o += QK32) {
        const float d = half(x[i].d);
        for (int j = 0; j < 16; ++j) o[j] = d * ((x[i].qs[j] & 0xf) - 8), o[j + 16] = d * ((x[i].qs[j] >> 4) - 8);
    }
}

void dequant_iq4_nl(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockIQ4_NL*>(w);
    for (int i = 0; i < nb; ++i, o += QK32) {
        const float d = half(x[i].d);
        for (int j = 0; j < 16; ++j) o[j] = d * IQ4_VALUES[x[i].qs[j] & 0xf], o[j + 16] = d * IQ4_VALUES[x[i].qs[j] >> 4];
    }
}

void dequant_iq4_xs(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockIQ4_XS*>(w);
    for (int i = 0; i < nb; ++i)
        for (int j = 0; j < 8; ++j, o += 32) {
            const float dl = half(x[i].d) * (float)iq4xs_scale(x[i], j);
            const uint8_t* q = x[i].qs + 16 * j;
            for (int l = 0; l < 16; ++l) o[l] = dl * IQ4_VALUES[q[l] & 0xf], o[l + 16] = dl * IQ4_VALUES[q[l] >> 4];
        }
}

void dequant_q4_1(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockQ4_1*>(w);
    for (int i = 0; i < nb; ++i, o += QK32) {
        const float d = half(x[i].d), m = half(x[i].m);
        for (int j = 0; j < 16; ++j) o[j] = d * (x[i].qs[j] & 0xf) + m, o[j + 16] = d * (x[i].qs[j] >> 4) + m;
    }
}

void dequant_q5_0(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockQ5_0*>(w);
    for (int i = 0; i < nb; ++i, o += QK32) {
        const float d = half(x[i].d);
        const uint32_t qh = load_u32(x[i].qh);
        for (int j = 0; j < 16; ++j) {
            const int lo = (int)((x[i].qs[j] & 0xf) | ((qh >> j) & 1) << 4);
            const int hi = (int)((x[i].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
            o[j] = d * (lo - 16);
            o[j + 16] = d * (hi - 16);
        }
    }
}

void dequant_q5_1(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockQ5_1*>(w);
    for (int i = 0; i < nb; ++i, o += QK32) {
        const float d = half(x[i].d), m = half(x[i].m);
        const uint32_t qh = load_u32(x[i].qh);
        for (int j = 0; j < 16; ++j) {
            o[j] = d * (int)((x[i].qs[j] & 0xf) | ((qh >> j) & 1) << 4) + m;
            o[j + 16] = d * (int)((x[i].qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) + m;
        }
    }
}

void dequant_q8_0(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockQ8_0*>(w);
    for (int i = 0; i < nb; ++i, o += QK32) {
        const float d = half(x[i].d);
        for (int j = 0; j < QK32; ++j) o[j] = d * x[i].qs[j];
    }
}

template <bool FIVE>
void dequant_k4(const uint8_t* w, int nb, float* o) {
    using B = typename std::conditional<FIVE, BlockQ5_K, BlockQ4_K>::type;
    auto* x = reinterpret_cast<const B*>(w);
    for (int i = 0; i < nb; ++i, o += QK_K) {
        const float d = half(x[i].d), dmin = half(x[i].dmin);
        for (int j = 0; j < 4; ++j) {
            int sc0, m0, sc1, m1;
            scale_min_k4(2 * j, x[i].scales, sc0, m0);
            scale_min_k4(2 * j + 1, x[i].scales, sc1, m1);
            for (int l = 0; l < 32; ++l) {
                int lo = x[i].qs[32 * j + l] & 0xf, hi = x[i].qs[32 * j + l] >> 4;
                if constexpr (FIVE) {
                    lo |= ((x[i].qh[l] >> (2 * j)) & 1) << 4;
                    hi |= ((x[i].qh[l] >> (2 * j + 1)) & 1) << 4;
                }
                o[64 * j + l] = d * sc0 * lo - dmin * m0;
                o[64 * j + 32 + l] = d * sc1 * hi - dmin * m1;
            }
        }
    }
}

void dequant_q6_K(const uint8_t* w, int nb, float* o) {
    auto* x = reinterpret_cast<const BlockQ6_K*>(w);
    for (int i = 0; i < nb; ++i, o += QK_K) {
        const float d = half(x[i].d);
        for (int n = 0; n < 2; ++n) {
            const uint8_t* ql = x[i].ql + 64 * n;
            const uint8_t* qh = x[i].qh + 32 * n;
            const int8_t* sc = x[i].scales + 8 * n;
            float* y = o + 128 * n;
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                y[l] = d * sc[is] * (((ql[l] & 0xf) | ((qh[l] >> 0) & 3) << 4) - 32);
                y[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xf) | ((qh[l] >> 2) & 3) << 4) - 32);
                y[l + 64] = d * sc[is + 4] * (((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32);
                y[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32);
            }
        }
    }
}

void silu_mul(const float* g, const float* u, float* h, int n) {
    for (int i = 0; i < n; ++i) h[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

using DotFn = float (*)(const uint8_t*, const uint8_t*, int, size_t);

template <DotFn DOT, int QK, class ABlock>
void gemm(const uint8_t* w, size_t rb, int nr, int n_cols, const uint8_t* act, int nt, float* out, size_t ldo) {
    const int nb = n_cols / QK;
    for (int t = 0; t < nt; ++t)  // token t's block b is at act + (b * nt + t) * sizeof(ABlock)
        for (int r = 0; r < nr; ++r)
            out[t * ldo + r] = DOT(w + r * rb, act + t * sizeof(ABlock), nb, nt * sizeof(ABlock));
}

void f16_row(const uint16_t* h, float* y, size_t n) {
    for (size_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(h[i]);
}

// Q4_K_R16 (quant_blocks.h), row i of the group at g against one token's activation blocks.
float dot_q4_k_r16(const uint8_t* g, int i, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ4_K_R16*>(g);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    for (int b = 0; b < nb; ++b) {
        uint8_t packed[12];
        for (int j = 0; j < 12; ++j) packed[j] = x[b].sc[j][i];
        int sumi = 0, summ = 0;
        for (int k = 0; k < 4; ++k) {
            int lo = 0, hi = 0;  // sub-blocks 2k (low nibbles) and 2k+1 (high nibbles)
            for (int c = 0; c < 8; ++c)
                for (int e = 0; e < 4; ++e) {
                    const uint8_t q = x[b].qs[k][c][i][e];
                    lo += (q & 0xf) * y[b].qs[64 * k + 4 * c + e];
                    hi += (q >> 4) * y[b].qs[64 * k + 32 + 4 * c + e];
                }
            int sc0, m0, sc1, m1;
            scale_min_k4(2 * k, packed, sc0, m0);
            scale_min_k4(2 * k + 1, packed, sc1, m1);
            sumi += sc0 * lo + sc1 * hi;
            summ += m0 * (y[b].bsums[4 * k] + y[b].bsums[4 * k + 1]) + m1 * (y[b].bsums[4 * k + 2] + y[b].bsums[4 * k + 3]);
        }
        acc += y[b].d * (half(x[b].d[i]) * (float)sumi - half(x[b].dmin[i]) * (float)summ);
    }
    return acc;
}

void gemm_q4_k_r16(const uint8_t* w, size_t rb, int nr, int n_cols, const uint8_t* act, int nt, float* out,
                   size_t ldo) {
    const int nb = n_cols / QK_K;
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r + 16 <= nr; r += 16)
            for (int i = 0; i < 16; ++i)
                out[t * ldo + r + i] =
                    dot_q4_k_r16(w + r * rb, i, act + t * sizeof(BlockQ8_K), nb, nt * sizeof(BlockQ8_K));
}

// Q6_K_R16 (quant_blocks.h), row i of the group at g against one token's activation blocks.
float dot_q6_k_r16(const uint8_t* g, int i, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ6_K_R16*>(g);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    for (int b = 0; b < nb; ++b) {
        int sumi = 0;
        for (int n = 0; n < 2; ++n)
            for (int m = 0; m < 4; ++m)
                for (int h = 0; h < 2; ++h) {  // the 16-value group 8n + 2m + h
                    int s = 0;
                    for (int l = 16 * h; l < 16 * h + 16; ++l) {
                        const int lo = (x[b].ql(n, m % 2, l / 4, i)[l % 4] >> (4 * (m / 2))) & 15;
                        const int hi = (x[b].qh(n, l / 4, i)[l % 4] >> (2 * m)) & 3;
                        s += ((lo | hi << 4) - 32) * y[b].qs[128 * n + 32 * m + l];
                    }
                    const int grp = 8 * n + 2 * m + h;
                    sumi += x[b].scales[grp / 2][i][grp % 2] * s;
                }
        acc += half(x[b].d[i]) * y[b].d * (float)sumi;
    }
    return acc;
}

void gemm_q6_k_r16(const uint8_t* w, size_t rb, int nr, int n_cols, const uint8_t* act, int nt, float* out,
                   size_t ldo) {
    const int nb = n_cols / QK_K;
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r + 16 <= nr; r += 16)
            for (int i = 0; i < 16; ++i)
                out[t * ldo + r + i] =
                    dot_q6_k_r16(w + r * rb, i, act + t * sizeof(BlockQ8_K), nb, nt * sizeof(BlockQ8_K));
}

// Q3_K_R16 (quant_blocks.h), row i of the group at g against one token's activation blocks.
float dot_q3_k_r16(const uint8_t* g, int i, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ3_K_R16*>(g);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    for (int b = 0; b < nb; ++b) {
        int sumi = 0;
        for (int grp = 0; grp < 16; ++grp) {
            const int lo = (x[b].sc[grp % 8][i] >> (4 * (grp / 8))) & 15;
            const int hi = (x[b].sc[8 + grp % 4][i] >> (2 * (grp / 4))) & 3;
            const int h = grp / 8, sh = (grp % 8) / 2;  // value 128h + 32sh + l, l = 16 (grp % 2) ..
            int s = 0;
            for (int l = 16 * (grp % 2); l < 16 * (grp % 2) + 16; ++l) {
                const int low = (x[b].qs(h, l / 4, i)[l % 4] >> (2 * sh)) & 3;
                const int hb = (x[b].hm(l / 4, i)[l % 4] >> (4 * h + sh)) & 1;
                s += ((low | hb << 2) - 4) * y[b].qs[128 * h + 32 * sh + l];
            }
            sumi += ((lo | hi << 4) - 32) * s;
        }
        acc += half(x[b].d[i]) * y[b].d * (float)sumi;
    }
    return acc;
}

void gemm_q3_k_r16(const uint8_t* w, size_t rb, int nr, int n_cols, const uint8_t* act, int nt, float* out,
                   size_t ldo) {
    const int nb = n_cols / QK_K;
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r + 16 <= nr; r += 16)
            for (int i = 0; i < 16; ++i)
                out[t * ldo + r + i] =
                    dot_q3_k_r16(w + r * rb, i, act + t * sizeof(BlockQ8_K), nb, nt * sizeof(BlockQ8_K));
}

// Q2_K_R16 (quant_blocks.h), row i of the group at g against one token's activation blocks.
float dot_q2_k_r16(const uint8_t* g, int i, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockQ2_K_R16*>(g);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    for (int b = 0; b < nb; ++b) {
        int sumi = 0, summ = 0;
        for (int grp = 0; grp < 16; ++grp) {
            const int h = grp / 8, sh = (grp % 8) / 2;  // value 128h + 32sh + l, l = 16 (grp % 2) ..
            int s = 0;
            for (int l = 16 * (grp % 2); l < 16 * (grp % 2) + 16; ++l)
                s += ((x[b].qs(h, l / 4, i)[l % 4] >> (2 * sh)) & 3) * y[b].qs[128 * h + 32 * sh + l];
            sumi += (x[b].sc[grp][i] & 15) * s;
            summ += (x[b].sc[grp][i] >> 4) * y[b].bsums[grp];
        }
        acc += y[b].d * (half(x[b].d[i]) * (float)sumi - half(x[b].dmin[i]) * (float)summ);
    }
    return acc;
}

void gemm_q2_k_r16(const uint8_t* w, size_t rb, int nr, int n_cols, const uint8_t* act, int nt, float* out,
                   size_t ldo) {
    const int nb = n_cols / QK_K;
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r + 16 <= nr; r += 16)
            for (int i = 0; i < 16; ++i)
                out[t * ldo + r + i] =
                    dot_q2_k_r16(w + r * rb, i, act + t * sizeof(BlockQ8_K), nb, nt * sizeof(BlockQ8_K));
}

// IQ4_XS_R16 (quant_blocks.h), row i of the group at g against one token's activation blocks.
float dot_iq4_xs_r16(const uint8_t* g, int i, const uint8_t* a, int nb, size_t as) {
    auto* x = reinterpret_cast<const BlockIQ4_XS_R16*>(g);
    CStrided<BlockQ8_K> y{a, as};
    float acc = 0.f;
    for (int b = 0; b < nb; ++b) {
        int sumi = 0;
        for (int j = 0; j < 8; ++j) {
            const int sc = (((x[b].sl[j / 2][i] >> (4 * (j % 2))) & 15) | (((x[b].sh[i] >> (2 * j)) & 3) << 4)) - 32;
            int s = 0;
            for (int l = 0; l < 16; ++l) {
                const uint8_t q = x[b].qs[j][l / 4][i][l % 4];
                s += IQ4_VALUES[q & 15] * y[b].qs[32 * j + l] + IQ4_VALUES[q >> 4] * y[b].qs[32 * j + 16 + l];
            }
            sumi += sc * s;
        }
        acc += half(x[b].d[i]) * y[b].d * (float)sumi;
    }
    return acc;
}

void gemm_iq4_xs_r16(const uint8_t* w, size_t rb, int nr, int n_cols, const uint8_t* act, int nt, float* out,
                     size_t ldo) {
    const int nb = n_cols / QK_K;
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r + 16 <= nr; r += 16)
            for (int i = 0; i < 16; ++i)
                out[t * ldo + r + i] =
                    dot_iq4_xs_r16(w + r * rb, i, act + t * sizeof(BlockQ8_K), nb, nt * sizeof(BlockQ8_K));
}

// The 32-value _R16 layouts (quant_blocks.h): code (u, before - OFF) of value j (< 32) of row i.
template <int T> inline int code32(const uint8_t* blk, int i, int j);
template <> inline int code32<T_Q8_0>(const uint8_t* blk, int i, int j) {
    return reinterpret_cast<const BlockQ8_0_R16*>(blk)->qs[j / 4][i][j % 4];
}
template <> inline int code32<T_Q4_0>(const uint8_t* blk, int i, int j) {
    const uint8_t q = reinterpret_cast<const BlockQ4_0_R16*>(blk)->qs[(j % 16) / 4][i][j % 4];
    return j < 16 ? q & 15 : q >> 4;
}
template <> inline int code32<T_Q5_0>(const uint8_t* blk, int i, int j) {
    auto* x = reinterpret_cast<const BlockQ5_0_R16*>(blk);
    const uint8_t q = x->qs[(j % 16) / 4][i][j % 4];
    const int hb = (int)(x->hb[(j % 16) / 4][j / 16] >> (4 * i + j % 4)) & 1;
    return (j < 16 ? q & 15 : q >> 4) | hb << 4;
}
template <> inline int code32<T_IQ4_NL>(const uint8_t* blk, int i, int j) {  // IQ4_VALUES + 128
    return IQ4_VALUES[code32<T_Q4_0>(blk, i, j)] + 128;
}
template <int T> constexpr int OFF32 = T == T_Q8_0 || T == T_IQ4_NL ? 128 : T == T_Q5_0 ? 16 : 8;
template <int T> constexpr size_t R16_BYTES = T == T_Q8_0 ? sizeof(BlockQ8_0_R16)
                                             : T == T_Q5_0 ? sizeof(BlockQ5_0_R16) : sizeof(BlockQ4_0_R16);

template <int T>
void gemm_32_r16(const uint8_t* w, size_t rb, int nr, int n_cols, const uint8_t* act, int nt, float* out,
                 size_t ldo) {
    const int nb = n_cols / QK32;
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r + 16 <= nr; r += 16)
            for (int i = 0; i < 16; ++i) {
                float acc = 0.f;
                for (int b = 0; b < nb; ++b) {
                    const uint8_t* blk = w + r * rb + (size_t)b * R16_BYTES<T>;
                    const auto* y = reinterpret_cast<const BlockQ8_0*>(act + ((size_t)b * nt + t) * sizeof(BlockQ8_0));
                    int s = 0;
                    for (int j = 0; j < 32; ++j) s += (code32<T>(blk, i, j) - OFF32<T>) * y->qs[j];
                    acc += half(reinterpret_cast<const uint16_t*>(blk)[i]) * half(y->d) * (float)s;
                }
                out[t * ldo + r + i] = acc;
            }
}

void f32_gemv(const float* w, size_t ldw, int nr, int n, const float* x, float* out) {
    for (int r = 0; r < nr; ++r) {
        float sum = 0.f;
        for (int i = 0; i < n; ++i) sum += w[(size_t)r * ldw + i] * x[i];
        out[r] = sum;
    }
}

template <float (*CVT)(uint16_t)>
void gemm_float(const uint8_t* w, size_t rb, int nr, int n_cols, const uint8_t* act, int nt, float* out, size_t ldo) {
    for (int t = 0; t < nt; ++t)
        for (int r = 0; r < nr; ++r)
            out[t * ldo + r] = dot_float<CVT>(w + r * rb, act + t * sizeof(BlockF32), n_cols, nt * sizeof(BlockF32));
}

// KV-cache elements: float32, or f16 (uint16_t bits) widened exactly.
inline float kv1(const float* p) { return *p; }
inline float kv1(const uint16_t* p) { return fp16_to_fp32(*p); }

template <class KT>
void attn_part_t(const float* q, int G, int dk, int dv, const KT* k, size_t ks, const KT* v, size_t vs, int n,
                 float scale, float* p, float* m, float* s, float* o) {
    for (int g = 0; g < G; ++g) {
        const float* qg = q + (size_t)g * dk;
        float* pg = p + (size_t)g * n;
        float mx = -INFINITY;
        for (int l = 0; l < n; ++l) {
            const KT* kl = k + l * ks;
            float acc = 0.f;
            for (int j = 0; j < dk; ++j) acc += qg[j] * kv1(kl + j);
            pg[l] = acc * scale;
            mx = std::fmax(mx, pg[l]);
        }
        float sum = 0.f;
        float* og = o + (size_t)g * dv;
        for (int j = 0; j < dv; ++j) og[j] = 0.f;
        for (int l = 0; l < n; ++l) {
            const float e = std::exp(pg[l] - mx);
            sum += e;
            const KT* vl = v + l * vs;
            for (int j = 0; j < dv; ++j) og[j] += e * kv1(vl + j);
        }
        m[g] = mx;
        s[g] = sum;
    }
}

template <class KT>
void attn_prefill_t(const float* q, size_t qs, int G, int nt, int p0, int dk, int dv, const KT* k, size_t ks,
                    const KT* v, size_t vs, float scale, float* o, size_t os, float* scratch, int window) {
    const int R = G * nt;
    float* O = scratch;  // [R][dv]: every row before any write, since o may be q
    std::vector<float> sc;
    for (int r = 0; r < R; ++r) {
        const float* qr = q + (size_t)(r / G) * qs + (size_t)(r % G) * dk;
        const int n = p0 + r / G + 1;
        const int lo = window > 0 ? std::max(0, n - window) : 0;  // first key in the window
        float mx = -INFINITY;
        sc.assign(n, -INFINITY);
        for (int l = lo; l < n; ++l) {
            float acc = 0.f;
            for (int j = 0; j < dk; ++j) acc += qr[j] * kv1(k + (size_t)l * ks + j);
            sc[l] = acc * scale;
            mx = std::fmax(mx, sc[l]);
        }
        float z = 0.f;
        float* orow = O + (size_t)r * dv;
        for (int c = 0; c < dv; ++c) orow[c] = 0.f;
        for (int l = lo; l < n; ++l) {
            const float e = std::exp(sc[l] - mx);
            z += e;
            for (int c = 0; c < dv; ++c) orow[c] += e * kv1(v + (size_t)l * vs + c);
        }
        for (int c = 0; c < dv; ++c) orow[c] /= z;
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < dv; ++c) o[(size_t)(r / G) * os + (size_t)(r % G) * dv + c] = O[(size_t)r * dv + c];
}

void attn_part(const float* q, int G, int dk, int dv, const void* k, size_t ks, const void* v, size_t vs, int n,
               float scale, float* p, float* m, float* s, float* o, bool f16) {
    if (f16)
        attn_part_t(q, G, dk, dv, static_cast<const uint16_t*>(k), ks, static_cast<const uint16_t*>(v), vs, n, scale,
                    p, m, s, o);
    else
        attn_part_t(q, G, dk, dv, static_cast<const float*>(k), ks, static_cast<const float*>(v), vs, n, scale, p, m,
                    s, o);
}

void attn_prefill(const float* q, size_t qs, int G, int nt, int p0, int dk, int dv, const void* k, size_t ks,
                  const void* v, size_t vs, float scale, float* o, size_t os, float* scratch, int window, bool f16) {
    if (f16)
        attn_prefill_t(q, qs, G, nt, p0, dk, dv, static_cast<const uint16_t*>(k), ks, static_cast<const uint16_t*>(v), vs,
                       scale, o, os, scratch, window);
    else
        attn_prefill_t(q, qs, G, nt, p0, dk, dv, static_cast<const float*>(k), ks, static_cast<const float*>(v), vs,
                       scale, o, os, scratch, window);
}

void f32_to_f16_row(const float* x, uint16_t* h, size_t n) {
    for (size_t i = 0; i < n; ++i) h[i] = fp32_to_fp16(x[i]);
}

KernelSet make_scalar() {
    KernelSet k{};
    k.name = "scalar";
    k.quant[ACT_Q8_0] = quant_q8_0;
    k.quant[ACT_Q8_1] = quant_q8_1;
    k.quant[ACT_Q8_K] = quant_q8_K;
    k.quant[ACT_F32] = quant_f32;
    k.silu_mul = silu_mul;
    k.attn_part = attn_part;
    k.attn_prefill = attn_prefill;
    k.f16_to_f32 = f16_row;
    k.f32_to_f16 = f32_to_f16_row;
    k.f32_gemv = f32_gemv;
    k.gemm[T_Q4_0] = gemm<dot_q4_0, QK32, BlockQ8_0>;
    k.gemm[T_Q4_1] = gemm<dot_q4_1, QK32, BlockQ8_1>;
    k.gemm[T_Q5_0] = gemm<dot_q5_0, QK32, BlockQ8_0>;
    k.gemm[T_Q5_1] = gemm<dot_q5_1, QK32, BlockQ8_1>;
    k.gemm[T_Q8_0] = gemm<dot_q8_0, QK32, BlockQ8_0>;
    k.gemm[T_Q2_K] = gemm<dot_q2_K, QK_K, BlockQ8_K>;
    k.gemm[T_Q3_K] = gemm<dot_q3_K, QK_K, BlockQ8_K>;
    k.gemm[T_Q4_K] = gemm<dot_q4_K, QK_K, BlockQ8_K>;
    k.gemm[T_Q5_K] = gemm<dot_q5_K, QK_K, BlockQ8_K>;
    k.gemm[T_Q6_K] = gemm<dot_q6_K, QK_K, BlockQ8_K>;
    k.gemm[T_IQ4_NL] = gemm<dot_iq4_nl, QK32, BlockQ8_0>;
    k.gemm[T_IQ4_XS] = gemm<dot_iq4_xs, QK_K, BlockQ8_K>;
    k.gemm[T_F16] = gemm_float<fp16_to_fp32>;
    k.gemm[T_BF16] = gemm_float<bf16_to_fp32>;
    k.gemm[T_Q4_K_R16] = gemm_q4_k_r16;
    k.gemm[T_Q6_K_R16] = gemm_q6_k_r16;
    k.gemm[T_Q3_K_R16] = gemm_q3_k_r16;
    k.gemm[T_Q2_K_R16] = gemm_q2_k_r16;
    k.gemm[T_IQ4_XS_R16] = gemm_iq4_xs_r16;
    k.gemm[T_Q4_0_R16] = gemm_32_r16<T_Q4_0>;
    k.gemm[T_Q5_0_R16] = gemm_32_r16<T_Q5_0>;
    k.gemm[T_Q8_0_R16] = gemm_32_r16<T_Q8_0>;
    k.gemm[T_IQ4_NL_R16] = gemm_32_r16<T_IQ4_NL>;
    return k;
}

}  // namespace

bool dequantize_row(int type, const uint8_t* w, int n_cols, float* out) {
    const int nb32 = n_cols / QK32, nbk = n_cols / QK_K;
    switch (type) {
        case T_Q4_0: dequant_q4_0(w, nb32, out); return true;
        case T_Q4_1: dequant_q4_1(w, nb32, out); return true;
        case T_Q5_0: dequant_q5_0(w, nb32, out); return true;
        case T_Q5_1: dequant_q5_1(w, nb32, out); return true;
        case T_Q8_0: dequant_q8_0(w, nb32, out); return true;
        case T_Q2_K: dequant_q2_K(w, nbk, out); return true;
        case T_Q3_K: dequant_q3_K(w, nbk, out); return true;
        case T_Q4_K: dequant_k4<false>(w, nbk, out); return true;
        case T_Q5_K: dequant_k4<true>(w, nbk, out); return true;
        case T_Q6_K: dequant_q6_K(w, nbk, out); return true;
        case T_IQ4_NL: dequant_iq4_nl(w, nb32, out); return true;
        case T_IQ4_XS: dequant_iq4_xs(w, nbk, out); return true;
        case T_F16: dequant_float<fp16_to_fp32>(w, n_cols, out); return true;
        case T_BF16: dequant_float<bf16_to_fp32>(w, n_cols, out); return true;
        default: return false;
    }
}

const KernelSet* kernels_scalar() {
    static const KernelSet k = make_scalar();
    return &k;
}

static const TypeInfo kTypes[] = {
    {T_Q4_0, "Q4_0", QK32, (int)sizeof(BlockQ4_0), ACT_Q8_0},
    {T_Q4_1, "Q4_1", QK32, (int)sizeof(BlockQ4_1), ACT_Q8_1},
    {T_Q5_0, "Q5_0", QK32, (int)sizeof(BlockQ5_0), ACT_Q8_0},
    {T_Q5_1, "Q5_1", QK32, (int)sizeof(BlockQ5_1), ACT_Q8_1},
    {T_Q8_0, "Q8_0", QK32, (int)sizeof(BlockQ8_0), ACT_Q8_0},
    {T_F16, "F16", 1, 2, ACT_F32},
    {T_BF16, "BF16", 1, 2, ACT_F32},
    {T_Q2_K, "Q2_K", QK_K, (int)sizeof(BlockQ2_K), ACT_Q8_K},
    {T_Q3_K, "Q3_K", QK_K, (int)sizeof(BlockQ3_K), ACT_Q8_K},
    {T_Q4_K, "Q4_K", QK_K, (int)sizeof(BlockQ4_K), ACT_Q8_K},
    {T_Q5_K, "Q5_K", QK_K, (int)sizeof(BlockQ5_K), ACT_Q8_K},
    {T_Q6_K, "Q6_K", QK_K, (int)sizeof(BlockQ6_K), ACT_Q8_K},
    {T_IQ4_NL, "IQ4_NL", QK32, (int)sizeof(BlockIQ4_NL), ACT_Q8_0},
    {T_IQ4_XS, "IQ4_XS", QK_K, (int)sizeof(BlockIQ4_XS), ACT_Q8_K},
    {T_Q4_K_R16, "Q4_K_R16", QK_K, (int)sizeof(BlockQ4_K_R16) / 16, ACT_Q8_K, 16},
    {T_Q6_K_R16, "Q6_K_R16", QK_K, (int)sizeof(BlockQ6_K_R16) / 16, ACT_Q8_K, 16},
    {T_Q3_K_R16, "Q3_K_R16", QK_K, (int)sizeof(BlockQ3_K_R16) / 16, ACT_Q8_K, 16},
    {T_Q2_K_R16, "Q2_K_R16", QK_K, (int)sizeof(BlockQ2_K_R16) / 16, ACT_Q8_K, 16},
    {T_IQ4_XS_R16, "IQ4_XS_R16", QK_K, (int)sizeof(BlockIQ4_XS_R16) / 16, ACT_Q8_K, 16},
    {T_IQ4_NL_R16, "IQ4_NL_R16", QK32, (int)sizeof(BlockQ4_0_R16) / 16, ACT_Q8_0, 16},
    {T_Q4_0_R16, "Q4_0_R16", QK32, (int)sizeof(BlockQ4_0_R16) / 16, ACT_Q8_0, 16},
    {T_Q5_0_R16, "Q5_0_R16", QK32, (int)sizeof(BlockQ5_0_R16) / 16, ACT_Q8_0, 16},
    {T_Q8_0_R16, "Q8_0_R16", QK32, (int)sizeof(BlockQ8_0_R16) / 16, ACT_Q8_0, 16},
};

const TypeInfo* type_info(int ggml_type) {
    for (const auto& t : kTypes)
        if (t.type == ggml_type) return &t;
    return nullptr;
}

void repack_q4_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockQ4_K);
    for (int r = r0; r < r1; r += 16) {
        auto* out = reinterpret_cast<BlockQ4_K_R16*>(dst + (size_t)r * rb);
        for (int b = 0; b < nb; ++b) {
            BlockQ4_K_R16& o = out[b];
            for (int i = 0; i < 16; ++i) {
                const BlockQ4_K& x = reinterpret_cast<const BlockQ4_K*>(src + (size_t)(r + i) * rb)[b];
                o.d[i] = x.d;
                o.dmin[i] = x.dmin;
                for (int j = 0; j < 12; ++j) o.sc[j][i] = x.scales[j];
                for (int k = 0; k < 4; ++k)
                    for (int c = 0; c < 8; ++c) std::memcpy(o.qs[k][c][i], x.qs + 32 * k + 4 * c, 4);
            }
        }
    }
}

void unpack_q4_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockQ4_K);
    for (int r = r0; r < r1; r += 16) {
        auto* in = reinterpret_cast<const BlockQ4_K_R16*>(src + (size_t)r * rb);
        for (int b = 0; b < nb; ++b) {
            const BlockQ4_K_R16& g = in[b];
            for (int i = 0; i < 16; ++i) {
                BlockQ4_K& x = reinterpret_cast<BlockQ4_K*>(dst + (size_t)(r + i) * rb)[b];
                x.d = g.d[i];
                x.dmin = g.dmin[i];
                for (int j = 0; j < 12; ++j) x.scales[j] = g.sc[j][i];
                for (int k = 0; k < 4; ++k)
                    for (int c = 0; c < 8; ++c) std::memcpy(x.qs + 32 * k + 4 * c, g.qs[k][c][i], 4);
            }
        }
    }
}

void repack_q6_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockQ6_K);
    for (int r = r0; r < r1; r += 16) {
        auto* out = reinterpret_cast<BlockQ6_K_R16*>(dst + (size_t)r * nb * (sizeof(BlockQ6_K_R16) / 16));
        for (int b = 0; b < nb; ++b) {
            BlockQ6_K_R16& o = out[b];
            for (int i = 0; i < 16; ++i) {
                const BlockQ6_K& x = reinterpret_cast<const BlockQ6_K*>(src + (size_t)(r + i) * rb)[b];
                o.d[i] = x.d;
                for (int g = 0; g < 16; ++g) o.scales[g / 2][i][g % 2] = x.scales[g];
                for (int n = 0; n < 2; ++n)
                    for (int c = 0; c < 8; ++c) {
                        std::memcpy(o.ql(n, 0, c, i), x.ql + 64 * n + 4 * c, 4);
                        std::memcpy(o.ql(n, 1, c, i), x.ql + 64 * n + 32 + 4 * c, 4);
                        std::memcpy(o.qh(n, c, i), x.qh + 32 * n + 4 * c, 4);
                    }
            }
        }
    }
}

void unpack_q6_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockQ6_K);
    for (int r = r0; r < r1; r += 16) {
        auto* in = reinterpret_cast<const BlockQ6_K_R16*>(src + (size_t)r * nb * (sizeof(BlockQ6_K_R16) / 16));
        for (int b = 0; b < nb; ++b) {
            const BlockQ6_K_R16& g = in[b];
            for (int i = 0; i < 16; ++i) {
                BlockQ6_K& x = reinterpret_cast<BlockQ6_K*>(dst + (size_t)(r + i) * rb)[b];
                x.d = g.d[i];
                for (int k = 0; k < 16; ++k) x.scales[k] = g.scales[k / 2][i][k % 2];
                for (int n = 0; n < 2; ++n)
                    for (int c = 0; c < 8; ++c) {
                        std::memcpy(x.ql + 64 * n + 4 * c, g.ql(n, 0, c, i), 4);
                        std::memcpy(x.ql + 64 * n + 32 + 4 * c, g.ql(n, 1, c, i), 4);
                        std::memcpy(x.qh + 32 * n + 4 * c, g.qh(n, c, i), 4);
                    }
            }
        }
    }
}

void repack_q3_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockQ3_K);
    for (int r = r0; r < r1; r += 16) {
        auto* out = reinterpret_cast<BlockQ3_K_R16*>(dst + (size_t)r * rb);
        for (int b = 0; b < nb; ++b) {
            BlockQ3_K_R16& o = out[b];
            for (int i = 0; i < 16; ++i) {
                const BlockQ3_K& x = reinterpret_cast<const BlockQ3_K*>(src + (size_t)(r + i) * rb)[b];
                o.d[i] = x.d;
                for (int k = 0; k < 12; ++k) o.sc[k][i] = x.scales[k];
                for (int c = 0; c < 8; ++c) {
                    std::memcpy(o.hm(c, i), x.hmask + 4 * c, 4);
                    std::memcpy(o.qs(0, c, i), x.qs + 4 * c, 4);
                    std::memcpy(o.qs(1, c, i), x.qs + 32 + 4 * c, 4);
                }
            }
        }
    }
}

void unpack_q3_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockQ3_K);
    for (int r = r0; r < r1; r += 16) {
        auto* in = reinterpret_cast<const BlockQ3_K_R16*>(src + (size_t)r * rb);
        for (int b = 0; b < nb; ++b) {
            const BlockQ3_K_R16& g = in[b];
            for (int i = 0; i < 16; ++i) {
                BlockQ3_K& x = reinterpret_cast<BlockQ3_K*>(dst + (size_t)(r + i) * rb)[b];
                x.d = g.d[i];
                for (int k = 0; k < 12; ++k) x.scales[k] = g.sc[k][i];
                for (int c = 0; c < 8; ++c) {
                    std::memcpy(x.hmask + 4 * c, g.hm(c, i), 4);
                    std::memcpy(x.qs + 4 * c, g.qs(0, c, i), 4);
                    std::memcpy(x.qs + 32 + 4 * c, g.qs(1, c, i), 4);
                }
            }
        }
    }
}

void repack_q2_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockQ2_K);
    for (int r = r0; r < r1; r += 16) {
        auto* out = reinterpret_cast<BlockQ2_K_R16*>(dst + (size_t)r * rb);
        for (int b = 0; b < nb; ++b) {
            BlockQ2_K_R16& o = out[b];
            for (int i = 0; i < 16; ++i) {
                const BlockQ2_K& x = reinterpret_cast<const BlockQ2_K*>(src + (size_t)(r + i) * rb)[b];
                o.d[i] = x.d, o.dmin[i] = x.dmin;
                for (int k = 0; k < 16; ++k) o.sc[k][i] = x.scales[k];
                for (int h = 0; h < 2; ++h)
                    for (int c = 0; c < 8; ++c) std::memcpy(o.qs(h, c, i), x.qs + 32 * h + 4 * c, 4);
            }
        }
    }
}

void unpack_q2_k_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockQ2_K);
    for (int r = r0; r < r1; r += 16) {
        auto* in = reinterpret_cast<const BlockQ2_K_R16*>(src + (size_t)r * rb);
        for (int b = 0; b < nb; ++b) {
            const BlockQ2_K_R16& g = in[b];
            for (int i = 0; i < 16; ++i) {
                BlockQ2_K& x = reinterpret_cast<BlockQ2_K*>(dst + (size_t)(r + i) * rb)[b];
                x.d = g.d[i], x.dmin = g.dmin[i];
                for (int k = 0; k < 16; ++k) x.scales[k] = g.sc[k][i];
                for (int h = 0; h < 2; ++h)
                    for (int c = 0; c < 8; ++c) std::memcpy(x.qs + 32 * h + 4 * c, g.qs(h, c, i), 4);
            }
        }
    }
}

void repack_iq4_xs_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockIQ4_XS);
    for (int r = r0; r < r1; r += 16) {
        auto* out = reinterpret_cast<BlockIQ4_XS_R16*>(dst + (size_t)r * rb);
        for (int b = 0; b < nb; ++b) {
            BlockIQ4_XS_R16& o = out[b];
            for (int i = 0; i < 16; ++i) {
                const BlockIQ4_XS& x = reinterpret_cast<const BlockIQ4_XS*>(src + (size_t)(r + i) * rb)[b];
                o.d[i] = x.d, o.sh[i] = x.scales_h;
                for (int k = 0; k < 4; ++k) o.sl[k][i] = x.scales_l[k];
                for (int j = 0; j < 8; ++j)
                    for (int c = 0; c < 4; ++c) std::memcpy(o.qs[j][c][i], x.qs + 16 * j + 4 * c, 4);
            }
        }
    }
}

void unpack_iq4_xs_r16(const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK_K;
    const size_t rb = (size_t)nb * sizeof(BlockIQ4_XS);
    for (int r = r0; r < r1; r += 16) {
        auto* in = reinterpret_cast<const BlockIQ4_XS_R16*>(src + (size_t)r * rb);
        for (int b = 0; b < nb; ++b) {
            const BlockIQ4_XS_R16& g = in[b];
            for (int i = 0; i < 16; ++i) {
                BlockIQ4_XS& x = reinterpret_cast<BlockIQ4_XS*>(dst + (size_t)(r + i) * rb)[b];
                x.d = g.d[i], x.scales_h = g.sh[i];
                for (int k = 0; k < 4; ++k) x.scales_l[k] = g.sl[k][i];
                for (int j = 0; j < 8; ++j)
                    for (int c = 0; c < 4; ++c) std::memcpy(x.qs + 16 * j + 4 * c, g.qs[j][c][i], 4);
            }
        }
    }
}

void repack_32_r16(int type, const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK32;
    const size_t in_b = type == T_Q8_0 ? sizeof(BlockQ8_0) : type == T_Q5_0 ? sizeof(BlockQ5_0) : sizeof(BlockQ4_0);
    const size_t rb = (size_t)nb * in_b, gb = 16 * in_b;  // a 16-row block: 16 rows' bytes of one column block
    for (int r = r0; r < r1; r += 16)
        for (int b = 0; b < nb; ++b) {
            uint8_t* o = dst + (size_t)r * rb + (size_t)b * gb;
            for (int i = 0; i < 16; ++i) {
                const uint8_t* x = src + (size_t)(r + i) * rb + (size_t)b * in_b;
                std::memcpy(o + 2 * i, x, 2);  // d
                if (type == T_Q8_0) {
                    auto* q = reinterpret_cast<BlockQ8_0_R16*>(o);
                    for (int c = 0; c < 8; ++c) {  // q + 128, four at a time
                        uint32_t u;
                        std::memcpy(&u, x + 2 + 4 * c, 4);
                        u ^= 0x80808080u;
                        std::memcpy(q->qs[c][i], &u, 4);
                    }
                } else if (type == T_Q4_0 || type == T_IQ4_NL) {  // the same block and layout
                    auto* q = reinterpret_cast<BlockQ4_0_R16*>(o);
                    for (int c = 0; c < 4; ++c) std::memcpy(q->qs[c][i], x + 2 + 4 * c, 4);
                } else {
                    auto* q = reinterpret_cast<BlockQ5_0_R16*>(o);
                    uint32_t qh;
                    std::memcpy(&qh, x + 2, 4);
                    if (i == 0) std::memset(q->hb, 0, sizeof q->hb);
                    for (int c = 0; c < 4; ++c) {
                        std::memcpy(q->qs[c][i], x + 6 + 4 * c, 4);
                        for (int h = 0; h < 2; ++h)  // bits 16h+4c.. of qh -> bits 4i.. of hb[c][h]
                            q->hb[c][h] |= (uint64_t)((qh >> (16 * h + 4 * c)) & 0xf) << (4 * i);
                    }
                }
            }
        }
}

void unpack_32_r16(int type, const uint8_t* src, int n_cols, int r0, int r1, uint8_t* dst) {
    const int nb = n_cols / QK32;
    const size_t in_b = type == T_Q8_0 ? sizeof(BlockQ8_0) : type == T_Q5_0 ? sizeof(BlockQ5_0) : sizeof(BlockQ4_0);
    const size_t rb = (size_t)nb * in_b, gb = 16 * in_b;
    for (int r = r0; r < r1; r += 16)
        for (int b = 0; b < nb; ++b) {
            const uint8_t* o = src + (size_t)r * rb + (size_t)b * gb;
            for (int i = 0; i < 16; ++i) {
                uint8_t* x = dst + (size_t)(r + i) * rb + (size_t)b * in_b;
                std::memcpy(x, o + 2 * i, 2);
                if (type == T_Q8_0) {
                    auto* q = reinterpret_cast<const BlockQ8_0_R16*>(o);
                    for (int j = 0; j < 32; ++j) x[2 + j] = (uint8_t)(q->qs[j / 4][i][j % 4] ^ 0x80);
                } else if (type == T_Q4_0 || type == T_IQ4_NL) {
                    auto* q = reinterpret_cast<const BlockQ4_0_R16*>(o);
                    for (int j = 0; j < 16; ++j) x[2 + j] = q->qs[j / 4][i][j % 4];
                } else {
                    auto* q = reinterpret_cast<const BlockQ5_0_R16*>(o);
                    uint32_t qh = 0;
                    for (int j = 0; j < 32; ++j)
                        if (q->hb[(j % 16) / 4][j / 16] >> (4 * i + j % 4) & 1) qh |= 1u << j;
                    std::memcpy(x + 2, &qh, 4);
                    for (int j = 0; j < 16; ++j) x[6 + j] = q->qs[j / 4][i][j % 4];
                }
            }
        }
}

const char* act_name(ActKind a) {
    return a == ACT_Q8_K ? "Q8_K" : a == ACT_Q8_1 ? "Q8_1" : a == ACT_F32 ? "F32" : "Q8_0";
}

}  // namespace hmoe
