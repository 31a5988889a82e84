"""GGUF-block Triton kernels (hetero_moe/kernels/triton/gguf.py) vs float64 references built from
gguf's bit-exact numpy dequantizer (`gguf.quants.dequantize`).

Without CUDA the kernels run in Triton's interpreter on CPU tensors; the module picks the mode per
call, so TRITON_INTERPRET is not needed (a subprocess test checks both settings). The compiled
CUDA path is still checked without a GPU: every kernel is compiled to sm_90 code."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
from gguf import GGMLQuantizationType as G  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

from hetero_moe.errors import UnsupportedError  # noqa: E402
from hetero_moe.kernels.triton import gguf as K  # noqa: E402
from hetero_moe.quant import QUANT_TYPES, row_bytes  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
F32, F16, BF16 = 0, 1, 30
TRITON_TYPES = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K]
FLOAT_TYPES = [F32, F16, BF16]


def rel_tol(n_in: int) -> float:
    """Error bound relative to max|y| for fp32 work over n_in terms: each of ~sqrt(n_in) random
    roundings of 2^-24 (sums, products, the in-register dequant), with a margin of 8."""
    return 8 * math.sqrt(n_in) * 2.0 ** -24


# CUDA feeds tl.dot fp16 (x and weight each rounded to 2^-11); torch F16/BF16 matmuls round x
# to the weight's type (BF16: 2^-8). A few of those roundings, relative to max|y|.
CUDA_HALF_TOL = 4 * 2.0 ** -11
CUDA_BF16_TOL = 4 * 2.0 ** -8


def tolerance(ggml_type: int, n_in: int, T: int) -> float:
    if DEV == "cuda":
        if ggml_type == BF16:
            return CUDA_BF16_TOL
        if ggml_type == F16 or (ggml_type in TRITON_TYPES and T > K._GEMV_MAX_T):
            return CUDA_HALF_TOL
    return rel_tol(n_in)


# f16 scale fields inside each block (random bytes there would give inf/NaN)
F16_FIELDS = {Q4_K: [0, 2], Q5_K: [0, 2], Q6_K: [208]}


def random_weight(ggml_type: int, n_out: int, n_in: int, rng, scale: float = 1.0) -> np.ndarray:
    """uint8 [n_out, row_bytes]: valid GGUF rows. Quantized from random floats where gguf's
    quantizer supports the type, else random bytes with sane (finite, similar) f16 scales."""
    if ggml_type in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
        return ref_quantize((rng.standard_normal((n_out, n_in)) * scale).astype(np.float32),
                            G(ggml_type))
    if ggml_type in FLOAT_TYPES:
        x = (rng.standard_normal((n_out, n_in)) * scale).astype(np.float32)
        if ggml_type == F16:
            return x.astype(np.float16).view(np.uint8)
        if ggml_type == BF16:
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.view(np.uint8)
    qt = QUANT_TYPES[ggml_type]
    b = rng.integers(0, 256, (n_out, row_bytes(ggml_type, n_in)), dtype=np.uint8)
    blocks = b.reshape(-1, qt.type_size)
    for off in F16_FIELDS[ggml_type]:
        d = rng.uniform(0.5, 1.0, blocks.shape[0]) * 2.0 ** -6 * scale
        blocks[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b


def dequant64(b: np.ndarray, ggml_type: int) -> np.ndarray:
    return ref_dequantize(b, G(ggml_type)).astype(np.float64)


def dev_bytes(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).reshape(-1).copy()).to(DEV)


def max_err(y: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(y.double().cpu().numpy() - ref).max())


# ---------------------------------------------------------------------------------- matmul

SHAPES = {  # type -> [(n_out, n_in)]: n_out never a multiple of the N tiles
    **{t: [(80, 512), (300, 768)] for t in (Q4_K, Q5_K, Q6_K)},
    **{t: [(80, 96), (300, 160)] for t in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, *FLOAT_TYPES)},
}
MATMUL_CASES = [(t, n_out, n_in) for t in TRITON_TYPES + FLOAT_TYPES for n_out, n_in in SHAPES[t]]


def _name(t: int) -> str:
    return QUANT_TYPES[t].name


@pytest.mark.parametrize("ggml_type,n_out,n_in", MATMUL_CASES,
                         ids=[f"{_name(t)}-{n}x{k}" for t, n, k in MATMUL_CASES])
def test_matmul_vs_dequant(ggml_type, n_out, n_in):
    rng = np.random.default_rng(ggml_type * 1000 + n_out)
    b = random_weight(ggml_type, n_out, n_in, rng)
    W = dequant64(b, ggml_type)                                       # [n_out, n_in]
    w = dev_bytes(b)
    for T in (1, 3, 8, 64):
        x = torch.from_numpy(rng.standard_normal((T, n_in)).astype(np.float32))
        ref = x.double().numpy() @ W.T
        y = K.matmul(x.to(DEV), w, ggml_type, n_out, n_in)
        assert y.dtype == torch.float32 and tuple(y.shape) == (T, n_out)
        err, ymax = max_err(y, ref), float(np.abs(ref).max())
        # yardstick: an fp32 torch matmul of the same dequantized weight
        yard = max_err(x @ torch.from_numpy(W.astype(np.float32)).T, ref)
        tol = tolerance(ggml_type, n_in, T) * ymax
        assert err <= tol, (f"{_name(ggml_type)} T={T}: err {err:.3g} > tol {tol:.3g} "
                            f"(max|y| {ymax:.3g}, fp32 torch {yard:.3g})")


def test_matmul_out_2d_weight_and_half_inputs():
    rng = np.random.default_rng(7)
    n_out, n_in = 48, 256
    b = random_weight(Q4_K, n_out, n_in, rng)
    W = dequant64(b, Q4_K)
    w2d = torch.from_numpy(b.copy()).to(DEV)                         # [n_out, row_bytes]
    for T, dtype in ((2, torch.float16), (20, torch.bfloat16)):
        x = torch.from_numpy(rng.standard_normal((T, n_in)).astype(np.float32)).to(dtype)
        ref = x.double().numpy() @ W.T
        out = torch.full((T, n_out), float("nan"), device=DEV)
        y = K.matmul(x.to(DEV), w2d, Q4_K, n_out, n_in, out=out)
        assert y.data_ptr() == out.data_ptr()
        assert max_err(out, ref) <= tolerance(Q4_K, n_in, T) * np.abs(ref).max()


def test_kernel_table_drives_dispatch(monkeypatch):
    for t in K.SUPPORTED:
        assert K.supports(t)
        for cls in ("gemv", "dot"):
            kind = K.KERNEL_TABLE[(t, cls)].kind
            assert kind == ("torch" if t in FLOAT_TYPES else cls)
    assert not K.supports(10) and not K.supports(11)     # Q2_K, Q3_K: float16 copies instead
    calls = []
    entry = K.KERNEL_TABLE[(Q8_0, "dot")]
    spy = K.KernelEntry(entry.kind, lambda *a: calls.append(a[-1]) or entry.run(*a),
                        entry.cuda, entry.interp)
    monkeypatch.setitem(K.KERNEL_TABLE, (Q8_0, "dot"), spy)
    b = random_weight(Q8_0, 16, 64, np.random.default_rng(1))
    K.matmul(torch.randn(9, 64, device=DEV), dev_bytes(b), Q8_0, 16, 64)
    assert calls == [spy]


# ---------------------------------------------------------------------------------- grouped MoE

E, TOP_K = 8, 2
SLOT_OF = [3, -1, 0, 4, -1, 1, -1, 2]   # experts 1, 4, 6 not resident; slot order scrambled
IDLE = 3                                # resident (slot 4) but never routed


def silu(v):
    return v / (1.0 + np.exp(-v))


def moe_reference(x, ids, wts, slot_of, Wg, Wu, Wd):
    """float64 [T, D]: per pair dequantized FFN, weighted; non-resident experts add 0."""
    y = np.zeros((x.shape[0], Wd[0].shape[0]))
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            s = slot_of[ids[t, k]]
            if s >= 0:
                h = silu(Wg[s] @ x[t]) * (Wu[s] @ x[t])
                y[t] += wts[t, k] * (Wd[s] @ h)
    return y


MOE_CASES = [  # gate, up, down, D, d_ff
    (Q4_K, Q4_K, Q6_K, 256, 512),
    (Q8_0, Q4_0, Q8_0, 96, 160),
    (Q5_0, Q4_1, Q5_1, 96, 160),
    (F16, F16, BF16, 96, 48),
]


@pytest.mark.parametrize("gt,ut,dt,D,F", MOE_CASES,
                         ids=[f"{_name(a)}-{_name(b)}-{_name(c)}-D{d}"
                              for a, b, c, d, _ in MOE_CASES])
def test_moe_grouped_vs_reference(gt, ut, dt, D, F):
    rng = np.random.default_rng(gt * 100 + dt)
    S = sum(s >= 0 for s in SLOT_OF)
    # weights scaled ~1/sqrt(fan-in) so silu sees O(1) inputs
    gate = [random_weight(gt, F, D, rng, 1 / math.sqrt(D)) for _ in range(S)]
    up = [random_weight(ut, F, D, rng, 1 / math.sqrt(D)) for _ in range(S)]
    down = [random_weight(dt, D, F, rng, 1 / math.sqrt(F)) for _ in range(S)]
    Wg = [dequant64(b, gt) for b in gate]
    Wu = [dequant64(b, ut) for b in up]
    Wd = [dequant64(b, dt) for b in down]
    stack = lambda bs: torch.from_numpy(np.stack([b.reshape(-1) for b in bs])).to(DEV)  # noqa
    slot_of = torch.tensor(SLOT_OF, dtype=torch.int32, device=DEV)
    routable = [e for e in range(E) if e != IDLE]
    for T in (1, 5, 40):
        x = rng.standard_normal((T, D)).astype(np.float32)
        ids = np.stack([rng.choice(routable, TOP_K, replace=False) for _ in range(T)])
        if T > 1:
            ids[0] = [1, 4]                         # a token with no resident expert at all
        wts = rng.uniform(0.1, 1.0, (T, TOP_K)).astype(np.float32)
        ref = moe_reference(x.astype(np.float64), ids, wts, SLOT_OF, Wg, Wu, Wd)
        y = K.moe_grouped(torch.from_numpy(x).to(DEV), torch.from_numpy(ids).to(DEV),
                          torch.from_numpy(wts).to(DEV), slot_of, stack(gate), stack(up),
                          stack(down), gt, ut, dt, F)
        assert y.dtype == torch.float32 and tuple(y.shape) == (T, D)
        if T > 1:
            assert not y[0].any()
        tol = (tolerance(max(gt, ut), D, T + 9) + tolerance(dt, F, T + 9)) * np.abs(ref).max()
        err = max_err(y, ref)
        assert err <= tol, f"T={T}: err {err:.3g} > tol {tol:.3g}"


def test_moe_tile_table_groups_by_slot():
    ids = torch.tensor([[0, 2], [2, 5], [7, 1], [2, 0]])
    slot_of = torch.tensor(SLOT_OF, dtype=torch.int32)
    order, slot, r0, r1, n_tiles = K._tile_table(slot_of, ids, 5, 2)
    flat = ids.reshape(-1)
    keys = [SLOT_OF[e] if SLOT_OF[e] >= 0 else 5 for e in flat[order].tolist()]
    assert keys == sorted(keys)
    tiles = [(int(s), int(a), int(b)) for s, a, b in zip(slot, r0, r1) if s >= 0]
    # slot 0 (expert 2): rows 0..2 in tiles of 2; slot 2 (expert 7); slot 3 (expert 0): 2 rows;
    # slot 1 (expert 5): 1 row; slot 4 (expert 3): none
    assert tiles == [(0, 0, 3), (0, 2, 3), (1, 3, 4), (2, 4, 5), (3, 5, 7)]
    assert n_tiles == 4 + 5 and (slot[len(tiles):] == -1).all()


# ---------------------------------------------------------------------------------- errors

def test_errors_name_the_value():
    x = torch.randn(2, 256)
    w = torch.zeros(10 * 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"1439 bytes, expected 1440"):
        K.matmul(x, w[:-1], Q4_K, 10, 256)
    with pytest.raises(UnsupportedError, match=r"Q3_K \(type 11\)"):
        K.matmul(x, w, 11, 10, 256)
    with pytest.raises(UnsupportedError, match=r"type 999"):
        K.matmul(x, w, 999, 10, 256)
    with pytest.raises(ValueError, match=r"n_in = 100 must be a positive multiple of 256"):
        K.matmul(torch.randn(2, 100), w, Q4_K, 10, 100)
    with pytest.raises(ValueError, match=r"n_in = 40 must be a positive multiple of 32"):
        K.matmul(torch.randn(2, 40), w, Q4_0, 10, 40)
    with pytest.raises(ValueError, match=r"x has 128 columns, expected n_in = 256"):
        K.matmul(torch.randn(2, 128), w, Q4_K, 10, 256)
    with pytest.raises(TypeError, match=r"uint8.*torch.float32"):
        K.matmul(x, w.float(), Q4_K, 10, 256)
    with pytest.raises(TypeError, match=r"x must be float32.*torch.int64"):
        K.matmul(x.long(), w, Q4_K, 10, 256)
    with pytest.raises(ValueError, match=r"w is on meta but x is on cpu"):
        K.matmul(x, w.to("meta"), Q4_K, 10, 256)
    with pytest.raises(ValueError, match=r"out must be \[2, 10\]"):
        K.matmul(x, w, Q4_K, 10, 256, out=torch.empty(2, 11))
    slot_of = torch.tensor([0, -1], dtype=torch.int32)
    ids, wts = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    g = torch.zeros(1, 256 * 144, dtype=torch.uint8)       # one slot, D = d_ff = 256, Q4_K
    with pytest.raises(TypeError, match=r"slot_of must be int32"):
        K.moe_grouped(x, ids, wts, slot_of.long(), g, g, g, Q4_K, Q4_K, Q4_K, 256)
    with pytest.raises(ValueError, match=r"d_ff \(down\) = 8 must be a positive multiple of 256"):
        K.moe_grouped(x, ids, wts, slot_of, g, g, g, Q4_K, Q4_K, Q4_K, 8)
    with pytest.raises(ValueError, match=r"gate holds 36863 bytes, expected 36864"):
        K.moe_grouped(x, ids, wts, slot_of, g[:, 1:], g, g, Q4_K, Q4_K, Q4_K, 256)
    with pytest.raises(TypeError, match=r"ids must be an integer tensor"):
        K.moe_grouped(x, wts, wts, slot_of, g, g, g, Q4_K, Q4_K, Q4_K, 256)


# ---------------------------------------------------------------------------------- modes

_SUBPROCESS = """
import numpy as np, torch
from gguf.quants import quantize, dequantize
from gguf import GGMLQuantizationType as G
from hetero_moe.kernels.triton import gguf as K
w = quantize(np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32), G.Q8_0)
x = torch.randn(3, 64)
y = K.matmul(x, torch.from_numpy(w.reshape(-1).copy()), 8, 40, 64)
ref = x.double().numpy() @ dequantize(w, G.Q8_0).astype(np.float64).T
assert np.abs(y.numpy() - ref).max() < 1e-4 * np.abs(ref).max()
print("OK", sorted(K._GEMV._built))
"""


@pytest.mark.parametrize("interpret", [None, "1"])
def test_cpu_tensors_interpret_whatever_the_env(interpret):
    """The module imported with or without TRITON_INTERPRET runs CPU tensors interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = interpret
    r = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK ['interpret']" in r.stdout


