// Dense matmul and fused MoE FFN on the thread pool.
//
// Dimension key:  T tokens, k experts per token, E experts, D model width, F expert FFN width,
//                 P = T*k (token, expert) pairs, grouped by expert.
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "threadpool.h"

namespace hmoe {

namespace {

// Per-thread scratch that only grows: no allocation on the hot path after warm-up.
float* scratch(size_t n_floats) {
    thread_local std::vector<float> buf;
    if (buf.size() < n_floats) buf.resize(n_floats);
    return buf.data();
}

inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

std::string fmt(const char* f, long long a, long long b = 0, long long c = 0, long long d = 0) {
    char s[512];
    std::snprintf(s, sizeof s, f, a, b, c, d);
    return s;
}

}  // namespace

size_t act_row_bytes(ActKind a, int n_cols) { return (size_t)act_blocks(a, n_cols) * act_bytes(a); }

void quantize_rows(ActKind a, const float* x, int rows, int cols, uint8_t* out) {
    const QuantRowFn q = active_kernels()->quant[a];
    const size_t rb = act_row_bytes(a, cols);
    for (int r = 0; r < rows; ++r) q(x + (size_t)r * cols, out + r * rb, cols, act_bytes(a));
}

// ================================================================ repacking at load

int repacked_type(int from) {
    switch (from) {
        case T_Q2_K: return T_Q2_K_R16;
        case T_Q3_K: return T_Q3_K_R16;
        case T_Q4_K: return T_Q4_K_R16;
        case T_Q6_K: return T_Q6_K_R16;
        case T_Q4_0: return T_Q4_0_R16;
        case T_Q5_0: return T_Q5_0_R16;
        case T_Q8_0: return T_Q8_0_R16;
        case T_IQ4_XS: return T_IQ4_XS_R16;
        case T_IQ4_NL: return T_IQ4_NL_R16;
        default: return -1;
    }
}

bool repack_pays(int from) {
    if (from == T_Q4_0 || from == T_Q5_0) return true;
    return repacked_type(from) >= 0 && active_kernels()->vnni;
}

std::string check_repack(int from, long long n_rows, long long n_cols, size_t src_len, size_t dst_len, bool unpack) {
    const int to = repacked_type(from);
    if (to < 0) return fmt("ggml_type %lld has no repacked layout", (long long)from);
    const TypeInfo *tf = type_info(from), *tt = type_info(to);
    if (n_rows <= 0 || n_rows > (1LL << 31) - 1 || n_rows % tt->group)
        return fmt("n_rows=%lld must be a positive multiple of %lld (rows interleaved per group)", n_rows,
                   (long long)tt->group);
    if (n_cols <= 0 || n_cols > (1LL << 30) || n_cols % tf->block)
        return fmt("n_cols=%lld must be a positive multiple of %lld", n_cols, (long long)tf->block);
    const long long nf = n_rows * (n_cols / tf->block) * tf->bytes, nt = n_rows * (n_cols / tt->block) * tt->bytes;
    const long long ns = unpack ? nt : nf, nd = unpack ? nf : nt;
    if ((long long)src_len != ns) return fmt("src has %lld bytes, expected %lld", (long long)src_len, ns);
    if ((long long)dst_len != nd) return fmt("dst has %lld bytes, expected %lld", (long long)dst_len, nd);
    return "";
}

namespace {
class RepackJob : public Job {
public:
    int n_rows = 0, n_cols = 0, per = 0;
    const uint8_t* src = nullptr;
    uint8_t* dst = nullptr;
    bool unpack = false;
    int from = T_Q4_K;
    void run_task(int, int i) override {
        const int r0 = i * per, r1 = std::min(n_rows, r0 + per);
        if (from == T_Q6_K) (unpack ? unpack_q6_k_r16 : repack_q6_k_r16)(src, n_cols, r0, r1, dst);
        else if (from == T_Q3_K) (unpack ? unpack_q3_k_r16 : repack_q3_k_r16)(src, n_cols, r0, r1, dst);
        else if (from == T_Q2_K) (unpack ? unpack_q2_k_r16 : repack_q2_k_r16)(src, n_cols, r0, r1, dst);
        else if (from == T_IQ4_XS) (unpack ? unpack_iq4_xs_r16 : repack_iq4_xs_r16)(src, n_cols, r0, r1, dst);
        else if (from == T_Q4_K) (unpack ? unpack_q4_k_r16 : repack_q4_k_r16)(src, n_cols, r0, r1, dst);
        else (unpack ? unpack_32_r16 : repack_32_r16)(from, src, n_cols, r0, r1, dst);
    }
};
}  // namespace

void repack(int from, int n_rows, int n_cols, const uint8_t* src, uint8_t* dst, bool unpack) {
    RepackJob job;  // a type with a repacked layout (check_repack refused the others)
    job.n_rows = n_rows, job.n_cols = n_cols, job.src = src, job.dst = dst, job.unpack = unpack;
    job.from = from;
    job.per = 64;  // rows per task (a multiple of the group)
    const int counts[1] = {ceil_div(n_rows, job.per)};
    job.set_phases(counts, 1);
    ThreadPool::instance().run(&job);
}

// ================================================================ dense matmul

std::string check_matmul(int type, long long n_rows, long long n_cols, long long T, size_t w_len, size_t x_len,
                         size_t out_len) {
    const TypeInfo* ti = type_info(type);
    if (!ti) return fmt("ggml_type %lld is not supported by the CPU kernels", type);
    if (n_rows <= 0 || n_rows > (1LL << 31) - 1) return fmt("n_rows=%lld must be in [1, 2^31)", n_rows);
    if (n_cols <= 0 || n_cols % ti->block) return fmt("n_cols=%lld must be a positive multiple of %lld", n_cols, ti->block);
    if (n_rows % ti->group) return fmt("n_rows=%lld must be a multiple of %lld (rows interleaved per group)", n_rows, (long long)ti->group);
    if (T < 0 || T > (1LL << 31) - 1) return fmt("T=%lld must be in [0, 2^31)", T);
    const long long rb = n_cols / ti->block * ti->bytes;
    if ((long long)w_len != n_rows * rb)
        return fmt("w has %lld bytes, expected n_rows*row_bytes = %lld", (long long)w_len, n_rows * rb);
    if ((long long)x_len < T * n_cols * 4) return fmt("x has %lld bytes, expected %lld", (long long)x_len, T * n_cols * 4);
    if ((long long)out_len < T * n_rows * 4)
        return fmt("out has %lld bytes, expected %lld", (long long)out_len, T * n_rows * 4);
    return "";
}

namespace {

class MatmulJob : public Job {
public:
    void prepare(const uint8_t* w, int type, int nr, int nc, const float* x, int T, float* out, int threads) {
        const TypeInfo* ti = type_info(type);
        ks_ = active_kernels();
        gemm_ = ks_->gemm[type];
        quant_ = ks_->quant[ti->act];
        w_ = w, x_ = x, out_ = out, nr_ = nr, nc_ = nc, T_ = T;
        rb_ = (size_t)(nc / ti->block) * ti->bytes;
        arb_ = act_row_bytes(ti->act, nc);
        ab_ = act_bytes(ti->act);
        xq_.resize(arb_ * T);
        tq_ = std::max(1, ceil_div(T, 4 * threads));
        n_tt_ = ceil_div(T, GEMM_MAX_TOKENS);
        // enough row chunks to balance the threads, each a multiple of 4 rows and of the row group
        const int want = std::max(1, 8 * threads / n_tt_), g = std::max(4, ti->group);
        rc_ = std::max(g, std::min(T > 1 ? 32 : 256, ceil_div(nr, want * g) * g));
        n_rc_ = ceil_div(nr, rc_);
        const int counts[2] = {ceil_div(T, tq_), n_rc_ * n_tt_};
        set_phases(counts, 2);
    }

