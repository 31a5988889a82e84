"""The heterogeneous CPU/GPU path end to end with gpu="interpret": the planner's placement, the
GPU tier's Triton kernels (in Triton's interpreter, on CPU tensors), hot experts in GPU slots and
the cold ones on the C++ pool, overlapped in the executor's order.

Plans put attention, norms, routers, shared experts and the lm_head on the "GPU" and about a third
of each layer's routed experts. Bars: on llama.cpp's F32 twin, the strict parity bar and the same
greedy tokens as the CPU-only run; on the Q4_K_M file, llama.cpp's own quantization deviation (the
GPU tier keeps float activations, the CPU tier and llama.cpp quantize them to 8 bits) and greedy
tokens equal to the CPU-only run up to a near-tie.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hetero_moe
from hetero_moe.runtime import planner as P
from hetero_moe.runtime.hetero import HeteroMoE

from .conftest import tiny_model
from .reference import LlamaRef, assert_same_greedy, compare_logits, rel_err
from .test_parity import MAX_REL_ERR, MIN_TOP1, SELF_MARGIN_MEAN, SELF_MARGIN_P95, _twin

pytest.importorskip("triton")

N_POS = 48            # teacher-forced positions (the interpreter is slow; the bars are per position)
N_GEN = 32
N_CTX = 128
TIE_MARGIN = 0.75     # as tests/test_api.py: greedy runs may part only at a near-tie
HOLD_TOL = 0.01       # bytes held by the GPU tier vs the plan
MODELS = [("qwen3moe", "tiny"), ("qwen2moe", "tiny"), ("deepseek2", "tiny-v3")]


# The 49152 x 256 lm_head costs the interpreter ~1 s a call: the end-to-end runs keep it on the
# CPU tier (an override, exercising that path too); test_..._submitted_before_gpu_work keeps it
# on the GPU tier.
LM_HEAD_ON_CPU = [r"^output\.weight$=cpu"]


def third_plan(path: str, overrides=LM_HEAD_ON_CPU) -> P.Plan:
    """A plan whose GPU budget holds the dense part and a third of every layer's experts."""
    kw = dict(gpu="interpret", n_ctx=N_CTX, cpu_bandwidth_gbps=20, overrides=overrides)
    full = P.plan(path, **kw)
    fixed = full.gpu_total - full.gpu_groups["hot_experts"]
    hot = sum(full.n_expert // 3 * full.expert_gpu_bytes[l] for l in full.moe_layers)
    p = P.plan(path, vram=fixed + hot, **kw)
    assert p.fits, p.reason
    assert all(len(p.hot_per_layer[l]) == p.n_expert // 3 for l in p.moe_layers), p.hot_per_layer
    return p


def _ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 49152, size=n).tolist()


@pytest.mark.llama
@pytest.mark.parametrize("arch,preset", MODELS)
def test_f32_twin_strict_and_same_greedy(arch, preset, llama_cpp):
    path = _twin(tiny_model(arch, preset=preset))
    p = third_plan(path)
    m = hetero_moe.load(path, gpu="interpret", plan=p)
    ids = _ids(N_POS)
    ours = m.logits(ids).numpy()
    want = LlamaRef(path, n_ctx=256).logits(ids)
    stats = compare_logits(ours, want)
    print(arch, preset, "F32 twin, interpret", stats)
    assert stats["max_rel_err"] <= MAX_REL_ERR, stats
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats
    cpu = hetero_moe.load(path, gpu="none", n_ctx=N_CTX)
    prompt = _ids(12, seed=1)
    got = m.generate(prompt, max_tokens=N_GEN, temperature=0).tokens
    want_toks = cpu.generate(prompt, max_tokens=N_GEN, temperature=0).tokens
    assert got == want_toks, (got, want_toks)


@pytest.mark.llama
@pytest.mark.parametrize("arch,preset,quant", [m + ("Q4_K_M",) for m in MODELS]
                         + [("qwen3moe", "tiny", "Q3_K_M")])
def test_quantized_within_llama_noise_and_greedy(arch, preset, quant, llama_cpp):
    """Q3_K_M: hot experts of a type without a Triton kernel (Q3_K) run from float16 copies."""
    path = tiny_model(arch, preset=preset, quant=quant)
    p = third_plan(path)
    m = hetero_moe.load(path, gpu="interpret", plan=p)
    # the executor holds what the plan says
    mem = m.memory()
    assert mem["mode"] == "interpret"
    assert abs(mem["held_bytes"] - mem["planned_bytes"]) <= HOLD_TOL * mem["planned_bytes"], mem
    assert mem["held_groups"]["hot_experts"] == p.gpu_groups["hot_experts"]
    assert m.plan is p and m.plan.to_dict() == p.to_dict()
    ids = _ids(N_POS)
    ours = m.logits(ids).numpy()
    want = LlamaRef(path, n_ctx=256).logits(ids)
    exact = LlamaRef(_twin(path), n_ctx=256).logits(ids)
    noise = rel_err(want, exact)
    err = rel_err(ours, want)
    stats = compare_logits(ours, want)
    stats.update(llama_q_vs_f32_mean=float(noise.mean()), ours_mean=float(err.mean()))
    print(arch, preset, quant, "interpret", stats)
    assert err.mean() <= max(MAX_REL_ERR, SELF_MARGIN_MEAN * noise.mean()), stats
    assert np.percentile(err, 95) <= max(MAX_REL_ERR, SELF_MARGIN_P95 * np.percentile(noise, 95))
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats
    # the plan's cache type rules a GPU tier: another one asked for is refused by name
    with pytest.raises(ValueError, match="differs from the GPU plan's 'f16'"):
        hetero_moe.load(path, gpu="interpret", plan=p, cache_type="f32")
    # greedy: the same tokens as the CPU-only run, parting only where it was at a near-tie
    cpu = hetero_moe.load(path, gpu="none", n_ctx=N_CTX)
    # a prompt whose first 16 tokens are decided: for the Q3_K_M file the seed among 1-12 whose
    # CPU run (f16 KV cache) has the largest smallest top-1/top-2 margin over them (0.20 logits;
    # seed 2's is 0.036 at token 6)
    prompt = _ids(12, seed=6 if quant == "Q3_K_M" else 1)
    got = m.generate(prompt, max_tokens=N_GEN, temperature=0).tokens
    ref = cpu.generate(prompt, max_tokens=N_GEN, temperature=0, logprobs=0)
    rows = [cpu.logits(prompt + ref.tokens[:j])[-1].numpy() for j in range(len(ref.tokens) + 1)]
    eog = cpu.tokenizer.eog_ids
    assert_same_greedy(got, ref.tokens, rows, eog, f"{arch} interpret vs CPU", N_GEN, TIE_MARGIN)


@pytest.mark.parametrize("arch,preset", MODELS)
def test_cpu_experts_submitted_before_gpu_work(arch, preset):
    path = tiny_model(arch, preset=preset)
    m = hetero_moe.load(path, gpu="interpret", plan=third_plan(path, overrides=None))
    assert m.net.lm_head.method.name == "gpu-blocks"
    log = m.executor.record()
    m.logits(_ids(6))
    m.eval([5], 6)                         # a decode step too
    layers = [i for i, b in enumerate(m.net.blocks) if isinstance(b.ffn, HeteroMoE)]
    assert layers
    seen_both = 0
    for l in layers:
        ev = log.of_layer(l)
        assert ev[0] == "route" and ev[-1] == "combine", ev
        # per call: route, [cpu_submit], [gpu_shared], [gpu_hot], [cpu_wait], combine
        calls, cur = [], []
        for e in ev:
            cur.append(e)
            if e == "combine":
                calls.append(cur)
                cur = []
        for c in calls:
            if "cpu_submit" in c:
                i = c.index("cpu_submit")
                gpu = [j for j, e in enumerate(c) if e in ("gpu_shared", "gpu_hot")]
                assert all(j > i for j in gpu), c
                assert c.index("cpu_wait") > max(gpu, default=i), c
                seen_both += bool(gpu)
    assert seen_both, "no call had both CPU and GPU experts"


def test_plan_and_memory_of_a_cpu_only_model():
    path = tiny_model("qwen3moe")
    m = hetero_moe.load(path, gpu="none", n_ctx=64)
    assert m.executor is None and m.memory() == {"mode": "none", "held_bytes": 0}
    d = m.plan.to_dict()
    assert d["gpu"]["device"] == "none" and d["hot_experts"]["count"] == 0


def test_plan_errors(tmp_path):
    path = tiny_model("qwen3moe")
    p = P.plan(path, gpu="interpret", n_ctx=64, cpu_bandwidth_gbps=20)
    with pytest.raises(P.PlanError, match="n_ctx=64"):
        hetero_moe.load(path, gpu="interpret", plan=p, n_ctx=128)
    other = tiny_model("qwen2moe")
    with pytest.raises(P.PlanError, match="the plan is for"):
        hetero_moe.load(other, gpu="interpret", plan=p)
    small = P.plan(path, gpu="interpret", n_ctx=64, vram="1MiB", cpu_bandwidth_gbps=20)
    with pytest.raises(P.PlanError, match="does not fit"):
        hetero_moe.load(path, gpu="interpret", plan=small)
    f = tmp_path / "p.json"
    p.save(str(f))
    m = hetero_moe.load(path, plan=str(f))            # gpu="auto" follows an interpret plan
    assert m.memory()["mode"] == "interpret"


def test_cpu_moe_skips_pairs_marked_minus_one():
    """The C++ MoE FFN skips (token, expert) pairs whose id is -1 (experts on the GPU tier):
    equal to the same call with those pairs' weights set to zero (up to float rounding: fewer
    pairs per expert can take another GEMM tiling, which sums in another order)."""
    from hetero_moe import cpu_backend
    from hetero_moe.testing.make_model import cached_test_model
    from hetero_moe.gguf import GGUFFile
    if not cpu_backend.available():
        pytest.skip("CPU kernels not built")
    g = GGUFFile(str(cached_test_model("qwen3moe")))
    st = [g.tensors[f"blk.0.ffn_{w}_exps.weight"] for w in ("gate", "up", "down")]
    E, Fe, D = st[0].shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, D, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(5)]).to(torch.int32)
    w = torch.rand(5, 2, generator=gen)
    skip = torch.rand(5, 2, generator=gen) < 0.5
    kw = dict(gate_type=st[0].ggml_type, up_type=st[1].ggml_type, down_type=st[2].ggml_type,
              n_expert=E, d_model=D, d_ff=Fe)
    a = cpu_backend.moe_ffn(x, ids.masked_fill(skip, -1), w, st[0].data, st[1].data,
                            st[2].data, **kw)
    b = cpu_backend.moe_ffn(x, ids, w.masked_fill(skip, 0.0), st[0].data, st[1].data,
                            st[2].data, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(a[skip.all(1)], torch.zeros_like(a[skip.all(1)]))   # all pairs skipped
    with pytest.raises(ValueError, match="-2"):
        cpu_backend.moe_ffn(x, ids.masked_fill(skip, -2), w, st[0].data, st[1].data,
                            st[2].data, **kw)


def test_gpu_block_types_match_the_kernels():
    """The planner counts block bytes for exactly the types the Triton kernels multiply."""
    from hetero_moe import quant
    from hetero_moe.kernels.triton import gguf as gk
    from hetero_moe.layers.linear import register_gpu_kernels
    from hetero_moe.runtime.placement import GPU_BLOCK_TYPES
    assert GPU_BLOCK_TYPES == gk.SUPPORTED
    register_gpu_kernels()
    assert {t for t, q in quant.QUANT_TYPES.items() if q.gpu_kernel is gk} == GPU_BLOCK_TYPES


def test_large_prompts_stream_cold_experts_to_the_gpu():
    """Above stream_min_tokens a prompt's hit cold experts run on the GPU tier (uploaded in
    groups) instead of the CPU: the same logits as the CPU-expert run up to the CPU tier's 8-bit
    activations, and no CPU submission in the log."""
    path = tiny_model("qwen2moe")
    p = third_plan(path)
    ids = _ids(24)
    cpu_side = hetero_moe.load(path, gpu="interpret", plan=p, stream_min_tokens=0)
    streamed = hetero_moe.load(path, gpu="interpret", plan=p, stream_min_tokens=8)
    log = streamed.executor.record()
    a, b = cpu_side.logits(ids).numpy(), streamed.logits(ids).numpy()
    ev = [e for e, _, _ in log.events]
    assert "gpu_stream" in ev and "cpu_submit" not in ev
    streamed.eval([7], len(ids))                      # decode (1 token) stays on the CPU
    assert "cpu_submit" in [e for e, _, _ in log.events]
    stats = compare_logits(b, a)
    assert stats["mean_rel_err"] <= MAX_REL_ERR, stats
    assert stats["top1_agree_decided"] >= MIN_TOP1, stats
    assert streamed.memory()["held_bytes"] == cpu_side.memory()["held_bytes"]   # transient
    with pytest.raises(ValueError, match="stream_min_tokens"):
        hetero_moe.load(path, gpu="interpret", plan=p, stream_min_tokens=-1)


def test_cli_plan_then_run_and_bench_interpret(tmp_path):
    import json
    import subprocess
    import sys
    path = tiny_model("qwen3moe")
    plan = tmp_path / "plan.json"
    cli = [sys.executable, "-m", "hetero_moe.cli"]
    r = subprocess.run(cli + ["plan", path, "--gpu", "interpret", "--vram", "4MiB", "--ctx",
                              "64", "--override", r"^output\.weight$=cpu", "--cpu-bandwidth",
                              "20", "-o", str(plan)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(plan.read_text())["gpu"]["device"] == "interpret"
    r = subprocess.run(cli + ["run", path, "--plan", str(plan), "-p", "Hello there", "-n", "4",
                              "--temp", "0", "--raw"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "plan: GPU" in r.stderr and "hot experts" in r.stderr
    r = subprocess.run(cli + ["bench", path, "--plan", str(plan), "-p", "16", "-n", "4",
                              "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["gpu"]["mode"] == "interpret" and d["gpu"]["held_bytes"] == d["gpu"]["planned_bytes"]
    r = subprocess.run(cli + ["run", path, "--gpu", "interpret", "--vram", "1MiB", "-p", "x",
                              "-n", "1"], capture_output=True, text=True)
    assert r.returncode == 1 and "does not fit" in r.stderr


def test_prompts_run_in_the_plans_chunks():
    path = tiny_model("qwen3moe")
    p = P.plan(path, gpu="interpret", n_ctx=64, chunk=8, cpu_bandwidth_gbps=20,
               overrides=LM_HEAD_ON_CPU)
    m = hetero_moe.load(path, gpu="interpret", plan=p)
    log = m.executor.record()
    full = m.logits(_ids(20))
    assert log.of_layer(0).count("route") == 3             # 8 + 8 + 4 tokens
    one = hetero_moe.load(path, gpu="interpret", plan=P.plan(
        path, gpu="interpret", n_ctx=64, cpu_bandwidth_gbps=20, overrides=LM_HEAD_ON_CPU))
    stats = compare_logits(full.numpy(), one.logits(_ids(20)).numpy())
    assert stats["max_rel_err"] <= MAX_REL_ERR, stats


def test_cpu_experts_through_the_torch_reference():
    """cpu_kernels="torch": the cold experts run through the torch reference (synchronously)."""
    path = tiny_model("qwen3moe")
    p = third_plan(path)
    ids = _ids(10)
    a = hetero_moe.load(path, gpu="interpret", plan=p, cpu_kernels="torch")
    assert not any(b.ffn.moe.use_kernel for b in a.net.blocks)
    b = hetero_moe.load(path, gpu="interpret", plan=p)
    stats = compare_logits(a.logits(ids).numpy(), b.logits(ids).numpy())
    assert stats["max_rel_err"] <= MAX_REL_ERR, stats
