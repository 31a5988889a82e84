// One decode step (a single token) through a whole standard decoder in C++: per layer RMSNorm, q/k/v,
// q/k norms, RoPE, the KV-cache write, attention over the cache, the output projection, RMSNorm and the
// FFN (dense SwiGLU or routed MoE with an optional shared expert), then the final norm and lm_head.
// The same kernels and pool jobs as the separate ops, without a trip through Python between them.
//
// Dimension key: D model width, H query heads, Hkv KV heads, Dh head dim, E experts, K experts per
// token, F expert (or dense) FFN width, Fs shared-expert width, V vocabulary.
//
// Multi-head Latent Attention (DeepSeek-V2/V3) takes the place of q/k/v when the model says so: C latent
// dims, N no-RoPE and R RoPE dims of a key head (Dh = N + R, n_rot = R), Dv value dims, Cq q-LoRA rank.
// The cache holds per position the normed latent and the rotated key part ([n_ctx, C + R], f16 or f32),
// one KV head for all H heads; decode runs absorbed: q_nope through k_b into the latent space, attention
// over the latent itself, the result through v_b. k_b / v_b stay in their GGUF blocks (per head a [C, N]
// and a [Dv, C] matrix); float32 copies (type 0) serve files whose kv_b holds both.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace hmoe {

struct QMat {  // a quantized matrix [rows, cols] in GGUF blocks
    const uint8_t* w = nullptr;
    int type = -1, rows = 0, cols = 0;
};

struct DecodeLayer {
    const float* attn_norm = nullptr;                      // [D]
    QMat q, k, v, o;                                       // [H*Dh, D], [Hkv*Dh, D] x2, [D, H*Dh]
    const float *bq = nullptr, *bk = nullptr, *bv = nullptr, *bo = nullptr;  // optional biases
    int qk_norm = 0;                                       // 0 none, 1 per head ([Dh]), 2 whole ([H*Dh])
    const float *q_norm = nullptr, *k_norm = nullptr;
    void *k_cache = nullptr, *v_cache = nullptr;           // [Hkv, n_ctx, Dh] head-major, f16 (kv_f16) or float32
    const float* ffn_norm = nullptr;                       // [D]
    int window = 0;                                        // > 0: sliding window (keys pos-window+1..pos)
    const float *rope_cos = nullptr, *rope_sin = nullptr;  // this layer's RoPE tables (nullptr: the model's)
    const float *post_attn_norm = nullptr, *post_ffn_norm = nullptr;  // [D], optional (Gemma's post-norms)
    int act = 0;                                           // dense FFN: 0 SiLU, 1 GELU (tanh)
    bool moe = false;
    QMat gate, up, down;                                   // dense FFN: [F, D], [F, D], [D, F]
    const float* router = nullptr;                         // MoE: [E, D] float32
    QMat gate_exps, up_exps, down_exps;                    // MoE: rows/cols of one expert; E stacked
    QMat sh_gate, sh_up, sh_down;                          // shared expert, optional (w == nullptr)
    const float* sh_scale = nullptr;                       // [D]: output * sigmoid(x . sh_scale), optional
    const float* probs_bias = nullptr;                     // [E]: added to the probabilities to choose only
    // MLA (DecodeModel::mla): q (Cq == 0) or q_a -> q_a_norm -> q_b; kv_a; kv_a_norm; k_b, v_b; o
    QMat q_a, q_b, kv_a;                                   // [Cq, D], [H*Dh, Cq], [C+R, D]
    const float *q_a_norm = nullptr, *kv_a_norm = nullptr; // [Cq], [C]
    QMat k_b, v_b;                                         // H stacked: [C, N] and [Dv, C] per head
    void* latent = nullptr;                                // [n_ctx, C+R], f16 (latent_f16) or f32
};

