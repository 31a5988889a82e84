"""The placement planner on the real shapes (shape-only GGUFs of DeepSeek-R1 and Qwen3, whose data
region is a hole) and on tiny real models (routing profiles)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from hetero_moe.gguf import GGUFFile
from hetero_moe.runtime import planner as P
from hetero_moe.runtime.placement import gpu_resident_bytes

GiB = 1 << 30
CPU_BW = 60.0          # GB/s for predictions (no measurement: tests stay quiet and fast)
DENSE_GROUPS = ("attention", "shared_experts", "dense_ffn", "router", "norms")


@pytest.fixture(scope="module")
def r1():
    from hetero_moe.testing.shape_only import shape_only_model
    return str(shape_only_model("deepseek-r1"))


@pytest.fixture(scope="module")
def a3b():
    from hetero_moe.testing.shape_only import shape_only_model
    return str(shape_only_model("qwen3-30b-a3b"))


def _plan(path, **kw):
    kw.setdefault("cpu_bandwidth_gbps", CPU_BW)
    return P.plan(path, **kw)


def _mapped_rss(path: str) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    rss, inside = 0, False
    real = os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(real)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return rss


def test_r1_fits_24gib_at_32k(r1):
    t0 = time.perf_counter()
    p = _plan(r1, vram="24GiB", n_ctx=32768)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"planning took {elapsed:.1f} s"
    assert p.fits, p.reason
    g = GGUFFile(r1)
    for t in g:
        grp = P.group_of(t.name)
        if grp in DENSE_GROUPS or grp == "output":
            assert p.placement[t.name] == "gpu", t.name
        elif grp == "embeddings":
            assert p.placement[t.name] == "cpu"
        elif grp == "experts":
            assert isinstance(p.placement[t.name], list)
    # the MLA latent cache: (kv_lora 512 + rope 64) f16 values per token in each of 61 layers
    assert p.cache_bytes_per_token == 61 * 576 * 2
    assert abs(p.cache_bytes_per_token / 1024 - 68.6) < 0.05
    assert p.gpu_groups["kv_cache"] == 32768 * p.cache_bytes_per_token
    assert p.hot_count > 0
    assert p.gpu_total <= p.gpu_budget - p.margin
    assert p.gpu_budget == 24 * GiB and p.margin == P.DEFAULT_MARGIN
    # the groups add up to the tensors placed on the GPU, as the GPU tier holds them
    dense = sum(gpu_resident_bytes(t.name, t.ggml_type, t.ne, t.nbytes) for t in g
                if p.placement.get(t.name) == "gpu")
    from hetero_moe.models.base import config_from_gguf
    assert dense + P.rope_table_bytes(config_from_gguf(g), 32768) + sum(
        len(p.hot_per_layer[l]) * p.expert_gpu_bytes[l] for l in p.moe_layers) \
        == p.gpu_total - p.gpu_groups["kv_cache"] - p.gpu_groups["scratch"]
    # default hot experts: spread over the later layers (never more in an earlier layer)
    per = [len(p.hot_per_layer[l]) for l in p.moe_layers]
    assert per == sorted(per) and per[-1] - per[0] <= 1
    assert p.predicted["decode_tok_s"] > 0
    assert "prediction" in p.predicted["note"]
    # a CPU tier larger than the RAM budget is reported (the file would page from disk)
    assert "fits in RAM" in _plan(r1, vram="24GiB", ram="512GiB").ram_note
    assert "read from disk" in _plan(r1, vram="24GiB", ram="64GiB").ram_note


def test_r1_planning_reads_no_tensor_data(r1):
    g = GGUFFile(r1)
    try:
        data_start = min(t.offset for t in g)
        p = P.make_plan(g, vram="24GiB", n_ctx=32768, cpu_bandwidth_gbps=CPU_BW)
        assert p.fits
        rss = _mapped_rss(r1)
    finally:
        g.close()
    # only header pages may have been touched (the parser drops even those)
    assert rss <= data_start, f"{rss} bytes of {r1} resident, header is {data_start}"


def test_r1_refuses_8gib_naming_what_does_not_fit(r1):
    p = _plan(r1, vram="8GiB", n_ctx=32768)
    assert not p.fits
    for word in ("attention", "shared_experts", "cache", "8.00 GiB"):
        assert word in p.reason, (word, p.reason)
    assert p.max_ctx == 0 and "no context fits" in p.reason
    assert p.to_dict()["fits"] is False and p.to_dict()["reason"] == p.reason


def test_r1_too_long_context_names_the_largest_that_fits(r1):
    p = _plan(r1, vram="24GiB", n_ctx=262144)
    assert not p.fits
    assert 32768 < p.max_ctx < 262144
    assert f"the largest context that fits is {p.max_ctx} tokens" in p.reason
    ok = _plan(r1, vram="24GiB", n_ctx=p.max_ctx)
    assert ok.fits
    assert not _plan(r1, vram="24GiB", n_ctx=p.max_ctx + 64).fits


def test_overrides_move_exactly_what_they_match(r1):
    base = _plan(r1, vram="24GiB", n_ctx=8192)
    rule = r"blk\.(5|6)\.attn_q_b\.weight=cpu"
    p = _plan(r1, vram="24GiB", n_ctx=8192, overrides=[rule])
    moved = {n for n, v in base.placement.items()
             if not isinstance(v, list) and p.placement[n] != v}
    assert moved == {"blk.5.attn_q_b.weight", "blk.6.attn_q_b.weight"}
    assert all(p.placement[n] == "cpu" for n in moved)
    # the freed bytes went to hot experts
    assert p.hot_count >= base.hot_count
    # expert layers pinned to the CPU hold no hot experts; to the GPU, all of them
    p = _plan(r1, vram="24GiB", n_ctx=8192,
              overrides=[r"blk\.(59|60)\.ffn_.*_exps=cpu", r"blk\.3\.ffn_.*_exps=gpu"])
    assert p.hot_per_layer[59] == [] and p.hot_per_layer[60] == []
    assert p.hot_per_layer[3] == list(range(256))
    assert p.placement["blk.60.ffn_up_exps.weight"] == []
    assert p.tier_of("blk.3.ffn_down_exps.weight") == "gpu"
    # a rule that splits a layer's gate/up/down is refused with the names
    with pytest.raises(P.PlanError, match="move together"):
        _plan(r1, vram="24GiB", overrides=[r"blk\.7\.ffn_down_exps=cpu"])
    with pytest.raises(P.PlanError, match="REGEX=gpu"):
        _plan(r1, overrides=["attn_q=somewhere"])


def test_cpu_moe_shortcut(a3b):
    p = _plan(a3b, vram="24GiB", n_ctx=4096, cpu_moe=40)
    assert all(p.hot_per_layer[l] == [] for l in range(40))
    assert all(len(p.hot_per_layer[l]) == 128 for l in range(40, 48))


def test_qwen3_30b_fits_whole_on_24gib(a3b):
    p = _plan(a3b, vram="24GiB", n_ctx=32768)
    assert p.fits, p.reason
    assert p.hot_count == 48 * 128                 # every routed expert on the GPU
    assert "experts" not in p.cpu_groups           # no CPU expert tier at all
    assert set(p.cpu_groups) == {"embeddings"}
    assert p.predicted["hit_rate"] == 1.0
    half = _plan(a3b, vram="12GiB", n_ctx=32768)
    assert half.fits
    assert 0 < half.hot_count < 48 * 128
    assert half.cpu_groups["experts"] > 0


def test_json_fields_and_round_trip(a3b, tmp_path):
    p = _plan(a3b, vram="12GiB", n_ctx=8192)
    d = p.to_dict()
    for k in ("fits", "placement", "reason"):
        assert k in d
    assert d["gpu"]["budget_bytes"] == 12 * GiB
    assert d["gpu"]["total_bytes"] == sum(d["gpu"]["groups"].values())
    assert set(d["gpu"]["groups"]) == set(P.GROUPS)
    assert d["cpu"]["total_bytes"] > 0
    assert d["kv_cache"]["bytes_per_token"] == 48 * 2 * 4 * 128 * 2
    assert d["hot_experts"]["count"] == sum(d["hot_experts"]["per_layer"].values())
    assert d["predicted"]["decode_tok_s"] > 0
    assert isinstance(d["placement"]["blk.0.ffn_gate_exps.weight"], list)
    f = tmp_path / "plan.json"
    p.save(str(f))
    assert P.Plan.load(str(f)).to_dict() == json.loads(json.dumps(d))


def test_sizes_and_errors():
    assert P.parse_size("24GiB") == 24 * GiB == P.parse_size("24G")
    assert P.parse_size("24GB") == 24 * 10 ** 9
    assert P.parse_size("1.5GiB") == 3 * GiB // 2
    assert P.parse_size(1234) == 1234
    with pytest.raises(P.PlanError, match="not a size"):
        P.parse_size("lots")
    with pytest.raises(P.PlanError, match="cannot read plan"):
        P.Plan.load("/nonexistent/plan.json")


def test_cli_plan(r1, tmp_path):
    out = tmp_path / "r1.json"
    r = subprocess.run([sys.executable, "-m", "hetero_moe.cli", "plan", r1, "--vram", "24GiB",
                        "--ctx", "32768", "--cpu-bandwidth", "60", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "hot experts:" in r.stdout and "fits: yes" in r.stdout
    assert "predicted decode (a roofline, not a measurement)" in r.stdout
    assert json.loads(out.read_text())["fits"] is True
    r = subprocess.run([sys.executable, "-m", "hetero_moe.cli", "plan", r1, "--vram", "8GiB",
                        "--ctx", "32768", "--cpu-bandwidth", "60", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert d["fits"] is False and "attention" in d["reason"]


@pytest.mark.llama
def test_profile_changes_the_hot_experts(tmp_path):
    """A routing profile from a real run of a tiny MoE decides which experts are hot."""
    from hetero_moe.testing.make_model import cached_test_model
    path = str(cached_test_model("qwen3moe", preset="tiny", quant="Q4_K_M"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox jumps over the lazy dog.\n"
                       "Mixture-of-experts models route each token to a few experts.\n"
                       "Once upon a time there was a small model.\n")
    prof_path = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, "-m", "hetero_moe.cli", "profile", path, "--prompts",
                        str(prompts), "-o", str(prof_path), "-n", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    prof = P.Profile.load(str(prof_path))
    assert sorted(prof.counts) == [0, 1] and prof.tokens > 0
    assert all(sum(c) == prof.tokens * 2 for c in prof.counts.values())   # top-2 per token
    base = P.plan(path, gpu="interpret", n_ctx=256, cpu_bandwidth_gbps=CPU_BW)
    one = base.expert_gpu_bytes[0]
    fixed = base.gpu_total - base.gpu_groups["hot_experts"]
    budget = fixed + 3 * one + one // 2                   # room for three experts
    p0 = P.plan(path, gpu="interpret", n_ctx=256, vram=budget, cpu_bandwidth_gbps=CPU_BW)
    p1 = P.plan(path, gpu="interpret", n_ctx=256, vram=budget, profile=str(prof_path),
                cpu_bandwidth_gbps=CPU_BW)
    assert p0.hot_count == p1.hot_count == 3
    picked = [(l, e) for l, es in p1.hot_per_layer.items() for e in es]
    freq = sorted(((c / sum(cs), l, e) for l, cs in prof.counts.items()
                   for e, c in enumerate(cs)), reverse=True)
    assert sorted(picked) == sorted((l, e) for _, l, e in freq[:3])
    assert p1.hot_per_layer != p0.hot_per_layer
    assert p1.predicted["hit_rate"] > p0.predicted["hit_rate"]
