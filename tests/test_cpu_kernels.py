"""CPU kernels (hetero_moe._cpu) against float references built with gguf.quants.dequantize.

Named tolerances:
  EXACT        activation quantization: every SIMD variant produces the scalar twin's bytes.
  ACC_TOL      a kernel vs the float64 product of the dequantized weights and the *dequantized int8
               activations it consumed*: only float32 accumulation order differs, so the error is
               bounded by 1e-4 * (|W| @ |x_q|) elementwise (an indexing or scale bug is >= 1e-2).
  Q8_TOL       activation quantization error: symmetric int8 with step amax/127 has RMS error
               step/sqrt(12) ~ amax/440, i.e. ~0.8% of the RMS for Gaussian rows (amax ~ 3.5 sigma);
               a kernel vs the float reference may differ by relative L2 <= 2e-2, the quantized
               activations vs the floats by <= 1e-2.
  MOE_TOL      fused MoE vs a float torch reference: two activation quantizations (x and the hidden
               h) each ~0.8% -> relative L2 <= 4e-2.
  VARIANT_MOE  fused MoE SIMD vs scalar: h is re-quantized, a float rounding difference may move one
               int8 step of h -> relative L2 <= 2e-3.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from hetero_moe import cpu_backend as cb

ACC_TOL = 1e-4
Q8_TOL = 1e-2
Q8_DOT_TOL = 2e-2
MOE_TOL = 4e-2
VARIANT_MOE = 2e-3

TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
GGUF_QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}

needs_ext = pytest.mark.skipif(not cb.available(), reason=f"extension not built: {cb.unavailable_reason()}")


def test_extension_loaded():
    assert cb.available(), cb.unavailable_reason()
    f = cb.features()
    assert f["variant"] in f["variants"] and "scalar" in f["variants"]


def _variants():
    return cb._lib().variants() if cb.available() else ["scalar"]


@pytest.fixture
def variant_scope():
    """Restore the best variant after a test forces one."""
    yield lambda v: cb._lib()._force_variant(v)
    if cb.available():
        cb._lib()._force_variant(None)


# ---------------------------------------------------------------- block makers

def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(*a.shape, 2)


def make_weights(name: str, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """[n_rows, row_bytes] uint8: gguf-quantized Gaussian weights where gguf can quantize the type,
    otherwise random quant bytes with finite, well-scaled f16 scales."""
    rng = np.random.default_rng(seed)
    qt = GGMLQuantizationType(TYPES[name])
    if name in GGUF_QUANTIZABLE:
        return gq.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32) * 0.05, qt)
    bs, ts = GGML_QUANT_SIZES[qt]
    nb = n_cols // bs
    b = rng.integers(0, 256, size=(n_rows, nb, ts), dtype=np.uint8)
    scale = rng.uniform(0.5, 1.5, size=(n_rows, nb)) * 2e-3
    if name == "Q6_K":
        b[:, :, 208:210] = _f16_bytes(scale)
    else:  # Q4_K / Q5_K: d, dmin (dmin smaller, as real files have)
        b[:, :, 0:2] = _f16_bytes(scale)
        b[:, :, 2:4] = _f16_bytes(scale * 0.3)
    return b.reshape(n_rows, nb * ts)


def dequant(name: str, w: np.ndarray, n_cols: int) -> np.ndarray:
    return gq.dequantize(w, GGMLQuantizationType(TYPES[name])).reshape(-1, n_cols).astype(np.float64)


def dequant_act(name: str, q: np.ndarray, n_cols: int, s_err: list | None = None) -> np.ndarray:
    """Float values of the activation blocks produced by cb.quantize_act (layouts in csrc/quant_blocks.h).
    For Q8_1, s_err receives s - d*sum(qs) per block (s is stored in f16, so the min term uses it)."""
    act = cb.type_info(TYPES[name])["act"]
    R = q.shape[0]
    if act == "Q8_K":  # f32 d, int8 qs[256], int16 bsums[16], f32 sums32[8]
        b = q.reshape(R, -1, 324)
        d = b[:, :, 0:4].copy().view(np.float32)
        qs = b[:, :, 4:260].view(np.int8).astype(np.float64)
        bsums = b[:, :, 260:292].copy().view(np.int16)
        assert np.array_equal(bsums, qs.reshape(R, -1, 16, 16).sum(-1)), "bsums must equal the sums of 16 qs"
        return (d.astype(np.float64) * qs).reshape(R, n_cols)
    if act == "Q8_0":
        return gq.dequantize(q, GGMLQuantizationType.Q8_0).reshape(R, n_cols).astype(np.float64)
    b = q.reshape(R, -1, 36)  # Q8_1: f16 d, f16 s = d * sum(qs), int8 qs[32]
    d = b[:, :, 0:2].copy().view(np.float16).astype(np.float64)
    s = b[:, :, 2:4].copy().view(np.float16).astype(np.float64)
    qs = b[:, :, 4:36].view(np.int8).astype(np.float64)
    np.testing.assert_allclose(s, d * qs.sum(-1, keepdims=True), rtol=2e-3, atol=1e-6)
    if s_err is not None:
        s_err.append((s - d * qs.sum(-1, keepdims=True))[:, :, 0])
    return (d * qs).reshape(R, n_cols)


def gaussian(T: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((T, n)).astype(np.float32))


# ---------------------------------------------------------------- activation quantization

@needs_ext
@pytest.mark.parametrize("wname", ["Q8_0", "Q4_1", "Q4_K"])  # -> Q8_0, Q8_1, Q8_K activations
def test_quantize_act_exact_and_accurate(wname, variant_scope):
    n = 512
    x = gaussian(7, n)
    x[3] = 0.0  # an all-zero row must give d = 0 and zeros
    x[4, :40] *= 100.0  # one outlier block
    variant_scope("scalar")
    ref = cb.quantize_act(x, TYPES[wname])
    for v in _variants():
        variant_scope(v)
        assert np.array_equal(cb.quantize_act(x, TYPES[wname]), ref), f"{v} differs from scalar (EXACT)"
    deq = dequant_act(wname, ref, n)
    assert np.all(deq[3] == 0)
    xs = x.double().numpy()
    rows = [0, 1, 2, 5, 6]
    err = np.linalg.norm(deq[rows] - xs[rows]) / np.linalg.norm(xs[rows])
    assert err <= Q8_TOL, f"relative L2 error {err:.3g} > Q8_TOL {Q8_TOL}"


# ---------------------------------------------------------------- matmul

def _check_matmul(name, n_rows, n_cols, T, variant, seed=0):
    t = TYPES[name]
    w = make_weights(name, n_rows, n_cols, seed)
    W = dequant(name, w, n_cols)
    x = gaussian(T, n_cols, seed + 1)
    cb._lib()._force_variant(variant)
    y = cb.matmul(w, t, n_rows, n_cols, x).double().numpy()
    assert y.shape == (T, n_rows)
    s_err = []
    xq = dequant_act(name, cb.quantize_act(x, t), n_cols, s_err)
    exact = xq @ W.T
    if s_err:  # Q4_1/Q5_1: the min term m_w * s_a uses the f16-rounded s
        m_w = w.reshape(n_rows, n_cols // 32, -1)[:, :, 2:4].copy().view(np.float16)[:, :, 0]
        exact += s_err[0] @ m_w.astype(np.float64).T
    bound = ACC_TOL * (np.abs(xq) @ np.abs(W).T) + 1e-30
    worst = float(np.max(np.abs(y - exact) / bound))
    assert worst <= 1.0, f"{name} {variant} T={T}: error {worst:.3g} x ACC_TOL bound"
    ref = x.double().numpy() @ W.T
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel <= Q8_DOT_TOL, f"{name} {variant} T={T}: relative L2 {rel:.3g} vs float reference"
    return y


@needs_ext
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("T", [1, 2, 3, 4, 6, 8, 17])  # 2-8: the small-batch GEMV of 32-blocks
def test_matmul_all_variants(name, T, variant_scope):
    n_cols = 512 if TYPES[name] >= 12 else 96  # 2 super-blocks / 3 blocks: not a multiple of any tile
    ys = {v: _check_matmul(name, 37, n_cols, T, v) for v in _variants()}
    for v, y in ys.items():  # SIMD twin vs scalar twin
        np.testing.assert_allclose(y, ys["scalar"], rtol=1e-4, atol=1e-4 * np.abs(ys["scalar"]).max())


@needs_ext
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0"])
def test_matmul_prefill_shape(name, variant_scope):
    # 512 tokens: several 64-token tiles and row chunks on the thread pool, best variant only
    _check_matmul(name, 70, 1024, 512, cb.features()["best"])


@needs_ext
def test_matmul_leading_dims_and_empty():
    w = make_weights("Q8_0", 5, 64)
    x = gaussian(6, 64).reshape(2, 3, 64)
    y = cb.matmul(w, 8, 5, 64, x)
    assert y.shape == (2, 3, 5)
    assert torch.equal(y.reshape(6, 5), cb.matmul(w, 8, 5, 64, x.reshape(6, 64)))
    assert cb.matmul(w, 8, 5, 64, torch.zeros(0, 64)).shape == (0, 5)


@needs_ext
def test_matmul_readonly_mmap_view(tmp_path):
    w = make_weights("Q4_K", 8, 256)
    p = tmp_path / "w.bin"
    w.tofile(p)
    mm = np.memmap(p, dtype=np.uint8, mode="r").reshape(w.shape)
    x = gaussian(2, 256)
    assert torch.equal(cb.matmul(mm, 12, 8, 256, x), cb.matmul(w, 12, 8, 256, x))


# ---------------------------------------------------------------- fused MoE

def moe_inputs(T, k, E, D, F, types, seed=0):
    gt, ut, dt = types
    rng = np.random.default_rng(seed)
    gate = np.stack([make_weights(gt, F, D, seed + 10 + e) for e in range(E)])
    up = np.stack([make_weights(ut, F, D, seed + 100 + e) for e in range(E)])
    down = np.stack([make_weights(dt, D, F, seed + 1000 + e) for e in range(E)])
    x = gaussian(T, D, seed + 1)
    ids = torch.from_numpy(np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]).astype(np.int32))
    wts = torch.from_numpy(rng.uniform(0.1, 1.0, size=(T, k)).astype(np.float32))
    return x, ids, wts, gate, up, down


def moe_reference(x, ids, wts, gate, up, down, types, D, F):
    gt, ut, dt = types
    xs = x.double()
    out = torch.zeros_like(xs)
    for e in ids.unique().tolist():
        Wg = torch.from_numpy(dequant(gt, gate[e], D))
        Wu = torch.from_numpy(dequant(ut, up[e], D))
        Wd = torch.from_numpy(dequant(dt, down[e], F))
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = torch.nn.functional.silu(xs[tok] @ Wg.T) * (xs[tok] @ Wu.T)
        out.index_add_(0, tok, (h @ Wd.T) * wts[tok, slot].double()[:, None])
    return out


def run_moe(x, ids, wts, gate, up, down, types, E, D, F, submit=False):
    kw = dict(gate_type=TYPES[types[0]], up_type=TYPES[types[1]], down_type=TYPES[types[2]], n_expert=E,
              d_model=D, d_ff=F)
    f = cb.moe_ffn_submit if submit else cb.moe_ffn
    return f(x, ids, wts, gate.reshape(-1), up.reshape(-1), down.reshape(-1), **kw)


MOE_TYPES = [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q8_0", "Q8_0"), ("Q4_0", "Q5_1", "Q5_K"),
             ("Q5_0", "Q4_1", "Q4_K")]


@needs_ext
@pytest.mark.parametrize("types", MOE_TYPES, ids=lambda t: "-".join(t))
@pytest.mark.parametrize("T", [1, 3, 17])
def test_moe_ffn_vs_reference(types, T, variant_scope):
    E, k, D, F = 8, 3, 256, 256
    args = moe_inputs(T, k, E, D, F, types)
    ref = moe_reference(*args, types, D, F)
    outs = {}
    for v in _variants():
        variant_scope(v)
        outs[v] = run_moe(*args, types, E, D, F).double()
        rel = ((outs[v] - ref).norm() / ref.norm()).item()
        assert rel <= MOE_TOL, f"{v}: relative L2 {rel:.3g} > MOE_TOL"
    for v, o in outs.items():
        rel = ((o - outs["scalar"]).norm() / outs["scalar"].norm()).item()
        assert rel <= VARIANT_MOE, f"{v} vs scalar: {rel:.3g}"


@needs_ext
def test_moe_prefill_threads_async():
    types = ("Q4_K", "Q4_K", "Q6_K")
    E, k, D, F, T = 16, 4, 512, 256, 512
    args = moe_inputs(T, k, E, D, F, types, seed=3)
    ref = moe_reference(*args, types, D, F)
    n0 = cb.get_num_threads()
    try:
        cb.set_num_threads(1)
        one = run_moe(*args, types, E, D, F)
        cb.set_num_threads(3)
        h1 = run_moe(*args, types, E, D, F, submit=True)
        h2 = run_moe(*args, types, E, D, F, submit=True)
        three_b, three_a = h2.wait(), h1.wait()  # out of order
    finally:
        cb.set_num_threads(n0)
    rel = ((one.double() - ref).norm() / ref.norm()).item()
    assert rel <= MOE_TOL
    # each output value is summed in a fixed order: identical for any thread count
    assert torch.equal(one, three_a) and torch.equal(one, three_b)


@needs_ext
@pytest.mark.parametrize("T", [1, 4])
def test_moe_decode_split_changes_no_result(T):
    """How a decode step's experts are cut into tasks (_set_moe_decode_split) decides only who
    computes which rows: the output is the same to the bit for any split."""
    from hetero_moe import _cpu
    types = ("Q4_K", "Q4_K", "Q6_K")
    E, k, D, F = 16, 8, 512, 768
    args = moe_inputs(T, k, E, D, F, types, seed=5)
    old = _cpu._set_moe_decode_split(1)
    try:
        outs = []
        for n in (1, 2, 8, 64):
            _cpu._set_moe_decode_split(n)
            outs.append(run_moe(*args, types, E, D, F))
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        with pytest.raises(ValueError, match=r"\[1, 1024\]"):
            _cpu._set_moe_decode_split(0)
    finally:
        _cpu._set_moe_decode_split(old)
    ref = moe_reference(*args, types, D, F)
    assert ((outs[0].double() - ref).norm() / ref.norm()).item() <= MOE_TOL


@needs_ext
def test_moe_duplicate_ids_and_unused_experts():
    types = ("Q8_0", "Q8_0", "Q8_0")
    E, D, F = 6, 64, 64
    x, _, _, gate, up, down = moe_inputs(2, 2, E, D, F, types)
    ids = torch.tensor([[4, 4], [1, 4]], dtype=torch.int64)  # int64 accepted, a repeated expert
    wts = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    out = run_moe(x, ids, wts, gate, up, down, types, E, D, F)
    ref = moe_reference(x, ids.int(), wts, gate, up, down, types, D, F)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= MOE_TOL


# ---------------------------------------------------------------- bad inputs never crash

@needs_ext
def test_bad_matmul_inputs():
    w = make_weights("Q4_K", 4, 256)
    x = gaussian(2, 256)
    with pytest.raises(ValueError, match="not supported"):
        cb.matmul(w, 16, 4, 256, x)  # IQ2_XXS
    with pytest.raises(ValueError, match="w has 576 bytes, expected 720"):
        cb.matmul(w, 12, 5, 256, x)
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        cb.matmul(w, 12, 4, 128, x[:, :128])
    with pytest.raises(ValueError, match="float32"):
        cb.matmul(w, 12, 4, 256, x.double())
    with pytest.raises(ValueError, match="contiguous"):
        cb.matmul(w, 12, 4, 256, gaussian(256, 2).T)
    with pytest.raises(ValueError, match="n_cols=256"):
        cb.matmul(w, 12, 4, 256, gaussian(2, 512))
    with pytest.raises(ValueError, match="uint8"):
        cb.matmul(w.view(np.int8), 12, 4, 256, x)
    with pytest.raises(ValueError, match="n_rows"):
        cb.matmul(w, 12, 0, 256, x)
    lib = cb._lib()  # the C++ checks hold on their own
    out = np.empty((2, 4), np.float32)
    with pytest.raises(ValueError, match="w has"):
        lib.matmul(w[:3], 12, 4, 256, x.numpy(), 2, out)
    with pytest.raises(ValueError, match="out has"):
        lib.matmul(w, 12, 4, 256, x.numpy(), 2, out[:1])
    with pytest.raises(ValueError, match="x has"):
        lib.matmul(w, 12, 4, 256, x.numpy(), 3, np.empty((3, 4), np.float32))
    with pytest.raises(ValueError, match="writable"):
        lib.matmul(w, 12, 4, 256, x.numpy(), 2, b"\0" * 32)


@needs_ext
def test_bad_moe_inputs():
    types = ("Q8_0", "Q8_0", "Q8_0")
    E, k, D, F, T = 4, 2, 64, 64, 3
    x, ids, wts, gate, up, down = moe_inputs(T, k, E, D, F, types)
    kw = dict(gate_type=8, up_type=8, down_type=8, n_expert=E, d_model=D, d_ff=F)
    g, u, d = gate.reshape(-1), up.reshape(-1), down.reshape(-1)
    with pytest.raises(ValueError, match=r"ids\[\d+, \d+\] = \d+ is outside \[0, n_expert=4\)"):
        cb.moe_ffn(x, ids + 2, wts, g, u, d, **kw)
    with pytest.raises(ValueError, match=r"ids\[\d+, \d+\] = -[12] is outside"):
        cb.moe_ffn(x, ids - 2, wts, g, u, d, **kw)
    with pytest.raises(ValueError, match="gate has"):
        cb.moe_ffn(x, ids, wts, g[:-1], u, d, **kw)
    with pytest.raises(ValueError, match="down has"):
        cb.moe_ffn(x, ids, wts, g, u, d, **{**kw, "down_type": 2})
    with pytest.raises(ValueError, match="weights must be"):
        cb.moe_ffn(x, ids, wts[:, :1], g, u, d, **kw)
    with pytest.raises(ValueError, match="ids must be int32"):
        cb.moe_ffn(x, ids.float(), wts, g, u, d, **kw)
    with pytest.raises(ValueError, match="x has shape"):
        cb.moe_ffn(x[:, :32].contiguous(), ids, wts, g, u, d, **kw)
    with pytest.raises(ValueError, match="not supported"):
        cb.moe_ffn(x, ids, wts, g, u, d, **{**kw, "gate_type": 99})
    lib = cb._lib()  # the C++ checks hold on their own
    out = np.empty((T, D), np.float32)
    bad = (ids.numpy() + 3).astype(np.int32)
    with pytest.raises(ValueError, match=r"ids\[0, 0\] = \d+ is outside \[0, n_expert=4\)"):
        lib.moe_submit(x.numpy(), bad, wts.numpy(), g, u, d, out, T, k, E, D, F, 8, 8, 8)
    with pytest.raises(ValueError, match="ids has"):
        lib.moe_submit(x.numpy(), ids.numpy()[:2], wts.numpy(), g, u, d, out, T, k, E, D, F, 8, 8, 8)
    with pytest.raises(ValueError, match="d_ff=48"):
        lib.moe_submit(x.numpy(), ids.numpy(), wts.numpy(), g, u, d, out, T, k, E, D, 48, 8, 8, 8)


@needs_ext
def test_threads_and_variants_api():
    n = cb.get_num_threads()
    with pytest.raises(ValueError):
        cb.set_num_threads(0)
    cb.set_num_threads(2)
    assert cb.get_num_threads() == 2
    cb.set_num_threads(n)
    with pytest.raises(ValueError, match="not supported by this CPU|unknown"):
        cb._lib()._force_variant("sse9")
    assert cb.supports(12) and cb.supports(10) and not cb.supports(16)


@needs_ext
def test_pool_survives_fork():
    import os
    w = make_weights("Q8_0", 64, 256)
    x = gaussian(3, 256)
    y0 = cb.matmul(w, 8, 64, 256, x)
    pid = os.fork()
    if pid == 0:  # the child has no worker threads: ops run on the caller, then new workers start
        ok = torch.equal(cb.matmul(w, 8, 64, 256, x), y0)
        cb.set_num_threads(2)
        ok = ok and torch.equal(cb.matmul(w, 8, 64, 256, x), y0)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0


# ---------------------------------------------------------------- real blocks quantized by llama.cpp

def _llama_quantized(src: str, ftype_name: str) -> str:
    """src requantized by llama.cpp to ftype (cached next to the other test models)."""
    import ctypes

    import llama_cpp

    from hetero_moe.config_env import cache_dir
    dst = cache_dir() / "test-models" / f"cpu-kernels-smollm2-{ftype_name}.gguf"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
        p.allow_requantize = True
        p.nthread = 2
        tmp = dst.with_suffix(".tmp")
        assert llama_cpp.llama_model_quantize(src.encode(), str(tmp).encode(), ctypes.byref(p)) == 0
        tmp.rename(dst)
    return str(dst)


@needs_ext
@pytest.mark.llama
@pytest.mark.parametrize("ftype", ["source", "Q4_K_M", "Q5_K_M"])
def test_matmul_llama_cpp_blocks(ftype, smollm2, llama_cpp, variant_scope):
    """Weights quantized by llama.cpp itself (SmolLM2: Q4_1 source; Q4_K_M / Q5_K_M requantized give
    Q4_K, Q5_K, Q6_K, Q5_0, Q8_0): one tensor of each type against gguf's dequantizer."""
    from gguf import GGUFReader
    path = smollm2 if ftype == "source" else _llama_quantized(smollm2, ftype)
    seen = set()
    for t in GGUFReader(path).tensors:
        name = t.tensor_type.name
        if name not in TYPES or name in seen or len(t.shape) != 2:
            continue
        seen.add(name)
        n_cols, n_rows = int(t.shape[0]), min(int(t.shape[1]), 96)
        w = np.asarray(t.data[:n_rows])  # a read-only memmap slice
        W = dequant(name, w, n_cols)
        x = gaussian(3, n_cols, 7)
        xq = dequant_act(name, cb.quantize_act(x, TYPES[name]), n_cols)
        for v in _variants():
            variant_scope(v)
            y = cb.matmul(w, TYPES[name], n_rows, n_cols, x).double().numpy()
            exact = xq @ W.T
            if cb.type_info(TYPES[name])["act"] != "Q8_1":  # Q8_1's f16 sum is covered above
                bound = ACC_TOL * (np.abs(xq) @ np.abs(W).T) + 1e-30
                assert float(np.max(np.abs(y - exact) / bound)) <= 1.0, f"{t.name} ({name}, {v})"
            ref = x.double().numpy() @ W.T
            rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
            assert rel <= Q8_DOT_TOL, f"{t.name} ({name}, {v}): relative L2 {rel:.3g}"
    assert seen, "no supported tensor type in the file"


