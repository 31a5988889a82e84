// One decode step through the whole decoder (see decode.h).
#include "decode.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>

#include "ops.h"
#include "quant_blocks.h"
#include "threadpool.h"

namespace hmoe {

// ================================================================ the flat description
//
// ints, in order (a "buffer" is two ints: address, byte length; address 0 = absent; a "matrix" is
// a buffer followed by ggml type, rows, cols):
//   n_layer D H Hkv Dh n_ctx n_rot V rope_neox E K sigmoid_gating norm_topk
//   mla C N R Dv Cq cache_f16 n_group n_group_used   (cache_f16: the latent or the K/V caches hold f16)
//   rope_cos rope_sin out_norm (buffers)  lm_head (matrix)
//   per layer: attn_norm (buffer)
//              standard: q k v o (matrices)  bq bk bv bo (buffers)
//                        qk_norm_kind  q_norm k_norm (buffers)  k_cache v_cache (buffers of n_ctx*Hkv*Dh
//                        elements)
//              MLA:      Cq > 0: q_a (matrix) q_a_norm (buffer) q_b (matrix); else q (matrix)
//                        kv_a (matrix) kv_a_norm (buffer) k_b v_b (matrices, rows/cols of one head, H
//                        stacked; type 0: float32) o (matrix) latent (buffer of n_ctx * (C+R) elements)
//              ffn_norm (buffer)
//              window  rope_cos rope_sin post_attn_norm post_ffn_norm (buffers, optional)  ffn_act
//              is_moe
//              dense: gate up down (matrices)
//              moe:   router probs_bias (buffers; the bias optional)  gate_exps up_exps down_exps
//                     (matrices, rows/cols of one expert, E stacked)  sh_gate sh_up sh_down (matrices,
//                     address 0 = none)  sh_scale (buffer)
// floats: eps attn_scale expert_scale

namespace {

struct Reader {
    const int64_t* p;
    size_t n, i = 0;
    std::string err;
    int64_t next(const char* what) {
        if (i >= n) {
            if (err.empty()) err = std::string("description ends before ") + what;
            return 0;
        }
        return p[i++];
    }
};

std::string fmt(const char* f, const std::string& a, long long b = 0, long long c = 0) {
    char s[512];
    std::snprintf(s, sizeof s, f, a.c_str(), b, c);
    return s;
}

// A float buffer of exactly n floats (or absent when allowed).
template <class T>
bool read_buf(Reader& r, const std::string& name, long long n_floats, bool optional, T** out, int es = 4) {
    const int64_t addr = r.next(name.c_str()), len = r.next(name.c_str());
    if (!r.err.empty()) return false;
    if (addr == 0) {
        if (!optional) r.err = fmt("%s is missing", name);
        *out = nullptr;
        return optional;
    }
    if (len != n_floats * es) {
        r.err = fmt("%s has %lld bytes, expected %lld", name, len, n_floats * es);
        return false;
    }
    *out = reinterpret_cast<T*>(addr);
    return true;
}

bool read_mat(Reader& r, const std::string& name, long long rows, long long cols, long long n_stack, bool optional,
              QMat* m, bool allow_f32 = false) {
    const int64_t addr = r.next(name.c_str()), len = r.next(name.c_str());
    const int64_t type = r.next(name.c_str()), nr = r.next(name.c_str()), nc = r.next(name.c_str());
    if (!r.err.empty()) return false;
    if (addr == 0) {
        if (!optional) r.err = fmt("%s is missing", name);
        *m = QMat{};
        return optional;
    }
    if (rows >= 0 && nr != rows) {
        r.err = fmt("%s has %lld rows, expected %lld", name, nr, rows);
        return false;
    }
    if (nc != cols || nr <= 0 || nr > (1LL << 30)) {
        r.err = fmt("%s has shape [%lld, %lld]: wrong column count", name, nr, nc);
        return false;
    }
    const bool f32 = allow_f32 && type == T_F32;
    const TypeInfo* ti = type >= 0 && type < MAX_TYPE_ID && !f32 ? type_info((int)type) : nullptr;
    if (!f32 && (!ti || !active_kernels()->gemm[type])) {
        r.err = fmt("%s: ggml_type %lld is not supported by the CPU kernels", name, type);
        return false;
    }
    if (!f32 && nr % ti->group) {
        r.err = fmt("%s: %lld rows are not a multiple of the type's row group %lld", name, nr, (long long)ti->group);
        return false;
    }
    if (!f32 && nc % ti->block) {
        r.err = fmt("%s: %lld columns are not a multiple of the block size %lld", name, nc, ti->block);
        return false;
    }
    const long long want = f32 ? n_stack * nr * nc * 4 : n_stack * nr * (nc / ti->block) * ti->bytes;
    if (len != want) {
        r.err = fmt("%s has %lld bytes, expected %lld", name, len, want);
        return false;
    }
    m->w = reinterpret_cast<const uint8_t*>(addr);
    m->type = (int)type, m->rows = (int)nr, m->cols = (int)nc;
    return true;
}

}  // namespace

std::string parse_decode_model(const int64_t* ints, size_t n_ints, const double* floats, size_t n_floats,
                               DecodeModel* out) {
    Reader r{ints, n_ints};
    DecodeModel m;
    int64_t h[22];
    static const char* hn[22] = {"n_layer", "D", "H", "Hkv", "Dh", "n_ctx", "n_rot", "V", "rope_neox", "E", "K",
                                 "sigmoid_gating", "norm_topk", "mla", "C", "N", "R", "Dv", "Cq", "latent_f16",
                                 "n_group", "n_group_used"};
    for (int i = 0; i < 22; ++i) h[i] = r.next(hn[i]);
    if (!r.err.empty()) return r.err;
    for (int i = 0; i < 8; ++i)
        if (h[i] <= 0 || h[i] > (1LL << 30)) return fmt("%s = %lld must be in [1, 2^30]", hn[i], h[i]);
    m.n_layer = (int)h[0], m.D = (int)h[1], m.H = (int)h[2], m.Hkv = (int)h[3], m.Dh = (int)h[4];
    m.n_ctx = (int)h[5], m.n_rot = (int)h[6], m.V = (int)h[7], m.rope_neox = h[8] != 0;
    m.E = (int)h[9], m.K = (int)h[10], m.sigmoid_gating = h[11] != 0, m.norm_topk = h[12] != 0;
    if (m.H % m.Hkv) return fmt("%s: H = %lld is not a multiple of Hkv = %lld", "heads", m.H, m.Hkv);
    if (m.n_rot > m.Dh || m.n_rot % 2) return fmt("%s = %lld must be even and <= Dh = %lld", "n_rot", m.n_rot, m.Dh);
    if (m.E < 0 || m.K < 0 || m.K > m.E || m.K > 64) return fmt("%s: K = %lld must be in [0, min(E, 64)], E = %lld", "experts", m.K, m.E);
    m.mla = h[13] != 0, m.latent_f16 = h[19] != 0, m.kv_f16 = !m.mla && h[19] != 0;
    for (int i = 14; i < 22; ++i)
        if (h[i] < 0 || h[i] > (1LL << 20)) return fmt("%s = %lld must be in [0, 2^20]", hn[i], h[i]);
    m.C = (int)h[14], m.N = (int)h[15], m.R = (int)h[16], m.Dv = (int)h[17], m.Cq = (int)h[18];
    m.n_group = (int)h[20], m.n_group_used = (int)h[21];
    if (m.n_group > 256) return fmt("%s = %lld must be <= 256", "n_group", m.n_group);
    if (m.n_group > 1 && (m.E % m.n_group || m.n_group_used < 1 || m.n_group_used > m.n_group ||
                          (long long)m.n_group_used * (m.E / m.n_group) < m.K))
        return fmt("%s: %lld groups (E = %lld) cannot hold the top-K within the best n_group_used", "routing",
                   m.n_group, m.E);
    if (m.mla) {
        if (m.C <= 0 || m.N <= 0 || m.R <= 0 || m.Dv <= 0)
            return fmt("%s: C = %lld, N = %lld (and R, Dv) must be positive", "mla", m.C, m.N);
        if (m.Dh != m.N + m.R || m.n_rot != m.R || m.Hkv != m.H)
            return fmt("%s: Dh must be N + R = %lld and n_rot R = %lld, Hkv H", "mla", m.N + m.R, m.R);
    }
    if (n_floats != 3) return fmt("%s: expected 3 floats, got %lld", "floats", (long long)n_floats);
    m.eps = (float)floats[0], m.attn_scale = (float)floats[1], m.expert_scale = (float)floats[2];
    const long long D = m.D, qd = (long long)m.H * m.Dh, kvd = (long long)m.Hkv * m.Dh;
    const long long half = m.n_rot / 2;
    if (!read_buf(r, "rope_cos", (long long)m.n_ctx * half, half == 0, &m.rope_cos)) return r.err;
    if (!read_buf(r, "rope_sin", (long long)m.n_ctx * half, half == 0, &m.rope_sin)) return r.err;
    if (!read_buf(r, "output_norm", D, false, &m.out_norm)) return r.err;
    if (!read_mat(r, "lm_head", m.V, D, 1, false, &m.lm_head)) return r.err;
    m.layers.resize(m.n_layer);
    for (int l = 0; l < m.n_layer; ++l) {
        DecodeLayer& L = m.layers[l];
        const std::string p = "blk." + std::to_string(l) + ".";
        if (!read_buf(r, p + "attn_norm", D, false, &L.attn_norm)) return r.err;
        if (m.mla) {
            const long long qk = (long long)m.H * m.Dh, CR = m.C + m.R;
            if (m.Cq) {
                if (!read_mat(r, p + "attn_q_a", m.Cq, D, 1, false, &L.q_a) ||
                    !read_buf(r, p + "attn_q_a_norm", m.Cq, false, &L.q_a_norm) ||
                    !read_mat(r, p + "attn_q_b", qk, m.Cq, 1, false, &L.q_b))
                    return r.err;
            } else if (!read_mat(r, p + "attn_q", qk, D, 1, false, &L.q)) {
                return r.err;
            }
            if (!read_mat(r, p + "attn_kv_a_mqa", CR, D, 1, false, &L.kv_a) ||
                !read_buf(r, p + "attn_kv_a_norm", m.C, false, &L.kv_a_norm) ||
                !read_mat(r, p + "attn_k_b", m.C, m.N, m.H, false, &L.k_b, true) ||
                !read_mat(r, p + "attn_v_b", m.Dv, m.C, m.H, false, &L.v_b, true) ||
                !read_mat(r, p + "attn_output", D, (long long)m.H * m.Dv, 1, false, &L.o))
                return r.err;
            const int64_t addr = r.next("latent"), len = r.next("latent");
            const long long want = (long long)m.n_ctx * CR * (m.latent_f16 ? 2 : 4);
            if (!r.err.empty()) return r.err;
            if (addr == 0 || len != want)
                return fmt("%slatent cache has %lld bytes, expected %lld", p, addr ? len : 0, want);
            L.latent = reinterpret_cast<void*>(addr);
        } else {
            if (!read_mat(r, p + "attn_q", qd, D, 1, false, &L.q) || !read_mat(r, p + "attn_k", kvd, D, 1, false, &L.k) ||
                !read_mat(r, p + "attn_v", kvd, D, 1, false, &L.v) || !read_mat(r, p + "attn_output", D, qd, 1, false, &L.o))
                return r.err;
            if (!read_buf(r, p + "attn_q.bias", qd, true, &L.bq) || !read_buf(r, p + "attn_k.bias", kvd, true, &L.bk) ||
                !read_buf(r, p + "attn_v.bias", kvd, true, &L.bv) || !read_buf(r, p + "attn_output.bias", D, true, &L.bo))
                return r.err;
            L.qk_norm = (int)r.next("qk_norm");
            if (L.qk_norm < 0 || L.qk_norm > 2) return fmt("%sqk_norm kind %lld must be 0, 1 or 2", p, L.qk_norm);
            const long long nq = L.qk_norm == 1 ? m.Dh : qd, nk = L.qk_norm == 1 ? m.Dh : kvd;
            if (!read_buf(r, p + "attn_q_norm", nq, L.qk_norm == 0, &L.q_norm) ||
                !read_buf(r, p + "attn_k_norm", nk, L.qk_norm == 0, &L.k_norm))
                return r.err;
            const int es = m.kv_f16 ? 2 : 4;
            if (!read_buf(r, p + "k_cache", (long long)m.n_ctx * kvd, false, &L.k_cache, es) ||
                !read_buf(r, p + "v_cache", (long long)m.n_ctx * kvd, false, &L.v_cache, es))
                return r.err;
        }
        if (!read_buf(r, p + "ffn_norm", D, false, &L.ffn_norm)) return r.err;
        const int64_t window = r.next("window");
        if (window < 0 || window > (1LL << 30)) return fmt("%swindow = %lld must be in [0, 2^30]", p, window);
        L.window = (int)window;
        if (m.mla && window) return fmt("%s: a sliding window (%lld) with latent attention", p, window);
        if (!read_buf(r, p + "rope_cos", (long long)m.n_ctx * half, true, &L.rope_cos) ||
            !read_buf(r, p + "rope_sin", (long long)m.n_ctx * half, true, &L.rope_sin))
            return r.err;
        if (!L.rope_cos != !L.rope_sin) return fmt("%s: rope_cos and rope_sin must come together", p);
        if (!read_buf(r, p + "post_attention_norm", D, true, &L.post_attn_norm) ||
            !read_buf(r, p + "post_ffw_norm", D, true, &L.post_ffn_norm))
            return r.err;
        const int64_t act = r.next("ffn_act");
        if (act < 0 || act > 1) return fmt("%sffn_act %lld must be 0 (SiLU) or 1 (GELU)", p, act);
        L.act = (int)act;
        L.moe = r.next("is_moe") != 0;
        if (L.moe && L.act) return fmt("%s: GELU experts are not supported (ffn_act %lld)", p, act);
        if (!L.moe) {
            if (!read_mat(r, p + "ffn_gate", -1, D, 1, false, &L.gate)) return r.err;
            const int F = L.gate.rows;
            if (!read_mat(r, p + "ffn_up", F, D, 1, false, &L.up) || !read_mat(r, p + "ffn_down", D, F, 1, false, &L.down))
                return r.err;
            continue;
        }
        if (m.E <= 0 || m.K <= 0) return fmt("%s: an MoE layer needs E, K > 0 (E = %lld, K = %lld)", p, m.E, m.K);
        if (!read_buf(r, p + "ffn_gate_inp", (long long)m.E * D, false, &L.router) ||
            !read_buf(r, p + "exp_probs_b", m.E, true, &L.probs_bias))
            return r.err;
        if (!read_mat(r, p + "ffn_gate_exps", -1, D, m.E, false, &L.gate_exps)) return r.err;
        const int F = L.gate_exps.rows;
        if (!read_mat(r, p + "ffn_up_exps", F, D, m.E, false, &L.up_exps) ||
            !read_mat(r, p + "ffn_down_exps", D, F, m.E, false, &L.down_exps))
            return r.err;
        if (!read_mat(r, p + "ffn_gate_shexp", -1, D, 1, true, &L.sh_gate)) return r.err;
        const bool sh = L.sh_gate.w != nullptr;
        const int Fs = sh ? L.sh_gate.rows : 0;
        if (!read_mat(r, p + "ffn_up_shexp", sh ? Fs : -1, D, 1, !sh, &L.sh_up) ||
            !read_mat(r, p + "ffn_down_shexp", D, sh ? Fs : 1, 1, !sh, &L.sh_down))
            return r.err;
        if (!sh && (L.sh_up.w || L.sh_down.w)) return fmt("%s: shared expert up/down without gate", p);
        if (!read_buf(r, p + "ffn_gate_inp_shexp", D, true, &L.sh_scale)) return r.err;
        if (L.sh_scale && !sh) return fmt("%s: shared-expert gate without a shared expert", p);
    }
    if (r.i != r.n) return fmt("%s: %lld ints left over after the last layer", "description", (long long)(r.n - r.i));
    *out = std::move(m);
    return "";
}

// ================================================================ the step

namespace {

// Optional wall-time accounting per part (decode_profile), on the calling thread.
bool g_prof_on = false;
double g_prof[DECODE_PARTS] = {};

struct Timer {
    int part;
    std::chrono::steady_clock::time_point t0;
    explicit Timer(int p) : part(p) {
        if (g_prof_on) t0 = std::chrono::steady_clock::now();
    }
    void next(int p) {  // close this part, open the next
        if (g_prof_on) {
            const auto t = std::chrono::steady_clock::now();
            g_prof[part] += std::chrono::duration<double>(t - t0).count();
            t0 = t;
        }
        part = p;
    }
    ~Timer() { next(part); }
};

struct ForJob : public Job {
    std::function<void(int)> fn;
    void run_task(int, int i) override { fn(i); }
};

// run fn(0..n-1) on the pool
void parallel_for(int n, const std::function<void(int)>& fn) {
    thread_local ForJob job;
    job.fn = fn;
    const int counts[1] = {n};
    job.set_phases(counts, 1);
    ThreadPool::instance().run(&job);
}

float dot(const float* a, const float* b, int n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
    float t = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; i < n; ++i) t += a[i] * b[i];
    return t;
}

// y = x / sqrt(mean(x^2) + eps) * w
void rms_norm(const float* x, const float* w, int n, float eps, float* y) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += (double)x[i] * x[i];
    const float scale = 1.f / std::sqrt((float)(s / n) + eps);
    for (int i = 0; i < n; ++i) y[i] = x[i] * scale * w[i];
}

