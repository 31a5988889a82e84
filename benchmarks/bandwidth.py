"""DRAM read-bandwidth probe: the roofline for decode (bytes of weights read per token / GB/s).

Sums a 1 GiB array (numpy, which releases the GIL inside the reduction) with 1..N threads, each
thread summing its own contiguous slice; reports the best of several passes.

    python benchmarks/bandwidth.py [--gib 1] [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def read_gbps(buf: np.ndarray, threads: int, passes: int) -> float:
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(passes):
            t0 = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def measure_bandwidth(gib: float = 1.0, threads: int | None = None, passes: int = 5) -> float:
    """Best read bandwidth in GB/s over 1..threads threads."""
    threads = threads or len(os.sched_getaffinity(0))
    buf = np.ones(int(gib * (1 << 30)) // 8, dtype=np.uint64)
    return max(read_gbps(buf, n, passes) for n in sorted({1, threads}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="array size in GiB (default 1)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    buf = np.ones(int(args.gib * (1 << 30)) // 8, dtype=np.uint64)  # touched: really resident
    res = {f"threads={n}": read_gbps(buf, n, args.passes) for n in sorted({1, args.threads})}
    if args.json:
        print(json.dumps({"gib": args.gib, "read_GBps": res}))
    else:
        for k, v in res.items():
            print(f"{k}: {v:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