# ---------------------------------------------------------------- several matmuls in one job

@needs_ext
@pytest.mark.parametrize("T", [1, 3, 70])
def test_matmul_multi_equals_separate(T, variant_scope):
    """q/k/v-style groups (mixed types, two activation formats) give exactly the single results."""
    n_cols = 512
    names = [("Q4_K", 37), ("Q6_K", 8), ("Q8_0", 21), ("Q4_1", 5)]
    mats = [(make_weights(n, r, n_cols, seed=i), TYPES[n], r) for i, (n, r) in enumerate(names)]
    x = gaussian(T, n_cols, 7)
    for v in _variants():
        variant_scope(v)
        ys = cb.matmul_multi(mats, n_cols, x)
        for (w, t, r), y in zip(mats, ys):
            assert y.shape == (T, r)
            torch.testing.assert_close(y, cb.matmul(w, t, r, n_cols, x), rtol=0, atol=0)


@needs_ext
def test_matmul_multi_bad_inputs():
    w = make_weights("Q4_K", 4, 256)
    x = gaussian(2, 256)
    with pytest.raises(ValueError, match="bytes"):
        cb.matmul_multi([(w, TYPES["Q4_K"], 5)], 256, x)
    with pytest.raises(ValueError, match="1..4"):
        cb.matmul_multi([(w, TYPES["Q4_K"], 4)] * 5, 256, x)
    with pytest.raises(ValueError, match="n_cols"):
        cb.matmul_multi([(w, TYPES["Q4_K"], 4)], 512, x)