// ggml's GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))
float gelu_tanh(float x) {
    return 0.5f * x * (1.f + std::tanh(0.7978845608028654f * x * (1.f + 0.044715f * x * x)));
}

void rope_heads(float* x, int n_head, int Dh, int n_rot, bool neox, const float* c, const float* s) {
    const int half = n_rot / 2;
    for (int h = 0; h < n_head; ++h) {
        float* v = x + (size_t)h * Dh;
        for (int i = 0; i < half; ++i) {
            const int ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
            const float a = v[ia], b = v[ib];
            v[ia] = a * c[i] - b * s[i];
            v[ib] = a * s[i] + b * c[i];
        }
    }
}

void add(float* y, const float* b, int n) {
    for (int i = 0; i < n; ++i) y[i] += b[i];
}

struct Buffers {
    std::vector<float> xn, q, k, v, att, y, ys, g, u, logit, w, sel;  // B rows each; k, v: this step's
    std::vector<float> qa, kv, qabs, olat, split;                     // MLA
    std::vector<int32_t> ids;
    std::vector<char> taken;
};

// Row b's caches of layer l: the plan's own (one sequence) or the caller's (a batch of sequences).
struct Caches {
    const DecodeModel& m;
    const SeqCache* seq;  // [B * n_layer] or nullptr: the plan's
    void* k(int b, int l) const { return seq ? seq[(size_t)b * m.n_layer + l].k : m.layers[l].k_cache; }
    void* v(int b, int l) const { return seq ? seq[(size_t)b * m.n_layer + l].v : m.layers[l].v_cache; }
};

