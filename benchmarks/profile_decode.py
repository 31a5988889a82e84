"""Where decode time goes: quantized matmuls (C++ kernels), the fused MoE op, attention over the
cache, routing, lm_head and everything else, in ms per token.

    python benchmarks/profile_decode.py [--model qwen3moe-a3b] [--threads 2] [--ctx 512] [--json]
        [--per-op] [--batch 1,2,4,8] [--repack auto|on|off]

By default decode runs as one C++ step per token (runtime/fused_decode.py), which times its parts
itself; "Python" is the token's total minus the step (embedding row, call, sampling). --per-op
profiles the per-op path instead (HETERO_MOE_FUSED_DECODE=0): wall time around each op's call on
the decoding thread, "glue" being the total minus the parts.

--batch B1,B2,..: batched decode instead (what a server with B generating slots runs: one
forward_batch of B sequences, each at --ctx cached positions of its own cache), per B: ms per step,
aggregate tok/s and its ratio to B = 1, and the fused step's parts per step. Counts alternate
(B1, B2, .., B1, B2, ..) for --rounds rounds; the best round of each is reported.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3moe-a3b", help="preset name, 'smollm2' or a .gguf path")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512, help="cached positions before decoding (512)")
    ap.add_argument("--tokens", type=int, default=48, help="decoded tokens measured (48)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--per-op", action="store_true", help="profile the per-op path")
    ap.add_argument("--batch", help="batched decode: comma-separated sequence counts, e.g. 1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3, help="--batch rounds (3)")
    ap.add_argument("--repack", choices=["auto", "on", "off"], default="auto",
                    help="load(repack=...): the 16-row interleaved layouts (auto: as load's default)")
    args = ap.parse_args(argv)
    if args.per_op:
        os.environ["HETERO_MOE_FUSED_DECODE"] = "0"

    import torch

    import hetero_moe
    from bench_vs_llama import resolve_model
    from hetero_moe.layers import attention, linear, moe

    path = resolve_model(args.model, args.layers)
    m = hetero_moe.load(path, threads=args.threads, n_ctx=args.ctx + args.tokens + 8, repack=args.repack)
    acc: dict[str, float] = collections.defaultdict(float)
    on = [False]

    def timed(key_of, f):
        def g(*a, **k):
            if not on[0]:
                return f(*a, **k)
            t0 = time.perf_counter()
            r = f(*a, **k)
            acc[key_of(*a)] += time.perf_counter() - t0
            return r
        return g

    lm_head = m.net.lm_head
    linear.QuantLinear.__call__ = timed(
        lambda s, *_: "lm_head" if s is lm_head else "matmul (attention projections, dense FFN)",
        linear.QuantLinear.__call__)
    linear.apply_group = timed(lambda *_: "matmul (attention projections, dense FFN)",
                               linear.apply_group)
    attention.apply_group = linear.apply_group
    moe.apply_group = linear.apply_group
    moe.MoE.experts_kernel = timed(lambda *_: "MoE experts (fused op)", moe.MoE.experts_kernel)
    moe.MoE.experts_torch = timed(lambda *_: "MoE experts (fused op)", moe.MoE.experts_torch)
    moe.MoE.route = timed(lambda *_: "routing", moe.MoE.route)
    attention.decode_attention = timed(lambda *_: "attention over the cache",
                                       attention.decode_attention)

    ids = list(range(10, 10 + args.ctx))
    if args.batch:
        return _batched(m, path, ids, args)
    m.eval(ids, 0)
    tok = 5
    for i in range(4):                                   # warm-up
        tok = int(m.eval([tok], args.ctx + i)[-1].numpy().argmax())
    m.eval(ids, 0)
    fused = bool(m.net.fused)
    lib = m.net.fused._lib if fused else None
    on[0] = True
    if fused:
        lib.decode_profile(True)
    t0 = time.perf_counter()
    for i in range(args.tokens):
        tok = int(m.eval([tok], args.ctx + i)[-1].numpy().argmax())
    total = (time.perf_counter() - t0) / args.tokens
    if fused:
        acc.update({k: v for k, v in lib.decode_profile(False).items() if v > 0})
    parts = {k: v / args.tokens for k, v in acc.items()}
    rest = ("Python (embedding row, call, argmax)" if fused
            else "glue (Python, norms, rope, residuals, sampling)")
    parts[rest] = total - sum(parts.values())
    how = "one C++ step per token" if fused else f"per-op path ({m.net.fused_reason})"
    print(f"decode {total * 1e3:.2f} ms/token ({1 / total:.1f} tok/s), {args.threads} threads, "
          f"{args.ctx} cached positions, {os.path.basename(path)}, {how}")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:52s} {v * 1e3:7.2f} ms  {100 * v / total:5.1f}%")
    if args.json:
        print(json.dumps({"model": path, "ms_per_token": total * 1e3, "fused": fused,
                          "parts_ms": {k: v * 1e3 for k, v in parts.items()}}))
    return 0


def _batched(m, path, ids, args) -> int:
    import torch
    counts = [int(b) for b in args.batch.split(",")]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--batch: positive sequence counts, got {args.batch!r}")
    net = m.net
    caches = [net.cache] + [net.new_cache() for _ in range(max(counts) - 1)]
    for c in caches:
        net.forward(torch.tensor(ids), 0, all_logits=False, cache=c)
    L = len(ids)
    fused = bool(net.fused) if net.fused is not None else net._fused_ready()
    lib = net.fused._lib if fused else None
    best: dict[int, tuple[float, dict]] = {}
    for _ in range(max(1, args.rounds)):
        for B in counts:
            tok = [5 + b for b in range(B)]
            net.forward_batch(tok, [L] * B, caches[:B])           # warm-up
            if lib is not None:
                lib.decode_profile(True)
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                net.forward_batch(tok, [L] * B, caches[:B])       # the same position again
            dt = (time.perf_counter() - t0) / args.tokens
            parts = lib.decode_profile(False) if lib is not None else {}
            if B not in best or dt < best[B][0]:
                best[B] = (dt, {k: v / args.tokens for k, v in parts.items() if v > 0})
    print(f"batched decode, {args.threads} threads, {L} cached positions each, "
          f"{os.path.basename(path)}, {'one C++ call per step' if fused else 'per-op path'}, "
          f"best of {args.rounds} rounds")
    one = best[counts[0]][0] / counts[0] if 1 not in best else best[1][0]
    rows = []
    for B in counts:
        dt, parts = best[B]
        rows.append({"B": B, "ms_per_step": dt * 1e3, "tok_s": B / dt,
                     "vs_1": (B / dt) * one, "parts_ms": {k: v * 1e3 for k, v in parts.items()}})
        print(f"  B={B}: {dt * 1e3:7.2f} ms/step, {B / dt:7.1f} tok/s ({(B / dt) * one:.2f}x)  " +
              ", ".join(f"{k.split(' (')[0]} {v * 1e3:.2f}" for k, v in
                        sorted(parts.items(), key=lambda kv: -kv[1])))
    if args.json:
        print(json.dumps({"model": path, "batched": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
