"""GPTQ / AWQ int4: our vectorized unpacking, dequantization and GGUF repack against an
independent, element-by-element transcription of the packing.

The packing, as AutoGPTQ/GPTQModel and AutoAWQ document and write it (W is [out, in]):
  GPTQ  qweight[i // 8, o] holds q[o, i] in bits 4*(i % 8) .. 4*(i % 8) + 3   (int32 words)
        qzeros[g, o // 8] holds z[o, g] - 1 (format "gptq", v1) or z[o, g] ("gptq_v2") in
        bits 4*(o % 8) ..; scales[g, o] fp16; g_idx[i] = group of input column i
  AWQ   qweight[i, o // 8] holds q[o, i] in nibble k where ORDER[k] == o % 8,
        ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; qzeros[g, o // 8] the same for z[o, g] (no offset);
        groups are i // group_size
  W[o, i] = scales[g, o] * (q - z)
The loops below read exactly those sentences, one element at a time.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hetero_moe.errors import GGUFFormatError
from hetero_moe.hf import quant as hq
from hetero_moe.testing import make_hf_model as mh

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _rand_layer(rng, n_out, n_in, gs, zlo=0, zhi=16, desc_act=False):
    G = n_in // gs
    q = rng.integers(0, 16, (n_out, n_in), dtype=np.uint8)
    z = rng.integers(zlo, zhi, (n_out, G)).astype(np.int16)
    s = (rng.standard_normal((n_out, G)) * 0.01).astype(np.float16)
    perm = rng.permutation(n_in) if desc_act else np.arange(n_in)
    g_idx = np.empty(n_in, dtype=np.int32)
    g_idx[perm] = np.arange(n_in) // gs
    return q, z, s, g_idx


def _loop_pack_gptq(q, z, s, g_idx, v1=True):
    n_out, n_in = q.shape
    G = z.shape[1]
    qweight = np.zeros((n_in // 8, n_out), dtype=np.uint32)
    qzeros = np.zeros((G, n_out // 8), dtype=np.uint32)
    for i in range(n_in):
        for o in range(n_out):
            qweight[i // 8, o] |= np.uint32(int(q[o, i]) << (4 * (i % 8)))
    for g in range(G):
        for o in range(n_out):
            qzeros[g, o // 8] |= np.uint32((int(z[o, g]) - (1 if v1 else 0)) << (4 * (o % 8)))
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32),
            "scales": np.ascontiguousarray(s.T), "g_idx": g_idx}


def _loop_pack_awq(q, z, s):
    n_out, n_in = q.shape
    G = z.shape[1]
    qweight = np.zeros((n_in, n_out // 8), dtype=np.uint32)
    qzeros = np.zeros((G, n_out // 8), dtype=np.uint32)
    for o in range(n_out):
        k = ORDER.index(o % 8)
        for i in range(n_in):
            qweight[i, o // 8] |= np.uint32(int(q[o, i]) << (4 * k))
        for g in range(G):
            qzeros[g, o // 8] |= np.uint32(int(z[o, g]) << (4 * k))
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32),
            "scales": np.ascontiguousarray(s.T)}


def _loop_dequant(fmt, t, n_out, n_in, gs, v1=True):
    W = np.zeros((n_out, n_in), dtype=np.float32)
    qw, qz = t["qweight"].view(np.uint32), t["qzeros"].view(np.uint32)
    for o in range(n_out):
        for i in range(n_in):
            if fmt == "gptq":
                g = int(t["g_idx"][i])
                qv = (int(qw[i // 8, o]) >> (4 * (i % 8))) & 15
                zv = ((int(qz[g, o // 8]) >> (4 * (o % 8))) & 15) + (1 if v1 else 0)
            else:
                g = i // gs
                k = ORDER.index(o % 8)
                qv = (int(qw[i, o // 8]) >> (4 * k)) & 15
                zv = (int(qz[g, o // 8]) >> (4 * k)) & 15
            W[o, i] = np.float32(t["scales"][g, o]) * np.float32(qv - zv)
    return W


CASES = [  # (fmt, group size, zero range, desc_act, v1)
    ("gptq", 32, (8, 9), False, True),        # symmetric: z = 8 -> Q4_0
    ("gptq", 64, (1, 17), False, True),       # asymmetric v1 (z - 1 in 0..15) -> Q5_0
    ("gptq", 32, (0, 16), False, False),      # gptq_v2: z stored as is
    ("gptq", 32, (1, 17), True, True),        # desc_act: groups scattered -> Q8_0 (rounded)
    ("awq", 32, (0, 16), False, False),
    ("awq", 64, (0, 16), False, False),
]


@pytest.mark.parametrize("fmt,gs,zr,desc_act,v1", CASES)
def test_dequant_matches_transcription(fmt, gs, zr, desc_act, v1):
    rng = np.random.default_rng(gs + zr[0] + 7 * desc_act)
    n_out, n_in = 24, 128
    q, z, s, g_idx = _rand_layer(rng, n_out, n_in, gs, *zr, desc_act=desc_act)
    t = _loop_pack_gptq(q, z, s, g_idx, v1) if fmt == "gptq" else _loop_pack_awq(q, z, s)
    # the test-model writer packs bit-identically to the transcription
    opts = mh.QuantOptions(fmt=fmt, group_size=gs, v2=not v1)
    if not (fmt == "gptq" and v1 and z.min() == 0):
        mine = mh.pack(q, z, s, g_idx, opts)
        for k in t:
            assert np.array_equal(mine[k], t[k]), k
    spec = hq.QuantSpec(fmt, gs, desc_act=desc_act, zero_plus_one=v1)
    u = hq.unpack(spec, "layer", n_out, n_in, t["qweight"], t["qzeros"], t["scales"],
                  t.get("g_idx"))
    want = _loop_dequant(fmt, t, n_out, n_in, gs, v1)
    got = hq.dequantize(u).numpy()
    assert np.array_equal(got, want)                         # bit-exact
    assert np.array_equal(got, mh.dequantized(q, z, s, g_idx))


@pytest.mark.parametrize("fmt,gs,zr,desc_act,v1", CASES)
def test_repack_is_exact(fmt, gs, zr, desc_act, v1):
    """The GGUF blocks we run, decoded by gguf-py's reference dequantizer (llama.cpp's formulas),
    equal the checkpoint's weights bit for bit."""
    from gguf import GGMLQuantizationType, quants
    rng = np.random.default_rng(100 + gs)
    n_out, n_in = 16, 256
    q, z, s, g_idx = _rand_layer(rng, n_out, n_in, gs, *zr, desc_act=desc_act)
    t = _loop_pack_gptq(q, z, s, g_idx, v1) if fmt == "gptq" else _loop_pack_awq(q, z, s)
    spec = hq.QuantSpec(fmt, gs, desc_act=desc_act, zero_plus_one=v1)
    u = hq.unpack(spec, "layer", n_out, n_in, t["qweight"], t["qzeros"], t["scales"],
                  t.get("g_idx"))
    gt = hq.block_type([u])
    want_type = hq.GGML_Q8_0 if desc_act else hq.GGML_Q4_0 if zr == (8, 9) else hq.GGML_Q5_0
    assert gt == want_type
    blocks = hq.to_blocks(u, gt)
    got = quants.dequantize(blocks, GGMLQuantizationType(gt)).reshape(n_out, n_in)
    want = _loop_dequant(fmt, t, n_out, n_in, gs, v1)
    if gt != hq.GGML_Q8_0:
        assert np.array_equal(got.astype(np.float32), want)
        return
    # re-quantized: llama.cpp's own Q8_0 of the exact weights, each within half a step (plus
    # d's own fp16 rounding: up to 127 * 2^-11 steps)
    assert np.array_equal(blocks.reshape(-1), quants.quantize(want, GGMLQuantizationType.Q8_0)
                          .reshape(-1))
    step = np.abs(want.reshape(n_out, -1, 32)).max(-1, keepdims=True) / 127
    assert (np.abs(got - want).reshape(n_out, -1, 32) <= (0.5 + 127 / 2048) * step + 1e-9).all()


