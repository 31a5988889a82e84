"""CPU kernels for Q2_K, Q3_K (x Q8_K activations) and F16, BF16 (x F32 activations): every variant
and token count against float references built with gguf.quants.dequantize, the fused MoE FFN with
these types, blocks quantized by llama.cpp itself, and a tiny qwen3moe model that llama.cpp
quantized to Q3_K_M and Q2_K run end to end on the kernels (teacher-forced logits vs llama.cpp, the
fused decode step vs the per-op path).

Named tolerances (derivations in tests/test_cpu_kernels.py, whose constants these are):
  ACC_TOL      kernel vs the float64 product of the dequantized weights and the activations it
               consumed (Q8_K-dequantized; for F16/BF16 the floats themselves): float32 accumulation
               order only, <= 1e-4 * (|W| @ |x|) elementwise.
  Q8_DOT_TOL   K-quants vs the float reference: the activation's int8 rounding, relative L2 <= 2e-2.
  FLOAT_DOT_TOL  F16/BF16 vs the float reference: the weights convert exactly and the activations stay
               f32, so only f32 accumulation (over n <= 512 terms, <= n * 2^-24 ~ 3e-5 relative) is
               left: 1e-4. Rounding the activations to f16 (llama.cpp's way) would show as ~3e-4.
  MOE_TOL, VARIANT_MOE  the fused MoE with K-quants (two activation quantizations) and SIMD vs scalar.
  FLOAT_MOE_TOL  the fused MoE with F16/BF16 weights only: no quantization anywhere, 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from hetero_moe import cpu_backend as cb

from .test_cpu_kernels import ACC_TOL, MOE_TOL, Q8_DOT_TOL, VARIANT_MOE

FLOAT_DOT_TOL = 1e-4
FLOAT_MOE_TOL = 1e-4

LOWBIT = {"Q2_K": 10, "Q3_K": 11, "F16": 1, "BF16": 30}
OTHER = {"Q4_K": 12, "Q6_K": 14}
TYPES = {**LOWBIT, **OTHER}
FLOAT_TYPES = {"F16", "BF16"}
VARIANTS = ["scalar", "avx2", "avx512"]
TOKENS = [1, 3, 8, 64]

needs_ext = pytest.mark.skipif(not cb.available(), reason=f"extension not built: {cb.unavailable_reason()}")


@pytest.fixture
def use_variant():
    """Force a kernel variant (skipped, naming the variant, where this CPU cannot run it); the best
    variant is restored afterwards."""
    def force(v):
        have = cb._lib().variants()
        if v not in have:
            pytest.skip(f"this CPU cannot run the {v} kernels (it runs {', '.join(have)}; flags: "
                        f"{ {k: x for k, x in cb.features().items() if isinstance(x, bool)} })")
        cb._lib()._force_variant(v)
    yield force
    if cb.available():
        cb._lib()._force_variant(None)


# ---------------------------------------------------------------- weights and references

def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(*a.shape, 2)


def make_weights(name: str, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """[n_rows, row_bytes] uint8. F16/BF16: Gaussian weights; K-quants: random quant bytes (every
    bit pattern of quants and 4/6-bit scales occurs) with finite, well-scaled f16 d (and dmin)."""
    rng = np.random.default_rng(seed)
    if name in FLOAT_TYPES:
        v = rng.standard_normal((n_rows, n_cols)).astype(np.float32) * 0.05
        h = v.astype(np.float16) if name == "F16" else (v.view(np.uint32) >> 16).astype(np.uint16)
        return h.view(np.uint8).reshape(n_rows, 2 * n_cols)
    if name in OTHER:
        from .test_cpu_kernels import make_weights as other
        return other(name, n_rows, n_cols, seed)
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(TYPES[name])]
    nb = n_cols // bs
    b = rng.integers(0, 256, size=(n_rows, nb, ts), dtype=np.uint8)
    scale = rng.uniform(0.5, 1.5, size=(n_rows, nb)) * 2e-3
    if name == "Q2_K":  # scales[16] qs[64] d dmin
        b[:, :, 80:82] = _f16_bytes(scale)
        b[:, :, 82:84] = _f16_bytes(scale * 0.3)
    else:  # Q3_K: hmask[32] qs[64] scales[12] d
        b[:, :, 108:110] = _f16_bytes(scale)
    return b.reshape(n_rows, nb * ts)


def dequant(name: str, w: np.ndarray, n_cols: int) -> np.ndarray:
    return gq.dequantize(w, GGMLQuantizationType(TYPES[name])).reshape(-1, n_cols).astype(np.float64)


def act_values(name: str, x: torch.Tensor) -> np.ndarray:
    """The activation values the kernel multiplies: x's Q8_K blocks dequantized (layout in
    csrc/quant_blocks.h), or x itself for F16/BF16 (its F32 blocks, checked to be x zero-padded)."""
    R, C = x.shape
    q = cb.quantize_act(x, TYPES[name])
    if name in FLOAT_TYPES:
        blocks = q.view(np.float32).reshape(R, -1)
        assert blocks.shape[1] == -(-C // 8) * 8, "F32 activations come in blocks of 8"
        assert np.array_equal(blocks[:, :C], x.numpy()) and not blocks[:, C:].any(), "F32 blocks = x, zero-padded"
        return x.double().numpy()
    b = q.reshape(R, -1, 324)  # f32 d, int8 qs[256], int16 bsums[16], f32 sums32[8]
    d = b[:, :, 0:4].copy().view(np.float32).astype(np.float64)
    qs = b[:, :, 4:260].view(np.int8).astype(np.float64)
    bsums = b[:, :, 260:292].copy().view(np.int16)
    assert np.array_equal(bsums, qs.reshape(R, -1, 16, 16).sum(-1)), "bsums must equal the sums of 16 qs"
    return (d * qs).reshape(R, C)


def gaussian(T: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((T, n)).astype(np.float32))


def check_product(name: str, y: np.ndarray, w_deq: np.ndarray, x: torch.Tensor, what: str) -> None:
    """y = the kernel's x @ W.T: within ACC_TOL of the exact product of what it consumed, and within
    the type's tolerance of the float reference."""
    xa = act_values(name, x)
    exact = xa @ w_deq.T
    bound = ACC_TOL * (np.abs(xa) @ np.abs(w_deq).T) + 1e-30
    worst = float(np.max(np.abs(y - exact) / bound))
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the ACC_TOL bound"
    ref = x.double().numpy() @ w_deq.T
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    tol = FLOAT_DOT_TOL if name in FLOAT_TYPES else Q8_DOT_TOL
    assert rel <= tol, f"{what}: relative L2 {rel:.3g} vs the float reference (tolerance {tol})"


