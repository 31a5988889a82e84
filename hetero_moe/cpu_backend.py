"""CPU kernels (the hetero_moe._cpu extension): quantized matmul and the fused MoE FFN.

Weights stay in their GGUF blocks (numpy uint8 arrays, read-only mmap views are fine); activations are
float32 torch tensors, quantized inside the op (Q8_K for K-quants, Q8_0/Q8_1 for the 32-blocks; F16 and
BF16 weights meet the float32 activations themselves, in zero-padded blocks of 8).

Threads: one persistent pool per process (set_num_threads(n) = n - 1 workers plus the calling
thread, which helps while it waits; default HETERO_MOE_THREADS or the usable cores). Ops release the
GIL. moe_ffn_submit starts the op on the workers and returns a Handle; Handle.wait() joins in and
returns the output. Results do not depend on the thread count (fixed summation order).

Dimension key: T tokens, k experts per token, E experts, D model width, F expert FFN width.
"""
from __future__ import annotations

import mmap
import threading

import numpy as np
import torch

from .errors import UnsupportedError

_lock = threading.Lock()
_mod = None
_reason: str | None = None
_loaded = False
_threads_set = False

_TYPE_NAMES = {1: "F16", 30: "BF16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
               11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


def _load():
    global _mod, _reason, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    from . import _cpu
                    _mod = _cpu
                except ImportError as e:
                    _reason = (f"hetero_moe._cpu did not load ({e}); build it with `pip install -e . -v` "
                               "(needs a C++17 compiler; the log shows why the build failed, and "
                               "HETERO_MOE_REQUIRE_CPU_EXT=1 makes a failed build an error)")
                _loaded = True
    return _mod


def _lib():
    """The extension, with the thread count initialised on first use."""
    global _threads_set
    m = _load()
    if m is None:
        raise UnsupportedError(f"CPU kernels unavailable: {_reason}")
    if not _threads_set:
        from .config_env import default_threads
        m.set_num_threads(default_threads())
        _threads_set = True
    return m


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _reason


def features() -> dict:
    """CPU flags, the variants this CPU can run, and the variant each kernel uses."""
    m = _lib()
    f = dict(m.features())
    f["variants"] = m.variants()
    f["kernels"] = {name: f["variant"] for name in _TYPE_NAMES.values()}
    f["kernels"].update({"quantize_q8_0": f["variant"], "quantize_q8_K": f["variant"], "silu_mul": f["variant"]})
    return f


def set_num_threads(n: int) -> None:
    """Threads per op, the calling thread included. Do not call while an op is in flight."""
    global _threads_set
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n={n!r} must be an int >= 1")
    _lib().set_num_threads(n)
    _threads_set = True


def set_spin_us(us: int) -> None:
    """How long an idle pool worker polls for the next op before sleeping (microseconds)."""
    if not isinstance(us, int) or isinstance(us, bool) or not 0 <= us <= 1_000_000:
        raise ValueError(f"set_spin_us: us={us!r} must be an int in [0, 1000000]")
    _lib().set_spin_us(us)


def get_num_threads() -> int:
    return _lib().get_num_threads()


def supports(ggml_type: int) -> bool:
    m = _load()
    return m is not None and m.type_info(int(ggml_type)) is not None


_INFO: dict[int, dict] = {}  # ggml type -> type_info, filled on first use (ops are called per layer)


def type_info(ggml_type: int) -> dict:
    """Block facts: name, block (elements), bytes (per block), act (activation format), act_bytes,
    act_block (elements per activation block)."""
    info = _INFO.get(ggml_type)
    if info is None:
        info = _lib().type_info(int(ggml_type))
        if info is None:
            raise UnsupportedError(f"ggml type {ggml_type} is not supported by the CPU kernels "
                                   f"(supported: {sorted(_TYPE_NAMES.values())})")
        _INFO[int(ggml_type)] = info
    return info


def row_bytes(ggml_type: int, n_cols: int) -> int:
    info = type_info(ggml_type)
    if n_cols % info["block"]:
        raise ValueError(f"n_cols={n_cols} is not a multiple of the {info['name']} block size {info['block']}")
    return n_cols // info["block"] * info["bytes"]


# ---------------------------------------------------------------- argument checks

def _weight_buffer(name: str, w, nbytes: int) -> np.ndarray:
    if type(w) is np.ndarray and w.dtype == np.uint8 and w.flags.c_contiguous and w.nbytes == nbytes:
        return w  # the common case, checked cheaply
    if isinstance(w, torch.Tensor):
        if w.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {w.device}")
        w = w.detach().numpy()
    if not isinstance(w, np.ndarray):
        raise ValueError(f"{name} must be a numpy uint8 array (or a CPU torch uint8 tensor), got {type(w).__name__}")
    if w.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {w.dtype}")
    if not w.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if w.nbytes != nbytes:
        raise ValueError(f"{name} has {w.nbytes} bytes, expected {nbytes} for its shape and type")
    return w


def _float_tensor(name: str, x, shape_desc: str) -> torch.Tensor:
    if type(x) is torch.Tensor and x.dtype == torch.float32 and x.is_cpu and x.is_contiguous():
        return x.detach() if x.requires_grad else x
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {x.device}")
    if x.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 {shape_desc}, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return x.detach()


def _positive(name: str, v) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name}={v!r} must be a positive int")
    return int(v)