# The compiled path, without a GPU: compile each kernel to sm_90 code (PTX + cubin), which
# type-checks the kernel source and its layouts; the interpreter checks the numbers above.
_PTR = {F32: "*fp32", F16: "*fp16", BF16: "*bf16"}
_W = lambda p, t: {f"{p}b": "*u8", f"{p}h": _PTR.get(t, "*fp16"), f"{p}i": "*i8"}  # noqa
_SIG = {
    "_GEMV": lambda t: {"x_ptr": "*fp32", "sx": "i32", **_W("w", t), "y_ptr": "*fp32",
                        "sy": "i32", "T": "i32", "n_out": "i32", "row_stride": "i32",
                        "n_in": "i32", "k_split": "i32"},
    "_GEMM": lambda t: {"x_ptr": "*fp32", "sx": "i32", **_W("w", t), "y_ptr": "*fp32",
                        "sy": "i32", "T": "i32", "n_out": "i32", "row_stride": "i32",
                        "n_in": "i32"},
    "_MOE_GATE_UP": lambda t: {"x_ptr": "*fp32", "sx": "i32", "order_ptr": "*i64",
                               "tile_slot_ptr": "*i32", "tile_r0_ptr": "*i64",
                               "tile_r1_ptr": "*i64", "k_top": "i32", **_W("g", t),
                               "g_row": "i32", "g_slot": "i32", **_W("u", t), "u_row": "i32",
                               "u_slot": "i32", "h_ptr": "*fp32", "F": "i32", "D": "i32"},
    "_MOE_DOWN": lambda t: {"h_ptr": "*fp32", "order_ptr": "*i64", "tile_slot_ptr": "*i32",
                            "tile_r0_ptr": "*i64", "tile_r1_ptr": "*i64", "wt_ptr": "*fp32",
                            **_W("d", t), "d_row": "i32", "d_slot": "i32", "y_ptr": "*fp32",
                            "D": "i32", "F": "i32"},
}


