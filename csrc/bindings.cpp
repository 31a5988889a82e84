// Python bindings of hetero_moe._cpu (plain CPython C API, buffer protocol; no logic beyond argument
// checks). Buffers are any contiguous objects: numpy arrays, read-only mmap views, bytes.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>
#include <vector>

#include "decode.h"
#include "ops.h"
#include "threadpool.h"

using namespace hmoe;

namespace {

// RAII holder of a buffer view.
struct Buf {
    Py_buffer v{};
    bool held = false;
    bool get(PyObject* o, const char* name, bool writable) {
        if (PyObject_GetBuffer(o, &v, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) != 0) {
            PyErr_Format(PyExc_ValueError, "%s must be a contiguous%s buffer (numpy array or similar)", name,
                         writable ? " writable" : "");
            return false;
        }
        held = true;
        return true;
    }
    void release() {
        if (held) PyBuffer_Release(&v);
        held = false;
    }
    ~Buf() { release(); }
    template <class T>
    T* ptr() const { return static_cast<T*>(v.buf); }
    size_t len() const { return (size_t)v.len; }
};

bool set_error(const std::string& e) {
    if (e.empty()) return false;
    PyErr_SetString(PyExc_ValueError, e.c_str());
    return true;
}

PyObject* py_features(PyObject*, PyObject*) {
    const CpuFeatures f = cpu_features();
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:s,s:s}", "avx2", f.avx2 ? Py_True : Py_False, "fma",
                         f.fma ? Py_True : Py_False, "f16c", f.f16c ? Py_True : Py_False, "avx512f",
                         f.avx512f ? Py_True : Py_False, "avx512bw", f.avx512bw ? Py_True : Py_False, "avx512vl",
                         f.avx512vl ? Py_True : Py_False, "avx512dq", f.avx512dq ? Py_True : Py_False, "avx512vnni",
                         f.avx512vnni ? Py_True : Py_False, "variant", active_kernels()->name, "best",
                         best_kernels()->name);
}

PyObject* py_variants(PyObject*, PyObject*) {
    PyObject* l = PyList_New(0);
    for (const char* n : {"scalar", "avx2", "avx512"})
        if (variant(n)) {
            PyObject* s = PyUnicode_FromString(n);
            PyList_Append(l, s);
            Py_DECREF(s);
        }
    return l;
}

PyObject* py_force_variant(PyObject*, PyObject* arg) {
    if (arg == Py_None) {
        set_active_kernels(nullptr);
        Py_RETURN_NONE;
    }
    const char* name = PyUnicode_AsUTF8(arg);
    if (!name) return nullptr;
    const KernelSet* k = variant(name);
    if (!k) return PyErr_Format(PyExc_ValueError, "kernel variant %R is unknown or not supported by this CPU", arg);
    set_active_kernels(k);
    Py_RETURN_NONE;
}