# ---------------------------------------------------------------- ops

def _out_buffer(out, shape) -> torch.Tensor:
    """A caller's output tensor (float32, contiguous, CPU, of this shape), or a new one."""
    if out is None:
        return torch.from_numpy(np.empty(shape, dtype=np.float32))
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.is_cpu
            and out.is_contiguous() and tuple(out.shape) == tuple(shape)):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {tuple(shape)}")
    return out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Rows of x [..., n] scaled to unit RMS (+eps) times w [n], on the pool -> [..., n]."""
    m = _mod if _threads_set else _lib()
    x = _float_tensor("x", x, "[..., n]")
    w = _float_tensor("w", w, "[n]")
    n = x.shape[-1]
    y = _out_buffer(out, tuple(x.shape))
    m.rms_norm(x.numpy().reshape(-1), w.numpy(), x.numel() // n, n, float(eps),
               y.numpy().reshape(-1))
    return y


def gelu_mul(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(g) * u elementwise with ggml's GELU (tanh form; input rounded to f16, result from an
    f16 table, 0 below -10, x above 10), on the pool. out may be g."""
    m = _mod if _threads_set else _lib()
    g = _float_tensor("g", g, "[...]")
    u = _float_tensor("u", u, "[...]")
    if u.shape != g.shape:
        raise ValueError(f"gelu_mul: g has shape {tuple(g.shape)}, u {tuple(u.shape)}")
    y = _out_buffer(out, tuple(g.shape))
    m.gelu_mul(g.numpy().reshape(-1), u.numpy().reshape(-1), y.numpy().reshape(-1))
    return y