# ---------------------------------------------------------------- matmul (GEMV for T=1, GEMM above)

@needs_ext
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(LOWBIT))
def test_matmul(name, variant, T, use_variant):
    """37 rows (not a multiple of any row tile); K-quants: 2 super-blocks; F16/BF16 also rows that
    are not whole 8-value blocks (the padded activation block meets the row's tail)."""
    use_variant(variant)
    widths = [512, 100, 13] if name in FLOAT_TYPES else [512]
    for n_cols in widths:
        w = make_weights(name, 37, n_cols, seed=n_cols)
        x = gaussian(T, n_cols, seed=T)
        y = cb.matmul(w, TYPES[name], 37, n_cols, x).double().numpy()
        assert y.shape == (T, 37)
        check_product(name, y, dequant(name, w, n_cols), x, f"{name} {variant} T={T} n_cols={n_cols}")


@needs_ext
@pytest.mark.parametrize("name", list(LOWBIT))
def test_variants_agree_with_scalar(name, use_variant):
    """Every SIMD variant against the scalar twin, at the token counts of each path."""
    n_cols = 512 if name not in FLOAT_TYPES else 300
    w = make_weights(name, 21, n_cols, seed=5)
    for T in TOKENS:
        x = gaussian(T, n_cols, seed=9)
        ys = {}
        for v in cb._lib().variants():
            use_variant(v)
            ys[v] = cb.matmul(w, TYPES[name], 21, n_cols, x).double().numpy()
        for v, y in ys.items():
            np.testing.assert_allclose(y, ys["scalar"], rtol=1e-4, atol=1e-4 * np.abs(ys["scalar"]).max(),
                                       err_msg=f"{name} {v} vs scalar, T={T}")


