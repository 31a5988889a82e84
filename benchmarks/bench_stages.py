"""Aggregate decode throughput of a model split into pipeline stages on Ray, against the same model
in one process, with 1, 2 and 4 concurrent streams, on this machine.

Each stream is a client of the server's engine (hetero_moe.server.engine, no HTTP) sending greedy
requests back to back. Two engines drive the staged model: "step" waits for each decode step's
micro-batches and samples with the pipeline empty (Engine(pipeline=False)); "pipelined" keeps one
decode group per stage in flight and sends a group's next step as soon as its logits are back
(the server's default for stages). One process gets all the threads; each stage gets
threads / stages of them, so both use the same cores. The cells run in rounds, the order of the
modes rotated each round, and the table gives each cell's median over the rounds.

    python benchmarks/bench_stages.py [MODEL] [--stages 2] [--seconds 10] [--rounds 3]
                                      [--json out.json]

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


def run_streams(model, streams: int, seconds: float, max_tokens: int, batch: str,
                pipeline: bool | None = None) -> dict:
    from hetero_moe.sampling import SamplingParams
    from hetero_moe.server.engine import Done, Engine, Failed, Job
    eng = Engine(model, n_slots=streams, batch=batch, pipeline=pipeline)
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


def _overlap(t0, t1) -> float:
    """Seconds during which both stages worked (each stage runs one call at a time)."""
    return sum(max(0.0, min(b0, b1) - max(a0, a1)) for a0, b0, *_ in t0 for a1, b1, *_ in t1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import statistics

    import hetero_moe
    from hetero_moe.distributed import pipeline
    path = args.model
    if path is None:
        from hetero_moe.testing.make_model import cached_test_model
        path = str(cached_test_model("qwen3moe", preset="qwen3moe-a3b", layers=4))
    streams = [int(s) for s in args.streams.split(",")]
    n_ctx = 512
    single = hetero_moe.load(path, threads=args.threads, n_ctx=n_ctx, gpu="none")
    per_stage = max(1, args.threads // args.stages)
    pipeline.connect("local", num_cpus=args.threads)
    staged = hetero_moe.load(path, stages=args.stages, cluster="local", threads=per_stage,
                             stage_cpus=args.threads / args.stages, n_ctx=n_ctx,
                             sequences=max(streams), progress=True)
    modes = {"single process": (single, "auto", None),
             f"{args.stages} stages, step engine": (staged, "on", False),
             f"{args.stages} stages, pipelined engine": (staged, "on", True)}
    names = list(modes)
    rows = []
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for n in streams:
            for mode in order:
                model, batch, pl = modes[mode]
                if model is staged:
                    staged.net.traces()
                r = run_streams(model, n, args.seconds, args.max_tokens, batch, pl)
                if model is staged:
                    t0, t1 = staged.net.traces()[:2]
                    r["stage_busy"] = [sum(b - a for a, b, *_ in t) / r["seconds"]
                                       for t in (t0, t1)]
                    r["stage_overlap"] = _overlap(t0, t1) / r["seconds"]
                rows.append({"mode": mode, "round": rnd, **r})
                print(f"round {rnd}: {mode}, {n} stream(s): {r['tok_s']:.1f} tok/s" +
                      (f"; stages busy {r['stage_busy'][0]:.0%} / {r['stage_busy'][1]:.0%}, "
                       f"both at once {r['stage_overlap']:.0%} of the time"
                       if "stage_busy" in r else ""), file=sys.stderr, flush=True)
    single.close()
    staged.close()

    def cell(mode, n, key="tok_s"):
        return [r[key] for r in rows if r["mode"] == mode and r["streams"] == n]
    print(f"\nmodel: {os.path.basename(path)}; {args.threads} threads; greedy requests of "
          f"{args.max_tokens} tokens back to back for {args.seconds:g} s per cell; median of "
          f"{args.rounds} round(s), modes rotated each round\n")
    print("| mode | streams | aggregate tok/s (median) | runs | vs single process | "
          "stages busy at once |")
    print("|---|---:|---:|---|---:|---:|")
    for mode in names:
        for n in streams:
            v = cell(mode, n)
            base = statistics.median(cell(names[0], n))
            ov = cell(mode, n, "stage_overlap") if mode != names[0] else []
            print(f"| {mode} | {n} | {statistics.median(v):.1f} | "
                  f"{' / '.join(f'{x:.1f}' for x in v)} | "
                  f"{statistics.median(v) / base:.2f}x | "
                  f"{f'{statistics.median(ov):.0%}' if ov else ''} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, "threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