    void run_task(int phase, int i) override {
        if (phase == 0) {
            const int t1 = std::min(T_, (i + 1) * tq_);
            for (int t = i * tq_; t < t1; ++t) {  // into its 64-token tile, block-major
                const int t0 = t / GEMM_MAX_TOKENS * GEMM_MAX_TOKENS, nt = std::min(GEMM_MAX_TOKENS, T_ - t0);
                quant_(x_ + (size_t)t * nc_, xq_.data() + t0 * arb_ + (t - t0) * ab_, nc_, nt * ab_);
            }
            return;
        }
        const int r0 = (i / n_tt_) * rc_, t0 = (i % n_tt_) * GEMM_MAX_TOKENS;  // token tiles share weights
        const int nr = std::min(rc_, nr_ - r0), nt = std::min(GEMM_MAX_TOKENS, T_ - t0);
        gemm_(w_ + r0 * rb_, rb_, nr, nc_, xq_.data() + t0 * arb_, nt, out_ + (size_t)t0 * nr_ + r0, nr_);
    }

private:
    const KernelSet* ks_ = nullptr;
    GemmFn gemm_ = nullptr;
    QuantRowFn quant_ = nullptr;
    const uint8_t* w_ = nullptr;
    const float* x_ = nullptr;
    float* out_ = nullptr;
    int nr_ = 0, nc_ = 0, T_ = 0, tq_ = 1, n_tt_ = 1, rc_ = 4, n_rc_ = 1;
    size_t rb_ = 0, arb_ = 0, ab_ = 0;
    std::vector<uint8_t> xq_;  // [T, arb] as 64-token block-major tiles
};

}  // namespace

void matmul(const uint8_t* w, int type, int n_rows, int n_cols, const float* x, int T, float* out) {
    if (T == 0) return;
    thread_local MatmulJob job;  // reused: its buffers only grow
    ThreadPool& pool = ThreadPool::instance();
    job.prepare(w, type, n_rows, n_cols, x, T, out, pool.threads());
    pool.run(&job);
}

// ================================================================ several matmuls sharing x

std::string check_matmul_multi(const MultiMatmulArgs& a, const size_t* w_len, size_t x_len, const size_t* out_len) {
    if (a.n < 1 || a.n > MAX_MULTI) return fmt("%lld matrices: must be 1..%lld", a.n, MAX_MULTI);
    for (int i = 0; i < a.n; ++i) {
        std::string e = check_matmul(a.type[i], a.n_rows[i], a.n_cols, a.T, w_len[i], x_len, out_len[i]);
        if (!e.empty()) return fmt("matrix %lld: ", i) + e;
    }
    return "";
}

namespace {

class MultiMatmulJob : public Job {
public:
    void prepare(const MultiMatmulArgs& a, int threads) {
        a_ = a;
        const KernelSet* ks = active_kernels();
        n_acts_ = 0;
        size_t total_rows = 0;
        int g = 4;  // row chunks: multiples of 4 rows and of every matrix's row group
        for (int i = 0; i < a.n; ++i) {
            const TypeInfo* ti = type_info(a.type[i]);
            g = std::max(g, ti->group);
            gemm_[i] = ks->gemm[a.type[i]];
            rb_[i] = (size_t)(a.n_cols / ti->block) * ti->bytes;
            int slot = -1;
            for (int j = 0; j < n_acts_; ++j)
                if (acts_[j] == ti->act) slot = j;
            if (slot < 0) {
                slot = n_acts_++;
                acts_[slot] = ti->act;
                quant_[slot] = ks->quant[ti->act];
                arb_[slot] = act_row_bytes(ti->act, a.n_cols);
                ab_[slot] = act_bytes(ti->act);
                xq_[slot].resize(arb_[slot] * a.T);
            }
            act_of_[i] = slot;
            total_rows += a.n_rows[i];
        }
        n_tt_ = ceil_div(a.T, GEMM_MAX_TOKENS);
        const int want = std::max(1, 8 * threads / n_tt_);
        rc_ = std::max(g, std::min(a.T > 1 ? 32 : 256, (int)ceil_div((long long)total_rows, (long long)want * g) * g));
        chunks_.clear();
        for (int i = 0; i < a.n; ++i)
            for (int r0 = 0; r0 < a.n_rows[i]; r0 += rc_)
                for (int t = 0; t < n_tt_; ++t) chunks_.push_back({i, r0, t * GEMM_MAX_TOKENS});
        const int counts[2] = {a.T * n_acts_, (int)chunks_.size()};
        set_phases(counts, 2);
    }

