"""Multi-head Latent Attention (DeepSeek-V2/V3) in the whole-model C++ decode step against the per-op
path: the absorbed decode (k_b / v_b per head from their GGUF blocks, or the float copies of a legacy
kv_b), the latent cache in f16 and f32, q-LoRA, V3 routing (sigmoid, selection bias, groups), shared
experts, B sequences in one call, and the description's checks.

Two kinds of files: F16 ones, whose matmuls take float activations, so the two paths may differ only
by float summation order and any gap grows only as rounding does (a tight bar over many steps); and
Q4_K_M ones, whose activations are quantized to int8 before each matmul, where a difference in the
last bit can move one value across a rounding step and the paths part by that step (one step
compared, as for the other architectures)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hetero_moe
from hetero_moe.runtime import fused_decode
from hetero_moe.runtime.kv_cache import LatentKVCache

from .conftest import tiny_model

MLA = [("deepseek2", "tiny-lite"), ("deepseek2", "tiny-v3"), ("deepseek2-kvb", "tiny-lite"),
       ("deepseek2-kvb", "tiny-v3")]


def _ids(n, vocab, seed=0):
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(m, ids, n_prompt, fused):
    """Prefill ids[:n_prompt], decode the rest one at a time -> logits [steps, V]."""
    m.net.fused = None if fused else False
    rows = [m.eval(ids[:n_prompt], 0)[-1].clone()]
    for i, t in enumerate(ids[n_prompt:]):
        rows.append(m.eval([t], n_prompt + i)[-1].clone())
    if fused:
        assert isinstance(m.net.fused, fused_decode.FusedDecode), m.net.fused_reason
    return torch.stack(rows)


def _f32_cache(m):
    net = m.net
    net.cache = net._main_cache = LatentKVCache(net.cfg.n_layer, net.n_ctx, net.cfg.mla.latent_dim,
                                                "cpu", torch.float32)
    net.fused = None


@pytest.mark.parametrize("arch,preset", MLA)
@pytest.mark.parametrize("cache", ["f16", "f32"])
def test_fused_mla_follows_per_op_path_over_many_steps(llama_cpp, arch, preset, cache):
    m = hetero_moe.load(tiny_model(arch, quant="F16", preset=preset), threads=2, n_ctx=128)
    if cache == "f32":
        _f32_cache(m)
    assert m.net.cache.layers[0].latent.dtype == (torch.float32 if cache == "f32" else torch.float16)
    ids = _ids(44, m.config.n_vocab, 1)
    got = _run(m, ids, 20, fused=True)
    lat = [c.latent[:len(ids)].clone() for c in m.net.cache.layers]
    want = _run(m, ids, 20, fused=False)
    assert m.net.fused is False
    # f32: summation order only; f16: the query and the cache rows are rounded to f16 on both
    # paths, and a last-bit difference before that rounding moves a value by an f16 step
    bar = 2e-5 if cache == "f32" else 2e-3
    err = ((got - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
    assert err < bar, (arch, preset, cache, err)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for a, b in zip(lat, (c.latent[:len(ids)] for c in m.net.cache.layers)):
        torch.testing.assert_close(a.float(), b.float(), atol=bar * float(b.float().abs().max()),
                                   rtol=0)


@pytest.mark.parametrize("arch,preset", MLA)
def test_fused_mla_step_equals_per_op_path_q4_k_m(llama_cpp, arch, preset):
    m = hetero_moe.load(tiny_model(arch, preset=preset), threads=2, n_ctx=128)
    V = m.config.n_vocab
    for seed, n in ((0, 1), (1, 17), (2, 90)):
        ids = _ids(n + 1, V, seed)
        out = {}
        for fused in (True, False):
            m.net.fused = None if fused else False
            m.eval(ids[:-1], 0)
            out[fused] = (m.eval(ids[-1:], n)[-1].clone(),
                          [c.latent[n].clone() for c in m.net.cache.layers])
            if fused:
                assert isinstance(m.net.fused, fused_decode.FusedDecode), m.net.fused_reason
        (got, got_rows), (want, want_rows) = out[True], out[False]
        torch.testing.assert_close(got, want, atol=1e-3 * float(want.abs().max()), rtol=0)
        assert int(got.argmax()) == int(want.argmax())
        for g, w in zip(got_rows, want_rows):
            torch.testing.assert_close(g.float(), w.float(), atol=2e-3 * float(w.float().abs().max()),
                                       rtol=0)


def test_fused_mla_keeps_k_b_v_b_in_blocks(llama_cpp):
    """A split k_b / v_b file keeps no float copy of them: the per-op path and the fused step both
    read the GGUF blocks (a float copy is made only if the expanded form is asked for)."""
    m = hetero_moe.load(tiny_model("deepseek2", preset="tiny-lite"), threads=2, n_ctx=64)
    for b in m.net.blocks:
        a = b.attn
        assert a.k_b is None and a.v_b is None and a.k_b_raw is not None and a.v_b_raw is not None
    ids = _ids(12, m.config.n_vocab, 4)
    absorbed = m.eval(ids, 0)[-1].clone()
    a = m.net.blocks[0].attn
    x = torch.randn(5, m.config.n_embd, generator=torch.Generator().manual_seed(0))
    qn, qp, new = a.project(x, 0)
    lat = new.to(torch.float16).float()
    want = a.attend_absorbed(qn, qp, lat, 0, torch.float16)
    got = a.attend_expanded(qn, qp, lat, 0)                        # makes the float copies
    assert a.k_b is not None and a.v_b is not None
    assert float((got - want).norm() / want.norm()) < 2e-2          # k_b/v_b activations in int8
    assert torch.equal(m.eval(ids, 0)[-1], absorbed)               # still the absorbed form


@pytest.mark.parametrize("arch,preset", [("deepseek2", "tiny-v3"), ("deepseek2-kvb", "tiny-lite")])
def test_fused_mla_batch_equals_each_alone(llama_cpp, arch, preset, monkeypatch):
    m = hetero_moe.load(tiny_model(arch, preset=preset), threads=2, n_ctx=128)
    net, V = m.net, m.config.n_vocab
    calls = []
    real = fused_decode.FusedDecode.steps
    monkeypatch.setattr(fused_decode.FusedDecode, "steps",
                        lambda self, x, p, c: calls.append(len(p)) or real(self, x, p, c))
    prompts = [_ids(n, V, seed) for seed, n in ((0, 3), (1, 17), (2, 70))]
    toks = [11, 12, 13]
    batch = [net.new_cache() for _ in prompts]
    solo = [net.new_cache() for _ in prompts]
    for ids, b, s in zip(prompts, batch, solo):
        net.forward(torch.tensor(ids), 0, cache=b)
        net.forward(torch.tensor(ids), 0, cache=s)
    pos = [len(p) for p in prompts]
    rows = net.forward_batch(toks, pos, batch)
    assert calls == [3], net.fused_reason
    for j in range(3):
        alone = net.forward_batch([toks[j]], [pos[j]], [solo[j]])[0]
        err = float((rows[j] - alone).norm() / alone.norm())
        assert err < 1e-3, (arch, j, err)
        assert int(rows[j].argmax()) == int(alone.argmax())
        p = pos[j]
        for lb, ls in zip(batch[j].layers, solo[j].layers):
            assert lb.length == ls.length == p + 1
            torch.testing.assert_close(lb.latent[:p], ls.latent[:p], atol=0, rtol=0)
            torch.testing.assert_close(lb.latent[p].float(), ls.latent[p].float(), atol=2e-2,
                                       rtol=2e-3)
    assert calls == [3, 1, 1, 1]


def test_fused_mla_description_checks(llama_cpp):
    m = hetero_moe.load(tiny_model("deepseek2", preset="tiny-v3"), threads=2, n_ctx=32)
    m.eval([5, 6], 0)
    m.eval([7], 2)
    f = m.net.fused
    assert isinstance(f, fused_decode.FusedDecode)
    lib, ints, floats = f._lib, f._ints, f._floats
    cache = m.net.cache.layers[0].latent
    where = [i for i in range(len(ints) - 1)
             if ints[i] == cache.data_ptr() and ints[i + 1] == cache.numel() * 2]
    assert len(where) == 1
    bad = ints.copy()
    bad[where[0] + 1] -= 2
    with pytest.raises(ValueError, match="blk.0.latent cache has"):
        lib.decode_plan(bad, floats)
    bad = ints.copy()
    bad[15] = 0                                                  # N
    with pytest.raises(ValueError, match="mla: C = .* N = 0"):
        lib.decode_plan(bad, floats)
    bad = ints.copy()
    bad[20] = 5                                                  # groups not dividing E = 12
    with pytest.raises(ValueError, match="5 groups"):
        lib.decode_plan(bad, floats)
    c = m.net.new_cache()
    addrs = np.stack([f._addrs(c)])
    D, V = m.config.n_embd, m.config.n_vocab
    x, lg = np.zeros(D, np.float32), np.zeros(V, np.float32)
    lib.decode_steps(f.plan, x, np.array([0], np.int32), addrs, lg)
    bad = addrs.copy()
    bad[0, 1, 1] -= 2
    bad[0, 1, 3] -= 2
    with pytest.raises(ValueError, match="row 0 layer 1"):
        lib.decode_steps(f.plan, x, np.array([0], np.int32), bad, lg)