def matmul(w, ggml_type: int, n_rows: int, n_cols: int, x: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., n_cols] float32 @ W.T -> [..., n_rows] float32; W is n_rows rows of ggml_type blocks.
    out: an optional [T, n_rows] float32 tensor to write into (T = rows of x)."""
    m = _mod if _threads_set else _lib()
    n_rows, n_cols = _positive("n_rows", n_rows), _positive("n_cols", n_cols)
    w = _weight_buffer("w", w, n_rows * row_bytes(ggml_type, n_cols))
    x = _float_tensor("x", x, f"[T, {n_cols}]")
    shape = x.shape
    if len(shape) < 1 or shape[-1] != n_cols:
        raise ValueError(f"x has shape {tuple(shape)}, expected [..., n_cols={n_cols}]")
    T = x.numel() // n_cols
    y = _out_buffer(out, (T, n_rows))
    if T:
        m.matmul(w, ggml_type, n_rows, n_cols, x.numpy(), T, y.numpy())
    return y if len(shape) == 2 else y.reshape(*shape[:-1], n_rows)


def matmul_multi(mats, n_cols: int, x: torch.Tensor, outs=None) -> list[torch.Tensor]:
    """[x @ W_i.T for each (W_i, ggml_type_i, n_rows_i) in mats] in one pool job: x [T, n_cols] is
    quantized once per activation format and all matrices' rows are shared out together.
    outs: optional [T, n_rows_i] float32 tensors to write into."""
    m = _mod if _threads_set else _lib()
    n_cols = _positive("n_cols", n_cols)
    x = _float_tensor("x", x, f"[T, {n_cols}]")
    if x.dim() != 2 or x.shape[1] != n_cols:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [T, n_cols={n_cols}]")
    T = x.shape[0]
    given = outs
    ws, types, rows, outs = [], [], [], []
    for i, (w, t, r) in enumerate(mats):
        r = _positive("n_rows", r)
        ws.append(_weight_buffer("w", w, r * row_bytes(t, n_cols)))
        types.append(int(t))
        rows.append(r)
        outs.append(_out_buffer(None if given is None else given[i], (T, r)))
    if T:
        m.matmul_multi(tuple(ws), tuple(types), tuple(rows), n_cols, x.numpy(), T,
                       tuple(o.numpy() for o in outs))
    return outs


KV_DTYPES = (torch.float32, torch.float16)   # KV-cache element types the attention kernels read


def _span_view(name: str, t: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """A [L, Hkv, d] float32 or float16 view (rows and heads may be strided, d contiguous) as one
    flat numpy buffer from its first to its last element, plus its row and head strides in
    elements."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ValueError(f"{name} must be a 3-D torch.Tensor [L, n_head_kv, dim]")
    if t.dtype not in KV_DTYPES or not t.is_cpu:
        raise ValueError(f"{name} must be a float32 or float16 CPU tensor, got {t.dtype} on {t.device}")
    if t.stride(2) != 1 or min(t.stride()) < 0:
        raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")
    L, H, d = t.shape
    span = (L - 1) * t.stride(0) + (H - 1) * t.stride(1) + d
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    return flat.detach().numpy(), t.stride(0), t.stride(1)


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token's attention over L cached positions -> [H, dv] float32.

    q [H, dk] float32; k [L, Hkv, dk] and v [L, Hkv, dv] views into a KV cache, both float32 or
    both float16 (contiguous in the last dimension; v may be a prefix of k's rows, as in MLA's
    latent cache). Query head h reads KV head h // (H / Hkv).
    """
    m = _mod if _threads_set else _lib()
    q = _float_tensor("q", q, "[H, dk]")
    kb, ks, khs = _span_view("k", k)
    vb, vs, vhs = _span_view("v", v)
    L, Hkv, dk = k.shape
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on [L, n_head_kv]")
    if k.dtype != v.dtype:
        raise ValueError(f"k ({k.dtype}) and v ({v.dtype}) must have one element type")
    if q.dim() != 2 or q.shape[1] != dk:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected [n_head, dk={dk}]")
    H, dv = q.shape[0], v.shape[2]
    out = np.empty((H, dv), dtype=np.float32)
    m.attn_decode(q.numpy(), kb, vb, out, H, Hkv, dk, dv, L, ks, khs, vs, vhs, float(scale),
                  k.dtype == torch.float16)
    return torch.from_numpy(out)


def dequantize_rows(rows: np.ndarray, ggml_type: int, n_cols: int) -> torch.Tensor:
    """Quantized rows (uint8 [n, row_bytes]) of ggml_type -> float32 [n, n_cols]."""
    m = _mod if _threads_set else _lib()
    n_cols = _positive("n_cols", n_cols)
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    n = rows.shape[0] if rows.ndim == 2 else 0
    out = np.empty((n, n_cols), dtype=np.float32)
    m.dequantize_rows(int(ggml_type), rows, n, n_cols, out)
    return torch.from_numpy(out)


def repacked_type(ggml_type: int) -> int | None:
    """The row-interleaved layout the kernels have for ggml_type (Q2_K, Q3_K, Q4_K, Q6_K, Q4_0, Q5_0, Q8_0, IQ4_NL, IQ4_XS ->
    their _R16 forms), or None."""
    if not available():
        return None
    info = _lib().type_info(int(ggml_type))
    return info["repacked"] if info is not None and info["repacked"] >= 0 else None


def repack_pays(ggml_type: int) -> bool:
    """Whether load(repack="on"/"auto") converts ggml_type with the active kernel variant (Q4_0, Q5_0
    always; Q2_K, Q3_K, Q4_K, Q6_K, Q8_0, IQ4_NL and IQ4_XS where the kernels have VNNI: their AVX2 _R16 prompt kernels are
    slower than the plain ones)."""
    if not available():
        return False
    info = _lib().type_info(int(ggml_type))
    return bool(info is not None and info["repack_pays"])


def repack(w, ggml_type: int, n_rows: int, n_cols: int, unpack: bool = False,
           out: np.ndarray | None = None) -> np.ndarray:
    """The n_rows x n_cols matrix w (uint8 blocks of ggml_type) in its row-interleaved layout, a new
    uint8 array or `out` (unpack=True: w is that layout, back to ggml_type). Rows of whole expert
    stacks may be passed as one matrix: groups never cross an expert when its row count is a
    multiple of the group; the layout keeps each group's rows together, so whole groups of rows
    may also be converted a slice at a time. Runs on the kernel thread pool."""
    to = repacked_type(ggml_type)
    if to is None:
        raise UnsupportedError(f"ggml type {ggml_type} has no row-interleaved layout")
    n_rows, n_cols = _positive("n_rows", n_rows), _positive("n_cols", n_cols)
    src_t, dst_t = (to, ggml_type) if unpack else (ggml_type, to)
    w = _weight_buffer("w", w, n_rows * row_bytes(src_t, n_cols))
    if out is None:
        out = _huge_buffer(n_rows * row_bytes(dst_t, n_cols))
    else:
        out = _weight_buffer("out", out, n_rows * row_bytes(dst_t, n_cols))
        if not out.flags.writeable:
            raise ValueError("out must be writable")
    m = _mod if _threads_set else _lib()
    m.repack(int(ggml_type), w, n_rows, n_cols, out, bool(unpack))
    return out


HUGE_MIN = 4 << 20   # bytes: below this a plain array


def _huge_buffer(n: int) -> np.ndarray:
    """A uint8 array of n bytes for weights made at load: large ones in an anonymous mapping marked
    for transparent huge pages (where the kernel allows them), so filling it faults 2 MiB at a time
    and the weight stream of every token walks far fewer TLB entries."""
    if n < HUGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(n, dtype=np.uint8)
    # private: a shared anonymous mapping is shmem, whose huge pages most systems turn off
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    return np.frombuffer(mm, dtype=np.uint8)


def attn_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int, scale: float,
                 out: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Causal attention of T prompt tokens at positions pos0.. over the cache -> [T, H, dv].

    q [T, H, dk] float32 (contiguous); k [L, Hkv, dk] and v [L, Hkv, dv] cache views, both float32
    or both float16 (contiguous in the last dimension), L = pos0 + T. out: [T, H, dv] to write into, which may be
    q itself (when dv == dk): each query block is read in full before its output is written.
    window > 0: a sliding window (the token at position p sees keys p-window+1..p only)."""
    m = _mod if _threads_set else _lib()
    q = _float_tensor("q", q, "[T, H, dk]")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, dk], got shape {tuple(q.shape)}")
    T, H, dk = q.shape
    kb, ks, khs = _span_view("k", k)
    vb, vs, vhs = _span_view("v", v)
    L, Hkv = k.shape[0], k.shape[1]
    if k.shape[2] != dk or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.dtype != v.dtype:
        raise ValueError(f"k ({k.dtype}) and v ({v.dtype}) must have one element type")
    if L != pos0 + T:
        raise ValueError(f"the cache holds {L} positions, expected pos0 + T = {pos0 + T}")
    dv = v.shape[2]
    y = _out_buffer(out, (T, H, dv))
    m.attn_prefill(q.numpy(), kb, vb, q.numpy() if y is q else y.numpy(), T, int(pos0), H, Hkv,
                   dk, dv, H * dk, H * dv, ks, khs, vs, vhs, float(scale), int(window),
                   k.dtype == torch.float16)
    return y