    void run_task(int phase, int i) override {
        const int nc = a_.n_cols;
        if (phase == 0) {
            const int slot = i / a_.T, t = i % a_.T;
            const int t0 = t / GEMM_MAX_TOKENS * GEMM_MAX_TOKENS, nt = std::min(GEMM_MAX_TOKENS, a_.T - t0);
            quant_[slot](a_.x + (size_t)t * nc, xq_[slot].data() + t0 * arb_[slot] + (t - t0) * ab_[slot], nc,
                         nt * ab_[slot]);
            return;
        }
        const Chunk& c = chunks_[i];
        const int m = c.mat, slot = act_of_[m], nr = std::min(rc_, a_.n_rows[m] - c.r0);
        const int nt = std::min(GEMM_MAX_TOKENS, a_.T - c.t0);
        gemm_[m](a_.w[m] + c.r0 * rb_[m], rb_[m], nr, nc, xq_[slot].data() + c.t0 * arb_[slot], nt,
                 a_.out[m] + (size_t)c.t0 * a_.n_rows[m] + c.r0, a_.n_rows[m]);
    }

private:
    struct Chunk { int mat, r0, t0; };
    MultiMatmulArgs a_{};
    GemmFn gemm_[MAX_MULTI] = {};
    size_t rb_[MAX_MULTI] = {};
    int act_of_[MAX_MULTI] = {};
    int n_acts_ = 0, n_tt_ = 1, rc_ = 4;
    ActKind acts_[MAX_MULTI] = {};
    QuantRowFn quant_[MAX_MULTI] = {};
    size_t arb_[MAX_MULTI] = {}, ab_[MAX_MULTI] = {};
    std::vector<uint8_t> xq_[MAX_MULTI];  // per activation format: [T, arb] as 64-token tiles
    std::vector<Chunk> chunks_;
};

}  // namespace

void matmul_multi(const MultiMatmulArgs& a) {
    if (a.T == 0) return;
    thread_local MultiMatmulJob job;
    ThreadPool& pool = ThreadPool::instance();
    job.prepare(a, pool.threads());
    pool.run(&job);
}

// ================================================================ decode attention

std::string check_attn(const AttnArgs& a, size_t q_len, size_t k_len, size_t v_len, size_t out_len) {
    if (a.H <= 0 || a.Hkv <= 0 || a.H % a.Hkv) return fmt("n_head=%lld must be a positive multiple of n_head_kv=%lld", a.H, a.Hkv);
    if (a.dk <= 0 || a.dv <= 0 || a.dk > 65536 || a.dv > 65536) return fmt("dk=%lld, dv=%lld must be in [1, 65536]", a.dk, a.dv);
    if (a.L <= 0) return fmt("L=%lld: attention needs at least one cached position", a.L);
    if (a.ks < 0 || a.khs < 0 || a.vs < 0 || a.vhs < 0) return "strides must not be negative";
    if ((long long)q_len < (long long)a.H * a.dk * 4) return fmt("q has %lld bytes, expected %lld", (long long)q_len, (long long)a.H * a.dk * 4);
    if ((long long)out_len < (long long)a.H * a.dv * 4)
        return fmt("out has %lld bytes, expected %lld", (long long)out_len, (long long)a.H * a.dv * 4);
    const long long kend = (a.L - 1LL) * a.ks + (a.Hkv - 1LL) * a.khs + a.dk;
    const long long vend = (a.L - 1LL) * a.vs + (a.Hkv - 1LL) * a.vhs + a.dv;
    const long long es = a.kv_f16 ? 2 : 4;
    if (kend * es > (long long)k_len)
        return fmt("k has %lld elements, the shape and strides reach %lld", (long long)k_len / es, kend);
    if (vend * es > (long long)v_len)
        return fmt("v has %lld elements, the shape and strides reach %lld", (long long)v_len / es, vend);
    return "";
}

namespace {

class AttnJob : public Job {
public:
    void prepare(const AttnArgs& a, int threads) {
        a_ = a;
        G_ = a.H / a.Hkv;
        // split positions so every thread has work even with one KV head (flash-decoding)
        const int want = std::max(1, ceil_div(4 * threads, a.Hkv));
        chunk_ = std::max(64, ceil_div(a.L, want));
        nc_ = ceil_div(a.L, chunk_);
        m_.resize((size_t)a.Hkv * nc_ * G_);
        s_.resize(m_.size());
        o_.resize(m_.size() * a.dv);
        const int counts[2] = {a.Hkv * nc_, a.Hkv};
        set_phases(counts, 2);
    }