void rms_rows(const float* x, const float* w, int B, int n, float eps, float* y) {
    for (int r = 0; r < B; ++r) rms_norm(x + (size_t)r * n, w, n, eps, y + (size_t)r * n);
}

// y [B, rows] = x [B, cols] @ m^T
void matmul_rows(const QMat& m, const float* x, int B, float* y) { matmul(m.w, m.type, m.rows, m.cols, x, B, y); }

void attention(const DecodeModel& m, int l, const Caches& cs, Buffers& b, float* x, int B, const int* pos) {
    const DecodeLayer& L = m.layers[l];
    const int D = m.D, qd = m.H * m.Dh, kvd = m.Hkv * m.Dh;
    Timer tm(PART_OTHER);
    rms_rows(x, L.attn_norm, B, D, m.eps, b.xn.data());
    MultiMatmulArgs a{};
    a.n = 3, a.n_cols = D, a.T = B, a.x = b.xn.data();
    const QMat* mats[3] = {&L.q, &L.k, &L.v};
    float* outs[3] = {b.q.data(), b.k.data(), b.v.data()};
    for (int i = 0; i < 3; ++i)
        a.w[i] = mats[i]->w, a.type[i] = mats[i]->type, a.n_rows[i] = mats[i]->rows, a.out[i] = outs[i];
    tm.next(PART_PROJ);
    matmul_multi(a);
    const long long hs = (long long)m.n_ctx * m.Dh;  // head stride of the head-major caches
    for (int r = 0; r < B; ++r) {
        float* q = b.q.data() + (size_t)r * qd;
        float* att = b.att.data() + (size_t)r * qd;
        char *kc = static_cast<char*>(cs.k(r, l)), *vc = static_cast<char*>(cs.v(r, l));
        tm.next(PART_OTHER);
        AttnPrepArgs pa;
        pa.q = q, pa.k = b.k.data() + (size_t)r * kvd, pa.v = b.v.data() + (size_t)r * kvd, pa.T = 1;
        pa.H = m.H, pa.Hkv = m.Hkv, pa.Dh = m.Dh;
        pa.n_rot = m.n_rot, pa.pos0 = pos[r], pa.neox = m.rope_neox;
        pa.cos = L.rope_cos ? L.rope_cos : m.rope_cos, pa.sin = L.rope_sin ? L.rope_sin : m.rope_sin;
        pa.bq = L.bq, pa.bk = L.bk, pa.bv = L.bv, pa.qk_norm = L.qk_norm, pa.q_norm = L.q_norm, pa.k_norm = L.k_norm;
        pa.eps = m.eps, pa.k_cache = kc, pa.v_cache = vc, pa.cache_ctx = m.n_ctx, pa.cache_f16 = m.kv_f16;
        attn_prep_token(pa, 0);
        tm.next(PART_ATTN);
        // a sliding-window layer reads only the window's positions [lo, pos]
        const int lo = L.window > 0 ? std::max(0, pos[r] - L.window + 1) : 0;
        const size_t es = m.kv_f16 ? 2 : 4;
        kc += (size_t)lo * m.Dh * es, vc += (size_t)lo * m.Dh * es;
        if (m.Hkv >= ThreadPool::instance().threads()) {
            // one task per KV head keeps every thread busy: the register-tiled prompt kernel
            AttnPrefillArgs ap{};
            ap.q = q, ap.k = kc, ap.v = vc, ap.out = att;
            ap.T = 1, ap.pos0 = pos[r] - lo, ap.H = m.H, ap.Hkv = m.Hkv, ap.dk = m.Dh, ap.dv = m.Dh;
            ap.qs = qd, ap.os = qd, ap.ks = m.Dh, ap.khs = hs, ap.vs = m.Dh, ap.vhs = hs, ap.scale = m.attn_scale;
            ap.kv_f16 = m.kv_f16;
            attn_prefill(ap);
        } else {  // few KV heads: split the positions too (flash-decoding)
            AttnArgs at{};
            at.q = q, at.k = kc, at.v = vc, at.out = att;
            at.H = m.H, at.Hkv = m.Hkv, at.dk = m.Dh, at.dv = m.Dh, at.L = pos[r] + 1 - lo;
            at.ks = m.Dh, at.khs = hs, at.vs = m.Dh, at.vhs = hs, at.scale = m.attn_scale;
            at.kv_f16 = m.kv_f16;
            attn_decode(at);
        }
    }
    tm.next(PART_PROJ);
    matmul_rows(L.o, b.att.data(), B, b.y.data());
    tm.next(PART_OTHER);
    for (int r = 0; r < B; ++r) {
        float* y = b.y.data() + (size_t)r * D;
        if (L.bo) add(y, L.bo, D);
        if (L.post_attn_norm) rms_norm(y, L.post_attn_norm, D, m.eps, y);
        add(x + (size_t)r * D, y, D);
    }
}