def attn_prep(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_store: torch.Tensor,
              v_store: torch.Tensor, pos0: int, *, q_norm=None, k_norm=None, qk_norm: int = 0,
              cos=None, sin=None, n_rot: int = 0, neox: bool = False, eps: float = 1e-6,
              biases=(None, None, None)) -> None:
    """Attention inputs of T tokens at positions pos0..: q [T, H, Dh], k and v [T, Hkv, Dh]
    float32 get their biases, q/k RMSNorms (qk_norm 1: per head with [Dh] weights, 2: over all
    heads) and RoPE (cos/sin [n_ctx, n_rot/2], NEOX or adjacent pairs) in place, and k and v are
    written to positions pos0.. of the head-major caches k_store / v_store [Hkv, n_ctx, Dh]
    (float32, or float16: rounded to nearest even). Sizes are checked in C++ against the buffers."""
    m = _mod if _threads_set else _lib()
    T, H, Dh = q.shape
    Hkv = k.shape[1]
    if tuple(k.shape) != (T, Hkv, Dh) or tuple(v.shape) != (T, Hkv, Dh):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"[T, H, Dh] and [T, Hkv, Dh] twice")

    def buf(name, t):
        if t is None:
            return None
        t = _float_tensor(name, t, "")
        return t.numpy()

    def cache(name, t):
        if not isinstance(t, torch.Tensor) or t.dtype not in KV_DTYPES or not t.is_cpu \
                or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 or float16 CPU tensor")
        return t.detach().numpy()
    if k_store.dtype != v_store.dtype:
        raise ValueError(f"k_store ({k_store.dtype}) and v_store ({v_store.dtype}) must have one "
                         f"element type")
    m.attn_prep(buf("q", q), buf("k", k), buf("v", v), *(buf("bias", b) for b in biases),
                buf("q_norm", q_norm), buf("k_norm", k_norm), buf("cos", cos), buf("sin", sin),
                cache("k_cache", k_store), cache("v_cache", v_store), T, H, Hkv, Dh, int(n_rot),
                int(bool(neox)), int(qk_norm), int(pos0), float(eps), k_store.dtype == torch.float16)