@needs_ext
@pytest.mark.parametrize("name", list(LOWBIT))
def test_matmul_prefill_shape(name):
    """512 tokens: several 64-token tiles and row chunks on the thread pool (best variant)."""
    n_cols = 1024 if name not in FLOAT_TYPES else 1000
    w = make_weights(name, 70, n_cols, seed=2)
    x = gaussian(512, n_cols, seed=4)
    y = cb.matmul(w, TYPES[name], 70, n_cols, x).double().numpy()
    check_product(name, y, dequant(name, w, n_cols), x, f"{name} T=512")


@needs_ext
@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_activations_exact(variant, use_variant):
    """F32 "quantization" (F16/BF16's activation format) is a copy with a zero-padded last block,
    byte for byte the same in every variant (act_values checks the bytes)."""
    use_variant(variant)
    for n in (8, 13, 256, 1001):
        act_values("F16", gaussian(5, n, seed=n))


@needs_ext
@pytest.mark.parametrize("name", ["Q2_K", "Q3_K"])
def test_quantize_act_q8_k_same_in_every_variant(name, use_variant):
    x = gaussian(4, 512, seed=3)
    use_variant("scalar")
    want = cb.quantize_act(x, TYPES[name])
    for v in cb._lib().variants():
        use_variant(v)
        assert np.array_equal(cb.quantize_act(x, TYPES[name]), want), v


@needs_ext
def test_matmul_multi_mixed_activation_formats(use_variant):
    """q/k/v-style groups mixing Q8_K and F32 activations give exactly the single results."""
    n_cols = 512
    mats = [(make_weights(n, r, n_cols, seed=i), TYPES[n], r)
            for i, (n, r) in enumerate([("Q3_K", 13), ("F16", 8), ("Q2_K", 21), ("BF16", 5)])]
    for T in (1, 3, 70):
        x = gaussian(T, n_cols, 7)
        for v in cb._lib().variants():
            use_variant(v)
            for (w, t, r), y in zip(mats, cb.matmul_multi(mats, n_cols, x)):
                torch.testing.assert_close(y, cb.matmul(w, t, r, n_cols, x), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("name", list(LOWBIT))
def test_dequantize_rows_vs_gguf(name):
    """The C++ row dequantizer (embedding lookups: Q3_K_M files keep token_embd in Q3_K)."""
    n_cols = 512 if name not in FLOAT_TYPES else 100
    w = make_weights(name, 5, n_cols, seed=3)
    got = cb.dequantize_rows(w, TYPES[name], n_cols)
    np.testing.assert_array_equal(got.numpy(), dequant(name, w, n_cols).astype(np.float32))


@needs_ext
def test_bad_inputs_lowbit():
    w = make_weights("Q3_K", 4, 256)
    x = gaussian(2, 256)
    with pytest.raises(ValueError, match="multiple of the Q3_K block size 256"):
        cb.matmul(w, TYPES["Q3_K"], 4, 128, x[:, :128])
    with pytest.raises(ValueError, match="w has 440 bytes, expected n_rows\\*row_bytes = 336"):
        cb._lib().matmul(w, TYPES["Q2_K"], 4, 256, x.numpy(), 2, np.empty((2, 4), np.float32))
    h = make_weights("F16", 4, 13)
    with pytest.raises(ValueError, match="w has 104 bytes, expected n_rows\\*row_bytes = 78"):
        cb._lib().matmul(h, TYPES["BF16"], 3, 13, x[:, :13].contiguous().numpy(), 2, np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="out has"):
        cb._lib().matmul(h, TYPES["F16"], 4, 13, x[:, :13].contiguous().numpy(), 2, np.empty((1, 4), np.float32))
    assert all(cb.supports(t) for t in LOWBIT.values())


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


# (gate, up, down types), D, F: the Q3_K_M and Q2_K file mixes, float experts of widths that are not
# whole 8-blocks (the hidden state's last F32 block is padded), and K-quants feeding an F16 down.
MOE_CASES = [(("Q3_K", "Q3_K", "Q4_K"), 256, 256), (("Q2_K", "Q2_K", "Q3_K"), 256, 256),
             (("F16", "BF16", "F16"), 200, 76), (("Q2_K", "Q3_K", "F16"), 256, 76)]


@needs_ext
@pytest.mark.parametrize("T", [1, 3, 8, 64])
@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: "-".join(c[0]) + f"-D{c[1]}-F{c[2]}")
def test_moe_ffn_lowbit(case, T, use_variant):
    types, D, F = case
    E, k = 8, 3
    x, ids, wts, gate, up, down = moe_inputs(T, k, E, D, F, types, seed=T)
    ref = moe_reference(x, ids, wts, gate, up, down, types, D, F)
    tol = FLOAT_MOE_TOL if set(types) <= FLOAT_TYPES else MOE_TOL
    kw = dict(gate_type=TYPES[types[0]], up_type=TYPES[types[1]], down_type=TYPES[types[2]], n_expert=E,
              d_model=D, d_ff=F)
    outs = {}
    for v in cb._lib().variants():
        use_variant(v)
        outs[v] = cb.moe_ffn(x, ids, wts, gate.reshape(-1), up.reshape(-1), down.reshape(-1), **kw).double()
        rel = ((outs[v] - ref).norm() / ref.norm()).item()
        assert rel <= tol, f"{v}: relative L2 {rel:.3g} > {tol}"
    for v, o in outs.items():
        rel = ((o - outs["scalar"]).norm() / outs["scalar"].norm()).item()
        assert rel <= VARIANT_MOE, f"{v} vs scalar: {rel:.3g}"


