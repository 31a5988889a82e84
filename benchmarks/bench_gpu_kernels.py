"""GGUF-block Triton matmuls on the GPU (hetero_moe/kernels/triton/gguf.py): weight GB/s and
TFLOP/s per type and token count.

Weights are random valid blocks (random bytes, f16 scale fields set to a finite value), as many
copies as fill --l2-flush-mb, cycled per call so each call streams its weight from DRAM rather
than L2. Times are CUDA-event medians over --iters calls after warm-up. GB/s counts weight bytes
only (the file's own bytes: what decode is bound by); TFLOP/s counts 2 T n_out n_in.
Without CUDA it prints "no GPU: nothing measured" and exits 0.

    python benchmarks/bench_gpu_kernels.py [--types Q4_K,Q6_K] [--tokens 1,4,16,128,512]
        [--shapes 7168x2048,2048x7168] [--iters 50] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys

import torch

TYPE_IDS = {"F32": 0, "F16": 1, "BF16": 30, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13,
            "Q6_K": 14}
F16_FIELDS = {2: [0], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}   # byte offsets in a block


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q5_K,Q6_K,F16",
                   help="comma-separated GGUF types (default: %(default)s)")
    p.add_argument("--tokens", default="1,4,16,128,512",
                   help="comma-separated token counts T (default: %(default)s)")
    p.add_argument("--shapes", default="7168x2048,2048x7168",
                   help="comma-separated n_out x n_in (default: %(default)s)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per case (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per case")
    p.add_argument("--l2-flush-mb", type=int, default=256,
                   help="total bytes of weight copies cycled through, in MiB (> L2)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    return p.parse_args(argv)


def random_weight(ggml_type: int, n_out: int, n_in: int, device) -> torch.Tensor:
    """uint8 [n_out * row_bytes] of valid blocks."""
    from hetero_moe.quant import QUANT_TYPES, row_bytes
    n = n_out * row_bytes(ggml_type, n_in)
    if ggml_type in (0, 1, 30):
        dtype = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[ggml_type]
        return (torch.randn(n_out * n_in, device=device) * 0.02).to(dtype).view(torch.uint8)
    w = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    blocks = w.view(-1, QUANT_TYPES[ggml_type].type_size)
    scale = torch.tensor([0.01], dtype=torch.float16, device=device).view(torch.uint8)
    for off in F16_FIELDS[ggml_type]:
        blocks[:, off:off + 2] = scale
    return w


def time_case(K, ggml_type, n_out, n_in, T, args, device) -> float:
    """Median milliseconds of one matmul call."""
    w0 = random_weight(ggml_type, n_out, n_in, device)
    copies = max(1, math.ceil(args.l2_flush_mb * 2**20 / w0.numel()))
    ws = [w0] + [random_weight(ggml_type, n_out, n_in, device) for _ in range(copies - 1)]
    x = torch.randn(T, n_in, device=device)
    out = torch.empty(T, n_out, device=device)
    for i in range(args.warmup):
        K.matmul(x, ws[i % copies], ggml_type, n_out, n_in, out=out)
    times = []
    for i in range(args.iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        K.matmul(x, ws[i % copies], ggml_type, n_out, n_in, out=out)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: nothing measured")
        return 0
    import triton

    from hetero_moe.kernels.triton import gguf as K
    from hetero_moe.quant import row_bytes
    device = torch.device("cuda")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    for t in types:
        if t not in TYPE_IDS:
            sys.exit(f"unknown type {t!r}; known: {', '.join(TYPE_IDS)}")
    tokens = [int(v) for v in args.tokens.split(",")]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    name = torch.cuda.get_device_name(device)
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'type':6} {'n_out x n_in':>13} {'T':>5} {'kernel':>6} {'ms':>9} {'GB/s':>8} "
          f"{'TFLOP/s':>8}")
    rows = []
    for tname in types:
        t = TYPE_IDS[tname]
        for n_out, n_in in shapes:
            n_bytes = n_out * row_bytes(t, n_in)
            for T in tokens:
                ms = time_case(K, t, n_out, n_in, T, args, device)
                kind = K.KERNEL_TABLE[(t, K._t_class(T))].kind
                gbps = n_bytes / (ms * 1e-3) / 1e9
                tflops = 2 * T * n_out * n_in / (ms * 1e-3) / 1e12
                print(f"{tname:6} {f'{n_out}x{n_in}':>13} {T:5d} {kind:>6} {ms:9.4f} "
                      f"{gbps:8.1f} {tflops:8.2f}", flush=True)
                rows.append(dict(type=tname, n_out=n_out, n_in=n_in, T=T, kernel=kind, ms=ms,
                                 weight_bytes=n_bytes, gb_s=gbps, tflop_s=tflops))
    if args.json:
        meta = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                    python=platform.python_version(), iters=args.iters,
                    l2_flush_mb=args.l2_flush_mb)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