class Handle:
    """A fused MoE FFN running on the thread pool; wait() returns its output [T, D]."""

    def __init__(self, h, out: torch.Tensor, keep: tuple):
        self._h, self._out, self._keep = h, out, keep

    def done(self) -> bool:
        return self._h is None or self._h.done()

    def wait(self) -> torch.Tensor:
        if self._h is not None:
            self._h.wait()
            self._h, self._keep = None, ()
        return self._out


def moe_ffn_submit(x, ids, weights, gate, up, down, *, gate_type, up_type, down_type, n_expert, d_model,
                   d_ff, out: torch.Tensor | None = None) -> Handle:
    """Start out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].

    x [T, D] float32; ids [T, k] int32 (int64 accepted); weights [T, k] float32; gate, up [E, F, D] and
    down [E, D, F] as GGUF bytes (uint8 arrays) of gate_type / up_type / down_type. The inputs must not
    change until wait() returns.
    """
    m = _mod if _threads_set else _lib()
    E, D, F = _positive("n_expert", n_expert), _positive("d_model", d_model), _positive("d_ff", d_ff)
    gate = _weight_buffer("gate", gate, E * F * row_bytes(gate_type, D))
    up = _weight_buffer("up", up, E * F * row_bytes(up_type, D))
    down = _weight_buffer("down", down, E * D * row_bytes(down_type, F))
    x = _float_tensor("x", x, f"[T, {D}]")
    if x.dim() != 2 or x.shape[1] != D:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [T, d_model={D}]")
    T = x.shape[0]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != T:
        raise ValueError(f"ids must be a torch.Tensor [T={T}, k], got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 (or int64), got {ids.dtype}")
    k = ids.shape[1]
    if k < 1:
        raise ValueError("ids must have k >= 1 columns")
    # each id is checked against [0, n_expert) in C++, which names the first bad one
    if ids.dtype != torch.int32 or not ids.is_cpu or not ids.is_contiguous():
        ids = ids.detach().to(device="cpu", dtype=torch.int32).contiguous()
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (T, k):
        raise ValueError(f"weights must be a torch.Tensor [T={T}, k={k}], got "
                         f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    if weights.dtype != torch.float32 or not weights.is_cpu or not weights.is_contiguous():
        weights = weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
    y = _out_buffer(out, (T, D))
    h = m.moe_submit(x.numpy(), ids.detach().numpy(), weights.detach().numpy(), gate, up, down, y.numpy(), T, k, E,
                     D, F, gate_type, up_type, down_type)
    return Handle(h, y, (x, ids, weights, gate, up, down))


def moe_ffn(x, ids, weights, gate, up, down, *, gate_type, up_type, down_type, n_expert, d_model,
            d_ff, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused MoE FFN, synchronous; see moe_ffn_submit."""
    return moe_ffn_submit(x, ids, weights, gate, up, down, gate_type=gate_type, up_type=up_type,
                          down_type=down_type, n_expert=n_expert, d_model=d_model, d_ff=d_ff,
                          out=out).wait()


def quantize_act(x: torch.Tensor, ggml_type: int) -> np.ndarray:
    """Rows of x [R, C] float32 in the activation format paired with ggml_type (tests, debugging)."""
    m = _lib()
    info = type_info(ggml_type)
    x = _float_tensor("x", x, "[R, C]")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [R, C], got shape {tuple(x.shape)}")
    R, C = x.shape
    ab = info["act_block"]
    if info["act"] == "F32":       # any width: the last block is zero-padded
        n_blocks = -(-C // ab)
    elif C % ab:
        raise ValueError(f"x has {C} columns, not a multiple of the {info['act']} block size {ab}")
    else:
        n_blocks = C // ab
    out = np.empty(R * n_blocks * info["act_bytes"], dtype=np.uint8)
    m.quantize_act(int(ggml_type), x.numpy(), R, C, out)
    return out.reshape(R, -1)
