"""Row-interleaved weights (Q2_K, Q3_K, Q4_K, Q6_K, IQ4_XS, IQ4_NL, Q4_0, Q5_0, Q8_0 -> their _R16 forms, csrc/quant_blocks.h),
converted at load.

The layout is checked three ways: repack then unpack gives back every byte (a transcription of
Q4_K's 6-bit scale packing in both directions); the R16 kernels of every variant against the float
product of gguf's dequantized weights and the int8 activations they consumed (ACC_TOL, as the
other kernels); the SIMD variants against the scalar twin. End to end, a model loaded with and
without repacking gives the same logits up to float32 summation order.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hetero_moe
from hetero_moe import cpu_backend as cb

from .conftest import tiny_model
from . import test_cpu_kernels as _k
from . import test_cpu_kernels_iq4 as _iq4
from . import test_cpu_kernels_lowbit as _lowbit
from .test_cpu_kernels import ACC_TOL, MOE_TOL, Q8_DOT_TOL, gaussian, moe_inputs, moe_reference


LOWBIT = ("Q2_K", "Q3_K")


# Q2_K and Q3_K weights come from the low-bit tests' maker (IQ4_XS, IQ4_NL from the IQ4 tests') (random quant bytes: every code, hmask bit and
# 6-bit scale pattern occurs) and gguf's dequantizer; its activations are Q8_K blocks, as Q6_K's
def _maker(name):
    return _lowbit if name in LOWBIT else _iq4 if name.startswith("IQ4") else _k


def make_weights(name, n_rows, n_cols, seed=0):
    return _maker(name).make_weights(name, n_rows, n_cols, seed)


def dequant(name, w, n_cols):
    return _maker(name).dequant(name, w, n_cols)


def dequant_act(name, q, n_cols):
    # the activation blocks of the type's kind: Q8_K (as Q6_K's) or Q8_0 (as Q4_0's)
    return _k.dequant_act({"IQ4_NL": "Q4_0"}.get(name, "Q6_K" if name in LOWBIT + ("IQ4_XS",) else name),
                          q, n_cols)

Q4_K, Q4_K_R16, Q6_K, Q6_K_R16 = 12, 112, 14, 114
R16 = {"Q4_K": (Q4_K, Q4_K_R16, 144), "Q6_K": (Q6_K, Q6_K_R16, 210), "Q3_K": (11, 111, 110),
       "Q2_K": (10, 110, 84), "IQ4_XS": (23, 123, 136), "IQ4_NL": (20, 120, 18),
       "Q4_0": (2, 115, 18),
       "Q5_0": (6, 116, 22), "Q8_0": (8, 117, 34)}
ALL_R16 = list(R16)
needs_ext = pytest.mark.skipif(not cb.available(), reason=f"extension not built: {cb.unavailable_reason()}")


def _variants():
    return cb._lib().variants() if cb.available() else ["scalar"]


@pytest.fixture
def variant_scope():
    yield lambda v: cb._lib()._force_variant(v)
    if cb.available():
        cb._lib()._force_variant(None)


def test_avx512_variant_present_or_said():
    """The 512-bit variant is tested wherever the CPU has it; say so where it does not."""
    if not cb.available():
        pytest.skip("extension not built")
    f = cb.features()
    if not (f["avx512f"] and f["avx512bw"] and f["avx512vl"] and f["avx512dq"] and f["avx512vnni"]):
        pytest.skip("this CPU lacks AVX-512 (F/BW/VL/DQ/VNNI): the 512-bit R16 kernels are not run here")
    assert "avx512" in _variants()


@needs_ext
def test_type_facts():
    info = cb.type_info(Q4_K_R16)
    assert (info["name"], info["block"], info["bytes"], info["group"], info["act"]) == \
        ("Q4_K_R16", 256, 144, 16, "Q8_K")
    assert cb.repacked_type(Q4_K) == Q4_K_R16
    info = cb.type_info(Q6_K_R16)
    assert (info["name"], info["block"], info["bytes"], info["group"], info["act"]) == \
        ("Q6_K_R16", 256, 210, 16, "Q8_K")
    assert cb.repacked_type(Q6_K) == Q6_K_R16
    for name, (t, tr, rbytes) in R16.items():
        info = cb.type_info(tr)
        assert (info["name"], info["bytes"], info["group"]) == (name + "_R16", rbytes, 16)
        assert cb.repacked_type(t) == tr
    assert cb.repacked_type(3) is None           # Q4_1: no interleaved layout
    assert cb.repack_pays(2) and cb.repack_pays(6) and not cb.repack_pays(3)
    # Q4_K_R16, Q6_K_R16 and Q8_0_R16 are converted at load only where the kernels have VNNI (their
    # AVX2 prompt kernels are slower than the plain ones); Q3_K_R16 and Q2_K_R16 as well
    vnni = cb.features()["variant"] == "avx512"
    assert cb.repack_pays(Q4_K) == vnni and cb.repack_pays(Q6_K) == vnni and cb.repack_pays(8) == vnni
    assert cb.repack_pays(11) == vnni and cb.repack_pays(10) == vnni      # Q3_K, Q2_K likewise


@needs_ext
@pytest.mark.parametrize("rows,cols", [(16, 256), (48, 1024), (144, 512)])
@pytest.mark.parametrize("tname", ALL_R16)
def test_repack_roundtrip_exact(tname, rows, cols):
    t, _, rbytes = R16[tname]
    w = make_weights(tname, rows, cols, seed=rows).reshape(-1)
    r16 = cb.repack(w, t, rows, cols)
    assert r16.nbytes == rows * (cols // cb.type_info(t)["block"]) * rbytes
    assert not np.array_equal(r16, w)
    assert np.array_equal(cb.repack(r16, t, rows, cols, unpack=True), w)


@needs_ext
def test_repack_layout_by_hand():
    """One group, one super-block: the bytes where quant_blocks.h says they are."""
    w = make_weights("Q4_K", 16, 256, seed=5).reshape(16, 144)
    r16 = cb.repack(w.reshape(-1), Q4_K, 16, 256)
    assert np.array_equal(r16[0:32].view(np.uint16), w[:, 0:2].copy().view(np.uint16)[:, 0])    # d[16]
    assert np.array_equal(r16[32:64].view(np.uint16), w[:, 2:4].copy().view(np.uint16)[:, 0])   # dmin[16]
    assert np.array_equal(r16[64:256].reshape(12, 16), w[:, 4:16].T)    # packed scales, byte-major
    # values: gguf's dequantizer is the reference for which nibble is which value and for the
    # 6-bit scale packing (decoded here as Q4_K defines it)
    W = dequant("Q4_K", w, 256)                                     # [16, 256]
    qs = r16[256:].reshape(4, 8, 16, 4)                             # [k, c, row, byte]
    d = w[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float64)
    dmin = w[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64)
    for i in range(16):
        p = r16[64:256].reshape(12, 16)[:, i].astype(np.int64)
        for j in range(8):
            if j < 4:
                sc, m = p[j] & 63, p[j + 4] & 63
            else:
                sc, m = (p[j + 4] & 15) | (p[j - 4] >> 6) << 4, (p[j + 4] >> 4) | (p[j] >> 6) << 4
            k, sh = j // 2, 4 * (j % 2)
            q = ((qs[k, :, i, :].reshape(32) >> sh) & 15).astype(np.float64)   # values 32j..32j+31
            np.testing.assert_allclose(d[i] * sc * q - dmin[i] * m, W[i, 32 * j:32 * j + 32], rtol=0, atol=1e-6)


@needs_ext
def test_repack_q6_k_layout_by_hand():
    """Q6_K_R16, one group, one super-block: each value decoded where quant_blocks.h says it is,
    against gguf's dequantizer."""
    w = make_weights("Q6_K", 16, 256, seed=6).reshape(16, 210)
    r16 = cb.repack(w.reshape(-1), Q6_K, 16, 256)
    W = dequant("Q6_K", w, 256)                                     # [16, 256]
    d = r16[0:32].view(np.float16).astype(np.float64)               # d[16]
    np.testing.assert_array_equal(r16[0:32].view(np.uint16), w[:, 208:210].copy().view(np.uint16)[:, 0])
    scales = r16[32:288].view(np.int8).reshape(8, 16, 2)            # [pair, row, e]
    q = r16[288:].reshape(2, 2, 4, 3, 16, 4)                       # [n, c // 4, c % 4, slot, row, byte]
    ql = q[:, :, :, [0, 2]].transpose(0, 3, 1, 2, 4, 5).reshape(2, 2, 8, 16, 4)  # [n, m % 2, c, row, byte]
    qh = q[:, :, :, 1].reshape(2, 8, 16, 4)                         # [n, c, row, byte]
    for i in range(16):
        for n in range(2):
            for m in range(4):
                l = np.arange(32)
                lo = (ql[n, m % 2, l // 4, i, l % 4] >> (4 * (m // 2))) & 15
                hi = (qh[n, l // 4, i, l % 4] >> (2 * m)) & 3
                v = 128 * n + 32 * m + l
                sc = scales[v // 32, i, (v // 16) % 2].astype(np.float64)
                np.testing.assert_allclose(d[i] * sc * ((lo | hi << 4).astype(np.float64) - 32), W[i, v],
                                           rtol=0, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("tname", ["Q4_0", "Q5_0", "Q8_0"])
def test_repack_32_layout_by_hand(tname):
    """Q4_0/Q5_0/Q8_0_R16, one group, one 32-column block: each value decoded where
    quant_blocks.h says it is, against gguf's dequantizer."""
    t, _, rb = R16[tname]
    w = make_weights(tname, 16, 32, seed=7).reshape(16, rb)
    r16 = cb.repack(w.reshape(-1), t, 16, 32)
    W = dequant(tname, w, 32)                                       # [16, 32]
    d = r16[0:32].view(np.float16).astype(np.float64)
    np.testing.assert_array_equal(r16[0:32].view(np.uint16), w[:, 0:2].copy().view(np.uint16)[:, 0])
    j = np.arange(32)
    for i in range(16):
        if tname == "Q8_0":
            u = r16[32:].reshape(8, 16, 4)[j // 4, i, j % 4].astype(np.int64) - 128
        else:
            qs = r16[-256:].reshape(4, 16, 4)[(j % 16) // 4, i, j % 4]
            u = np.where(j < 16, qs & 15, qs >> 4).astype(np.int64)
            if tname == "Q5_0":
                hb = r16[32:96].view(np.uint64).reshape(4, 2)[(j % 16) // 4, j // 16]
                u |= ((hb >> (4 * i + j % 4).astype(np.uint64)) & np.uint64(1)).astype(np.int64) << 4
            u -= 16 if tname == "Q5_0" else 8
        np.testing.assert_allclose(d[i] * u, W[i], rtol=0, atol=1e-6)


def test_repack_iq4_xs_layout_by_hand():
    """IQ4_XS_R16, one group, one super-block: each value decoded where quant_blocks.h says it is,
    against gguf's dequantizer."""
    from gguf.quants import IQ4_NL as _nl
    values = np.asarray(_nl.kvalues, dtype=np.float64)
    w = make_weights("IQ4_XS", 16, 256, seed=9).reshape(16, 136)
    r16 = cb.repack(w.reshape(-1), 23, 16, 256)
    W = dequant("IQ4_XS", w, 256)                                   # [16, 256]
    np.testing.assert_array_equal(r16[0:32].view(np.uint16), w[:, 0:2].copy().view(np.uint16)[:, 0])
    d = r16[0:32].view(np.float16).astype(np.float64)
    sh = r16[32:64].view(np.uint16).astype(np.int64)                # [row]
    sl = r16[64:128].reshape(4, 16).astype(np.int64)                # [k, row]
    q = r16[128:].reshape(8, 4, 16, 4)                              # [j, c, row, byte]
    l = np.arange(16)
    for i in range(16):
        for j in range(8):
            sc = (((sl[j // 2, i] >> (4 * (j % 2))) & 15) | (((sh[i] >> (2 * j)) & 3) << 4)) - 32
            b = q[j, l // 4, i, l % 4]
            np.testing.assert_allclose(d[i] * sc * values[b & 15], W[i, 32 * j + l], rtol=0, atol=1e-6)
            np.testing.assert_allclose(d[i] * sc * values[b >> 4], W[i, 32 * j + 16 + l], rtol=0, atol=1e-6)


def test_repack_iq4_nl_is_q4_0_layout():
    """IQ4_NL blocks are Q4_0's bytes (d, 16 index bytes): IQ4_NL_R16 is Q4_0_R16's layout."""
    w = make_weights("IQ4_NL", 32, 256, seed=10).reshape(-1)
    np.testing.assert_array_equal(cb.repack(w, 20, 32, 256), cb.repack(w, 2, 32, 256))


def test_repack_q2_k_layout_by_hand():
    """Q2_K_R16, one group, one super-block: each value decoded where quant_blocks.h says it is,
    against gguf's dequantizer."""
    w = make_weights("Q2_K", 16, 256, seed=8).reshape(16, 84)
    r16 = cb.repack(w.reshape(-1), 10, 16, 256)
    W = dequant("Q2_K", w, 256)                                     # [16, 256]
    np.testing.assert_array_equal(r16[0:32].view(np.uint16), w[:, 80:82].copy().view(np.uint16)[:, 0])
    np.testing.assert_array_equal(r16[32:64].view(np.uint16), w[:, 82:84].copy().view(np.uint16)[:, 0])
    d = r16[0:32].view(np.float16).astype(np.float64)
    dmin = r16[32:64].view(np.float16).astype(np.float64)
    sc = r16[64:320].reshape(16, 16).astype(np.int64)               # [group, row]
    q = r16[320:].reshape(2, 8, 16, 4)                              # [h, c, row, byte]
    l = np.arange(32)
    for i in range(16):
        for h in range(2):
            for s_ in range(4):
                code = ((q[h, l // 4, i, l % 4] >> (2 * s_)) & 3).astype(np.float64)
                g = 8 * h + 2 * s_ + l // 16
                v = 128 * h + 32 * s_ + l
                np.testing.assert_allclose(d[i] * (sc[g, i] & 15) * code - dmin[i] * (sc[g, i] >> 4),
                                           W[i, v], rtol=0, atol=1e-6)


def test_repack_q3_k_layout_by_hand():
    """Q3_K_R16, one group, one super-block: each value decoded where quant_blocks.h says it is,
    against gguf's dequantizer."""
    w = make_weights("Q3_K", 16, 256, seed=7).reshape(16, 110)
    r16 = cb.repack(w.reshape(-1), 11, 16, 256)
    W = dequant("Q3_K", w, 256)                                     # [16, 256]
    np.testing.assert_array_equal(r16[0:32].view(np.uint16), w[:, 108:110].copy().view(np.uint16)[:, 0])
    d = r16[0:32].view(np.float16).astype(np.float64)               # d[16]
    sc = r16[32:224].reshape(12, 16).astype(np.int64)               # [byte, row]
    q0 = r16[224:1248].reshape(8, 2, 16, 4)                         # [c, hm | qs(0, c), row, byte]
    q1 = r16[1248:].reshape(8, 16, 4)                               # qs(1, c)
    l = np.arange(32)
    for i in range(16):
        for h in range(2):
            qs = q1 if h else q0[:, 1]
            for s_ in range(4):
                low = (qs[l // 4, i, l % 4] >> (2 * s_)) & 3
                hb = (q0[l // 4, 0, i, l % 4] >> (4 * h + s_)) & 1
                g = 8 * h + 2 * s_ + l // 16
                scale = (((sc[g % 8, i] >> (4 * (g // 8))) & 15) | (((sc[8 + g % 4, i] >> (2 * (g // 4))) & 3) << 4)) - 32
                v = 128 * h + 32 * s_ + l
                np.testing.assert_allclose(d[i] * scale * ((low | hb << 2).astype(np.float64) - 4), W[i, v],
                                           rtol=0, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17, 70])
@pytest.mark.parametrize("tname", ALL_R16)
def test_r16_matmul_all_variants(tname, T, variant_scope):
    t, tr, _ = R16[tname]
    rows, cols = 48, 768
    w = make_weights(tname, rows, cols, seed=T).reshape(-1)
    r16 = cb.repack(w, t, rows, cols)
    W = dequant(tname, w, cols)
    x = gaussian(T, cols, seed=T + 1)
    xq = dequant_act(tname, cb.quantize_act(x, t), cols)
    exact = xq @ W.T
    bound = ACC_TOL * (np.abs(xq) @ np.abs(W).T) + 1e-30
    ref = x.double().numpy() @ W.T
    ys = {}
    for v in _variants():
        variant_scope(v)
        y = cb.matmul(r16, tr, rows, cols, x).double().numpy()
        worst = float(np.max(np.abs(y - exact) / bound))
        assert worst <= 1.0, f"{v} T={T}: error {worst:.3g} x ACC_TOL bound"
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert rel <= Q8_DOT_TOL, f"{v} T={T}: relative L2 {rel:.3g} vs the float reference"
        # the same product as the plain kernel of this variant, up to summation order
        y0 = cb.matmul(w, t, rows, cols, x).double().numpy()
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5 * np.abs(y0).max())
        ys[v] = y
    for v, y in ys.items():                     # SIMD twins vs the scalar twin
        np.testing.assert_allclose(y, ys["scalar"], rtol=1e-4, atol=1e-4 * np.abs(ys["scalar"]).max())


@needs_ext
@pytest.mark.parametrize("tname", ALL_R16)
def test_r16_matmul_prefill_shape(tname):
    """512 tokens: several 64-token tiles and row chunks on the pool, best variant."""
    t, tr, _ = R16[tname]
    rows, cols = 96, 1024
    w = make_weights(tname, rows, cols, seed=3).reshape(-1)
    r16 = cb.repack(w, t, rows, cols)
    x = gaussian(512, cols, seed=4)
    y0 = cb.matmul(w, t, rows, cols, x)
    y = cb.matmul(r16, tr, rows, cols, x)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5 * float(y0.abs().max()))


@needs_ext
@pytest.mark.parametrize("tname", ALL_R16)
def test_r16_prefetch_setting_changes_no_result(tname):
    """The Q4_K_R16 kernel prefetches only on calls of at least _set_r16_prefetch(n) tokens: on or
    off, every product is the same to the bit."""
    from hetero_moe import _cpu
    t, tr, _ = R16[tname]
    rows, cols = 48, 768
    w = make_weights(tname, rows, cols, seed=5).reshape(-1)
    r16 = cb.repack(w, t, rows, cols)
    old = _cpu._set_r16_prefetch(1)
    try:
        for T in (1, 9):
            x = gaussian(T, cols, seed=T)
            _cpu._set_r16_prefetch(1)                       # always
            on = cb.matmul(r16, tr, rows, cols, x)
            _cpu._set_r16_prefetch(1 << 30)                 # never
            off = cb.matmul(r16, tr, rows, cols, x)
            assert torch.equal(on, off), (tname, T)
        with pytest.raises(ValueError, match=">= 1"):
            _cpu._set_r16_prefetch(0)
    finally:
        _cpu._set_r16_prefetch(old)


@needs_ext
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("dname", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_moe_with_r16_experts(dname, T, variant_scope):
    E, k, D, F = 8, 3, 256, 256
    types = ("Q4_K", "Q4_K", dname)
    x, ids, wts, gate, up, down = moe_inputs(T, k, E, D, F, types)
    ref = moe_reference(x, ids, wts, gate, up, down, types, D, F)
    g16 = cb.repack(gate.reshape(-1), Q4_K, E * F, D)
    u16 = cb.repack(up.reshape(-1), Q4_K, E * F, D)
    d16 = cb.repack(down.reshape(-1), R16[dname][0], E * D, F)
    for v in _variants():
        variant_scope(v)
        plain = cb.moe_ffn(x, ids, wts, gate.reshape(-1), up.reshape(-1), down.reshape(-1),
                           gate_type=Q4_K, up_type=Q4_K, down_type=R16[dname][0], n_expert=E, d_model=D,
                           d_ff=F)
        out = cb.moe_ffn(x, ids, wts, g16, u16, d16, gate_type=Q4_K_R16, up_type=Q4_K_R16,
                         down_type=R16[dname][1], n_expert=E, d_model=D, d_ff=F)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel <= MOE_TOL, f"{v}: relative L2 {rel:.3g} vs the float reference"
        # h is re-quantized after gate/up: a last-bit difference may move one int8 step
        rel = ((out - plain).norm() / plain.norm()).item()
        assert rel <= 2e-3, f"{v}: R16 vs plain Q4_K experts differ by {rel:.3g}"


@needs_ext
def test_bad_repack_inputs():
    w = make_weights("Q4_K", 20, 256).reshape(-1)
    with pytest.raises(ValueError, match="multiple of 16"):
        cb.repack(w, Q4_K, 20, 256)
    with pytest.raises(ValueError, match="expected"):
        cb.repack(w[:-1], Q4_K, 20, 256)
    with pytest.raises(hetero_moe.errors.UnsupportedError, match="no row-interleaved layout"):
        cb.repack(np.zeros(8 * 20, np.uint8), 3, 1, 256)   # Q4_1
    r16 = cb.repack(w[: 16 * 144], Q4_K, 16, 256)
    with pytest.raises(ValueError, match="multiple of 16"):     # a matmul over part of a group
        cb.matmul(r16[: 8 * 144], Q4_K_R16, 8, 256, torch.zeros(1, 256))
    with pytest.raises(ValueError, match="interleaved"):
        cb.dequantize_rows(r16.reshape(16, 144), Q4_K_R16, 256)
    E, D, F = 2, 256, 24                         # gate/up of 24 rows cannot be groups of 16
    with pytest.raises(ValueError, match="row groups"):
        cb.moe_ffn(gaussian(1, D), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1),
                   np.zeros(E * F * 144, np.uint8), np.zeros(E * F * 144, np.uint8),
                   np.zeros(E * D * F * 2, np.uint8), gate_type=Q4_K_R16, up_type=Q4_K_R16,
                   down_type=1, n_expert=E, d_model=D, d_ff=F)


@needs_ext
@pytest.mark.parametrize("arch,preset,quant", [("qwen3moe", "tiny", "Q4_K_M"), ("llama", "tiny", "Q4_K_M"),
                                               ("deepseek2", "tiny-lite", "Q4_K_M"),
                                               ("qwen3moe", "tiny", "Q3_K_M"),
                                               ("qwen3moe", "tiny", "Q2_K"),
                                               ("qwen3moe", "tiny", "IQ4_XS"),
                                               ("qwen3moe", "tiny", "IQ4_NL")])
def test_model_repacked_equals_plain(arch, preset, quant, monkeypatch):
    """Repacked at load vs the mapped blocks (repack="off"), the fused decode step on R16 weights
    included: greedy tokens equal, and the same distance from the exact float result (our runtime on
    llama.cpp's F32 twin of the file). With a per-position KV cache the logits also agree up to
    float32 summation order at almost every position (a last-bit difference can move one int8 step
    of an activation, ~1% at that position). MLA's latent cache carries such a step on to every
    later position, so there only the distance from the exact result is compared. A float32 K/V
    cache keeps the comparison on the weights' layouts: an f16 cache would carry such a step on as
    well (a last-bit difference can flip the rounding of a cached key). Every type with a layout
    is converted here, also where the kernels would not choose to (AVX2)."""
    path = tiny_model(arch, preset=preset, quant=quant)
    monkeypatch.setattr(cb, "repack_pays", lambda t: cb.repacked_type(t) is not None)
    ct = None if arch == "deepseek2" else "f32"
    a = hetero_moe.load(path, threads=2, n_ctx=128, repack=True, cache_type=ct)
    b = hetero_moe.load(path, threads=2, n_ctx=128, repack="off", cache_type=ct)
    ktypes = {l.ktype for l in _linears(a)}
    want = {"Q3_K_M": 111, "Q2_K": 110, "IQ4_XS": 123, "IQ4_NL": 120}.get(quant, Q4_K_R16)  # experts
    assert want in ktypes, f"nothing was repacked: kernel types {ktypes}"
    assert not {l.ktype for l in _linears(b)} & {want, Q4_K_R16}
    ids = a.tokenize("The quick brown fox jumps over the lazy dog. " * 6)
    la, lb = a.logits(ids), b.logits(ids)
    if arch != "deepseek2":
        per = (la - lb).norm(dim=-1) / lb.norm(dim=-1)
        assert per.median() <= 1e-5 and per.quantile(0.9) <= 1e-4, \
            f"per-position relative error: median {per.median():.3g}, p90 {per.quantile(0.9):.3g}"
    try:
        from .reference import quantize_with_llama
        twin = quantize_with_llama(path, path[:-len(".gguf")] + ".f32-twin.gguf", "ALL_F32")
    except ImportError:
        twin = None
    if twin is not None:
        exact = hetero_moe.load(twin, threads=2, n_ctx=128).logits(ids)
        ea = (la - exact).norm(dim=-1) / exact.norm(dim=-1)
        eb = (lb - exact).norm(dim=-1) / exact.norm(dim=-1)
        assert ea.median() <= 1.1 * eb.median() and ea.mean() <= 1.1 * eb.mean(), \
            f"distance from the exact result: repacked median {ea.median():.4g} mean {ea.mean():.4g}, " \
            f"plain {eb.median():.4g} / {eb.mean():.4g}"
    elif arch == "deepseek2":
        pytest.skip("llama-cpp-python (its quantizer makes the F32 twin) is not installed")
    ta = a.generate(ids, max_tokens=24, temperature=0.0)
    tb = b.generate(ids, max_tokens=24, temperature=0.0)
    if arch != "deepseek2":
        assert ta.tokens == tb.tokens
        return
    # teacher-forced on the repacked model's tokens, the plain model picks each of them too, except
    # at near-ties (top-2 gap under 1% of the logits' spread), where the carried step may decide
    seq = list(ids) + list(ta.tokens)
    lp = b.logits(seq)[len(ids) - 1:len(seq) - 1]
    top2 = lp.topk(2, dim=-1).values
    near = (top2[:, 0] - top2[:, 1]) < 0.01 * lp.std(dim=-1)
    picked = lp.argmax(dim=-1) == torch.tensor(ta.tokens)
    assert bool((picked | near).all()), f"steps where plain disagrees off near-ties: {(~(picked | near)).nonzero()}"
    assert near.float().mean() <= 0.2, "too many near-ties to judge"


def _linears(m):
    from hetero_moe.layers.linear import QuantLinear
    from hetero_moe.layers.moe import ExpertStack
    seen, out = set(), []

    def walk(o, depth=0):
        if id(o) in seen or depth > 6:
            return
        seen.add(id(o))
        if isinstance(o, (QuantLinear, ExpertStack)):
            out.append(o)
            return
        if isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and type(o).__module__.startswith("hetero_moe"):
            for v in vars(o).values():
                walk(v, depth + 1)
    walk(m.net)
    return out


@needs_ext
def test_repack_auto_default(monkeypatch):
    """load()'s default repack="auto": on where the kernels have a layout that pays (Q4_0/Q5_0
    everywhere, the K-quants and Q8_0 with VNNI) and the copies fit the memory available less the
    reserve; off on the torch path, when memory is short, or by HETERO_MOE_REPACK=off; "on"/"off"
    and the bools as asked; a bad value named."""
    import collections

    from hetero_moe.runtime import memory
    path = tiny_model("qwen3moe")
    monkeypatch.delenv("HETERO_MOE_REPACK", raising=False)
    from hetero_moe.gguf import GGUFFile
    pays = any(cb.repack_pays(t.ggml_type) for t in GGUFFile(path).tensors.values())
    m = hetero_moe.load(path, threads=1, n_ctx=64)
    assert m.repack["mode"] == "auto" and m.repack["on"] == pays, m.repack
    ktypes = {l.ktype for l in _linears(m)}
    assert (m.repack["tensors"] > 0 and m.repack["bytes"] > 0
            and ktypes & {115, 116, 117, Q4_K_R16, Q6_K_R16}) if pays else not m.repack["tensors"]
    on = hetero_moe.load(path, threads=1, n_ctx=64, repack=True)
    assert on.repack["mode"] == "on" and on.repack["on"] and (on.repack["tensors"] > 0) == pays
    for off in (hetero_moe.load(path, threads=1, n_ctx=64, repack="off"),
                hetero_moe.load(path, threads=1, n_ctx=64, repack=False),
                hetero_moe.load(path, threads=1, n_ctx=64, cpu_kernels="torch")):
        assert not off.repack["on"] and off.repack["tensors"] == 0
        assert not {l.ktype for l in _linears(off)} & {115, 116, 117, Q4_K_R16, Q6_K_R16}
    monkeypatch.setenv("HETERO_MOE_REPACK", "off")
    assert hetero_moe.load(path, threads=1, n_ctx=64).repack["mode"] == "off"
    monkeypatch.setenv("HETERO_MOE_REPACK", "sometimes")
    with pytest.raises(ValueError, match="HETERO_MOE_REPACK"):
        hetero_moe.load(path, threads=1, n_ctx=64)
    monkeypatch.delenv("HETERO_MOE_REPACK")
    with pytest.raises(ValueError, match="repack must be"):
        hetero_moe.load(path, threads=1, n_ctx=64, repack="always")
    # memory short: the copies would not fit what is available less the reserve
    VM = collections.namedtuple("VM", "total available")
    import psutil
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM(24 << 30, (2 << 30) + (1 << 20)))
    short = hetero_moe.load(path, threads=1, n_ctx=64)
    if pays:
        assert not short.repack["on"] and "would not fit" in short.repack["why"], short.repack
    assert memory.resolve_repack("auto", [], "auto")["on"] is False


@needs_ext
@pytest.mark.parametrize("tname", ALL_R16)
def test_repack_in_slices_equals_whole(tname, monkeypatch):
    """kernel_weights converts a large tensor a slice of whole row groups at a time, releasing each
    slice's mapped bytes as it goes (then the whole tensor): the same bytes as one conversion."""
    import hetero_moe.layers.linear as lin
    t, tr, _ = R16[tname]
    monkeypatch.setattr(cb, "repack_pays", lambda ty: cb.repacked_type(ty) is not None)
    monkeypatch.setattr(lin, "REPACK_CHUNK_BYTES", 40_000)
    rows, cols = 16 * 37, 512
    w = np.random.default_rng(3).integers(0, 256, rows * cb.row_bytes(t, cols), dtype=np.uint8)
    parts = []
    got, to = lin.kernel_weights("x", w, t, rows, cols, lin.KernelOptions(
        repack=True, release=lambda name, part=None: parts.append(part)))
    assert to == tr and np.array_equal(np.asarray(got), cb.repack(w, t, rows, cols))
    assert parts[-1] is None and len(parts) > 2
    spans = parts[:-1]
    assert spans[0][0] == 0 and spans[-1][1] == w.nbytes
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all((hi - lo) % (16 * cb.row_bytes(t, cols)) == 0 for lo, hi in spans[:-1])
