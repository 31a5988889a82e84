"""CPU kernel benchmarks at Qwen3-30B-A3B layer shapes (D=2048, E=128, top-8, F=768, Q4_K_M:
gate/up Q4_K, down Q6_K).

  GEMV  (decode, T=1): GB/s of weight bytes streamed, weights larger than the L3 cache.
  GEMM  (prefill): GFLOP/s (2*rows*cols*T) on one expert's matrices, T=32 (a typical expert's share of
        a 512-token prompt) and T=512; Q8_0 at the gate/up shape for the legacy-quant path.
  MoE   the fused FFN layer: T=1 decode (fresh random experts every call, so they come from DRAM) and
        T=512 prefill; ms per call, and for decode GB/s of the 8 experts' bytes.

    python benchmarks/bench_kernels.py [--threads N] [--json] [--quick]

--cputime reports per-call CPU time of the calling thread with 1 thread (useful on a busy machine:
cycles spent by the kernel, not wall time lost to other processes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import os

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from hetero_moe import cpu_backend as cb  # noqa: E402

F16, BF16, Q8_0, Q2_K, Q3_K, Q4_K, Q6_K = 1, 30, 8, 10, 11, 12, 14
TYPE_IDS = {"F16": F16, "BF16": BF16, "Q8_0": Q8_0, "Q2_K": Q2_K, "Q3_K": Q3_K, "Q4_K": Q4_K, "Q6_K": Q6_K}
# byte offsets of a block's f16 scales (default: d, dmin)
F16_OFFSETS = {Q8_0: [0], Q6_K: [208], Q2_K: [80, 82], Q3_K: [108]}
D, F, E, K = 2048, 768, 128, 8


def rand_weights(t: int, n_rows: int, n_cols: int, rng) -> np.ndarray:
    """Random quant bytes with small finite f16 scales (speed does not depend on values)."""
    info = cb.type_info(t)
    if t in (F16, BF16):  # finite values (random bytes would hold NaNs and subnormals)
        v = rng.standard_normal((n_rows, n_cols), dtype=np.float32) * 0.05
        return (v.astype(np.float16) if t == F16 else (v.view(np.uint32) >> 16).astype(np.uint16)).view(np.uint8)
    nb = n_cols // info["block"]
    b = rng.integers(0, 256, size=(n_rows, nb, info["bytes"]), dtype=np.uint8)
    h = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    for off in F16_OFFSETS.get(t, [0, 2]):
        b[:, :, off], b[:, :, off + 1] = h[0], h[1]
    return b.reshape(n_rows, nb * info["bytes"])


def timeit(fn, min_time: float, cputime: bool) -> float:
    clock = time.thread_time if cputime else time.perf_counter
    fn()  # warm-up
    n, t0 = 0, clock()
    w0 = time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - w0 >= min_time and n >= 3:
            break
    return (clock() - t0) / n


def bench_gemv(t: int, n_rows: int, n_cols: int, args, rng) -> dict:
    mats = [rand_weights(t, n_rows, n_cols, rng) for _ in range(2)]  # alternate: 2x L3 size
    x = torch.randn(1, n_cols)
    it = iter(range(10 ** 9))
    dt = timeit(lambda: cb.matmul(mats[next(it) % 2], t, n_rows, n_cols, x), args.min_time, args.cputime)
    nbytes = mats[0].nbytes
    return {"kind": "gemv", "type": cb.type_info(t)["name"], "shape": [n_rows, n_cols], "ms": dt * 1e3,
            "GB/s": nbytes / dt / 1e9}


def bench_gemm(t: int, n_rows: int, n_cols: int, T: int, args, rng) -> dict:
    w = rand_weights(t, n_rows, n_cols, rng)
    x = torch.randn(T, n_cols)
    dt = timeit(lambda: cb.matmul(w, t, n_rows, n_cols, x), args.min_time, args.cputime)
    return {"kind": "gemm", "type": cb.type_info(t)["name"], "shape": [n_rows, n_cols], "T": T, "ms": dt * 1e3,
            "GFLOP/s": 2.0 * n_rows * n_cols * T / dt / 1e9}


def bench_moe(T: int, n_expert: int, args, rng, layer) -> dict:
    gate, up, down = layer
    x = torch.randn(T, D) * 0.5
    kw = dict(gate_type=Q4_K, up_type=Q4_K, down_type=Q6_K, n_expert=n_expert, d_model=D, d_ff=F)
    wts = torch.full((T, K), 1.0 / K)

    def call():
        ids = torch.from_numpy(np.stack([rng.choice(n_expert, K, replace=False) for _ in range(T)]).astype(np.int32))
        cb.moe_ffn(x, ids, wts, gate, up, down, **kw)

    dt = timeit(call, args.min_time, args.cputime)
    per_expert = (2 * F * cb.row_bytes(Q4_K, D) + D * cb.row_bytes(Q6_K, F))
    r = {"kind": "moe", "T": T, "n_expert": n_expert, "k": K, "ms": dt * 1e3, "tok/s": T / dt,
         "GFLOP/s": 2.0 * T * K * 3 * D * F / dt / 1e9}
    if T == 1:
        r["GB/s"] = K * per_expert / dt / 1e9
        r["roofline_ms_at_41GBps"] = K * per_expert / 41e9 * 1e3
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller expert count and shorter runs")
    ap.add_argument("--cputime", action="store_true", help="CPU time of the calling thread (forces 1 thread)")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--only", default="gemv,gemm,moe")
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0",
                    help="weight types for gemv/gemm (Q4_K,Q6_K,Q8_0; also Q2_K, Q3_K, F16, BF16)")
    args = ap.parse_args(argv)
    if not cb.available():
        print(f"CPU kernels unavailable: {cb.unavailable_reason()}", file=sys.stderr)
        return 1
    if args.cputime:
        args.threads = 1
    if args.threads:
        cb.set_num_threads(args.threads)
    if args.quick:
        args.min_time = min(args.min_time, 0.3)
    rng = np.random.default_rng(0)
    only = set(args.only.split(","))
    results = []
    types = [TYPE_IDS[n] for n in args.types.split(",")]
    if "gemv" in only:  # ~56 MB matrices (Q4_K): larger than L3
        for t in types:  # the gate/up shape; Q6_K at the down shape
            results.append(bench_gemv(t, 32 * D, F, args, rng) if t == Q6_K else bench_gemv(t, 48 * F, D, args, rng))
    if "gemm" in only:
        for T in (32, 512):
            for t in types:
                results.append(bench_gemm(t, D, F, T, args, rng) if t == Q6_K else bench_gemm(t, F, D, T, args, rng))
    if "moe" in only:
        n_exp = 32 if args.quick else E
        layer = (rand_weights(Q4_K, n_exp * F, D, rng).reshape(-1), rand_weights(Q4_K, n_exp * F, D, rng).reshape(-1),
                 rand_weights(Q6_K, n_exp * D, F, rng).reshape(-1))
        results.append(bench_moe(1, n_exp, args, rng, layer))
        results.append(bench_moe(512, n_exp, args, rng, layer))
    meta = {"threads": cb.get_num_threads(), "variant": cb.features()["variant"], "cputime": args.cputime,
            # llama.cpp on the reference machine (2 threads), 4-layer Qwen3-30B-A3B-shaped Q4_K_M model:
            # decode ~8-9 ms per token (whole model), prefill ~390 tok/s for a 512-token prompt
            "llama_cpp_reference": {"decode_ms_per_token_4_layers": 8.5, "prefill_tok_s": 390}}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=1))
    else:
        print(f"# threads={meta['threads']} variant={meta['variant']}" + (" (CPU time)" if args.cputime else ""))
        for r in results:
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