// ---------------------------------------------------------------- Multi-head Latent Attention

// y [rows] = head h's [rows, cols] matrix of a stack (its blocks, or float32) times x [cols], on this thread.
void head_gemv(const QMat& M, int h, const float* x, float* y) {
    if (M.type == T_F32) {
        const float* W = reinterpret_cast<const float*>(M.w) + (size_t)h * M.rows * M.cols;
        active_kernels()->f32_gemv(W, (size_t)M.cols, M.rows, M.cols, x, y);
        return;
    }
    const KernelSet* ks = active_kernels();
    const TypeInfo* ti = type_info(M.type);
    const size_t rb = (size_t)(M.cols / ti->block) * ti->bytes;
    thread_local std::vector<uint8_t> act;
    act.resize(act_row_bytes(ti->act, M.cols));
    ks->quant[ti->act](x, act.data(), M.cols, act_bytes(ti->act));
    ks->gemm[M.type](M.w + (size_t)h * M.rows * rb, rb, M.rows, M.cols, act.data(), 1, y, (size_t)M.rows);
}

// Absorbed queries q [H, C+R] over the latent cache's positions [0, n) -> out [H, C] (softmax-weighted sums
// of the latents' first C dims): flash-decoding over position splits on the pool, 64 positions at a time
// (an f16 cache read as it lies, widened in the kernel's registers).
void latent_attend(const DecodeModel& m, const float* q, const void* latent, int n, float* out, std::vector<float>& state) {
    const KernelSet* ks = active_kernels();
    const int H = m.H, C = m.C, CR = m.C + m.R, blk = 64;
    const int n_blk = (n + blk - 1) / blk;
    const int n_split = std::max(1, std::min(n_blk, 4 * ThreadPool::instance().threads()));
    const size_t per = (size_t)H * (C + 2);  // a split's state: max [H], sum [H], weighted sum [H, C]
    state.resize(per * n_split);
    parallel_for(n_split, [&](int sp) {
        const int b0 = (int)((long long)n_blk * sp / n_split), b1 = (int)((long long)n_blk * (sp + 1) / n_split);
        float* M = state.data() + per * sp;
        float *S = M + H, *O = S + H;
        thread_local std::vector<float> p, bm, bs, bo;
        p.resize((size_t)H * blk), bm.resize(H), bs.resize(H), bo.resize((size_t)H * C);
        for (int h = 0; h < H; ++h) M[h] = -INFINITY, S[h] = 0.f;
        std::fill(O, O + (size_t)H * C, 0.f);
        for (int bi = b0; bi < b1; ++bi) {
            const int j0 = bi * blk, nj = std::min(blk, n - j0);
            const void* kb = m.latent_f16 ? static_cast<const void*>(static_cast<const uint16_t*>(latent) + (size_t)j0 * CR)
                                          : static_cast<const void*>(static_cast<const float*>(latent) + (size_t)j0 * CR);
            ks->attn_part(q, H, CR, C, kb, CR, kb, CR, nj, m.attn_scale, p.data(), bm.data(), bs.data(), bo.data(),
                          m.latent_f16);
            for (int h = 0; h < H; ++h) {  // merge this block into the split's running state
                const float mx = std::max(M[h], bm[h]);
                const float a = std::exp(M[h] - mx), c = std::exp(bm[h] - mx);
                S[h] = S[h] * a + bs[h] * c, M[h] = mx;
                float* o = O + (size_t)h * C;
                const float* ob = bo.data() + (size_t)h * C;
                for (int j = 0; j < C; ++j) o[j] = o[j] * a + ob[j] * c;
            }
        }
    });
    for (int h = 0; h < H; ++h) {  // merge the splits, normalise
        float mx = -INFINITY;
        for (int sp = 0; sp < n_split; ++sp) mx = std::max(mx, state[per * sp + h]);
        float sum = 0.f;
        float* o = out + (size_t)h * C;
        std::fill(o, o + C, 0.f);
        for (int sp = 0; sp < n_split; ++sp) {
            const float* M = state.data() + per * sp;
            const float c = std::exp(M[h] - mx);
            sum += M[H + h] * c;
            const float* O = M + 2 * H + (size_t)h * C;
            for (int j = 0; j < C; ++j) o[j] += O[j] * c;
        }
        const float inv = 1.f / sum;
        for (int j = 0; j < C; ++j) o[j] *= inv;
    }
}

