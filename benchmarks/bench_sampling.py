"""Time one sampler step over a 150k vocabulary for several knob settings (median ms, --json)."""
from __future__ import annotations

import argparse
import json
import time

import torch

from hetero_moe.sampling import Sampler, SamplingParams

SETTINGS = {
    "defaults (top_k 40)": dict(),
    "greedy": dict(temperature=0.0),
    "top_p 0.95 + min_p 0.05": dict(top_k=0, top_p=0.95, min_p=0.05),
    "top_p 0.95": dict(top_k=0, top_p=0.95, min_p=0.0),
    "penalties only": dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.1,
                           frequency_penalty=0.1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    logits = torch.randn(a.vocab, generator=torch.Generator().manual_seed(0)) * 2
    hist = list(range(0, 64 * 7, 7))
    res = {}
    for name, kw in SETTINGS.items():
        s = Sampler(SamplingParams(seed=0, **kw), a.vocab)
        for _ in range(3):
            s.sample(logits, hist)
        times = []
        for _ in range(a.iters):
            t = time.perf_counter()
            s.sample(logits, hist)
            times.append(time.perf_counter() - t)
        res[name] = sorted(times)[len(times) // 2] * 1e3
    if a.json:
        print(json.dumps({"vocab": a.vocab, "median_ms": res}, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v:7.2f} ms")


if __name__ == "__main__":
    main()