PyObject* py_set_num_threads(PyObject*, PyObject* arg) {
    const long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return nullptr;
    if (n < 1 || n > 1024) return PyErr_Format(PyExc_ValueError, "num_threads=%ld must be in [1, 1024]", n);
    Py_BEGIN_ALLOW_THREADS ThreadPool::instance().set_threads((int)n);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* py_get_num_threads(PyObject*, PyObject*) { return PyLong_FromLong(ThreadPool::instance().threads()); }

PyObject* py_set_spin_us(PyObject*, PyObject* arg) {
    const long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return nullptr;
    if (n < 0 || n > 1000000) return PyErr_Format(PyExc_ValueError, "spin_us=%ld must be in [0, 1000000]", n);
    ThreadPool::instance().set_spin_us((int)n);
    Py_RETURN_NONE;
}

PyObject* py_type_info(PyObject*, PyObject* arg) {
    const long t = PyLong_AsLong(arg);
    if (t == -1 && PyErr_Occurred()) return nullptr;
    const TypeInfo* ti = type_info((int)t);
    if (!ti) Py_RETURN_NONE;
    return Py_BuildValue("{s:s,s:i,s:i,s:s,s:i,s:i,s:i,s:i,s:O}", "name", ti->name, "block", ti->block, "bytes",
                         ti->bytes, "act", act_name(ti->act), "act_bytes", act_bytes(ti->act), "act_block",
                         act_block(ti->act), "group", ti->group, "repacked", repacked_type(t), "repack_pays",
                         repack_pays(t) ? Py_True : Py_False);
}

// quantize_act(weight_type, x, rows, cols, out): rows of x into the activation format of weight_type.
PyObject* py_quantize_act(PyObject*, PyObject* args) {
    int type, rows, cols;
    PyObject *xo, *oo;
    if (!PyArg_ParseTuple(args, "iOiiO", &type, &xo, &rows, &cols, &oo)) return nullptr;
    const TypeInfo* ti = type_info(type);
    if (!ti) return PyErr_Format(PyExc_ValueError, "ggml_type %d is not supported by the CPU kernels", type);
    const int ab = ti->act == ACT_F32 ? 1 : act_block(ti->act);  // F32 pads its last block
    if (rows < 0 || cols <= 0 || cols % ab)
        return PyErr_Format(PyExc_ValueError, "rows=%d, cols=%d: cols must be a positive multiple of %d", rows, cols, ab);
    Buf x, o;
    if (!x.get(xo, "x", false) || !o.get(oo, "out", true)) return nullptr;
    const size_t need_x = (size_t)rows * cols * 4, need_o = act_row_bytes(ti->act, cols) * rows;
    if (x.len() != need_x) return PyErr_Format(PyExc_ValueError, "x has %zu bytes, expected %zu", x.len(), need_x);
    if (o.len() != need_o) return PyErr_Format(PyExc_ValueError, "out has %zu bytes, expected %zu", o.len(), need_o);
    Py_BEGIN_ALLOW_THREADS quantize_rows(ti->act, x.ptr<float>(), rows, cols, o.ptr<uint8_t>());
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// matmul(w, type, n_rows, n_cols, x, T, out): out[T, n_rows] = x[T, n_cols] @ W^T
PyObject* py_matmul(PyObject*, PyObject* args) {
    PyObject *wo, *xo, *oo;
    int type;
    long long n_rows, n_cols, T;
    if (!PyArg_ParseTuple(args, "OiLLOLO", &wo, &type, &n_rows, &n_cols, &xo, &T, &oo)) return nullptr;
    Buf w, x, o;
    if (!w.get(wo, "w", false) || !x.get(xo, "x", false) || !o.get(oo, "out", true)) return nullptr;
    if (set_error(check_matmul(type, n_rows, n_cols, T, w.len(), x.len(), o.len()))) return nullptr;
    Py_BEGIN_ALLOW_THREADS matmul(w.ptr<uint8_t>(), type, (int)n_rows, (int)n_cols, x.ptr<float>(), (int)T,
                                  o.ptr<float>());
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// matmul_multi(ws, types, n_rows, n_cols, x, T, outs): outs[i][T, n_rows[i]] = x @ W_i^T (sequences)
PyObject* py_matmul_multi(PyObject*, PyObject* args) {
    PyObject *wso, *tso, *nro, *xo, *oso;
    long long n_cols, T;
    if (!PyArg_ParseTuple(args, "OOOLOLO", &wso, &tso, &nro, &n_cols, &xo, &T, &oso)) return nullptr;
    if (!PyTuple_Check(wso) || !PyTuple_Check(tso) || !PyTuple_Check(nro) || !PyTuple_Check(oso))
        return PyErr_Format(PyExc_ValueError, "ws, types, n_rows and outs must be tuples");
    const Py_ssize_t n = PyTuple_GET_SIZE(wso);
    if (n < 1 || n > MAX_MULTI || PyTuple_GET_SIZE(tso) != n || PyTuple_GET_SIZE(nro) != n || PyTuple_GET_SIZE(oso) != n)
        return PyErr_Format(PyExc_ValueError, "need 1..%d matrices with one type, n_rows and out each", MAX_MULTI);
    if (n_cols <= 0 || n_cols > (1LL << 30) || T < 0 || T > (1LL << 30))
        return PyErr_Format(PyExc_ValueError, "n_cols=%lld, T=%lld out of range", n_cols, T);
    MultiMatmulArgs a{};
    a.n = (int)n, a.n_cols = (int)n_cols, a.T = (int)T;
    Buf w[MAX_MULTI], o[MAX_MULTI], x;
    size_t wl[MAX_MULTI], ol[MAX_MULTI];
    if (!x.get(xo, "x", false)) return nullptr;
    for (int i = 0; i < a.n; ++i) {
        const long t = PyLong_AsLong(PyTuple_GET_ITEM(tso, i));
        const long long r = PyLong_AsLongLong(PyTuple_GET_ITEM(nro, i));
        if (PyErr_Occurred()) return nullptr;
        if (t < 0 || t >= MAX_TYPE_ID || r <= 0 || r > (1LL << 30))
            return PyErr_Format(PyExc_ValueError, "matrix %d: type %ld / n_rows %lld out of range", i, t, r);
        a.type[i] = (int)t, a.n_rows[i] = (int)r;
        if (!w[i].get(PyTuple_GET_ITEM(wso, i), "w", false) || !o[i].get(PyTuple_GET_ITEM(oso, i), "out", true))
            return nullptr;
        wl[i] = w[i].len(), ol[i] = o[i].len();
        a.w[i] = w[i].ptr<uint8_t>(), a.out[i] = o[i].ptr<float>();
    }
    if (set_error(check_matmul_multi(a, wl, x.len(), ol))) return nullptr;
    a.x = x.ptr<float>();
    Py_BEGIN_ALLOW_THREADS matmul_multi(a);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// attn_decode(q, k, v, out, H, Hkv, dk, dv, L, ks, khs, vs, vhs, scale[, kv_f16]): see ops.h (strides in
// cache elements: float32, or f16 when kv_f16 is true)
PyObject* py_attn_decode(PyObject*, PyObject* args) {
    PyObject *qo, *ko, *vo, *oo;
    AttnArgs a{};
    int f16 = 0;
    if (!PyArg_ParseTuple(args, "OOOOiiiiiLLLLf|p", &qo, &ko, &vo, &oo, &a.H, &a.Hkv, &a.dk, &a.dv, &a.L, &a.ks,
                          &a.khs, &a.vs, &a.vhs, &a.scale, &f16))
        return nullptr;
    a.kv_f16 = f16 != 0;
    Buf q, k, v, o;
    if (!q.get(qo, "q", false) || !k.get(ko, "k", false) || !v.get(vo, "v", false) || !o.get(oo, "out", true))
        return nullptr;
    if (set_error(check_attn(a, q.len(), k.len(), v.len(), o.len()))) return nullptr;
    a.q = q.ptr<float>(), a.k = k.ptr<void>(), a.v = v.ptr<void>(), a.out = o.ptr<float>();
    Py_BEGIN_ALLOW_THREADS attn_decode(a);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// attn_prefill(q, k, v, out, T, pos0, H, Hkv, dk, dv, qs, os, ks, khs, vs, vhs, scale[, window[, kv_f16]]):
// see ops.h
PyObject* py_attn_prefill(PyObject*, PyObject* args) {
    PyObject *qo, *ko, *vo, *oo;
    AttnPrefillArgs a{};
    int f16 = 0;
    if (!PyArg_ParseTuple(args, "OOOOiiiiiiLLLLLLf|ip", &qo, &ko, &vo, &oo, &a.T, &a.pos0, &a.H, &a.Hkv, &a.dk, &a.dv,
                          &a.qs, &a.os, &a.ks, &a.khs, &a.vs, &a.vhs, &a.scale, &a.window, &f16))
        return nullptr;
    a.kv_f16 = f16 != 0;
    const bool same = qo == oo;
    Buf q, k, v, o;
    if (!q.get(qo, "q", same) || !k.get(ko, "k", false) || !v.get(vo, "v", false)) return nullptr;
    if (!same && !o.get(oo, "out", true)) return nullptr;
    const Buf& ob = same ? q : o;
    a.q = q.ptr<float>(), a.k = k.ptr<void>(), a.v = v.ptr<void>(), a.out = ob.ptr<float>();
    if (set_error(check_attn_prefill(a, q.len(), k.len(), v.len(), ob.len()))) return nullptr;
    Py_BEGIN_ALLOW_THREADS attn_prefill(a);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// ---- MoE handle: keeps the buffers alive until the op finished ----
struct MoeHandle {
    PyObject_HEAD MoeJob* job;
    Buf bufs[7];
};

void handle_finish(MoeHandle* h) {
    if (!h->job) return;
    MoeJob* job = h->job;
    h->job = nullptr;
    Py_BEGIN_ALLOW_THREADS moe_wait(job);
    Py_END_ALLOW_THREADS for (auto& b : h->bufs) b.release();
}

PyObject* handle_wait(PyObject* self, PyObject*) {
    handle_finish(reinterpret_cast<MoeHandle*>(self));
    Py_RETURN_NONE;
}

PyObject* handle_done(PyObject* self, PyObject*) {
    auto* h = reinterpret_cast<MoeHandle*>(self);
    return PyBool_FromLong(!h->job || moe_done(h->job));
}

void handle_dealloc(PyObject* self) {
    auto* h = reinterpret_cast<MoeHandle*>(self);
    handle_finish(h);  // never free buffers a running op still reads
    for (auto& b : h->bufs) b.~Buf();
    Py_TYPE(self)->tp_free(self);
}

PyMethodDef handle_methods[] = {
    {"wait", handle_wait, METH_NOARGS, "Block until the op finished (helping it with this thread)."},
    {"done", handle_done, METH_NOARGS, "True once every task finished."},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject MoeHandleType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// moe_submit(x, ids, weights, gate, up, down, out, T, k, n_expert, d_model, d_ff, gate_type, up_type, down_type)
PyObject* py_moe_submit(PyObject*, PyObject* args) {
    PyObject* objs[7];
    MoeArgs a{};
    if (!PyArg_ParseTuple(args, "OOOOOOOiiiiiiii", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5],
                          &objs[6], &a.T, &a.k, &a.n_expert, &a.d_model, &a.d_ff, &a.gate_type, &a.up_type,
                          &a.down_type))
        return nullptr;
    auto* h = PyObject_New(MoeHandle, &MoeHandleType);
    if (!h) return nullptr;
    h->job = nullptr;
    for (auto& b : h->bufs) new (&b) Buf();
    static const char* names[7] = {"x", "ids", "weights", "gate", "up", "down", "out"};
    for (int i = 0; i < 7; ++i)
        if (!h->bufs[i].get(objs[i], names[i], i == 6)) {
            Py_DECREF(h);
            return nullptr;
        }
    a.x = h->bufs[0].ptr<float>();
    a.ids = h->bufs[1].ptr<int32_t>();
    a.weights = h->bufs[2].ptr<float>();
    a.gate = h->bufs[3].ptr<uint8_t>();
    a.up = h->bufs[4].ptr<uint8_t>();
    a.down = h->bufs[5].ptr<uint8_t>();
    a.out = h->bufs[6].ptr<float>();
    const MoeLens lens{h->bufs[0].len(), h->bufs[1].len(), h->bufs[2].len(), h->bufs[3].len(),
                       h->bufs[4].len(), h->bufs[5].len(), h->bufs[6].len()};
    if (set_error(check_moe(a, lens))) {
        Py_DECREF(h);
        return nullptr;
    }
    MoeJob* job;
    Py_BEGIN_ALLOW_THREADS job = moe_submit(a);
    Py_END_ALLOW_THREADS h->job = job;
    return reinterpret_cast<PyObject*>(h);
}

// attn_prep(q, k, v, bq, bk, bv, q_norm, k_norm, cos, sin, k_cache, v_cache,
//           T, H, Hkv, Dh, n_rot, neox, qk_norm, pos0, eps[, cache_f16]): see decode.h (None for absent
//           buffers; the caches hold f16 when cache_f16 is true, else float32)
PyObject* py_attn_prep(PyObject*, PyObject* args) {
    PyObject* o[12];
    AttnPrepArgs a;
    int neox, f16 = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOiiiiiiiif|p", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7],
                          &o[8], &o[9], &o[10], &o[11], &a.T, &a.H, &a.Hkv, &a.Dh, &a.n_rot, &neox, &a.qk_norm,
                          &a.pos0, &a.eps, &f16))
        return nullptr;
    a.cache_f16 = f16 != 0;
    a.neox = neox != 0;
    if (a.T < 0 || a.H <= 0 || a.Hkv <= 0 || a.Dh <= 0 || a.H > 65536 || a.Dh > 65536 || a.pos0 < 0 ||
        a.n_rot < 0 || a.n_rot > a.Dh || a.n_rot % 2 || a.qk_norm < 0 || a.qk_norm > 2)
        return PyErr_Format(PyExc_ValueError, "attn_prep: bad sizes T=%d H=%d Hkv=%d Dh=%d n_rot=%d pos0=%d qk_norm=%d",
                            a.T, a.H, a.Hkv, a.Dh, a.n_rot, a.pos0, a.qk_norm);
    static const char* names[12] = {"q", "k", "v", "bq", "bk", "bv", "q_norm", "k_norm", "cos", "sin", "k_cache", "v_cache"};
    const long long qd = (long long)a.H * a.Dh, kvd = (long long)a.Hkv * a.Dh, half = a.n_rot / 2;
    const long long nq = a.qk_norm == 1 ? a.Dh : qd, nk = a.qk_norm == 1 ? a.Dh : kvd;
    // exact float counts; -1: at least (pos0 + T) rows of the row width given in `row` (the
    // head-major caches: Hkv runs of cache_ctx rows of Dh, cache_ctx from their length)
    const long long want[12] = {a.T * qd, a.T * kvd, a.T * kvd, qd, kvd, kvd, nq, nk, -1, -1, -1, -1};
    const long long row[12] = {0, 0, 0, 0, 0, 0, 0, 0, half, half, kvd, kvd};
    const bool optional[12] = {false, false, false, true, true, true, a.qk_norm == 0, a.qk_norm == 0,
                               a.n_rot == 0, a.n_rot == 0, false, false};
    Buf b[12];
    for (int i = 0; i < 12; ++i) {
        if (o[i] == Py_None) {
            if (!optional[i]) return PyErr_Format(PyExc_ValueError, "attn_prep: %s is required", names[i]);
            continue;
        }
        if (!b[i].get(o[i], names[i], i < 3 || i >= 10)) return nullptr;
        const long long have = (long long)b[i].len(), es = i >= 10 && a.cache_f16 ? 2 : 4;
        if (want[i] >= 0 ? have != want[i] * 4 : have < (long long)(a.pos0 + a.T) * row[i] * es || have % (row[i] * es))
            return PyErr_Format(PyExc_ValueError, "attn_prep: %s has %lld bytes, expected %s%lld", names[i], have,
                                want[i] >= 0 ? "" : "rows of this width for positions up to ",
                                want[i] >= 0 ? want[i] * 4 : (long long)(a.pos0 + a.T));
    }
    a.q = b[0].ptr<float>(), a.k = b[1].ptr<float>(), a.v = b[2].ptr<float>();
    a.bq = b[3].held ? b[3].ptr<float>() : nullptr, a.bk = b[4].held ? b[4].ptr<float>() : nullptr;
    a.bv = b[5].held ? b[5].ptr<float>() : nullptr;
    a.q_norm = b[6].held ? b[6].ptr<float>() : nullptr, a.k_norm = b[7].held ? b[7].ptr<float>() : nullptr;
    a.cos = b[8].held ? b[8].ptr<float>() : nullptr, a.sin = b[9].held ? b[9].ptr<float>() : nullptr;
    a.k_cache = b[10].ptr<void>(), a.v_cache = b[11].ptr<void>();
    if (b[10].len() != b[11].len()) return PyErr_Format(PyExc_ValueError, "attn_prep: k_cache and v_cache differ in size");
    a.cache_ctx = (int)(b[10].len() / ((size_t)kvd * (a.cache_f16 ? 2 : 4)));
    Py_BEGIN_ALLOW_THREADS attn_prep(a);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// gelu_mul(g, u, out): out = gelu(g) * u elementwise (ggml's f16-table GELU); float32 buffers of one size
PyObject* py_gelu_mul(PyObject*, PyObject* args) {
    PyObject *go, *uo, *oo;
    if (!PyArg_ParseTuple(args, "OOO", &go, &uo, &oo)) return nullptr;
    Buf g, u, o;
    if (!g.get(go, "g", false) || !u.get(uo, "u", false) || !o.get(oo, "out", true)) return nullptr;
    if (g.len() % 4 || u.len() != g.len() || o.len() != g.len())
        return PyErr_Format(PyExc_ValueError, "gelu_mul: g has %zu bytes, u %zu, out %zu; expected one size in float32",
                            g.len(), u.len(), o.len());
    Py_BEGIN_ALLOW_THREADS gelu_mul(g.ptr<float>(), u.ptr<float>(), o.ptr<float>(), (long long)(g.len() / 4));
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// rms_norm(x, w, rows, n, eps, out): out [rows, n] = RMSNorm of x's rows times w
PyObject* py_rms_norm(PyObject*, PyObject* args) {
    PyObject *xo, *wo, *oo;
    long long rows, n;
    float eps;
    if (!PyArg_ParseTuple(args, "OOLLfO", &xo, &wo, &rows, &n, &eps, &oo)) return nullptr;
    if (rows < 0 || n <= 0 || rows > (1LL << 30) || n > (1LL << 30))
        return PyErr_Format(PyExc_ValueError, "rms_norm: rows=%lld, n=%lld out of range", rows, n);
    Buf x, w, o;
    if (!x.get(xo, "x", false) || !w.get(wo, "w", false) || !o.get(oo, "out", true)) return nullptr;
    if ((long long)x.len() != rows * n * 4 || (long long)o.len() != rows * n * 4 || (long long)w.len() != n * 4)
        return PyErr_Format(PyExc_ValueError, "rms_norm: x has %zu bytes, w %zu, out %zu; expected %lld, %lld, %lld",
                            x.len(), w.len(), o.len(), rows * n * 4, n * 4, rows * n * 4);
    Py_BEGIN_ALLOW_THREADS rms_norm_rows(x.ptr<float>(), w.ptr<float>(), (int)rows, (int)n, eps, o.ptr<float>());
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// dequantize_rows(type, rows, n_rows, n_cols, out): rows [n_rows, row_bytes] -> out [n_rows, n_cols]
PyObject* py_dequantize_rows(PyObject*, PyObject* args) {
    int type;
    long long n_rows, n_cols;
    PyObject *ro, *oo;
    if (!PyArg_ParseTuple(args, "iOLLO", &type, &ro, &n_rows, &n_cols, &oo)) return nullptr;
    const TypeInfo* ti = type_info(type);
    if (!ti) return PyErr_Format(PyExc_ValueError, "ggml_type %d is not supported by the CPU kernels", type);
    if (n_rows < 0 || n_cols <= 0 || n_cols % ti->block || n_cols > (1LL << 30) || n_rows > (1LL << 30))
        return PyErr_Format(PyExc_ValueError, "n_rows=%lld, n_cols=%lld: n_cols must be a positive multiple of %d",
                            n_rows, n_cols, ti->block);
    if (ti->group != 1)
        return PyErr_Format(PyExc_ValueError, "%s rows are interleaved: unpack them first (repack(..., unpack=True))",
                            ti->name);
    Buf r, o;
    if (!r.get(ro, "rows", false) || !o.get(oo, "out", true)) return nullptr;
    const long long rb = n_cols / ti->block * ti->bytes;
    if ((long long)r.len() != n_rows * rb || (long long)o.len() != n_rows * n_cols * 4)
        return PyErr_Format(PyExc_ValueError, "rows has %zu bytes, out %zu; expected %lld and %lld", r.len(), o.len(),
                            n_rows * rb, n_rows * n_cols * 4);
    for (long long i = 0; i < n_rows; ++i)
        dequantize_row(type, r.ptr<uint8_t>() + i * rb, (int)n_cols, o.ptr<float>() + i * n_cols);
    Py_RETURN_NONE;
}

// repack(type, src, n_rows, n_cols, dst, unpack): a matrix of `type` into its interleaved layout at dst
// (unpack: the interleaved layout at src back to `type`), on the pool.
PyObject* py_repack(PyObject*, PyObject* args) {
    int type, unpack;
    long long n_rows, n_cols;
    PyObject *so, *dO;
    if (!PyArg_ParseTuple(args, "iOLLOp", &type, &so, &n_rows, &n_cols, &dO, &unpack)) return nullptr;
    Buf src, dst;
    if (!src.get(so, "src", false) || !dst.get(dO, "dst", true)) return nullptr;
    if (set_error(check_repack(type, n_rows, n_cols, src.len(), dst.len(), unpack))) return nullptr;
    Py_BEGIN_ALLOW_THREADS repack(type, (int)n_rows, (int)n_cols, src.ptr<uint8_t>(), dst.ptr<uint8_t>(), unpack);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// ---- whole-model decode step ----
const char* kPlanName = "hetero_moe._cpu.DecodePlan";

void plan_free(PyObject* cap) {
    delete static_cast<DecodeModel*>(PyCapsule_GetPointer(cap, kPlanName));
}

// decode_plan(ints, floats) -> capsule: ints int64 and floats float64 buffers (decode.cpp's layout).
// The caller keeps every buffer the description points to alive as long as the plan.
PyObject* py_decode_plan(PyObject*, PyObject* args) {
    PyObject *io, *fo;
    if (!PyArg_ParseTuple(args, "OO", &io, &fo)) return nullptr;
    Buf ib, fb;
    if (!ib.get(io, "ints", false) || !fb.get(fo, "floats", false)) return nullptr;
    if (ib.len() % 8 || fb.len() % 8) return PyErr_Format(PyExc_ValueError, "ints/floats must hold 8-byte items");
    auto* m = new DecodeModel();
    const std::string e = parse_decode_model(ib.ptr<int64_t>(), ib.len() / 8, fb.ptr<double>(), fb.len() / 8, m);
    if (!e.empty()) {
        delete m;
        PyErr_SetString(PyExc_ValueError, e.c_str());
        return nullptr;
    }
    PyObject* cap = PyCapsule_New(m, kPlanName, plan_free);
    if (!cap) delete m;
    return cap;
}

// decode_step(plan, x, pos, logits): x [D] float32 (overwritten), logits [V] float32
PyObject* py_decode_step(PyObject*, PyObject* args) {
    PyObject *cap, *xo, *lo;
    long long pos;
    if (!PyArg_ParseTuple(args, "OOLO", &cap, &xo, &pos, &lo)) return nullptr;
    auto* m = static_cast<DecodeModel*>(PyCapsule_GetPointer(cap, kPlanName));
    if (!m) return nullptr;
    Buf x, l;
    if (!x.get(xo, "x", true) || !l.get(lo, "logits", true)) return nullptr;
    if (x.len() != (size_t)m->D * 4) return PyErr_Format(PyExc_ValueError, "x has %zu bytes, expected %d", x.len(), m->D * 4);
    if (l.len() != (size_t)m->V * 4)
        return PyErr_Format(PyExc_ValueError, "logits has %zu bytes, expected %lld", l.len(), (long long)m->V * 4);
    if (pos < 0 || pos >= m->n_ctx)
        return PyErr_Format(PyExc_ValueError, "position %lld is outside the context [0, %d)", pos, m->n_ctx);
    Py_BEGIN_ALLOW_THREADS decode_step(*m, x.ptr<float>(), (int)pos, l.ptr<float>());
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// decode_token(plan, fd, offset, n_rows, type, scale, token, pos, logits): decode_step with the token's
// embedding read here: row `token` of the n_rows x D table of `type` at byte `offset` of the open file
// fd (pread: the table's pages stay out of the process's memory), dequantized and, when scale != 0,
// multiplied by scale. One call per generated token, nothing made in Python.
PyObject* py_decode_token(PyObject*, PyObject* args) {
    PyObject *cap, *lo;
    int fd, type;
    long long offset, n_rows, token, pos;
    double scale;
    if (!PyArg_ParseTuple(args, "OiLLidLLO", &cap, &fd, &offset, &n_rows, &type, &scale, &token, &pos, &lo))
        return nullptr;
    auto* m = static_cast<DecodeModel*>(PyCapsule_GetPointer(cap, kPlanName));
    if (!m) return nullptr;
    const TypeInfo* ti = type_info(type);
    if (!ti || ti->group != 1 || m->D % ti->block)
        return PyErr_Format(PyExc_ValueError, "embedding table: ggml_type %d rows of %d values are not supported", type,
                            m->D);
    if (token < 0 || token >= n_rows)
        return PyErr_Format(PyExc_ValueError, "token id %lld is out of range [0, %lld)", token, n_rows);
    if (pos < 0 || pos >= m->n_ctx)
        return PyErr_Format(PyExc_ValueError, "position %lld is outside the context [0, %d)", pos, m->n_ctx);
    if (offset < 0) return PyErr_Format(PyExc_ValueError, "embedding table offset %lld is negative", offset);
    Buf l;
    if (!l.get(lo, "logits", true)) return nullptr;
    if (l.len() != (size_t)m->V * 4)
        return PyErr_Format(PyExc_ValueError, "logits has %zu bytes, expected %lld", l.len(), (long long)m->V * 4);
    const size_t rb = (size_t)(m->D / ti->block) * ti->bytes;
    thread_local std::vector<uint8_t> row;
    thread_local std::vector<float> x;
    row.resize(rb), x.resize(m->D);
    ssize_t got = -1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    size_t done = 0;
    while (done < rb) {  // a regular file returns it all at once; loop for the rare short read
        const ssize_t n = pread(fd, row.data() + done, rb - done, (off_t)(offset + token * (long long)rb + (long long)done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            err = n < 0 ? errno : 0;
            break;
        }
        done += (size_t)n;
    }
    got = (ssize_t)done;
    if (got == (ssize_t)rb) {
        dequantize_row(type, row.data(), m->D, x.data());
        if (scale != 0.0)
            for (float& v : x) v *= (float)scale;
        decode_step(*m, x.data(), (int)pos, l.ptr<float>());
    }
    Py_END_ALLOW_THREADS
    if (got != (ssize_t)rb) {
        if (err) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        return PyErr_Format(PyExc_OSError, "short read of embedding row %lld (%zd of %zu bytes)", token, got, rb);
    }
    Py_RETURN_NONE;
}

// decode_steps(plan, x, pos, caches, logits): B sequences one token each. x [B, D] float32 (overwritten),
// pos int32 [B], caches int64 [B, n_layer, 4] = (k address, k bytes, v address, v bytes) of each row's
// layer caches, each [Hkv, n_ctx, Dh] in the plan's element type (f16 or float32); logits [B, V] float32.
PyObject* py_decode_steps(PyObject*, PyObject* args) {
    PyObject *cap, *xo, *po, *co, *lo;
    if (!PyArg_ParseTuple(args, "OOOOO", &cap, &xo, &po, &co, &lo)) return nullptr;
    auto* m = static_cast<DecodeModel*>(PyCapsule_GetPointer(cap, kPlanName));
    if (!m) return nullptr;
    Buf x, p, c, l;
    if (!x.get(xo, "x", true) || !p.get(po, "pos", false) || !c.get(co, "caches", false) || !l.get(lo, "logits", true))
        return nullptr;
    if (p.len() % 4 || p.len() == 0 || p.len() / 4 > 4096)
        return PyErr_Format(PyExc_ValueError, "pos must hold 1..4096 int32 positions, got %zu bytes", p.len());
    const long long B = (long long)(p.len() / 4), L = m->n_layer;
    if (x.len() != (size_t)(B * m->D * 4))
        return PyErr_Format(PyExc_ValueError, "x has %zu bytes, expected %lld (B=%lld rows of %d)", x.len(),
                            B * m->D * 4, B, m->D);
    if (l.len() != (size_t)(B * m->V * 4))
        return PyErr_Format(PyExc_ValueError, "logits has %zu bytes, expected %lld", l.len(), B * m->V * 4);
    if (c.len() != (size_t)(B * L * 4 * 8))
        return PyErr_Format(PyExc_ValueError, "caches has %zu bytes, expected %lld (B=%lld x %lld layers x 4 int64)",
                            c.len(), B * L * 32, B, L);
    const int32_t* pos = p.ptr<int32_t>();
    for (long long b = 0; b < B; ++b)
        if (pos[b] < 0 || pos[b] >= m->n_ctx)
            return PyErr_Format(PyExc_ValueError, "row %lld: position %d is outside the context [0, %d)", b, pos[b],
                                m->n_ctx);
    // MLA: both entries name the latent cache ([n_ctx, C+R] in the plan's element type)
    const long long want = m->mla ? (long long)m->n_ctx * (m->C + m->R) * (m->latent_f16 ? 2 : 4)
                                  : (long long)m->n_ctx * m->Hkv * m->Dh * (m->kv_f16 ? 2 : 4);
    const int64_t* ci = c.ptr<int64_t>();
    std::vector<SeqCache> seq((size_t)(B * L));
    for (long long i = 0; i < B * L; ++i) {
        const int64_t* e = ci + 4 * i;
        if (e[0] == 0 || e[2] == 0 || e[1] != want || e[3] != want)
            return PyErr_Format(PyExc_ValueError,
                                "row %lld layer %lld: key/value caches of %lld/%lld bytes at %s; expected %lld bytes each",
                                i / L, i % L, (long long)e[1], (long long)e[3], e[0] && e[2] ? "given addresses" : "a null address",
                                want);
        seq[i].k = reinterpret_cast<void*>(e[0]), seq[i].v = reinterpret_cast<void*>(e[2]);
    }
    Py_BEGIN_ALLOW_THREADS decode_steps(*m, (int)B, x.ptr<float>(), pos, seq.data(), l.ptr<float>());
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// decode_profile(on) -> {part: seconds} accumulated since the last call; timing on/off from now
PyObject* py_decode_profile(PyObject*, PyObject* arg) {
    const int on = PyObject_IsTrue(arg);
    if (on < 0) return nullptr;
    double t[DECODE_PARTS];
    decode_profile(on != 0, t);
    PyObject* d = PyDict_New();
    for (int i = 0; i < DECODE_PARTS && d; ++i) {
        PyObject* v = PyFloat_FromDouble(t[i]);
        if (!v || PyDict_SetItemString(d, decode_part_name(i), v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return nullptr;
        }
        Py_DECREF(v);
    }
    return d;
}

PyObject* py_set_r16_prefetch(PyObject*, PyObject* arg) {
    const long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return nullptr;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "_set_r16_prefetch: the token count must be >= 1");
        return nullptr;
    }
    const int old = r16_prefetch_min_tokens;
    r16_prefetch_min_tokens = (int)std::min<long>(n, 1 << 30);
    return PyLong_FromLong(old);
}

PyObject* py_set_moe_decode_split(PyObject*, PyObject* arg) {
    const long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return nullptr;
    if (n < 1 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "_set_moe_decode_split: tasks per thread must be in [1, 1024]");
        return nullptr;
    }
    const int old = moe_decode_tasks_per_thread;
    moe_decode_tasks_per_thread = (int)n;
    return PyLong_FromLong(old);
}

// f32_gemv(w, rows, cols, x, out): out[r] = <row r of w, x>, float32 rows back to back (the active variant).
PyObject* py_f32_gemv(PyObject*, PyObject* args) {
    PyObject *wo, *xo, *oo;
    long long rows, cols;
    if (!PyArg_ParseTuple(args, "OLLOO", &wo, &rows, &cols, &xo, &oo)) return nullptr;
    if (rows < 0 || cols <= 0 || rows > (1LL << 30) || cols > (1LL << 30))
        return PyErr_Format(PyExc_ValueError, "rows=%lld, cols=%lld out of range", rows, cols);
    Buf w, x, o;
    if (!w.get(wo, "w", false) || !x.get(xo, "x", false) || !o.get(oo, "out", true)) return nullptr;
    if ((long long)w.len() != rows * cols * 4 || (long long)x.len() != cols * 4 || (long long)o.len() != rows * 4)
        return PyErr_Format(PyExc_ValueError, "w/x/out have %zu/%zu/%zu bytes, expected %lld/%lld/%lld", w.len(), x.len(),
                            o.len(), rows * cols * 4, cols * 4, rows * 4);
    active_kernels()->f32_gemv(w.ptr<float>(), (size_t)cols, (int)rows, (int)cols, x.ptr<float>(), o.ptr<float>());
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"features", py_features, METH_NOARGS, "CPU flags and the active kernel variant."},
    {"variants", py_variants, METH_NOARGS, "Kernel variants this CPU can run."},
    {"_set_r16_prefetch", py_set_r16_prefetch, METH_O,
     "Fewest tokens per call for the Q4_K_R16 kernel's software prefetch; returns the old value."},
    {"_set_moe_decode_split", py_set_moe_decode_split, METH_O,
     "Tasks per thread in each phase of the fused MoE op on <= 4 tokens; returns the old value."},
    {"_force_variant", py_force_variant, METH_O, "Use a kernel variant by name (None: the best)."},
    {"set_num_threads", py_set_num_threads, METH_O, "Threads per op, the calling thread included."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "Threads per op."},
    {"set_spin_us", py_set_spin_us, METH_O, "Microseconds an idle worker polls before sleeping."},
    {"type_info", py_type_info, METH_O, "Block facts of a supported ggml type, else None."},
    {"quantize_act", py_quantize_act, METH_VARARGS, "Quantize f32 rows to a weight type's activation format."},
    {"f32_gemv", py_f32_gemv, METH_VARARGS, "out = W @ x for float32 rows W (routers), this thread."},
    {"matmul", py_matmul, METH_VARARGS, "out = x @ W^T with W quantized."},
    {"matmul_multi", py_matmul_multi, METH_VARARGS, "Several quantized matmuls of the same x in one job."},
    {"attn_decode", py_attn_decode, METH_VARARGS, "Decode attention over a float32 KV cache."},
    {"attn_prefill", py_attn_prefill, METH_VARARGS, "Causal prompt attention over a float32 or f16 KV cache."},
    {"moe_submit", py_moe_submit, METH_VARARGS, "Start the fused MoE FFN; returns a handle."},
    {"dequantize_rows", py_dequantize_rows, METH_VARARGS, "Rows of a quantized type to float32."},
    {"repack", py_repack, METH_VARARGS, "A matrix into its row-interleaved layout (or back), on the pool."},
    {"gelu_mul", py_gelu_mul, METH_VARARGS, "gelu(g) * u with ggml's f16-table GELU, on the pool."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of rows times a weight vector, on the pool."},
    {"attn_prep", py_attn_prep, METH_VARARGS, "Biases, q/k norms, RoPE and the KV-cache write for T tokens."},
    {"decode_token", py_decode_token, METH_VARARGS, "decode_step with the token's embedding row read from the file."},
    {"decode_plan", py_decode_plan, METH_VARARGS, "A whole-model decode plan from a flat description."},
    {"decode_step", py_decode_step, METH_VARARGS, "One token through the whole model -> logits."},
    {"decode_steps", py_decode_steps, METH_VARARGS, "One token of each of B sequences through the model -> logits."},
    {"decode_profile", py_decode_profile, METH_O, "Per-part decode_step seconds so far; timing on/off."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "hetero-moe CPU kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu(void) {
    MoeHandleType.tp_name = "hetero_moe._cpu.MoeHandle";
    MoeHandleType.tp_basicsize = sizeof(MoeHandle);
    MoeHandleType.tp_flags = Py_TPFLAGS_DEFAULT;
    MoeHandleType.tp_dealloc = handle_dealloc;
    MoeHandleType.tp_methods = handle_methods;
    MoeHandleType.tp_doc = "A fused MoE FFN op in flight.";
    if (PyType_Ready(&MoeHandleType) < 0) return nullptr;
    PyObject* m = PyModule_Create(&module);
    if (!m) return nullptr;
    Py_INCREF(&MoeHandleType);
    PyModule_AddObject(m, "MoeHandle", reinterpret_cast<PyObject*>(&MoeHandleType));
    return m;
}