def test_q8_0_blocks_match_ggml():
    """Our Q8_0 rows equal gguf-py's transcription of ggml's quantize_row_q8_0_ref and the C++
    activation quantizer's (the same block layout: fp16 d, 32 int8), zeros and ties included."""
    from gguf import GGMLQuantizationType, quants

    from hetero_moe import cpu_backend
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((12, 256)) * rng.uniform(1e-3, 10, (12, 1))).astype(np.float32)
    w[2, :32] = 0
    w[3, :32] = np.arange(32) - 16.0          # d = 16/127: exact halves round away from zero
    mine = hq.q8_0_blocks(w)
    assert np.array_equal(mine.reshape(-1), quants.quantize(w, GGMLQuantizationType.Q8_0)
                          .reshape(-1))
    if cpu_backend.available():
        assert np.array_equal(mine, cpu_backend.quantize_act(torch.from_numpy(w),
                                                             hq.GGML_Q8_0))


def test_act_order_down_proj_sorted_exactly():
    """A gated FFN whose down_proj scatters its groups: sorting down's columns by group and
    permuting gate/up rows alike gives blockable (exact Q5_0) blocks and the same output."""
    from gguf import GGMLQuantizationType, quants
    rng = np.random.default_rng(11)
    D, F, gs = 64, 128, 32
    spec = hq.QuantSpec("gptq", gs, desc_act=True)

    def layer(n_out, n_in):
        q, z, s, g = _rand_layer(rng, n_out, n_in, gs, 1, 17, desc_act=True)
        t = _loop_pack_gptq(q, z, s, g)
        return hq.unpack(spec, "x", n_out, n_in, t["qweight"], t["qzeros"], t["scales"],
                         t["g_idx"])
    gate, up, down = layer(F, D), layer(F, D), layer(D, F)
    assert not hq.blockable(down)
    perm = hq.contiguous_perm(down.g_idx)
    assert perm is not None and hq.contiguous_perm(np.arange(F) // gs) is None
    d2 = hq.permute(down, cols=perm)
    assert hq.blockable(d2) and hq.block_type([d2]) == hq.GGML_Q5_0
    wd = quants.dequantize(hq.to_blocks(d2, hq.GGML_Q5_0), GGMLQuantizationType.Q5_0)
    assert np.array_equal(wd.reshape(D, F), hq.dequantize(down).numpy()[:, perm])
    x = torch.from_numpy(rng.standard_normal((3, D)).astype(np.float32)).double()

    def ffn(g, u, d):
        g, u, d = (hq.dequantize(m).double() for m in (g, u, d))
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    got = ffn(hq.permute(gate, rows=perm), hq.permute(up, rows=perm), d2)
    assert torch.allclose(got, ffn(gate, up, down), rtol=1e-12, atol=1e-12)


def test_q5_0_covers_zero_extremes():
    """z = 0 and z = 16 (v1's stored 15 + 1) with q = 0 and 15: q - z spans -16..15."""
    from gguf import GGMLQuantizationType, quants
    n_out, n_in = 8, 64
    q = np.tile(np.array([0, 15], dtype=np.uint8), (n_out, n_in // 2))
    z = np.array([[0, 16]] * n_out, dtype=np.int16)
    s = np.full((n_out, 2), 0.5, dtype=np.float16)
    u = hq.Unpacked(q, z, s, np.arange(n_in) // 32)
    blocks = hq.to_blocks(u, hq.GGML_Q5_0)
    got = quants.dequantize(blocks, GGMLQuantizationType.Q5_0).reshape(n_out, n_in)
    assert np.array_equal(got, hq.dequantize(u).numpy())
    assert got.min() == -8.0 and got.max() == 7.5


def test_unpack_errors_name_the_tensor():
    spec = hq.QuantSpec("gptq", 32)
    qw = np.zeros((16, 24), dtype=np.int32)
    with pytest.raises(GGUFFormatError, match="'blk.x'.*qzeros.*shape"):
        hq.unpack(spec, "blk.x", 24, 128, qw, np.zeros((4, 2), np.int32),
                  np.zeros((4, 24), np.float16), None)
    with pytest.raises(GGUFFormatError, match="'blk.x'.*scales.*dtype"):
        hq.unpack(spec, "blk.x", 24, 128, qw, np.zeros((4, 3), np.int32),
                  np.zeros((4, 24), np.int32), None)
    with pytest.raises(GGUFFormatError, match="g_idx holds group"):
        hq.unpack(spec, "blk.x", 24, 128, qw, np.zeros((4, 3), np.int32),
                  np.zeros((4, 24), np.float16), np.full(128, 9, np.int32))


def test_generator_quantizer_roundtrip():
    """The test-model quantizer's codes dequantize within half a step of the float weights."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    for o in (mh.QuantOptions("gptq", 128, sym=True), mh.QuantOptions("gptq", 64, sym=False),
              mh.QuantOptions("gptq", 64, sym=False, desc_act=True), mh.QuantOptions("awq", 128)):
        q, z, s, gi = mh.quantize(w, o, rng)
        err = np.abs(mh.dequantized(q, z, s, gi) - w)
        step = s.astype(np.float32)[:, gi]
        assert (err <= 0.5 * step * 1.001 + 1e-6).mean() > 0.99, o
        assert torch.is_tensor(torch.from_numpy(q))
