"""CPU kernels for IQ4_NL (x Q8_0 activations) and IQ4_XS (x Q8_K): 4-bit indices into ggml's fixed
table of 16 non-linear values, per 32-block f16 scale (IQ4_NL) or a 6-bit scale per 32 under one f16
super-block scale (IQ4_XS). Every variant and token count against float references built with
gguf.quants.dequantize, SIMD against the scalar twin, the torch dequantizers bit-exact with gguf's,
the fused MoE with these types, blocks written by llama.cpp's quantizer, and tiny qwen3moe files that
llama.cpp quantized to IQ4_XS / IQ4_NL run end to end (the fused decode step against the per-op path,
teacher-forced logits within llama.cpp's own quantization noise).

Tolerances are tests/test_cpu_kernels.py's named ones (ACC_TOL: the kernel against the exact
product of what it consumed; Q8_DOT_TOL: against the float reference, the activation's int8
rounding; MOE_TOL / VARIANT_MOE for the fused MoE)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from hetero_moe import cpu_backend as cb
from hetero_moe import quant

from .test_cpu_kernels import ACC_TOL, MOE_TOL, Q8_DOT_TOL, VARIANT_MOE
from .test_cpu_kernels_lowbit import VARIANTS, gaussian, needs_ext, use_variant  # noqa: F401

TYPES = {"IQ4_NL": 20, "IQ4_XS": 23}
TOKENS = [1, 3, 8, 64]


def make_weights(name: str, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """[n_rows, row_bytes] uint8: random index bytes (every index and, for IQ4_XS, every 6-bit
    scale occurs) with finite, well-scaled f16 d."""
    rng = np.random.default_rng(seed)
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(TYPES[name])]
    nb = n_cols // bs
    b = rng.integers(0, 256, size=(n_rows, nb, ts), dtype=np.uint8)
    scale = rng.uniform(0.5, 1.5, size=(n_rows, nb)) * (2e-4 if name == "IQ4_XS" else 5e-3)
    b[:, :, 0:2] = scale.astype(np.float16).view(np.uint8).reshape(n_rows, nb, 2)
    return b.reshape(n_rows, nb * ts)


def dequant(name: str, w: np.ndarray, n_cols: int) -> np.ndarray:
    return gq.dequantize(w, GGMLQuantizationType(TYPES[name])).reshape(-1, n_cols).astype(np.float64)


def act_values(name: str, x: torch.Tensor) -> np.ndarray:
    """The activation values the kernel multiplies: x's Q8_0 (IQ4_NL) or Q8_K (IQ4_XS) blocks."""
    R, C = x.shape
    q = cb.quantize_act(x, TYPES[name])
    if name == "IQ4_NL":
        assert cb.type_info(TYPES[name])["act"] == "Q8_0"
        return gq.dequantize(q, GGMLQuantizationType.Q8_0).reshape(R, C).astype(np.float64)
    assert cb.type_info(TYPES[name])["act"] == "Q8_K"
    b = q.reshape(R, -1, 324)  # f32 d, int8 qs[256], int16 bsums[16], f32 sums32[8]
    d = b[:, :, 0:4].copy().view(np.float32).astype(np.float64)
    return (d * b[:, :, 4:260].view(np.int8).astype(np.float64)).reshape(R, C)


def check_product(name, y, w_deq, x, what):
    xa = act_values(name, x)
    exact = xa @ w_deq.T
    bound = ACC_TOL * (np.abs(xa) @ np.abs(w_deq).T) + 1e-30
    worst = float(np.max(np.abs(y - exact) / bound))
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the ACC_TOL bound"
    ref = x.double().numpy() @ w_deq.T
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel <= Q8_DOT_TOL, f"{what}: relative L2 {rel:.3g} vs the float reference"


@pytest.mark.parametrize("name", list(TYPES))
def test_torch_dequantizer_bit_exact_with_gguf(name):
    w = make_weights(name, 7, 512, seed=1)
    got = quant.dequantize(w, TYPES[name], (7, 512)).numpy()
    np.testing.assert_array_equal(got, dequant(name, w, 512).astype(np.float32))


@needs_ext
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(TYPES))
def test_matmul(name, variant, T, use_variant):
    """37 rows (not a multiple of any row tile), 2 super-blocks / 16 blocks."""
    use_variant(variant)
    w = make_weights(name, 37, 512, seed=T)
    x = gaussian(T, 512, seed=T)
    y = cb.matmul(w, TYPES[name], 37, 512, x).double().numpy()
    check_product(name, y, dequant(name, w, 512), x, f"{name} {variant} T={T}")


@needs_ext
@pytest.mark.parametrize("name", list(TYPES))
def test_variants_agree_with_scalar(name, use_variant):
    w = make_weights(name, 21, 768, seed=5)
    for T in TOKENS:
        x = gaussian(T, 768, seed=9)
        ys = {}
        for v in cb._lib().variants():
            use_variant(v)
            ys[v] = cb.matmul(w, TYPES[name], 21, 768, x).double().numpy()
        for v, y in ys.items():
            np.testing.assert_allclose(y, ys["scalar"], rtol=1e-4, atol=1e-4 * np.abs(ys["scalar"]).max(),
                                       err_msg=f"{name} {v} vs scalar, T={T}")


@needs_ext
@pytest.mark.parametrize("name", list(TYPES))
def test_matmul_prefill_shape(name):
    """512 tokens: several 64-token tiles and row chunks on the thread pool (best variant)."""
    w = make_weights(name, 70, 1024, seed=2)
    x = gaussian(512, 1024, seed=4)
    y = cb.matmul(w, TYPES[name], 70, 1024, x).double().numpy()
    check_product(name, y, dequant(name, w, 1024), x, f"{name} T=512")


