"""Decode attention per token per layer: sparse (`approx`, default settings) vs dense, on the CPU.

Random fp32 q/k/v in a KV cache of L tokens; each timed round decodes 16 consecutive tokens (so
the compressed-key cache appends one block per round, as in real decoding) and the figure is the
median over rounds of the time per token. Layouts: GQA 32 query heads / 4 KV heads / dim 128, and
the MLA latent cache (128 heads / 1 KV head / key 576, value = the key's first 512 dims).

The dense baseline is the fastest of: the model's own T=1 path (Attention.__call__ ->
decode_attention: the C++ op reading the cache in place when the extension is built), two torch
batched matmuls over the cache, and torch's scaled_dot_product_attention over the cache.
Bytes read: dense reads every cached key and value; sparse reads the compressed keys plus the
gathered tokens (top_n * sel_block + window per KV head).

    python benchmarks/bench_sparse_attn.py [--ctx 8192,16384,32768,65536] [--threads 1,2]
        [--layouts gqa,mla] [--rounds 7] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hetero_moe.layers.attention import decode_attention
from hetero_moe.layers.sparse_attn import SparseAttnConfig, cpu
from hetero_moe.layers.sparse_attn.cache import SparseCache

LAYOUTS = {  # name: (H, Hkv, Dk, Dv, v is the key's first Dv dims)
    "gqa": (32, 4, 128, 128, False),
    "mla": (128, 1, 576, 512, True),
}
STEPS = 16   # decode steps per round: one compressed block is appended per round


def dense_bmm(q, keys, values, scale):
    """The model's T=1 path: q [H, Dk] -> [H, Dv] over keys [L, Hkv, Dk]."""
    Hkv = keys.shape[1]
    qg = q.view(Hkv, -1, q.shape[-1])
    s = torch.bmm(qg, keys.transpose(0, 1).transpose(1, 2)) * scale
    return torch.bmm(torch.softmax(s, dim=-1), values.transpose(0, 1)).reshape(q.shape[0], -1)


def dense_sdpa(q, keys, values, scale):
    H, Hkv = q.shape[0], keys.shape[1]
    out = F.scaled_dot_product_attention(q[None, :, None], keys.transpose(0, 1)[None],
                                         values.transpose(0, 1)[None], scale=scale,
                                         enable_gqa=H != Hkv)
    return out.reshape(H, -1)


def make_cache(L, H, Hkv, Dk, Dv, v_from_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, Hkv, Dk, generator=g)
    v = k[..., :Dv] if v_from_k else torch.randn(L, Hkv, Dv, generator=g)
    q = torch.randn(STEPS, H, Dk, generator=g)
    return q, k, v


def time_rounds(fns, rounds):
    """Median seconds per token of each fn, the fns alternating round by round (a busy machine
    slows them alike)."""
    for fn in fns:
        fn()                               # warm-up (page faults, allocator)
    ts = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, ts):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) / STEPS)
    return [statistics.median(t) for t in ts]


def bench_one(layout, L, threads, rounds, cfg):
    H, Hkv, Dk, Dv, v_from_k = LAYOUTS[layout]
    torch.set_num_threads(threads)
    try:
        from hetero_moe import cpu_backend
        if cpu_backend.available():
            cpu_backend.set_num_threads(threads)
            if hasattr(cpu_backend, "set_spin_us"):
                # idle pool workers would otherwise spin between ops and take a core from the
                # torch threads of the paths timed next to the C++ one
                cpu_backend.set_spin_us(0)
    except ImportError:
        pass
    q, k, v = make_cache(L, H, Hkv, Dk, Dv, v_from_k)
    scale = Dk ** -0.5
    first = L - STEPS + 1                  # the round decodes positions first-1 .. L-1

    def run_dense(f):
        def go():
            for i in range(STEPS):
                f(q[i], k[:first + i], v[:first + i], scale)
        return go

    sc = SparseCache(cfg, L, Hkv, Dk, Dv, "cpu")
    sc.update(k, v)

    def run_sparse():
        sc.truncate(first - 1)
        for i in range(STEPS):
            cpu.decode(q[i], k[:first + i], v[:first + i], sc, cfg, scale)

    with torch.inference_mode():
        t_model, t_bmm, t_sdpa, t_sparse = time_rounds(
            [run_dense(decode_attention), run_dense(dense_bmm), run_dense(dense_sdpa),
             run_sparse], rounds)
    paths = {"model": t_model, "bmm": t_bmm, "sdpa": t_sdpa}
    best = min(paths, key=paths.get)
    t_dense = paths[best]
    kv_bytes = Dk + (0 if v_from_k else Dv)        # MLA: values are part of the key row
    dense_bytes = L * Hkv * kv_bytes * 4
    n_tok = cfg.top_n * cfg.sel_block + cfg.window
    sparse_bytes = (cfg.n_cmp(L - 1) * Hkv * Dk + min(n_tok, L) * Hkv * (Dk + Dv)) * 4
    return {
        "layout": layout, "ctx": L, "threads": threads, "H": H, "Hkv": Hkv, "Dk": Dk, "Dv": Dv,
        "dense_model_ms": t_model * 1e3, "dense_bmm_ms": t_bmm * 1e3,
        "dense_sdpa_ms": t_sdpa * 1e3, "dense_ms": t_dense * 1e3, "dense_path": best,
        "sparse_ms": t_sparse * 1e3,
        "speedup": t_dense / t_sparse, "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes,
        "bytes_ratio": dense_bytes / sparse_bytes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", default="8192,16384,32768,65536")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--layouts", default="gqa,mla")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    cfg = SparseAttnConfig(mode="approx")
    rows = []
    for layout in args.layouts.split(","):
        if layout not in LAYOUTS:
            ap.error(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
        for L in (int(c) for c in args.ctx.split(",")):
            for th in (int(t) for t in args.threads.split(",")):
                r = bench_one(layout, L, th, args.rounds, cfg)
                rows.append(r)
                if not args.json:
                    print(f"{layout:4s} ctx {L:6d} thr {th}: dense {r['dense_ms']:8.3f} ms "
                          f"({r['dense_path']:5s}) sparse {r['sparse_ms']:7.3f} ms  "
                          f"x{r['speedup']:5.1f}  bytes /{r['bytes_ratio']:5.1f}",
                          file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"config": cfg.__dict__, "steps_per_round": STEPS,
                          "rounds": args.rounds, "results": rows}, indent=2))
        return 0
    print(f"\nsparse attention decode, per token per layer ({cfg.mode}: block {cfg.sel_block}, "
          f"top-{cfg.top_n}, window {cfg.window}); medians of {args.rounds} rounds x {STEPS}")
    print("| layout | ctx | threads | dense ms (path) | sparse ms | speedup | bytes dense/sparse |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} {r['H']}/{r['Hkv']}x{r['Dk']} | {r['ctx']} | {r['threads']} | "
              f"{r['dense_ms']:.3f} ({r['dense_path']}) | {r['sparse_ms']:.3f} | "
              f"{r['speedup']:.1f}x | {r['bytes_ratio']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