void mla_attention(const DecodeModel& m, int l, const Caches& cs, Buffers& b, float* x, int B, const int* pos) {
    const DecodeLayer& L = m.layers[l];
    const int D = m.D, H = m.H, C = m.C, N = m.N, R = m.R, Dq = m.Dh, CR = m.C + m.R;
    Timer tm(PART_OTHER);
    rms_rows(x, L.attn_norm, B, D, m.eps, b.xn.data());
    tm.next(PART_PROJ);
    MultiMatmulArgs a{};
    a.n = 2, a.n_cols = D, a.T = B, a.x = b.xn.data();
    const QMat& q0 = m.Cq ? L.q_a : L.q;
    a.w[0] = q0.w, a.type[0] = q0.type, a.n_rows[0] = q0.rows, a.out[0] = m.Cq ? b.qa.data() : b.q.data();
    a.w[1] = L.kv_a.w, a.type[1] = L.kv_a.type, a.n_rows[1] = CR, a.out[1] = b.kv.data();
    matmul_multi(a);
    if (m.Cq) {
        tm.next(PART_OTHER);
        rms_rows(b.qa.data(), L.q_a_norm, B, m.Cq, m.eps, b.qa.data());
        tm.next(PART_PROJ);
        matmul_rows(L.q_b, b.qa.data(), B, b.q.data());
    }
    tm.next(PART_OTHER);
    const int half = R / 2;
    for (int r = 0; r < B; ++r) {
        const float* cos = (L.rope_cos ? L.rope_cos : m.rope_cos) + (size_t)pos[r] * half;
        const float* sin = (L.rope_sin ? L.rope_sin : m.rope_sin) + (size_t)pos[r] * half;
        float* kv = b.kv.data() + (size_t)r * CR;
        rms_norm(kv, L.kv_a_norm, C, m.eps, kv);
        rope_heads(kv + C, 1, R, R, false, cos, sin);
        rope_heads(b.q.data() + (size_t)r * H * Dq + N, H, Dq, R, false, cos, sin);
        void* lat = cs.seq ? cs.k(r, l) : L.latent;
        if (m.latent_f16) {
            uint16_t* row = static_cast<uint16_t*>(lat) + (size_t)pos[r] * CR;
            for (int i = 0; i < CR; ++i) row[i] = fp32_to_fp16(kv[i]);
        } else {
            std::copy(kv, kv + CR, static_cast<float*>(lat) + (size_t)pos[r] * CR);
        }
    }
    tm.next(PART_PROJ);
    // absorbed queries: q_nope through k_b into the latent space, the rotated part appended
    parallel_for(B * H, [&](int t) {
        const int r = t / H, h = t % H;
        const float* qh = b.q.data() + ((size_t)r * H + h) * Dq;
        float* qa = b.qabs.data() + ((size_t)r * H + h) * CR;
        head_gemv(L.k_b, h, qh, qa);
        std::copy(qh + N, qh + Dq, qa + C);
        if (m.latent_f16) {  // the query meets an f16 cache in f16, as llama.cpp's matmul does
            thread_local std::vector<uint16_t> h16;
            h16.resize(CR);
            const KernelSet* ks = active_kernels();
            ks->f32_to_f16(qa, h16.data(), (size_t)CR);
            ks->f16_to_f32(h16.data(), qa, (size_t)CR);
        }
    });
    tm.next(PART_ATTN);
    for (int r = 0; r < B; ++r) {
        const void* lat = cs.seq ? static_cast<const void*>(cs.k(r, l)) : L.latent;
        latent_attend(m, b.qabs.data() + (size_t)r * H * CR, lat, pos[r] + 1, b.olat.data() + (size_t)r * H * C,
                      b.split);
    }
    tm.next(PART_PROJ);
    parallel_for(B * H, [&](int t) {  // per head back out of the latent space through v_b
        const int r = t / H, h = t % H;
        head_gemv(L.v_b, h, b.olat.data() + ((size_t)r * H + h) * C, b.att.data() + ((size_t)r * H + h) * m.Dv);
    });
    matmul_rows(L.o, b.att.data(), B, b.y.data());
    tm.next(PART_OTHER);
    for (int r = 0; r < B; ++r) add(x + (size_t)r * D, b.y.data() + (size_t)r * D, D);
}

