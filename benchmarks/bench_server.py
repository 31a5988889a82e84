"""N concurrent streaming clients against `hetero-moe serve`, for a fixed time per N.

For each N (default 1, 2, 4, 8): N clients each send streaming chat completions back to back for
--seconds; reported: aggregate generated tokens/s (all clients, from the usage chunks), time to
first token, time per output token (TPOT: per request, from its first content chunk to its
finish_reason chunk over its completion_tokens - 1, from usage) and the time between content
chunks, each p50/p99, and requests completed.

The time between chunks is not a per-token latency: the server merges the pieces that queued up
while a client was being served into one chunk, so a chunk can carry several tokens (TPOT counts
them).

    python benchmarks/bench_server.py                       # the demo model
    python benchmarks/bench_server.py MODEL.gguf --clients 1 2 4 8 --seconds 20 --json out.json
    python benchmarks/bench_server.py --url http://127.0.0.1:8080   # a server already running

Without --url it starts `hetero-moe serve MODEL --host 127.0.0.1 --port 0 --parallel max(N)` and
stops it afterwards. The clients run in this process (one asyncio loop), on the same machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def client(http, url: str, model: str, i: int, deadline: float, max_tokens: int,
                 out: dict):
    import httpx
    n = 0
    while time.perf_counter() < deadline:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.8, "seed": i * 1000 + n,
                "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Write story number {i}-{n} about a "
                                                         f"fox, a river and a lost key."}]}
        n += 1
        t0 = time.perf_counter()
        last = first = done = None
        n_tokens = 0
        try:
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    out["errors"] += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("usage"):
                        n_tokens = ev["usage"]["completion_tokens"]
                        out["tokens"] += n_tokens
                        continue
                    ch = ev.get("choices") or [{}]
                    if ch[0].get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            out["ttft"].append(now - t0)
                            first = now
                        else:
                            out["chunk_gap"].append(now - last)
                        last = now
                    if ch[0].get("finish_reason"):
                        done = time.perf_counter()
        except httpx.HTTPError:
            out["errors"] += 1
            continue
        out["requests"] += 1
        out["t_end"] = max(out["t_end"], time.perf_counter())
        if first is not None and done is not None and n_tokens > 1:
            out["tpot"].append((done - first) / (n_tokens - 1))


async def run_level(url: str, model: str, n: int, seconds: float, max_tokens: int,
                    headers: dict) -> dict:
    import httpx
    out = {"tokens": 0, "ttft": [], "tpot": [], "chunk_gap": [], "requests": 0, "errors": 0,
           "t_end": 0.0}
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, url, model, i, t0 + seconds, max_tokens, out)
                               for i in range(n)))
    wall = out["t_end"] - t0
    return {"clients": n, "seconds": wall, "requests": out["requests"], "errors": out["errors"],
            "tokens": out["tokens"], "tok_s": out["tokens"] / wall if wall > 0 else 0.0,
            "ttft_p50_ms": 1000 * pct(out["ttft"], 50), "ttft_p99_ms": 1000 * pct(out["ttft"], 99),
            "tpot_p50_ms": 1000 * pct(out["tpot"], 50), "tpot_p99_ms": 1000 * pct(out["tpot"], 99),
            "chunk_gap_p50_ms": 1000 * pct(out["chunk_gap"], 50),
            "chunk_gap_p99_ms": 1000 * pct(out["chunk_gap"], 99)}


async def long_prompt_probe(url: str, model: str, n_words: int, headers: dict) -> dict:
    """One stream generating; meanwhile a completion with a long prompt (about n_words tokens)
    arrives. Returns the long prompt's time to its answer and the running stream's largest gap
    between content chunks while the long prompt was being evaluated (its stall)."""
    import httpx
    stamps: list[float] = []
    stop = asyncio.Event()

    async def streamer(http):
        body = {"model": model, "max_tokens": 4000, "temperature": 0.8, "seed": 1, "stream": True,
                "messages": [{"role": "user", "content": "Tell a very long story about a fox."}]}
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if stop.is_set():
                    break
                if line.startswith("data: {") and '"content"' in line:
                    stamps.append(time.perf_counter())

    words = " ".join(f"river{i % 97} stone" for i in range(n_words // 3))
    async with httpx.AsyncClient(timeout=600, headers=headers) as http:
        task = asyncio.create_task(streamer(http))
        while len(stamps) < 8:                      # the stream runs
            await asyncio.sleep(0.05)
            if task.done():
                raise SystemExit("the generating stream ended before the long prompt was sent")
        t0 = time.perf_counter()
        r = await http.post(url + "/v1/completions", json={
            "model": model, "prompt": words, "max_tokens": 1, "temperature": 0,
            "cache_prompt": False})
        t1 = time.perf_counter()
        stop.set()
        await asyncio.sleep(0.3)
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, httpx.HTTPError):
            pass
    r.raise_for_status()
    n_prompt = r.json()["usage"]["prompt_tokens"]
    inside = [b - a for a, b in zip(stamps, stamps[1:]) if b > t0 and a < t1]
    before = [b - a for a, b in zip(stamps, stamps[1:]) if b <= t0]
    return {"prompt_tokens": n_prompt, "answer_ms": 1000 * (t1 - t0),
            "stall_max_ms": 1000 * max(inside, default=float("nan")),
            "gap_p50_ms_during": 1000 * pct(inside, 50),
            "gap_p50_ms_before": 1000 * pct(before, 50)}


def start_server(model: str | None, parallel: int, extra: list[str]):
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "hetero_moe.cli", "serve"] + ([model] if model else []) + [
        "--host", "127.0.0.1", "--port", "0", "--parallel", str(parallel), "--metrics"] + extra
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    import httpx
    t0 = time.monotonic()
    url = None
    while time.monotonic() - t0 < 600:
        text = open(log.name, encoding="utf-8", errors="replace").read()
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", text)
        if m:
            url = m.group(1)
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    ready = [ln for ln in text.splitlines() if "ready on" in ln]
                    print(ready[-1] if ready else text, file=sys.stderr)
                    return proc, url, log.name
            except httpx.TransportError:
                pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become ready")


def metrics(url: str, headers: dict) -> dict:
    import httpx
    r = httpx.get(url + "/metrics", headers=headers, timeout=10)
    out = {}
    for ln in r.text.splitlines():
        if ln.startswith("hetero_moe_") and " " in ln and "{" not in ln:
            k, v = ln.rsplit(" ", 1)
            out[k] = float(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF file (default: the demo model)")
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--api-key", help="the running server's API key")
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 2, 4, 8],
                    help="client counts (1 2 4 8; none: only --long-prompt)")
    ap.add_argument("--seconds", type=float, default=20.0, help="per client count (20)")
    ap.add_argument("--max-tokens", type=int, default=128, help="per request (128)")
    ap.add_argument("--server-args", default="",
                    help="extra arguments for hetero-moe serve, e.g. '--batch on --ctx 2048'")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--long-prompt", type=int, default=0, metavar="N",
                    help="then, while one stream generates, send a completion with a prompt of "
                         "about N tokens, --long-repeats times: its answer time and the stream's "
                         "worst stall (needs a context of N tokens per slot and 2 slots)")
    ap.add_argument("--long-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = log = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url, log = start_server(args.model, max(args.clients + [2 if args.long_prompt
                                                                      else 1]),
                                      args.server_args.split())
    import httpx
    try:
        info = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]
        model = info["id"]
        asyncio.run(run_level(url, model, 1, 2.0, 16, headers))          # warm-up
        rows = []
        for n in args.clients:
            m0 = metrics(url, headers) if proc else {}
            r = asyncio.run(run_level(url, model, n, args.seconds, args.max_tokens, headers))
            if proc:
                m1 = metrics(url, headers)
                steps = m1["hetero_moe_decode_steps_total"] - m0["hetero_moe_decode_steps_total"]
                bs = m1["hetero_moe_decode_batched_steps_total"] - \
                    m0["hetero_moe_decode_batched_steps_total"]
                r["batched_step_share"] = bs / steps if steps else 0.0
            rows.append(r)
            print(f"N={n:2d}: {r['tok_s']:8.1f} tok/s aggregate | TTFT p50 {r['ttft_p50_ms']:7.1f} "
                  f"p99 {r['ttft_p99_ms']:7.1f} ms | TPOT p50 {r['tpot_p50_ms']:6.1f} p99 "
                  f"{r['tpot_p99_ms']:6.1f} ms | between chunks p50 {r['chunk_gap_p50_ms']:6.1f} "
                  f"p99 {r['chunk_gap_p99_ms']:6.1f} ms | {r['requests']} requests, "
                  f"{r['errors']} errors", file=sys.stderr, flush=True)
        longs = []
        for k in range(args.long_prompt and args.long_repeats):
            lp = asyncio.run(long_prompt_probe(url, model, args.long_prompt, headers))
            longs.append(lp)
            print(f"long prompt {k + 1}: {lp['prompt_tokens']} tokens answered in "
                  f"{lp['answer_ms']:.0f} ms; the running stream's worst gap meanwhile "
                  f"{lp['stall_max_ms']:.0f} ms (p50 {lp['gap_p50_ms_during']:.1f} ms; before "
                  f"it: {lp['gap_p50_ms_before']:.1f} ms)", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            os.unlink(log)
    if longs:
        print(f"\nlong prompt ({longs[0]['prompt_tokens']} tokens) while one stream generates, "
              f"{len(longs)} times: answered in {pct([x['answer_ms'] for x in longs], 50):.0f} ms "
              f"(median); the stream's worst gap {max(x['stall_max_ms'] for x in longs):.0f} ms "
              f"(median of the worst: {pct([x['stall_max_ms'] for x in longs], 50):.0f} ms)")
    base = rows[0]["tok_s"] if rows and rows[0]["clients"] == 1 else None
    print(f"\nmodel: {model} ({info['meta'].get('arch')}, {info['meta'].get('size', 0) / 2**20:.1f}"
          f" MiB); {info['meta'].get('placement')}; {os.cpu_count()} CPUs")
    print("| clients | aggregate tok/s | vs 1 client | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "between chunks p50 / p99 ms | requests |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{r['tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['clients']} | {r['tok_s']:.1f} | {rel} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | "
              f"{r['chunk_gap_p50_ms']:.1f} / {r['chunk_gap_p99_ms']:.1f} | {r['requests']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "meta": info["meta"], "url": url,
                       "seconds": args.seconds, "max_tokens": args.max_tokens,
                       "server_args": args.server_args, "results": rows,
                       "long_prompt": longs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
