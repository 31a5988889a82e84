// Operators built from the kernels: dense quantized matmul and the fused MoE FFN.
// Callers validate shapes against buffer sizes with the check_* functions first (they return an
// error message, empty when fine); the operators themselves trust their arguments.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels.h"

namespace hmoe {

// Fused MoE decode (<= 4 tokens): tasks per thread in each phase (fewer: longer runs of weight rows
// per task, so fewer cold starts of the hardware prefetcher; more: finer load balance).
extern int moe_decode_tasks_per_thread;

// ---- variant dispatch (dispatch.cpp) ----
struct CpuFeatures {
    bool avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512dq, avx512vnni;
};
CpuFeatures cpu_features();
const KernelSet* variant(const char* name);  // nullptr if unknown or unsupported by this CPU
const KernelSet* best_kernels();
const KernelSet* active_kernels();
void set_active_kernels(const KernelSet* k);  // nullptr restores the best

// ---- activation quantization of rows ----
size_t act_row_bytes(ActKind a, int n_cols);
void quantize_rows(ActKind a, const float* x, int rows, int cols, uint8_t* out);

// ---- repacking at load: a matrix of type `from` into its interleaved form (repacked_type(from),
// -1 if none) and back (unpack, for checks); rows split over the pool ----
int repacked_type(int from);
// Whether repacking `from` at load pays with the active kernels (Q4_0, Q5_0 always; Q4_K, Q6_K and
// Q8_0 with VNNI: their AVX2 _R16 prompt kernels are slower than the plain ones, measured on one machine).
bool repack_pays(int from);
std::string check_repack(int from, long long n_rows, long long n_cols, size_t src_len, size_t dst_len, bool unpack);
void repack(int from, int n_rows, int n_cols, const uint8_t* src, uint8_t* dst, bool unpack);

// ---- dense matmul: out[T, n_rows] = x[T, n_cols] @ W[n_rows, n_cols]^T ----
std::string check_matmul(int type, long long n_rows, long long n_cols, long long T, size_t w_len, size_t x_len,
                         size_t out_len);
void matmul(const uint8_t* w, int type, int n_rows, int n_cols, const float* x, int T, float* out);

// ---- several matrices applied to the same x in one pool job (q/k/v, gate/up): x is quantized once
// per activation format and the row chunks of all matrices share one phase ----
constexpr int MAX_MULTI = 4;
struct MultiMatmulArgs {
    int n;                          // matrices, 1..MAX_MULTI
    const uint8_t* w[MAX_MULTI];
    int type[MAX_MULTI], n_rows[MAX_MULTI];
    float* out[MAX_MULTI];          // [T, n_rows[i]]
    int n_cols, T;
    const float* x;                 // [T, n_cols]
};
std::string check_matmul_multi(const MultiMatmulArgs& a, const size_t* w_len, size_t x_len, const size_t* out_len);
void matmul_multi(const MultiMatmulArgs& a);

// ---- fused MoE FFN ----
// out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].
struct MoeArgs {
    const float* x;          // [T, D]
    const int32_t* ids;      // [T, k]
    const float* weights;    // [T, k]
    const uint8_t* gate;     // [E, F, D] in gate_type
    const uint8_t* up;       // [E, F, D] in up_type
    const uint8_t* down;     // [E, D, F] in down_type
    float* out;              // [T, D]
    int T, k, n_expert, d_model, d_ff;
    int gate_type, up_type, down_type;
};
struct MoeLens {  // byte sizes of the buffers behind MoeArgs
    size_t x, ids, weights, gate, up, down, out;
};
std::string check_moe(const MoeArgs& a, const MoeLens& lens);

// ---- decode attention over a KV cache, split over (KV head, position chunk) on the pool ----
// out[h] = softmax_l(scale * <q_h, k_l>) . v_l for query heads h (h / (H/Hkv) picks the KV head).
// Key l of KV head j is at k + l*ks + j*khs (dk elements), value at v + l*vs + j*vhs (dv elements);
// the cache elements are float32, or f16 with kv_f16 (strides in elements).
struct AttnArgs {
    const float* q;  // [H, dk]
    const void* k;
    const void* v;
    float* out;      // [H, dv]
    int H, Hkv, dk, dv, L;
    long long ks, khs, vs, vhs;
    float scale;
    bool kv_f16 = false;
};
std::string check_attn(const AttnArgs& a, size_t q_len, size_t k_len, size_t v_len, size_t out_len);
void attn_decode(const AttnArgs& a);

// ---- prompt attention over a KV cache (causal), split over (KV head, token block) on the pool ----
// T queries at positions pos0..pos0+T-1, q [T, H, dk] (token stride qs floats); keys/values as in
// AttnArgs with L = pos0 + T; out [T, H, dv] (token stride os) may be q itself when dv == dk.
struct AttnPrefillArgs {
    const float* q;
    const void* k;
    const void* v;
    float* out;
    int T, pos0, H, Hkv, dk, dv;
    long long qs, os, ks, khs, vs, vhs;
    float scale;
    int window = 0;  // > 0: sliding window, token t sees keys pos0+t-window+1 .. pos0+t only
    bool kv_f16 = false;  // f16 keys and values (else float32)
};
std::string check_attn_prefill(const AttnPrefillArgs& a, size_t q_len, size_t k_len, size_t v_len, size_t out_len);
void attn_prefill(const AttnPrefillArgs& a);

class MoeJob;
MoeJob* moe_submit(const MoeArgs& a);  // starts on the pool, returns at once
void moe_wait(MoeJob* job);            // helps, waits, recycles the job
bool moe_done(const MoeJob* job);

}  // namespace hmoe