def _constexprs(kernel: str, t: int) -> tuple[dict, K.Tiles]:
    if kernel == "_GEMV":
        tl_ = K._GEMV_TILES_CUDA
        return dict(QT=t, TP=4, BN=tl_.block_n, BK=tl_.block_k, ATOMIC=True, F32=False), tl_
    if kernel == "_GEMM":
        tl_ = K._DOT_TILES_CUDA
        return dict(QT=t, BM=tl_.block_m, BN=tl_.block_n, BK=tl_.block_k, F32=False), tl_
    tl_ = K._MOE_TILES_CUDA
    c = dict(BM=tl_.block_m, BN=tl_.block_n, BK=tl_.block_k, F32=False)
    return ({**c, "GT": t, "UT": t} if kernel == "_MOE_GATE_UP" else {**c, "DT": t}), tl_


def _compile_sm90(kernel: str, t: int):
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget
    consts, tiles = _constexprs(kernel, t)
    sig = {**_SIG[kernel](t), **{k: "constexpr" for k in consts}}
    fn = getattr(K, kernel)._get("compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            c = compiler.compile(compiler.ASTSource(fn, sig, consts),
                                 target=GPUTarget("cuda", 90, 32),
                                 options=dict(num_warps=tiles.num_warps,
                                              num_stages=tiles.num_stages))
        except (ImportError, KeyError, RuntimeError) as e:
            if "ptxas" in str(e) or "backend" in str(e).lower():
                pytest.skip(f"no CUDA backend to compile with: {e}")
            raise
    assert ".entry" in c.asm["ptx"] and c.asm["cubin"]


def _compile_in_subprocess(types_: list[int]) -> None:
    """Compile every kernel for `types_` in a fresh process without TRITON_INTERPRET (with it
    set at import, triton's own jit helpers such as tl.standard's are interpreted objects)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = ("import tests.test_triton_gguf as T\n"
            f"for t in {types_!r}:\n"
            "    for k in sorted(T._SIG):\n"
            "        T._compile_sm90(k, t)\n"
            "print('OK')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
    if "Skipped" in r.stderr:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_kernels_compile_for_cuda():
    _compile_in_subprocess([Q6_K])      # the deepest dequant branch


@pytest.mark.slow
def test_kernels_compile_for_cuda_every_type():
    _compile_in_subprocess(TRITON_TYPES + FLOAT_TYPES)