// GELU (tanh form) of every f16 value, as an f16 table: ggml's CPU backend reads GELU this way.
const uint16_t* gelu_table() {
    static const std::vector<uint16_t> t = [] {
        std::vector<uint16_t> v(1 << 16);
        for (uint32_t i = 0; i < (1u << 16); ++i) v[i] = fp32_to_fp16(gelu_tanh(fp16_to_fp32((uint16_t)i)));
        return v;
    }();
    return t.data();
}

// act(gate(xn)) * up(xn) -> down, for B rows of b.xn into out [B, D]; act: 0 SiLU, 1 GELU
void swiglu(const QMat& gate, const QMat& up, const QMat& down, Buffers& b, int B, float* out, int act = 0) {
    const int F = gate.rows;
    MultiMatmulArgs a{};
    a.n = 2, a.n_cols = gate.cols, a.T = B, a.x = b.xn.data();
    a.w[0] = gate.w, a.type[0] = gate.type, a.n_rows[0] = F, a.out[0] = b.g.data();
    a.w[1] = up.w, a.type[1] = up.type, a.n_rows[1] = F, a.out[1] = b.u.data();
    matmul_multi(a);
    if (act == 1)
        gelu_mul(b.g.data(), b.u.data(), b.g.data(), B * F);
    else
        active_kernels()->silu_mul(b.g.data(), b.u.data(), b.g.data(), B * F);
    matmul(down.w, down.type, down.rows, down.cols, b.g.data(), B, out);
}