    void run_task(int phase, int i) override {
        const AttnArgs& a = a_;
        if (phase == 0) {
            const int h = i / nc_, c = i % nc_, l0 = c * chunk_, n = std::min(chunk_, a.L - l0);
            const size_t slot = (size_t)(h * nc_ + c) * G_;
            const size_t es = a.kv_f16 ? 2 : 4;
            const char* k = static_cast<const char*>(a.k) + (size_t)(h * a.khs + l0 * a.ks) * es;
            const char* v = static_cast<const char*>(a.v) + (size_t)(h * a.vhs + l0 * a.vs) * es;
            active_kernels()->attn_part(a.q + (size_t)h * G_ * a.dk, G_, a.dk, a.dv, k, (size_t)a.ks, v, (size_t)a.vs,
                                        n, a.scale, scratch((size_t)G_ * n), m_.data() + slot, s_.data() + slot,
                                        o_.data() + slot * a.dv, a.kv_f16);
            return;
        }
        const int h = i;
        for (int g = 0; g < G_; ++g) {  // merge the chunks' softmax states
            float mx = -INFINITY;
            for (int c = 0; c < nc_; ++c) mx = std::max(mx, m_[(size_t)(h * nc_ + c) * G_ + g]);
            float* out = a.out + (size_t)(h * G_ + g) * a.dv;
            float den = 0.f;
            for (int j = 0; j < a.dv; ++j) out[j] = 0.f;
            for (int c = 0; c < nc_; ++c) {
                const size_t slot = (size_t)(h * nc_ + c) * G_ + g;
                const float w = std::exp(m_[slot] - mx);
                den += w * s_[slot];
                const float* o = o_.data() + slot * a.dv;
                for (int j = 0; j < a.dv; ++j) out[j] += w * o[j];
            }
            const float inv = 1.f / den;
            for (int j = 0; j < a.dv; ++j) out[j] *= inv;
        }
    }

private:
    AttnArgs a_{};
    int G_ = 1, chunk_ = 64, nc_ = 1;
    std::vector<float> m_, s_, o_;  // [Hkv, nc, G] softmax states and [Hkv, nc, G, dv] partial sums
};

}  // namespace

void attn_decode(const AttnArgs& a) {
    thread_local AttnJob job;  // reused: its buffers only grow
    ThreadPool& pool = ThreadPool::instance();
    job.prepare(a, pool.threads());
    pool.run(&job);
}

// ================================================================ prompt attention

std::string check_attn_prefill(const AttnPrefillArgs& a, size_t q_len, size_t k_len, size_t v_len, size_t out_len) {
    if (a.H <= 0 || a.Hkv <= 0 || a.H % a.Hkv) return fmt("n_head=%lld must be a positive multiple of n_head_kv=%lld", a.H, a.Hkv);
    if (a.dk <= 0 || a.dv <= 0 || a.dk > 65536 || a.dv > 65536) return fmt("dk=%lld, dv=%lld must be in [1, 65536]", a.dk, a.dv);
    if (a.T <= 0 || a.pos0 < 0 || (long long)a.pos0 + a.T > (1LL << 30)) return fmt("T=%lld, pos0=%lld out of range", a.T, a.pos0);
    if (a.qs < (long long)a.H * a.dk || a.os < (long long)a.H * a.dv) return "q/out token strides are smaller than a token's heads";
    if (a.ks < 0 || a.khs < 0 || a.vs < 0 || a.vhs < 0) return "strides must not be negative";
    if (a.window < 0) return fmt("window=%lld must not be negative (0: none)", a.window);
    if ((long long)q_len < ((a.T - 1LL) * a.qs + (long long)a.H * a.dk) * 4) return fmt("q has %lld bytes: too few for T=%lld", (long long)q_len, a.T);
    if ((long long)out_len < ((a.T - 1LL) * a.os + (long long)a.H * a.dv) * 4) return fmt("out has %lld bytes: too few for T=%lld", (long long)out_len, a.T);
    const long long L = (long long)a.pos0 + a.T;
    const long long kend = (L - 1) * a.ks + (a.Hkv - 1LL) * a.khs + a.dk;
    const long long vend = (L - 1) * a.vs + (a.Hkv - 1LL) * a.vhs + a.dv;
    const long long es = a.kv_f16 ? 2 : 4;
    if (kend * es > (long long)k_len)
        return fmt("k has %lld elements, the shape and strides reach %lld", (long long)k_len / es, kend);
    if (vend * es > (long long)v_len)
        return fmt("v has %lld elements, the shape and strides reach %lld", (long long)v_len / es, vend);
    if (a.out != a.q && a.out < a.q + (a.T - 1LL) * a.qs + (long long)a.H * a.dk && a.q < a.out + (a.T - 1LL) * a.os + (long long)a.H * a.dv)
        return "out overlaps q without being q";
    if (a.out == a.q && (a.dv != a.dk || a.os != a.qs)) return "out may be q only with dv == dk and equal strides";
    return "";
}

namespace {

class AttnPrefillJob : public Job {
public:
    void prepare(const AttnPrefillArgs& a) {
        a_ = a;
        G_ = a.H / a.Hkv;
        tb_ = std::max(1, 64 / G_);  // ~64 query rows per task
        nb_ = ceil_div(a.T, tb_);
        const int counts[1] = {nb_ * a.Hkv};
        set_phases(counts, 1);
    }
    void run_task(int, int i) override {
        const AttnPrefillArgs& a = a_;
        const int h = i % a.Hkv, b = nb_ - 1 - i / a.Hkv;  // the costliest (latest) blocks first
        const int t0 = b * tb_, nt = std::min(tb_, a.T - t0);
        float* sc = scratch(attn_prefill_scratch(G_ * nt, a.dk, a.dv));
        const size_t es = a.kv_f16 ? 2 : 4;
        active_kernels()->attn_prefill(a.q + (size_t)t0 * a.qs + (size_t)h * G_ * a.dk, (size_t)a.qs, G_, nt,
                                       a.pos0 + t0, a.dk, a.dv, static_cast<const char*>(a.k) + (size_t)h * a.khs * es,
                                       (size_t)a.ks, static_cast<const char*>(a.v) + (size_t)h * a.vhs * es,
                                       (size_t)a.vs, a.scale, a.out + (size_t)t0 * a.os + (size_t)h * G_ * a.dv,
                                       (size_t)a.os, sc, a.window, a.kv_f16);
    }

private:
    AttnPrefillArgs a_{};
    int G_ = 1, tb_ = 1, nb_ = 1;
};

}  // namespace

void attn_prefill(const AttnPrefillArgs& a) {
    thread_local AttnPrefillJob job;
    job.prepare(a);
    ThreadPool::instance().run(&job);
}

// ================================================================ fused MoE FFN

std::string check_moe(const MoeArgs& a, const MoeLens& n) {
    const TypeInfo* tg = type_info(a.gate_type);
    const TypeInfo* tu = type_info(a.up_type);
    const TypeInfo* td = type_info(a.down_type);
    if (!tg) return fmt("gate_type %lld is not supported by the CPU kernels", a.gate_type);
    if (!tu) return fmt("up_type %lld is not supported by the CPU kernels", a.up_type);
    if (!td) return fmt("down_type %lld is not supported by the CPU kernels", a.down_type);
    if (a.n_expert <= 0) return fmt("n_expert=%lld must be positive", a.n_expert);
    if (a.T < 0 || a.k <= 0) return fmt("T=%lld, k=%lld: need T >= 0 and k >= 1", a.T, a.k);
    if ((long long)a.T * a.k > (1LL << 26))
        return fmt("T*k = %lld (token, expert) pairs exceeds the limit %lld: split the batch", (long long)a.T * a.k,
                   1LL << 26);
    if (a.d_model <= 0 || a.d_model % tg->block || a.d_model % tu->block)
        return fmt("d_model=%lld must be a positive multiple of the gate/up block sizes (%lld, %lld)", a.d_model,
                   tg->block, tu->block);
    if (a.d_ff <= 0 || a.d_ff % td->block)
        return fmt("d_ff=%lld must be a positive multiple of the down block size %lld", a.d_ff, td->block);
    if (a.d_ff % tg->group || a.d_ff % tu->group || a.d_model % td->group)
        return fmt("d_ff=%lld, d_model=%lld: the rows of gate/up (d_ff) and down (d_model) must be multiples of their "
                   "types' row groups (gate/up %lld, down %lld)", a.d_ff, a.d_model,
                   (long long)std::max(tg->group, tu->group), (long long)td->group);
    const long long E = a.n_expert, D = a.d_model, F = a.d_ff, T = a.T, k = a.k;
    const long long eg = E * F * (D / tg->block) * tg->bytes, eu = E * F * (D / tu->block) * tu->bytes;
    const long long ed = E * D * (F / td->block) * td->bytes;
    if ((long long)n.gate != eg) return fmt("gate has %lld bytes, expected n_expert*d_ff*row_bytes = %lld", (long long)n.gate, eg);
    if ((long long)n.up != eu) return fmt("up has %lld bytes, expected n_expert*d_ff*row_bytes = %lld", (long long)n.up, eu);
    if ((long long)n.down != ed) return fmt("down has %lld bytes, expected n_expert*d_model*row_bytes = %lld", (long long)n.down, ed);
    if ((long long)n.x != T * D * 4) return fmt("x has %lld bytes, expected T*d_model*4 = %lld", (long long)n.x, T * D * 4);
    if ((long long)n.ids != T * k * 4) return fmt("ids has %lld bytes, expected T*k*4 = %lld", (long long)n.ids, T * k * 4);
    if ((long long)n.weights != T * k * 4)
        return fmt("weights has %lld bytes, expected T*k*4 = %lld", (long long)n.weights, T * k * 4);
    if ((long long)n.out != T * D * 4) return fmt("out has %lld bytes, expected T*d_model*4 = %lld", (long long)n.out, T * D * 4);
    for (long long i = 0; i < T * k; ++i)
        if (a.ids[i] < -1 || a.ids[i] >= a.n_expert)  // -1: this pair runs elsewhere (a GPU-resident expert)
            return fmt("ids[%lld, %lld] = %lld is outside [0, n_expert=%lld) (or -1: skip)", i / k, i % k, a.ids[i],
                       a.n_expert);
    return "";
}

int moe_decode_tasks_per_thread = 2;

class MoeJob : public Job {
public:
    void prepare(const MoeArgs& a, int threads);
    void run_task(int phase, int i) override;

private:
    struct GateUpTask { int e, f0, nf; };
    void gate_up(const GateUpTask& task);
    const uint8_t* gather_tile(const uint8_t* rows, size_t arb, size_t ab, int p0, int nt, int which);
    void down_rows(int d0, int nd);