struct DecodeModel {
    int n_layer = 0, D = 0, H = 0, Hkv = 0, Dh = 0, n_ctx = 0, n_rot = 0, V = 0;
    bool rope_neox = false;
    const float *rope_cos = nullptr, *rope_sin = nullptr;  // [n_ctx, n_rot/2]
    float eps = 1e-6f, attn_scale = 1.f;
    int E = 0, K = 0;
    bool sigmoid_gating = false, norm_topk = false;
    float expert_scale = 1.f;                               // 1: unscaled
    int n_group = 0, n_group_used = 0;                      // > 1 groups: top-K within the best groups
    bool mla = false, latent_f16 = true;
    bool kv_f16 = false;                                    // standard attention: f16 K/V caches (else float32)
    int C = 0, N = 0, R = 0, Dv = 0, Cq = 0;
    std::vector<DecodeLayer> layers;
    const float* out_norm = nullptr;                        // [D]
    QMat lm_head;                                           // [V, D]
};

// Build a model from a flat description: `ints` (addresses, byte lengths, types, sizes) and `floats`
// (eps, scales), in the order decode.cpp's parser documents. Every buffer's length is checked against
// the size the dimensions call for; an error message names the field (empty when fine).
std::string parse_decode_model(const int64_t* ints, size_t n_ints, const double* floats, size_t n_floats,
                               DecodeModel* out);

// x [D]: the token's embedding (overwritten); logits [V]; pos: the token's position (the caller checked
// pos < n_ctx and that the cache holds positions [0, pos)).
void decode_step(const DecodeModel& m, float* x, int pos, float* logits);

// B decode steps at once, one token of each of B sequences: x [B, D] (overwritten), pos[b] the position of
// row b, caches[b * n_layer + l] row b's key/value caches of layer l (each [Hkv, n_ctx, Dh] in the plan's
// element type; nullptr: the plan's own, B must then be 1), logits [B, V]. Projections, experts and lm_head run
// over the B rows together (one weight read for all of them), attention per row against its own cache.
struct SeqCache {
    void *k = nullptr, *v = nullptr;  // MLA: k is the latent cache ([n_ctx, C+R], the plan's element type)
};
void decode_steps(const DecodeModel& m, int B, float* x, const int* pos, const SeqCache* caches, float* logits);

// Attention input preparation for T tokens at positions pos0..pos0+T-1, parallel over tokens:
// q/k/v biases, q/k RMSNorms (per head or over all heads), RoPE on q and k (in place), and k and v
// written to positions pos0.. of the head-major caches k_cache/v_cache: [Hkv, cache_ctx, Dh], float32 or
// (cache_f16) f16 rounded to nearest even.
struct AttnPrepArgs {
    float *q = nullptr, *k = nullptr, *v = nullptr;        // [T, H*Dh], [T, Hkv*Dh] x2
    int T = 0, H = 0, Hkv = 0, Dh = 0, n_rot = 0, pos0 = 0;
    bool neox = false;
    const float *cos = nullptr, *sin = nullptr;            // [>= pos0+T, n_rot/2]
    const float *bq = nullptr, *bk = nullptr, *bv = nullptr;
    int qk_norm = 0;                                       // 0 none, 1 per head, 2 whole
    const float *q_norm = nullptr, *k_norm = nullptr;
    float eps = 1e-6f;
    void *k_cache = nullptr, *v_cache = nullptr;           // null: leave the cache alone
    int cache_ctx = 0;                                     // positions per head in the caches
    bool cache_f16 = false;
};
void attn_prep_token(const AttnPrepArgs& a, int t);       // one token, on this thread
void attn_prep(const AttnPrepArgs& a);                     // all T tokens on the pool

// h[i] = gelu(g[i]) * u[i] for i < n with ggml's GELU (tanh form, input rounded to f16, result from
// an f16 table, 0 below -10 and x above 10); h may be g. Large n is split over the pool.
void gelu_mul(const float* g, const float* u, float* h, long long n);

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows r < n_rows of n floats, rows split over the pool
// (y may be x).
void rms_norm_rows(const float* x, const float* w, int n_rows, int n, float eps, float* y);

// Wall time per part of decode_step, for profiling: decode_profile(on, out) copies the seconds
// accumulated so far into out[DECODE_PARTS] (when not null), zeroes them and turns timing on/off.
enum DecodePart { PART_OTHER, PART_PROJ, PART_ATTN, PART_ROUTE, PART_MOE, PART_SHARED, PART_LM_HEAD, DECODE_PARTS };
void decode_profile(bool on, double* parts_out);
const char* decode_part_name(int part);

}  // namespace hmoe