// router probabilities and the top-K experts of B rows -> b.ids, b.w [B, K]
void route(const DecodeModel& m, const DecodeLayer& L, Buffers& b, int B) {
    const int E = m.E, D = m.D, K = m.K;
    const int per = 16, n_chunk = (E + per - 1) / per;
    parallel_for(n_chunk * B, [&](int t) {
        const int r = t / n_chunk, c = t % n_chunk;
        const float* xn = b.xn.data() + (size_t)r * D;
        float* lg = b.logit.data() + (size_t)r * E;
        const int e0 = c * per, ne = std::min(E, (c + 1) * per) - e0;
        active_kernels()->f32_gemv(L.router + (size_t)e0 * D, (size_t)D, ne, D, xn, lg + e0);
    });
    for (int r = 0; r < B; ++r) {
        float* lg = b.logit.data() + (size_t)r * E;
        int32_t* ids = b.ids.data() + (size_t)r * K;
        float* w = b.w.data() + (size_t)r * K;
        if (m.sigmoid_gating) {
            for (int e = 0; e < E; ++e) lg[e] = 1.f / (1.f + std::exp(-lg[e]));
        } else {
            float mx = -INFINITY;
            for (int e = 0; e < E; ++e) mx = std::max(mx, lg[e]);
            float sum = 0.f;
            for (int e = 0; e < E; ++e) sum += (lg[e] = std::exp(lg[e] - mx));
            const float inv = 1.f / sum;
            for (int e = 0; e < E; ++e) lg[e] *= inv;
        }
        // choose on the probabilities plus the bias (when there is one), within the best groups
        const float* sel = lg;
        if (L.probs_bias || m.n_group > 1) {
            float* sc = b.sel.data() + (size_t)r * E;
            for (int e = 0; e < E; ++e) sc[e] = lg[e] + (L.probs_bias ? L.probs_bias[e] : 0.f);
            if (m.n_group > 1) {  // a group scores the sum of its two best; all but the best n_group_used drop out
                const int G = m.n_group, per_g = E / G;
                float gs[256];
                bool keep[256];
                for (int g = 0; g < G; ++g) {
                    float a = -INFINITY, c = -INFINITY;
                    for (int e = g * per_g; e < (g + 1) * per_g; ++e) {
                        if (sc[e] > a) c = a, a = sc[e];
                        else if (sc[e] > c) c = sc[e];
                    }
                    gs[g] = per_g > 1 ? a + c : a, keep[g] = false;
                }
                for (int j = 0; j < m.n_group_used; ++j) {
                    int best = -1;
                    for (int g = 0; g < G; ++g)
                        if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
                    keep[best] = true;
                }
                for (int g = 0; g < G; ++g)
                    if (!keep[g])
                        for (int e = g * per_g; e < (g + 1) * per_g; ++e) sc[e] = -INFINITY;
            }
            sel = sc;
        }
        // top-K, ties to the lower id, in descending order; the weights are the unbiased probabilities
        b.taken.assign(E, 0);
        float sum = 0.f;
        for (int j = 0; j < K; ++j) {
            int best = -1;
            for (int e = 0; e < E; ++e)
                if (!b.taken[e] && (best < 0 || sel[e] > sel[best])) best = e;
            b.taken[best] = 1;
            ids[j] = best;
            w[j] = lg[best];
            sum += lg[best];
        }
        if (m.norm_topk) {
            const float inv = 1.f / std::max(sum, 6.103515625e-5f);  // llama.cpp's floor
            for (int j = 0; j < K; ++j) w[j] *= inv;
        }
        if (m.expert_scale != 0.f && m.expert_scale != 1.f)
            for (int j = 0; j < K; ++j) w[j] *= m.expert_scale;
    }
}

void ffn(const DecodeModel& m, const DecodeLayer& L, Buffers& b, float* x, int B) {
    const int D = m.D;
    Timer tm(PART_OTHER);
    rms_rows(x, L.ffn_norm, B, D, m.eps, b.xn.data());
    if (!L.moe) {
        tm.next(PART_PROJ);
        swiglu(L.gate, L.up, L.down, b, B, b.y.data(), L.act);
        tm.next(PART_OTHER);
        for (int r = 0; r < B; ++r) {
            float* y = b.y.data() + (size_t)r * D;
            if (L.post_ffn_norm) rms_norm(y, L.post_ffn_norm, D, m.eps, y);
            add(x + (size_t)r * D, y, D);
        }
        return;
    }
    tm.next(PART_ROUTE);
    route(m, L, b, B);
    tm.next(PART_MOE);
    MoeArgs a{};
    a.x = b.xn.data(), a.ids = b.ids.data(), a.weights = b.w.data();
    a.gate = L.gate_exps.w, a.up = L.up_exps.w, a.down = L.down_exps.w, a.out = b.y.data();
    a.T = B, a.k = m.K, a.n_expert = m.E, a.d_model = D, a.d_ff = L.gate_exps.rows;
    a.gate_type = L.gate_exps.type, a.up_type = L.up_exps.type, a.down_type = L.down_exps.type;
    moe_wait(moe_submit(a));
    tm.next(PART_SHARED);
    if (L.sh_gate.w) {
        swiglu(L.sh_gate, L.sh_up, L.sh_down, b, B, b.ys.data());
        for (int r = 0; r < B; ++r) {
            float* ys = b.ys.data() + (size_t)r * D;
            if (L.sh_scale) {
                const float s = 1.f / (1.f + std::exp(-dot(b.xn.data() + (size_t)r * D, L.sh_scale, D)));
                for (int i = 0; i < D; ++i) ys[i] *= s;
            }
            add(b.y.data() + (size_t)r * D, ys, D);
        }
    }
    tm.next(PART_OTHER);
    for (int r = 0; r < B; ++r) {
        float* y = b.y.data() + (size_t)r * D;
        if (L.post_ffn_norm) rms_norm(y, L.post_ffn_norm, D, m.eps, y);
        add(x + (size_t)r * D, y, D);
    }
}

