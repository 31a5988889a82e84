"""Aggregate decode throughput of a model split into pipeline stages on Ray, against the same model
in one process, with 1, 2 and 4 concurrent streams, on this machine.

Each stream is a client of the server's engine (hetero_moe.server.engine, no HTTP) sending greedy
requests back to back; a step decodes every generating stream at once (the staged model pushes
them through its stages as micro-batches, a pipeline). One process gets all the threads; each
stage gets threads / stages of them, so both use the same cores.

    python benchmarks/bench_stages.py [MODEL] [--stages 2] [--seconds 10] [--json out.json]

Without MODEL: the qwen3moe-a3b test preset with 4 layers (Q4_K_M, 1.6 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_streams(model, streams: int, seconds: float, max_tokens: int, batch: str) -> dict:
    from hetero_moe.sampling import SamplingParams
    from hetero_moe.server.engine import Done, Engine, Failed, Job
    eng = Engine(model, n_slots=streams, batch=batch)
    eng.start()
    stop = time.perf_counter() + seconds
    counts = [0] * streams
    errors = []

    def client(k):
        prompt = model.tokenize(f"Stream {k}: tell me a long story about the number {k}.")
        while time.perf_counter() < stop:
            done = threading.Event()
            box = {}

            def emit(ev):
                if isinstance(ev, (Done, Failed)):
                    box["ev"] = ev
                    done.set()
            eng.submit(Job(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), emit,
                           cache_prompt=False))
            done.wait()
            ev = box["ev"]
            if isinstance(ev, Failed):
                errors.append(ev.error)
                return
            counts[k] += ev.completion_tokens
    t0 = time.perf_counter()
    ths = [threading.Thread(target=client, args=(k,)) for k in range(streams)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    eng.stop(5)
    eng.join(10)
    if errors:
        raise RuntimeError(f"requests failed: {errors[0]}")
    return {"streams": streams, "tokens": sum(counts), "seconds": wall,
            "tok_s": sum(counts) / wall, "decode_steps": eng.stats.decode_steps,
            "batched_steps": eng.stats.batched_steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import hetero_moe
    from hetero_moe.distributed import pipeline
    path = args.model
    if path is None:
        from hetero_moe.testing.make_model import cached_test_model
        path = str(cached_test_model("qwen3moe", preset="qwen3moe-a3b", layers=4))
    streams = [int(s) for s in args.streams.split(",")]
    n_ctx = 512
    rows = []
    single = hetero_moe.load(path, threads=args.threads, n_ctx=n_ctx, gpu="none")
    for n in streams:
        r = run_streams(single, n, args.seconds, args.max_tokens, "auto")
        rows.append({"mode": "single process", **r})
        print(f"single process, {n} stream(s): {r['tok_s']:.1f} tok/s", file=sys.stderr)
    single.close()
    per_stage = max(1, args.threads // args.stages)
    pipeline.connect("local", num_cpus=args.threads)
    staged = hetero_moe.load(path, stages=args.stages, cluster="local", threads=per_stage,
                             stage_cpus=args.threads / args.stages, n_ctx=n_ctx,
                             sequences=max(streams), progress=True)
    for n in streams:
        r = run_streams(staged, n, args.seconds, args.max_tokens, "on")
        rows.append({"mode": f"{args.stages} stages (Ray)", **r})
        print(f"{args.stages} stages, {n} stream(s): {r['tok_s']:.1f} tok/s", file=sys.stderr)
    # where a staged step's time goes: the stages' busy time against the wall time
    net = staged.net
    net.traces()
    run_streams(staged, max(streams), 3.0, args.max_tokens, "on")
    tr = net.traces()
    busy = [sum(b - a for a, b, *_ in t) for t in tr]
    span = max(b for t in tr for _, b, *_ in t) - min(a for t in tr for a, *_ in t)
    staged.close()
    print(f"\nmodel: {os.path.basename(path)}; {args.threads} threads; greedy requests of "
          f"{args.max_tokens} tokens back to back for {args.seconds:g} s per row\n")
    print("| mode | streams | aggregate tok/s | vs single process |")
    print("|---|---:|---:|---:|")
    base = {r["streams"]: r["tok_s"] for r in rows if r["mode"] == "single process"}
    for r in rows:
        print(f"| {r['mode']} | {r['streams']} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base[r['streams']]:.2f}x |")
    print(f"\nstage busy time over {span:.2f} s with {max(streams)} streams: " +
          ", ".join(f"stage {i} {b / span:.0%}" for i, b in enumerate(busy)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, "threads": args.threads, "rows": rows,
                       "stage_busy_fraction": [b / span for b in busy]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