    MoeArgs a_{};
    const KernelSet* ks_ = nullptr;
    GemmFn gemm_g_ = nullptr, gemm_u_ = nullptr, gemm_d_ = nullptr;
    QuantRowFn quant_g_ = nullptr, quant_u_ = nullptr, quant_d_ = nullptr;
    size_t rb_g_ = 0, rb_u_ = 0, rb_d_ = 0;     // weight row bytes
    size_t arb_g_ = 0, arb_u_ = 0, arb_d_ = 0;  // activation row bytes
    size_t ab_g_ = 0, ab_u_ = 0, ab_d_ = 0;     // activation block bytes
    bool share_xq_ = false;
    int tq_x_ = 1, fc_ = 64, dc_ = 64, n_pairs_ = 0;
    std::vector<int> off_;                 // [E+1] grouped-pair offsets per expert
    std::vector<int> active_;              // experts with tokens, ascending
    std::vector<int> pair_tok_;            // [P] token of each grouped pair
    std::vector<float> pair_w_;            // [P] its routing weight
    // Activations per pair, grouped by expert in tiles of <= 64 pairs, block-major inside a tile
    // (kernels.h): the tile starting at pair p0 begins at byte p0 * arb.
    std::vector<uint8_t> xq_g_, xq_u_;     // [T, arb] quantized x, one row per token
    std::vector<uint8_t> hq_;              // [P, arb_d] quantized silu(gate) * up
    int db_ = 32;                          // down's activation block: gate/up tasks own whole blocks
    std::vector<GateUpTask> gu_tasks_;
    std::vector<int> act_fill_;            // [E] counting-sort cursors
};

void MoeJob::prepare(const MoeArgs& a, int threads) {
    a_ = a;
    const TypeInfo *tg = type_info(a.gate_type), *tu = type_info(a.up_type), *td = type_info(a.down_type);
    ks_ = active_kernels();
    gemm_g_ = ks_->gemm[a.gate_type], gemm_u_ = ks_->gemm[a.up_type], gemm_d_ = ks_->gemm[a.down_type];
    quant_g_ = ks_->quant[tg->act], quant_u_ = ks_->quant[tu->act], quant_d_ = ks_->quant[td->act];
    const int T = a.T, k = a.k, E = a.n_expert, D = a.d_model, F = a.d_ff;
    rb_g_ = (size_t)(D / tg->block) * tg->bytes;
    rb_u_ = (size_t)(D / tu->block) * tu->bytes;
    rb_d_ = (size_t)(F / td->block) * td->bytes;
    arb_g_ = act_row_bytes(tg->act, D), arb_u_ = act_row_bytes(tu->act, D), arb_d_ = act_row_bytes(td->act, F);
    ab_g_ = act_bytes(tg->act), ab_u_ = act_bytes(tu->act), ab_d_ = act_bytes(td->act);
    share_xq_ = tg->act == tu->act;
    // group (token, expert) pairs by expert: counting sort keeps token order inside an expert;
    // pairs with id -1 are skipped (their expert runs on the GPU tier)
    off_.assign(E + 1, 0);
    for (int i = 0; i < T * k; ++i)
        if (a.ids[i] >= 0) ++off_[a.ids[i] + 1];
    for (int e = 0; e < E; ++e) off_[e + 1] += off_[e];
    n_pairs_ = off_[E];
    active_.clear();
    for (int e = 0; e < E; ++e)
        if (off_[e + 1] > off_[e]) active_.push_back(e);
    pair_tok_.resize(n_pairs_);
    pair_w_.resize(n_pairs_);
    {
        std::vector<int>& fill = act_fill_;
        fill.assign(off_.begin(), off_.end() - 1);
        for (int i = 0; i < T * k; ++i) {
            if (a.ids[i] < 0) continue;
            const int p = fill[a.ids[i]]++;
            pair_tok_[p] = i / k;
            pair_w_[p] = a.weights[i];
        }
    }

    xq_g_.resize(arb_g_ * T);
    if (!share_xq_) xq_u_.resize(arb_u_ * T);
    hq_.resize(arb_d_ * n_pairs_);

    // task sizes: enough tasks per phase for the threads
    tq_x_ = std::max(1, ceil_div(T, 4 * threads));
    // gate/up rows per task: whole activation blocks of down (each task quantizes its own slice
    // of h, so no float h is ever stored); for decode, long runs of rows so the weight stream is
    // sequential, ~8 tasks per thread
    db_ = act_block(td->act);
    fc_ = db_;
    const int tpt = moe_decode_tasks_per_thread;
    if (T <= 4) {
        const long long rows = (long long)active_.size() * F;
        fc_ = (int)std::max((long long)db_, std::min((long long)F, rows / ((long long)tpt * threads) / db_ * db_));
    }
    gu_tasks_.clear();
    for (int e : active_)
        for (int f0 = 0; f0 < F; f0 += fc_) gu_tasks_.push_back({e, f0, std::min(fc_, F - f0)});
    // down rows per task: every task walks all active experts, so ~8 tasks per thread balance well;
    // decode takes longer row runs (sequential weight stream, fewer cold prefetch starts)
    // (prefill: up to 128 rows, which halves how often each task re-reads all experts' activations)
    const int dmax = T <= 4 ? std::max(256, D) : 128;
    dc_ = std::max(16, std::min(dmax, (ceil_div(D, (T <= 4 ? tpt : 8) * threads) + 15) / 16 * 16));
    const int counts[3] = {ceil_div(T, tq_x_), (int)gu_tasks_.size(), ceil_div(D, dc_)};
    set_phases(counts, T > 0 ? 3 : 0);
}

void MoeJob::run_task(int phase, int i) {
    const int D = a_.d_model, F = a_.d_ff;
    switch (phase) {
        case 0: {  // quantize each token's x once (tasks gather it into expert tiles)
            const int t1 = std::min(a_.T, (i + 1) * tq_x_);
            for (int t = i * tq_x_; t < t1; ++t) {
                const float* x = a_.x + (size_t)t * D;
                quant_g_(x, xq_g_.data() + t * arb_g_, D, ab_g_);
                if (!share_xq_) quant_u_(x, xq_u_.data() + t * arb_u_, D, ab_u_);
            }
            break;
        }
        case 1:
            gate_up(gu_tasks_[i]);
            break;
        case 2:
            down_rows(i * dc_, std::min(dc_, D - i * dc_));
            break;
    }
}

// The block-major activation tile (kernels.h) of pairs [p0, p0+nt) from the tokens' quantized rows,
// in this thread's scratch (a single pair's row already is its tile).
const uint8_t* MoeJob::gather_tile(const uint8_t* rows, size_t arb, size_t ab, int p0, int nt, int which) {
    if (nt == 1) return rows + (size_t)pair_tok_[p0] * arb;
    thread_local std::vector<uint8_t> buf[2];
    std::vector<uint8_t>& tile = buf[which];
    if (tile.size() < arb * nt) tile.resize(arb * nt);
    const size_t nb = arb / ab;
    for (int t = 0; t < nt; ++t) {
        const uint8_t* row = rows + (size_t)pair_tok_[p0 + t] * arb;
        for (size_t b = 0; b < nb; ++b) std::memcpy(tile.data() + (b * nt + t) * ab, row + b * ab, ab);
    }
    return tile.data();
}

// Rows [f0, f0+nf) of gate and up for every token of expert e, h = silu(gate) * up, and h's slice
// quantized for down (the task owns whole activation blocks of h, so it quantizes them alone).
void MoeJob::gate_up(const GateUpTask& task) {
    const int D = a_.d_model, F = a_.d_ff, nf = task.nf;
    float* g = scratch(2 * (size_t)GEMM_MAX_TOKENS * nf);
    float* u = g + (size_t)GEMM_MAX_TOKENS * nf;
    const uint8_t* wg = a_.gate + ((size_t)task.e * F + task.f0) * rb_g_;
    const uint8_t* wu = a_.up + ((size_t)task.e * F + task.f0) * rb_u_;
    const size_t blk0 = (size_t)(task.f0 / db_);  // first activation block of h this task owns
    for (int p0 = off_[task.e]; p0 < off_[task.e + 1]; p0 += GEMM_MAX_TOKENS) {
        const int nt = std::min(GEMM_MAX_TOKENS, off_[task.e + 1] - p0);
        const uint8_t* xg = gather_tile(xq_g_.data(), arb_g_, ab_g_, p0, nt, 0);
        const uint8_t* xu = share_xq_ ? xg : gather_tile(xq_u_.data(), arb_u_, ab_u_, p0, nt, 1);
        gemm_g_(wg, rb_g_, nf, D, xg, nt, g, nf);
        gemm_u_(wu, rb_u_, nf, D, xu, nt, u, nf);
        uint8_t* tile = hq_.data() + p0 * arb_d_ + blk0 * nt * ab_d_;  // block-major tile (kernels.h)
        for (int t = 0; t < nt; ++t) {
            ks_->silu_mul(g + t * nf, u + t * nf, g + t * nf, nf);
            quant_d_(g + t * nf, tile + t * ab_d_, nf, nt * ab_d_);
        }
    }
}

// Output columns [d0, d0+nd) for every token: this task owns them, so no two threads write one value.
// Experts are added in ascending id order, which makes the result independent of the thread count.
void MoeJob::down_rows(int d0, int nd) {
    const int D = a_.d_model, F = a_.d_ff;
    for (int t = 0; t < a_.T; ++t) std::memset(a_.out + (size_t)t * D + d0, 0, nd * sizeof(float));
    float* y = scratch((size_t)GEMM_MAX_TOKENS * nd);
    for (int e : active_) {
        const uint8_t* wd = a_.down + ((size_t)e * D + d0) * rb_d_;
        for (int p0 = off_[e]; p0 < off_[e + 1]; p0 += GEMM_MAX_TOKENS) {
            const int nt = std::min(GEMM_MAX_TOKENS, off_[e + 1] - p0);
            gemm_d_(wd, rb_d_, nd, F, hq_.data() + p0 * arb_d_, nt, y, nd);
            for (int t = 0; t < nt; ++t) {
                float* o = a_.out + (size_t)pair_tok_[p0 + t] * D + d0;
                const float w = pair_w_[p0 + t];
                const float* yt = y + t * nd;
                for (int j = 0; j < nd; ++j) o[j] += w * yt[j];
            }
        }
    }
}

namespace {
std::mutex g_free_mu;
std::vector<std::unique_ptr<MoeJob>> g_free;  // recycled jobs keep their buffers
}  // namespace

MoeJob* moe_submit(const MoeArgs& a) {
    std::unique_ptr<MoeJob> job;
    {
        std::lock_guard<std::mutex> lk(g_free_mu);
        if (!g_free.empty()) {
            job = std::move(g_free.back());
            g_free.pop_back();
        }
    }
    if (!job) job.reset(new MoeJob());
    ThreadPool& pool = ThreadPool::instance();
    job->prepare(a, pool.threads());
    pool.submit(job.get());
    return job.release();
}

void moe_wait(MoeJob* job) {
    ThreadPool::instance().wait(job);
    std::lock_guard<std::mutex> lk(g_free_mu);
    g_free.emplace_back(job);
}

bool moe_done(const MoeJob* job) { return job->finished(); }

}  // namespace hmoe