# ---------------------------------------------------------------- decode attention

def _attn_reference(q, k, v, scale):
    H, Hkv = q.shape[0], k.shape[1]
    G = H // Hkv
    s = torch.einsum("hgd,lhd->hgl", q.double().view(Hkv, G, -1), k.double()) * scale
    return torch.einsum("hgl,lhd->hgd", torch.softmax(s, -1), v.double()).reshape(H, -1)


@needs_ext
@pytest.mark.parametrize("H,Hkv,dk,dv,L", [
    (32, 4, 128, 128, 1), (32, 4, 128, 128, 300), (9, 3, 64, 64, 1000), (8, 8, 60, 60, 77),
    (16, 2, 192, 128, 65), (7, 7, 8, 8, 5)])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attn_decode_vs_reference(H, Hkv, dk, dv, L, kv, variant_scope):
    """Every variant against a float64 softmax reference; the cache is a prefix view of a longer
    buffer, as in the runtime, in float32 or f16 (the reference reads the same f16 values)."""
    g = torch.Generator().manual_seed(L)
    k = torch.randn(L + 9, Hkv, dk, generator=g).to(kv)[:L]
    v = torch.randn(L + 9, Hkv, dv, generator=g).to(kv)[:L]
    q = torch.randn(H, dk, generator=g)
    want = _attn_reference(q, k, v, dk ** -0.5)
    for var in _variants():
        variant_scope(var)
        got = cb.attn_decode(q, k, v, dk ** -0.5)
        assert got.shape == (H, dv)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