void steps(const DecodeModel& m, int B, float* x, const int* pos, const SeqCache* seq, float* logits) {
    thread_local Buffers b;
    size_t F = 1;
    for (const DecodeLayer& L : m.layers)
        F = std::max<size_t>(F, std::max({L.gate.rows, L.sh_gate.rows, 1}));
    const size_t qd = (size_t)m.H * m.Dh, kvd = (size_t)m.Hkv * m.Dh;
    b.xn.resize(B * (size_t)m.D), b.q.resize(B * qd), b.att.resize(B * qd), b.y.resize(B * (size_t)m.D);
    b.ys.resize(B * (size_t)m.D), b.k.resize(B * kvd), b.v.resize(B * kvd);
    b.g.resize(B * F), b.u.resize(B * F), b.logit.resize(B * (size_t)std::max(m.E, 1));
    b.w.resize(B * (size_t)std::max(m.K, 1)), b.ids.resize(B * (size_t)std::max(m.K, 1));
    b.sel.resize(B * (size_t)std::max(m.E, 1));
    if (m.mla) {
        const size_t CR = (size_t)m.C + m.R;
        b.qa.resize(B * (size_t)std::max(m.Cq, 1)), b.kv.resize(B * CR), b.qabs.resize(B * (size_t)m.H * CR);
        b.olat.resize(B * (size_t)m.H * m.C), b.att.resize(B * (size_t)m.H * std::max(m.Dv, m.Dh));
    }
    const Caches cs{m, seq};
    for (int l = 0; l < m.n_layer; ++l) {
        if (m.mla)
            mla_attention(m, l, cs, b, x, B, pos);
        else
            attention(m, l, cs, b, x, B, pos);
        ffn(m, m.layers[l], b, x, B);
    }
    Timer tm(PART_OTHER);
    rms_rows(x, m.out_norm, B, m.D, m.eps, b.xn.data());
    tm.next(PART_LM_HEAD);
    matmul_rows(m.lm_head, b.xn.data(), B, logits);
}

}  // namespace

void gelu_mul(const float* g, const float* u, float* h, long long n) {
    const uint16_t* tab = gelu_table();
    auto run = [&](long long i0, long long i1) {
        for (long long i = i0; i < i1; ++i) {
            const float x = g[i];
            // ggml: the input rounded to f16 and the result read from the f16 table; |x| >= 10 cut
            const float y = x <= -10.f ? 0.f : x >= 10.f ? x : fp16_to_fp32(tab[fp32_to_fp16(x)]);
            h[i] = y * u[i];
        }
    };
    const long long per = 1 << 14;
    if (n <= per) {
        run(0, n);
        return;
    }
    parallel_for((int)((n + per - 1) / per), [&](int c) { run((long long)c * per, std::min(n, (long long)(c + 1) * per)); });
}

void attn_prep_token(const AttnPrepArgs& a, int t) {
    const int qd = a.H * a.Dh, kvd = a.Hkv * a.Dh;
    float* q = a.q + (size_t)t * qd;
    float* k = a.k + (size_t)t * kvd;
    float* v = a.v + (size_t)t * kvd;
    if (a.bq) add(q, a.bq, qd);
    if (a.bk) add(k, a.bk, kvd);
    if (a.bv) add(v, a.bv, kvd);
    if (a.qk_norm == 2) {
        rms_norm(q, a.q_norm, qd, a.eps, q);
        rms_norm(k, a.k_norm, kvd, a.eps, k);
    } else if (a.qk_norm == 1) {
        for (int h = 0; h < a.H; ++h) rms_norm(q + h * a.Dh, a.q_norm, a.Dh, a.eps, q + h * a.Dh);
        for (int h = 0; h < a.Hkv; ++h) rms_norm(k + h * a.Dh, a.k_norm, a.Dh, a.eps, k + h * a.Dh);
    }
    if (a.n_rot) {
        const size_t off = (size_t)(a.pos0 + t) * (a.n_rot / 2);
        rope_heads(q, a.H, a.Dh, a.n_rot, a.neox, a.cos + off, a.sin + off);
        rope_heads(k, a.Hkv, a.Dh, a.n_rot, a.neox, a.cos + off, a.sin + off);
    }
    const KernelSet* ks = a.cache_f16 ? active_kernels() : nullptr;
    for (int h = 0; h < a.Hkv; ++h) {  // head-major caches: head h's row of this position
        const size_t at = ((size_t)h * a.cache_ctx + a.pos0 + t) * a.Dh;
        if (a.cache_f16) {
            if (a.k_cache) ks->f32_to_f16(k + h * a.Dh, static_cast<uint16_t*>(a.k_cache) + at, (size_t)a.Dh);
            if (a.v_cache) ks->f32_to_f16(v + h * a.Dh, static_cast<uint16_t*>(a.v_cache) + at, (size_t)a.Dh);
        } else {
            if (a.k_cache) std::copy(k + h * a.Dh, k + (h + 1) * a.Dh, static_cast<float*>(a.k_cache) + at);
            if (a.v_cache) std::copy(v + h * a.Dh, v + (h + 1) * a.Dh, static_cast<float*>(a.v_cache) + at);
        }
    }
}

void rms_norm_rows(const float* x, const float* w, int n_rows, int n, float eps, float* y) {
    const int per = std::max(1, 16384 / std::max(n, 1));
    parallel_for((n_rows + per - 1) / per, [&](int i) {
        for (int r = i * per; r < std::min(n_rows, (i + 1) * per); ++r)
            rms_norm(x + (size_t)r * n, w, n, eps, y + (size_t)r * n);
    });
}

void attn_prep(const AttnPrepArgs& a) {
    const int per = 8;
    parallel_for((a.T + per - 1) / per, [&](int i) {
        for (int t = i * per; t < std::min(a.T, (i + 1) * per); ++t) attn_prep_token(a, t);
    });
}

void decode_profile(bool on, double* parts_out) {
    if (parts_out)
        for (int i = 0; i < DECODE_PARTS; ++i) parts_out[i] = g_prof[i];
    for (double& t : g_prof) t = 0;
    g_prof_on = on;
}

const char* decode_part_name(int i) {
    static const char* names[DECODE_PARTS] = {"norms, rope, residuals, cache write", "matmul (attention projections, dense FFN)",
                                              "attention over the cache", "routing", "MoE experts (fused op)",
                                              "shared expert", "lm_head"};
    return i >= 0 && i < DECODE_PARTS ? names[i] : "";
}

void decode_step(const DecodeModel& m, float* x, int pos, float* logits) { steps(m, 1, x, &pos, nullptr, logits); }

void decode_steps(const DecodeModel& m, int B, float* x, const int* pos, const SeqCache* caches, float* logits) {
    steps(m, B, x, pos, caches, logits);
}

}  // namespace hmoe
