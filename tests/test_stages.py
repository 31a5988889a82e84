"""Pipeline stages on a local Ray cluster (127.0.0.1, 2 CPUs): a staged tiny MoE against the
single-process model (same kernels: bit-identical logits, equal greedy text), each stage's
resident memory, the pipeline's overlap, a stage killed mid-request, the server over stages.

The split and the cluster prediction need no Ray (test_stages_split.py)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="pipeline stages need Ray: pip install 'hetero-moe[ray]'")

import hetero_moe  # noqa: E402
from hetero_moe import cpu_backend  # noqa: E402
from hetero_moe.testing.make_model import cached_test_model  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_backend.available(), reason="CPU kernels not built")

N_CTX = 256
PROMPT = list(range(5, 29))          # 24 tokens: the prompt takes the per-op path with scratch


@pytest.fixture(scope="module")
def path():
    return str(cached_test_model("qwen3moe", layers=8))


@pytest.fixture(scope="module")
def single(path):
    m = hetero_moe.load(path, threads=1, n_ctx=N_CTX, gpu="none")
    yield m
    m.close()


@pytest.fixture(scope="module")
def staged(path):
    from hetero_moe.distributed import pipeline
    pipeline.connect("local", num_cpus=2)
    m = hetero_moe.load(path, stages=2, cluster="local", threads=1, n_ctx=N_CTX,
                        stage_cpus=0.5, timeout_s=60)
    yield m
    m.close()


@pytest.fixture(scope="module", autouse=True)
def _shutdown():
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_local_cluster_is_loopback(staged):
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}


def test_logits_and_greedy_equal_single_process(staged, single):
    # prompts: the per-op path layer by layer; decode: the fused C++ step over each stage's
    # layers; the same ops in the same order as one process, so equal bit for bit
    a, b = staged.logits(PROMPT), single.logits(PROMPT)
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item()}"
    ga = staged.generate(PROMPT, max_tokens=24, temperature=0)
    gb = single.generate(PROMPT, max_tokens=24, temperature=0)
    assert ga.tokens == gb.tokens
    text = "Once upon a time"
    assert staged.generate(text, max_tokens=12, temperature=0).text == \
        single.generate(text, max_tokens=12, temperature=0).text


def test_batched_decode_equals_single_process(staged, single):
    """A decode step of 4 sequences goes through 2 stages as 2 micro-batches of 2 rows: equal bit
    for bit to the single process stepping the same 2-row groups, and to its 4-row step within
    the rounding of a different GEMM tiling (README: batched vs single decode, ~1e-6)."""
    nets = (staged.net, single.net)
    caches = [[n.new_cache() for _ in range(4)] for n in nets]
    ids = [7, 8, 9, 10]
    pos = [len(PROMPT) - k for k in range(4)]
    for n, cs in zip(nets, caches):
        for k, c in enumerate(cs):
            n.forward(torch.tensor(PROMPT[k:]), 0, all_logits=False, cache=c)
    got = staged.net.forward_batch(ids, pos, caches[0])
    ref = torch.cat([single.net.forward_batch(ids[a:a + 2], pos[a:a + 2], caches[1][a:a + 2])
                     for a in (0, 2)])
    assert torch.equal(got, ref)
    for c, p in zip(caches[1], pos):
        c.reset(p)
    whole = single.net.forward_batch(ids, pos, caches[1])
    rel = ((got - whole).norm() / whole.norm()).item()
    assert rel < 1e-5, rel


def test_each_stage_maps_only_its_layers(staged, path):
    from hetero_moe.gguf import GGUFFile
    g = GGUFFile(path)
    total = sum(t.nbytes for t in g.tensors.values())
    emb = g.tensors["token_embd.weight"].nbytes
    g.close()
    staged.generate(PROMPT, max_tokens=4, temperature=0)
    infos = staged.net.stage_info()
    assert len({i["pid"] for i in infos}) == 2
    split = staged.net.split
    for info, spec in zip(infos, split.stages):
        # the stage's own tensors (the embedding table is read row by row, never mapped)
        own = spec.weight_bytes - (emb if spec.is_first else 0)
        assert info["stage_bytes"] == own
        # what the process maps and holds of the model file: its own pages, nothing else
        assert info["file_mapped"] <= own + info["spans"] * 2 * 65536, info
        assert info["file_rss"] <= info["file_mapped"], info
        # prefaulted at load (tensors repacked for the kernels would hold anonymous copies instead)
        assert info["file_rss"] + info["repacked_bytes"] >= 0.9 * own, info
        assert info["file_rss"] < 0.75 * total, info
    assert sum(i["stage_bytes"] for i in infos) == total - emb


def test_stages_overlap_on_micro_batches(staged):
    """In a decode step of 8 sequences as 8 micro-batches, stage 1 works on the first ones while
    stage 0 still works on the later ones (the driver submits every chain before waiting)."""
    net = staged.net
    cs = [net.new_cache() for _ in range(8)]
    for c in cs:
        net.forward(torch.tensor(PROMPT), 0, all_logits=False, cache=c)
    net.micro_batches = 8
    overlapped = 0
    try:
        for step in range(6):
            net.traces()
            net.forward_batch(list(range(5, 13)), [len(PROMPT) + step] * 8, cs)
            t0, t1 = net.traces()
            assert [n for *_, n, _ in t0] == [1] * 8 and [n for *_, n, _ in t1] == [1] * 8
            overlapped += any(a1 < b0 and a0 < b1 for a0, b0, *_ in t0 for a1, b1, *_ in t1)
    finally:
        net.micro_batches = None
    # the OS may run them one after the other now and then on 2 busy cores
    assert overlapped >= 4, f"the stages overlapped in only {overlapped} of 6 steps"


def test_stage_killed_mid_request_then_recovers(staged, single):
    from hetero_moe.distributed.pipeline import StageError
    ref = single.generate(PROMPT, max_tokens=8, temperature=0).tokens
    pid = staged.net.stage_info()[1]["pid"]
    res = {}

    def gen():
        try:
            res["out"] = staged.generate(PROMPT, max_tokens=200, temperature=0)
        except Exception as e:          # the error the caller sees
            res["err"] = e
    th = threading.Thread(target=gen)
    th.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    th.join(60)
    assert not th.is_alive(), "the request hung after the stage died"
    err = res.get("err")
    assert isinstance(err, StageError), res
    assert "stage 1" in str(err) and "blk" in str(err)
    t0 = time.perf_counter()
    out = staged.generate(PROMPT, max_tokens=8, temperature=0)      # Ray restarted the stage
    assert out.tokens == ref
    assert time.perf_counter() - t0 < 60
    assert staged.net.stage_info()[1]["pid"] != pid


def test_bad_options_fail_clearly(path):
    with pytest.raises(ValueError, match="stages must be a positive integer"):
        hetero_moe.load(path, stages=0, cluster="local")
    with pytest.raises(hetero_moe.HeteroMoEError, match="exceeds the model's 8 layers"):
        hetero_moe.load(path, stages=9, cluster="local")
    with pytest.raises(hetero_moe.HeteroMoEError, match="cluster must be"):
        hetero_moe.load(path, stages=2, cluster="nowhere")
    with pytest.raises(hetero_moe.UnsupportedError, match="CPU with dense attention"):
        hetero_moe.load(path, stages=2, cluster="local", sparse_attn="approx")


def test_server_drives_staged_model(staged):
    """The OpenAI engine over a staged model: 3 requests in flight, greedy results equal to each
    request alone."""
    from hetero_moe.sampling import SamplingParams
    from hetero_moe.server.engine import Done, Engine, Failed, Job, Piece
    eng = Engine(staged, n_slots=3, batch="on")
    eng.start()
    results = {}
    events = {}

    def submit(k, prompt):
        done = threading.Event()
        pieces = []

        def emit(ev):
            if isinstance(ev, Piece):
                pieces.append(ev.text)
            elif isinstance(ev, (Done, Failed)):
                results[k] = (ev, "".join(pieces))
                done.set()
        eng.submit(Job(prompt, SamplingParams(max_tokens=12, temperature=0), emit,
                       cache_prompt=False))
        events[k] = done
    prompts = [PROMPT, PROMPT[3:], PROMPT[7:]]
    for k, p in enumerate(prompts):
        submit(k, p)
    for k in range(3):
        assert events[k].wait(60)
    eng.stop(5)
    eng.join(10)
    for k, p in enumerate(prompts):
        ev, text = results[k]
        assert isinstance(ev, Done), ev
        alone = staged.generate(p, max_tokens=12, temperature=0)
        assert text == alone.text
    assert eng.stats.batched_steps > 0