@needs_ext
@pytest.mark.parametrize("name", list(TYPES))
def test_dequantize_rows_vs_gguf(name):
    w = make_weights(name, 5, 512, seed=3)
    got = cb.dequantize_rows(w, TYPES[name], 512)
    np.testing.assert_array_equal(got.numpy(), dequant(name, w, 512).astype(np.float32))


@needs_ext
@pytest.mark.parametrize("T", [1, 5, 64])
@pytest.mark.parametrize("types", [("IQ4_XS", "IQ4_XS", "IQ4_XS"), ("IQ4_NL", "IQ4_XS", "IQ4_NL")],
                         ids=lambda t: "-".join(t))
def test_moe_ffn_iq4(types, T, use_variant):
    E, k, D, F = 6, 2, 256, 512
    rng = np.random.default_rng(T)
    x = gaussian(T, D, seed=T)
    ids = torch.from_numpy(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32))
    wts = torch.rand(T, k, generator=torch.Generator().manual_seed(T))
    gate = np.stack([make_weights(types[0], F, D, seed=10 + e) for e in range(E)])
    up = np.stack([make_weights(types[1], F, D, seed=20 + e) for e in range(E)])
    down = np.stack([make_weights(types[2], D, F, seed=30 + e) for e in range(E)])
    xs = x.double()
    ref = torch.zeros(T, D, dtype=torch.float64)
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        Wg = torch.from_numpy(dequant(types[0], gate[e], D))
        Wu = torch.from_numpy(dequant(types[1], up[e], D))
        Wd = torch.from_numpy(dequant(types[2], down[e], F))
        h = torch.nn.functional.silu(xs[tok] @ Wg.T) * (xs[tok] @ Wu.T)
        ref.index_add_(0, tok, (h @ Wd.T) * wts[tok, slot].double()[:, None])
    kw = dict(gate_type=TYPES[types[0]], up_type=TYPES[types[1]], down_type=TYPES[types[2]], n_expert=E,
              d_model=D, d_ff=F)
    outs = {}
    for v in cb._lib().variants():
        use_variant(v)
        outs[v] = cb.moe_ffn(x, ids, wts, gate.reshape(-1), up.reshape(-1), down.reshape(-1), **kw).double()
        rel = ((outs[v] - ref).norm() / ref.norm()).item()
        assert rel <= MOE_TOL, f"{v}: relative L2 {rel:.3g} > {MOE_TOL}"
    for v, o in outs.items():
        rel = ((o - outs["scalar"]).norm() / outs["scalar"].norm()).item()
        assert rel <= VARIANT_MOE, f"{v} vs scalar: {rel:.3g}"


def _tiny(q: str) -> str:
    from hetero_moe.testing.make_model import cached_test_model
    return str(cached_test_model("qwen3moe", preset="tiny", quant=q))


@needs_ext
@pytest.mark.llama
@pytest.mark.parametrize("q", list(TYPES))
def test_matmul_llama_cpp_blocks(q, llama_cpp, use_variant):
    """IQ4 tensors as llama.cpp's quantizer wrote them (real index and scale distributions)."""
    from gguf import GGUFReader
    seen = 0
    for t in GGUFReader(_tiny(q)).tensors:
        if t.tensor_type.name != q:
            continue
        seen += 1
        n_cols = int(t.shape[0])
        w = np.asarray(t.data).reshape(-1, t.data.shape[-1])[:96]
        W = dequant(q, w, n_cols)
        x = gaussian(3, n_cols, 7)
        for v in cb._lib().variants():
            use_variant(v)
            y = cb.matmul(w, TYPES[q], w.shape[0], n_cols, x).double().numpy()
            check_product(q, y, W, x, f"{t.name} ({q}, {v})")
        if seen >= 3:
            break
    assert seen, f"no {q} tensor in the {q} file"


@needs_ext
@pytest.mark.llama
@pytest.mark.parametrize("q", list(TYPES))
def test_tiny_qwen3moe_end_to_end(q, llama_cpp):
    """Every matrix runs on the C++ kernels, the fused decode step builds and agrees with the per-op
    path, and teacher-forced logits stay within llama.cpp's own quantization noise."""
    import hetero_moe
    from hetero_moe.layers.linear import CpuKernelMethod
    from hetero_moe.layers.moe import MoE
    from hetero_moe.runtime import fused_decode

    from .test_parity import _within_reference_noise
    path = _tiny(q)
    m = hetero_moe.load(path, gpu="none", threads=2, n_ctx=512)
    moes = [b.ffn for b in m.net.blocks if isinstance(b.ffn, MoE)]
    assert moes and all(moe.use_kernel for moe in moes) and moes[0].gate.ggml_type == TYPES[q]
    for b in m.net.blocks:
        for lin in (b.attn.q, b.attn.k, b.attn.v, b.attn.o):
            assert isinstance(lin.method, CpuKernelMethod), lin
    ids = torch.randint(10, m.config.n_vocab, (18,), generator=torch.Generator().manual_seed(1)).tolist()
    m.net.fused = None
    m.eval(ids[:-1], 0)
    got = m.eval(ids[-1:], len(ids) - 1)[-1].clone()
    assert isinstance(m.net.fused, fused_decode.FusedDecode), m.net.fused_reason
    m.net.fused = False
    m.eval(ids[:-1], 0)
    want = m.eval(ids[-1:], len(ids) - 1)[-1].clone()
    torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
    del m
    ids = np.random.default_rng(0).integers(3, 49152, size=300).tolist()
    _within_reference_noise(path, ids, "auto", f"qwen3moe tiny {q}")