# ---------------------------------------------------------------- llama.cpp's own blocks, end to end

N_POS = 300


def _tiny(quant: str) -> str:
    from hetero_moe.testing.make_model import cached_test_model
    return str(cached_test_model("qwen3moe", preset="tiny", quant=quant))


@needs_ext
@pytest.mark.llama
@pytest.mark.parametrize("quant", ["Q3_K_M", "Q2_K"])
def test_matmul_llama_cpp_blocks(quant, llama_cpp, use_variant):
    """Q2_K/Q3_K tensors as llama.cpp's quantizer wrote them (real scale distributions)."""
    from gguf import GGUFReader
    seen = set()
    for t in GGUFReader(_tiny(quant)).tensors:
        name = t.tensor_type.name
        if name not in ("Q2_K", "Q3_K") or name in seen:
            continue
        seen.add(name)
        n_cols = int(t.shape[0])
        w = np.asarray(t.data).reshape(-1, t.data.shape[-1])[:96]   # a read-only memmap slice
        W = dequant(name, w, n_cols)
        x = gaussian(3, n_cols, 7)
        for v in cb._lib().variants():
            use_variant(v)
            y = cb.matmul(w, TYPES[name], w.shape[0], n_cols, x).double().numpy()
            check_product(name, y, W, x, f"{t.name} ({name}, {v})")
    assert seen, f"no Q2_K/Q3_K tensor in the {quant} file"


@needs_ext
@pytest.mark.llama
@pytest.mark.parametrize("quant", ["Q3_K_M", "Q2_K", "F16", "BF16"])
def test_tiny_qwen3moe_end_to_end(quant, llama_cpp):
    """Every matrix of the file runs on the C++ kernels (MoE layers report use_kernel, the fused
    decode step builds and agrees with the per-op path), and teacher-forced logits stay within
    llama.cpp's own quantization noise (tests/test_parity.py's bar; on the F16/BF16 files, where
    that noise is tiny, its 2% floor)."""
    import hetero_moe
    from hetero_moe.layers.linear import CpuKernelMethod
    from hetero_moe.layers.moe import MoE
    from hetero_moe.runtime import fused_decode

    from .test_parity import _within_reference_noise
    path = _tiny(quant)
    m = hetero_moe.load(path, gpu="none", threads=2, n_ctx=512)
    moes = [b.ffn for b in m.net.blocks if isinstance(b.ffn, MoE)]
    assert moes and all(moe.use_kernel for moe in moes)
    for b in m.net.blocks:
        for lin in (b.attn.q, b.attn.k, b.attn.v, b.attn.o):
            assert isinstance(lin.method, CpuKernelMethod), lin
    V = m.config.n_vocab
    ids = torch.randint(10, V, (18,), generator=torch.Generator().manual_seed(1)).tolist()
    m.net.fused = None
    m.eval(ids[:-1], 0)
    got = m.eval(ids[-1:], len(ids) - 1)[-1].clone()
    assert isinstance(m.net.fused, fused_decode.FusedDecode), m.net.fused_reason
    m.net.fused = False
    m.eval(ids[:-1], 0)
    want = m.eval(ids[-1:], len(ids) - 1)[-1].clone()
    torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
    del m
    ids = np.random.default_rng(0).integers(3, 49152, size=N_POS).tolist()
    _within_reference_noise(path, ids, "auto", f"qwen3moe tiny {quant}")