def test_attn_decode_mla_latent_view(variant_scope):
    """MLA's latent cache: one KV head, the value is a prefix of each key row (a strided view)."""
    lat = torch.randn(120, 1, 576)
    k, v = lat[:100], lat[:100, :, :512]
    q = torch.randn(16, 576)
    want = _attn_reference(q, k, v, 0.05)
    for var in _variants():
        variant_scope(var)
        torch.testing.assert_close(cb.attn_decode(q, k, v, 0.05).double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
def test_attn_decode_bad_inputs():
    k = torch.randn(10, 2, 64)
    with pytest.raises(ValueError, match="n_head"):
        cb.attn_decode(torch.randn(3, 64), k, k, 0.1)
    with pytest.raises(ValueError, match="dk"):
        cb.attn_decode(torch.randn(4, 32), k, k, 0.1)
    with pytest.raises(ValueError, match="last dimension"):
        cb.attn_decode(torch.randn(4, 64), k.transpose(0, 2).contiguous().transpose(0, 2), k, 0.1)
    with pytest.raises(ValueError, match="float32"):
        cb.attn_decode(torch.randn(4, 64), k.double(), k, 0.1)
    with pytest.raises(ValueError, match="one element type"):
        cb.attn_decode(torch.randn(4, 64), k.half(), k, 0.1)
    with pytest.raises(ValueError, match="at least one"):
        cb.attn_decode(torch.randn(4, 64), k[:0], k[:0], 0.1)


@needs_ext
@pytest.mark.parametrize("rows,cols", [(128, 2048), (16, 7), (5, 33), (64, 100), (1, 1)])
def test_f32_gemv_vs_reference(rows, cols, variant_scope):
    """Float32 rows times a vector (the fused step's router and MLA head matrices): every variant
    against float64, tails shorter than a vector included, and the bad sizes refused."""
    g = torch.Generator().manual_seed(rows * 31 + cols)
    w = torch.randn(rows, cols, generator=g).numpy()
    x = torch.randn(cols, generator=g).numpy()
    want = w.astype(np.float64) @ x.astype(np.float64)
    bound = 1e-6 * (np.abs(w).astype(np.float64) @ np.abs(x)) + 1e-30
    lib = cb._lib()
    for var in _variants():
        variant_scope(var)
        out = np.empty(rows, np.float32)
        lib.f32_gemv(w, rows, cols, x, out)
        assert np.all(np.abs(out - want) <= bound), var
    with pytest.raises(ValueError, match="expected"):
        lib.f32_gemv(w, rows, cols + 1, x, np.empty(rows, np.float32))


# ---------------------------------------------------------------- prompt attention

def _prefill_reference(q, k, v, pos0, scale):
    """Causal attention of q [T, H, dk] at positions pos0.. over k/v [pos0+T, Hkv, d], float64."""
    T, H, _ = q.shape
    L, Hkv = k.shape[:2]
    G = H // Hkv
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("thd,lhd->htl", q.double(), kk) * scale
    hide = torch.arange(L)[None, :] > (pos0 + torch.arange(T))[:, None]
    s = s.masked_fill(hide[None], float("-inf"))
    return torch.einsum("htl,lhd->thd", torch.softmax(s, -1), vv)


@needs_ext
@pytest.mark.parametrize("T,pos0,H,Hkv,dk,dv", [
    (512, 0, 32, 4, 128, 128), (17, 5, 4, 2, 64, 64), (3, 100, 9, 3, 64, 64), (130, 0, 6, 6, 72, 72),
    (1, 7, 8, 1, 128, 128), (65, 64, 4, 4, 96, 96), (40, 3, 8, 8, 20, 20), (33, 31, 16, 2, 192, 128),
    (1, 0, 32, 4, 128, 128), (1, 530, 32, 4, 128, 128), (1, 40, 6, 6, 72, 72), (1, 20, 16, 2, 192, 128),
    (1, 15, 8, 8, 20, 20), (1, 63, 64, 2, 64, 64), (1, 77, 14, 2, 64, 64), (1, 33, 6, 3, 48, 48),
    (1, 95, 10, 2, 32, 32)])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attn_prefill_vs_reference(T, pos0, H, Hkv, dk, dv, kv, variant_scope):
    """Every variant against float64 causal attention: odd head dims (not multiples of 8 or 16),
    prompts after a cached prefix, partial key blocks, a lone last row, dv != dk; cache views are
    prefixes of a longer buffer, and with dv == dk the output may overwrite q. T = 1 is the decode
    kernel: up to 8 heads per KV head with dk a whole number of vectors take the one-token scores
    (dot products against the key rows as they lie, 1 to 8 rows here), the others the general
    path's transposed key blocks. An f16 cache (kv) is widened on load: the reference reads the
    same f16 values."""
    g = torch.Generator().manual_seed(T * 7 + pos0)
    L = pos0 + T
    k = torch.randn(L + 5, Hkv, dk, generator=g).to(kv)[:L]
    v = torch.randn(L + 5, Hkv, dv, generator=g).to(kv)[:L]
    q = torch.randn(T, H, dk, generator=g)
    want = _prefill_reference(q, k, v, pos0, dk ** -0.5)
    for var in _variants():
        variant_scope(var)
        got = cb.attn_prefill(q, k, v, pos0, dk ** -0.5)
        assert got.shape == (T, H, dv)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        if dv == dk:
            q2 = q.clone()
            assert cb.attn_prefill(q2, k, v, pos0, dk ** -0.5, out=q2) is q2
            torch.testing.assert_close(q2.double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("T,pos0,H,Hkv,dk,dv", [
    (1, 511, 32, 4, 128, 128), (1, 40, 6, 6, 72, 72), (1, 15, 8, 8, 20, 20), (3, 33, 16, 2, 192, 128),
    (70, 0, 8, 2, 64, 64), (1, 0, 12, 1, 40, 40), (20, 40, 4, 1, 64, 64)])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attn_prefill_head_major_cache(T, pos0, H, Hkv, dk, dv, kv, variant_scope):
    """Caches laid out head by head, [Hkv, n_ctx, d] (the fused decode step's): each head's rows
    are back to back, so the kernel reads values in place (f16 ones when one row tile reads a
    block, else widened into scratch once per block); every variant against float64."""
    g = torch.Generator().manual_seed(T + pos0 + dk)
    L = pos0 + T
    kh = torch.randn(Hkv, L + 9, dk, generator=g).to(kv)
    vh = torch.randn(Hkv, L + 9, dv, generator=g).to(kv)
    k, v = kh[:, :L].permute(1, 0, 2), vh[:, :L].permute(1, 0, 2)      # [L, Hkv, d] views
    q = torch.randn(T, H, dk, generator=g)
    want = _prefill_reference(q, k, v, pos0, dk ** -0.5)
    for var in _variants():
        variant_scope(var)
        got = cb.attn_prefill(q, k, v, pos0, dk ** -0.5)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("T,pos0,H,Hkv,dk,window", [
    (100, 0, 4, 1, 64, 8), (40, 70, 4, 1, 64, 33), (65, 3, 8, 2, 72, 64), (1, 90, 4, 1, 32, 5),
    (20, 10, 2, 2, 16, 1), (30, 0, 4, 4, 32, 100), (1, 300, 32, 4, 128, 40), (1, 17, 8, 2, 64, 16),
    (1, 5, 8, 2, 64, 1)])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attn_prefill_sliding_window(T, pos0, H, Hkv, dk, window, kv, variant_scope):
    """A sliding window (token at position p sees keys p-window+1..p): windows smaller than a key
    block, not a multiple of it, of one key, and longer than the context; every variant."""
    g = torch.Generator().manual_seed(T + window)
    L = pos0 + T
    k, v = torch.randn(L, Hkv, dk, generator=g).to(kv), torch.randn(L, Hkv, dk, generator=g).to(kv)
    q = torch.randn(T, H, dk, generator=g)
    G = H // Hkv
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("thd,lhd->htl", q.double(), kk) * dk ** -0.5
    j, i = torch.arange(L)[None, :], (pos0 + torch.arange(T))[:, None]
    s = s.masked_fill(((j > i) | (j <= i - window))[None], float("-inf"))
    want = torch.einsum("htl,lhd->thd", torch.softmax(s, -1), vv)
    for var in _variants():
        variant_scope(var)
        got = cb.attn_prefill(q, k, v, pos0, dk ** -0.5, window=window)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
def test_attn_prefill_bad_inputs():
    k = torch.randn(10, 2, 64)
    q = torch.randn(4, 4, 64)
    with pytest.raises(ValueError, match="pos0 \\+ T"):
        cb.attn_prefill(q, k, k, 0, 0.1)
    with pytest.raises(ValueError, match="n_head"):
        cb.attn_prefill(torch.randn(4, 3, 64), k[:8], k[:8], 4, 0.1)
    with pytest.raises(ValueError, match="do not match"):
        cb.attn_prefill(torch.randn(4, 4, 32), k[:8], k[:8], 4, 0.1)
    with pytest.raises(ValueError, match="out must be"):
        cb.attn_prefill(q, k[:8], k[:8], 4, 0.1, out=torch.empty(4, 4, 32))
    with pytest.raises(ValueError, match="float32"):
        cb.attn_prefill(q, k[:8].double(), k[:8], 4, 0.1)
    with pytest.raises(ValueError, match="one element type"):
        cb.attn_prefill(q, k[:8], k[:8].half(), 4, 0.1)
    with pytest.raises(ValueError, match="window=-1"):
        cb.attn_prefill(q, k[:8], k[:8], 4, 0.1, window=-1)


@needs_ext
@pytest.mark.parametrize("qk_norm", [0, 1, 2])
@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attn_prep_vs_torch(qk_norm, neox, kv, variant_scope):
    """Norms, RoPE (partial rotary dims) and the cache write against the per-op torch path; an
    f16 cache gets the values rounded to nearest even (torch's .half())."""
    from hetero_moe.layers.attention import rms_norm
    T, H, Hkv, Dh, n_rot, pos0, eps = 7, 6, 2, 64, 48, 3, 1e-6
    g = torch.Generator().manual_seed(qk_norm * 2 + neox)
    q, k, v = (torch.randn(T, n, Dh, generator=g) for n in (H, Hkv, Hkv))
    qn = torch.randn(Dh if qk_norm == 1 else H * Dh, generator=g) if qk_norm else None
    kn = torch.randn(Dh if qk_norm == 1 else Hkv * Dh, generator=g) if qk_norm else None
    ang = torch.outer(torch.arange(32.0), 10000.0 ** (-torch.arange(0, n_rot, 2.0) / n_rot))
    cos, sin = ang.cos(), ang.sin()

    def rope(x):
        rot, rest = x[..., :n_rot], x[..., n_rot:]
        c, s = cos[pos0:pos0 + T, None], sin[pos0:pos0 + T, None]
        if neox:
            a, b = rot[..., :n_rot // 2], rot[..., n_rot // 2:]
            r = torch.cat((a * c - b * s, a * s + b * c), -1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            r = torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)
        return torch.cat((r, rest), -1)
    wq, wk = q.clone(), k.clone()
    if qk_norm == 1:
        wq, wk = rms_norm(wq, qn, eps), rms_norm(wk, kn, eps)
    elif qk_norm == 2:
        wq = rms_norm(wq.reshape(T, -1), qn, eps).view(T, H, Dh)
        wk = rms_norm(wk.reshape(T, -1), kn, eps).view(T, Hkv, Dh)
    wq, wk = rope(wq), rope(wk)
    ks, vs = torch.zeros(Hkv, 16, Dh, dtype=kv), torch.zeros(Hkv, 16, Dh, dtype=kv)  # head-major
    kc, vc = ks.transpose(0, 1), vs.transpose(0, 1)                  # [n_ctx, Hkv, Dh] views
    v_in = v.clone()
    for var in _variants():
        variant_scope(var)
        qq, kk, vv = q.clone(), k.clone(), v.clone()
        ks.zero_(), vs.zero_()
        cb.attn_prep(qq, kk, vv, ks, vs, pos0, q_norm=qn, k_norm=kn, qk_norm=qk_norm, cos=cos,
                     sin=sin, n_rot=n_rot, neox=neox, eps=eps)
        torch.testing.assert_close(qq, wq, rtol=1e-5, atol=1e-5)
        if kv == torch.float32:
            torch.testing.assert_close(kc[pos0:pos0 + T], wk, rtol=1e-5, atol=1e-5)
        else:   # within one f16 step of the rounded reference (the f32 values agree to 1e-5)
            torch.testing.assert_close(kc[pos0:pos0 + T].float(), wk.half().float(), rtol=1e-3,
                                       atol=1e-4)
        assert torch.equal(vc[pos0:pos0 + T], v_in.to(kv))      # exact, rounded to nearest even
        assert not kc[:pos0].any() and not kc[pos0 + T:].any()
    with pytest.raises(ValueError, match="k_cache"):
        cb.attn_prep(q, k, v, ks[:, :9], vs[:, :9], pos0 + 5, cos=cos, sin=sin, n_rot=n_rot)
    with pytest.raises(ValueError, match="differ"):
        cb.attn_prep(q, k, v, ks, torch.zeros(Hkv, 12, Dh, dtype=kv), pos0, cos=cos, sin=sin,
                     n_rot=n_rot)
    with pytest.raises(ValueError, match="q_norm"):
        cb.attn_prep(q, k, v, ks, vs, pos0, qk_norm=1, k_norm=torch.ones(Dh), cos=cos, sin=sin,
                     n_rot=n_rot)


@needs_ext
def test_rms_norm_op():
    from hetero_moe.layers.attention import rms_norm
    x, w = torch.randn(37, 300), torch.randn(300)
    torch.testing.assert_close(cb.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    out = torch.empty(37, 300)
    assert cb.rms_norm(x, w, 1e-5, out=out) is out
    with pytest.raises(ValueError, match="out must be"):
        cb.rms_norm(x, w, 1e-5, out=torch.empty(36, 300))
    with pytest.raises(ValueError, match="rms_norm"):
        cb.rms_norm(x, torch.randn(299), 1e-5)


@needs_ext
@pytest.mark.parametrize("name", sorted(TYPES))
def test_dequantize_rows_vs_gguf(name):
    """The C++ row dequantizer (embedding lookups) against gguf's numpy dequantizer."""
    import gguf
    n_rows, n_cols = 5, 512
    w = make_weights(name, n_rows, n_cols, seed=3)
    want = gguf.quants.dequantize(w.reshape(n_rows, -1), gguf.GGMLQuantizationType(TYPES[name]))
    got = cb.dequantize_rows(w.reshape(n_rows, -1), TYPES[name], n_cols)
    np.testing.assert_allclose(got.numpy(), want.reshape(n_rows, n_cols), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="bytes"):
        cb.dequantize_rows(w.reshape(n_rows, -1)[:, :-1], TYPES[name], n_cols)
    with pytest.raises(ValueError, match="multiple"):
        cb.dequantize_rows(w.reshape(n_rows, -1), TYPES[name], n_cols + 1)


def test_gelu_mul_equals_ggml_rounding():
    """The C++ GELU table (prompts and the fused step of GeGLU models) against the torch form of
    ggml's GELU: the input rounded to f16, the result rounded to f16, cut at +-10. Both tables
    use float32 tanh; where 1 + tanh cancels (x near -5) the two tanh implementations leave
    results a few f16 subnormals apart (< 1e-6), everywhere else they agree bit for bit."""
    from hetero_moe.layers.moe import gelu_ggml
    g = torch.cat([torch.randn(70000) * 4, torch.linspace(-12, 12, 5001),
                   torch.tensor([0.0, -0.0, 1e-8, -1e-8, 65504.0, -70000.0, 9.999, 10.0, -10.0])])
    u = torch.randn_like(g)
    u[u == 0] = 1.0                     # randn can return an exact 0 (~1 run in 300): 0/0 below
    got = cb.gelu_mul(g, u)
    want = gelu_ggml(g) * u
    diff = (got - want).abs()
    assert float((diff / u.abs()).max()) < 1e-6
    far = gelu_ggml(g).abs() > 1e-4
    assert torch.equal(got[far], want[far])
    assert int(far.sum()) > 0.8 * g.numel()
    same = g.clone()
    cb.gelu_mul(same, u, out=same)                   # in place
    assert torch.equal(same, got)
    with pytest.raises(ValueError, match="gelu_mul"):
        cb.gelu_mul(g, u[:-1])


# Token counts that take the small-batch GEMV per type (kernels_simd.inc SmallGemv): each row is
# that token's one-token GEMV bit for bit, so a batched decode step of this many rows changes no
# row's rounding.
SMALL_BATCH = {"Q4_0": 8, "Q5_0": 8, "Q8_0": 8, "Q4_1": 8, "Q5_1": 8, "Q4_K": 3, "Q6_K": 2}


@needs_ext
@pytest.mark.parametrize("name", [n for n in TYPES if n in SMALL_BATCH])
@pytest.mark.parametrize("n_cols", [256 * 3, 256 * 8])   # an odd and an even number of blocks
def test_small_batch_rows_equal_one_token_gemv(name, n_cols, variant_scope):
    w = make_weights(name, 40, n_cols, 5)
    x = gaussian(SMALL_BATCH[name], n_cols, 6)
    for v in _variants():
        if v == "scalar":
            continue
        variant_scope(v)
        for T in range(2, SMALL_BATCH[name] + 1):
            y = cb.matmul(w, TYPES[name], 40, n_cols, x[:T])
            alone = torch.cat([cb.matmul(w, TYPES[name], 40, n_cols, x[t:t + 1]) for t in range(T)])
            assert torch.equal(y, alone), f"{name} {v} T={T}: rows differ from the one-token GEMV"
