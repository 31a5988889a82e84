"""Pipeline stages without Ray: the split by the planner's bytes, the cluster prediction
(`hetero-moe plan --stages`), and stages run in one process against the single-process model."""
from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

import hetero_moe
from hetero_moe import cpu_backend
from hetero_moe.distributed.split import (HIDDEN_BYTES, _partition, predict_cluster,
                                          split_stages)
from hetero_moe.gguf import GGUFFile
from hetero_moe.models.base import config_from_gguf
from hetero_moe.runtime.planner import GiB, PlanError
from hetero_moe.testing.make_model import cached_test_model


@pytest.fixture(scope="module")
def tiny():
    return str(cached_test_model("qwen3moe", layers=8))


@pytest.fixture(scope="module")
def r1():
    from hetero_moe.testing.shape_only import shape_only_model
    return str(shape_only_model("deepseek-r1"))


def _open(path):
    g = GGUFFile(path)
    return g, config_from_gguf(g)


def test_partition_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(30):
        L = int(rng.integers(2, 9))
        n = int(rng.integers(1, L + 1))
        cost = [int(c) for c in rng.integers(1, 100, L)]
        fe, le = int(rng.integers(0, 150)), int(rng.integers(0, 150))

        def worst(b):
            return max(sum(cost[b[k]:b[k + 1]]) + (fe if k == 0 else 0) +
                       (le if k == n - 1 else 0) for k in range(n))
        got = _partition(cost, fe, le, n)
        assert got[0] == 0 and got[-1] == L and all(a < b for a, b in zip(got, got[1:]))
        best = min(worst([0, *c, L]) for c in itertools.combinations(range(1, L), n - 1))
        assert worst(got) == best


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_split_covers_every_tensor_once(tiny, n):
    g, cfg = _open(tiny)
    sp = split_stages(g, cfg, n, n_ctx=256)
    total = sum(t.nbytes for t in g.tensors.values())
    assert [s.first for s in sp.stages] == [0] + [s.last for s in sp.stages[:-1]]
    assert sp.stages[-1].last == cfg.n_layer
    assert sum(s.weight_bytes for s in sp.stages) == total
    per_layer_cache = 2 * cfg.n_head_kv * cfg.head_dim * 4 * 256
    assert sum(s.cache_bytes for s in sp.stages) == cfg.n_layer * per_layer_cache
    for s in sp.stages:
        assert all(s.owns(t) == (s.first <= int(t.split(".")[1]) < s.last)
                   for t in g.tensors if t.startswith("blk."))
    assert "hidden state, 256 x 4" in sp.summary()
    g.close()


def test_split_errors_name_the_problem(tiny):
    g, cfg = _open(tiny)
    with pytest.raises(PlanError, match="exceeds the model's 8 layers"):
        split_stages(g, cfg, 9)
    with pytest.raises(PlanError, match="positive integer"):
        split_stages(g, cfg, 0)
    with pytest.raises(PlanError, match=r"boundaries \[0, 5, 5, 8\] must rise"):
        split_stages(g, cfg, 3, layers=[0, 5, 5, 8])
    with pytest.raises(PlanError, match="is not a size"):
        split_stages(g, cfg, 2, ram_per_host="lots")
    g.close()


def test_r1_over_hosts(r1):
    """R1 Q4_K_M (377 GiB of weights): one 192 GiB host is too small, 2 and 4 fit; the
    prediction is the stages' rooflines plus the hops."""
    g, cfg = _open(r1)
    one = split_stages(g, cfg, 1, n_ctx=32768, cache_type="f16", ram_per_host="192GiB")
    assert not one.fits
    for n in (2, 4):
        sp = split_stages(g, cfg, n, n_ctx=32768, cache_type="f16", ram_per_host="192GiB")
        assert sp.fits and all(s.total_bytes <= 192 * GiB for s in sp.stages)
        p = predict_cluster(sp, cpu_gbps=62.7, network_gbps=25, hop_latency_ms=0.5)
        hop_ms = 7168 * HIDDEN_BYTES * 8 / 25e9 * 1e3 + 0.5
        assert p.transfer_ms == pytest.approx((n - 1) * hop_ms)
        assert p.token_ms == pytest.approx(sum(s.read_bytes for s in sp.stages) / 62.7e9 * 1e3
                                           + (n - 1) * hop_ms)
        assert p.pipeline_tok_s > (n - 0.5) * 1000 / p.token_ms    # ~n x one stream
    with pytest.raises(PlanError, match="bandwidths must be > 0"):
        predict_cluster(sp, cpu_gbps=62.7, network_gbps=0)
    g.close()


def test_plan_cli_stages(r1):
    cmd = [sys.executable, "-m", "hetero_moe.cli", "plan", r1, "--stages", "4", "--ram-per-host",
           "192GiB", "--network-gbps", "25", "--cpu-bandwidth", "62.7", "--ctx", "32768"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stage 3: blk" in out.stdout and "one stream:" in out.stdout
    bad = subprocess.run(cmd[:6] + ["1"] + cmd[7:], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "does NOT fit 192.00 GiB" in bad.stdout


@pytest.mark.skipif(not cpu_backend.available(), reason="CPU kernels not built")
@pytest.mark.parametrize("arch,layers,n", [("qwen3moe", 8, 3), ("deepseek2", None, 2),
                                           ("llama", None, 2)])
def test_stages_in_process_equal_single(arch, layers, n):
    """Stages in one process (no Ray): each maps only its tensors; chained, they give the single
    process's logits bit for bit, prompt (per-op) and decode (fused step or per-op)."""
    from hetero_moe.distributed.stage import Stage
    preset = {"deepseek2": "tiny-v3", "llama": "tiny-tied"}.get(arch, "tiny")
    path = str(cached_test_model(arch, preset=preset, layers=layers))
    m = hetero_moe.load(path, threads=1, n_ctx=128, gpu="none")
    g, cfg = _open(path)
    sp = split_stages(g, cfg, min(n, cfg.n_layer), n_ctx=128)
    g.close()
    stages = [Stage(path, s, 128) for s in sp.stages]
    ids = list(range(3, 23))

    def run(x, pos, cids, all_logits=False):
        for st in stages:
            x = st.run(x, pos, cids, all_logits)
        return torch.from_numpy(x)
    assert torch.equal(run(np.array(ids), [0], [1], True), m.logits(ids))
    c = m.net.new_cache()
    with torch.inference_mode():
        m.net.forward(torch.tensor(ids), 0, False, cache=c)
        ref = m.net.forward_batch([9], [len(ids)], [c])
    assert torch.equal(run(np.array([9]), [len(ids)], [1]), ref)
    for st in stages:
        info = st.info()
        # each span rounds out to pages, and gaps of under a page between tensors are mapped
        slack = info["spans"] * 2 * 65536 + len(stages[0].g.tensors) * 4096
        assert info["stage_bytes"] <= info["mapped_bytes"] <= info["stage_bytes"] + slack
    m.close()
