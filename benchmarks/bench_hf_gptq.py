#!/usr/bin/env python
"""Decode speed: a GPTQ int4 Hugging Face folder against the same model as a Q4_0 GGUF.

Both are Qwen3-30B-A3B-shaped (D 2048, 128 experts of 768, top-8, 32/4 heads of 128), 4 layers,
from make_model's random weights: the folder quantized like GPTQ (sym, group 128), the GGUF by
llama.cpp's quantizer (MOSTLY_Q4_0, requantized from the cached Q4_K_M file). Two pairings:
  like-for-like: lm_head quantized in the folder too (GPTQModel's lm_head: true) against a "pure"
      Q4_0 GGUF (llama.cpp's output.weight in Q4_0 as well): the same bytes per token;
  as shipped: the folder's lm_head in fp16 (what GPTQ tools leave by default) against llama.cpp's
      default Q4_0 mix (output.weight Q6_K).
All four load in one process; rounds alternate between them (greedy decode of 32 tokens after a
16-token prompt); the best and the median decode of each are printed.

    python benchmarks/bench_hf_gptq.py [--rounds 3] [-n 32] [-t THREADS] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _decode_tps(model, n_gen: int) -> float:
    ids = list(range(100, 116))
    c = model.generate(ids, max_tokens=n_gen, temperature=0)
    return c.timings.decode_tps


def _pure_q4_0(src: str, dst: str) -> str:
    """llama.cpp's Q4_0 with `pure` set: every matrix Q4_0, output.weight included."""
    import ctypes
    import os

    import llama_cpp
    if not os.path.exists(dst):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        p.allow_requantize = True
        p.pure = True
        p.nthread = 2
        if llama_cpp.llama_model_quantize(src.encode(), (dst + ".part").encode(),
                                          ctypes.byref(p)) != 0:
            raise SystemExit(f"llama.cpp failed to quantize {src}")
        os.replace(dst + ".part", dst)
    return dst


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from hetero_moe.config_env import cache_dir
    from hetero_moe.testing.make_hf_model import QuantOptions, make_hf_test_model
    from hetero_moe.testing.make_model import cached_test_model
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from reference import quantize_with_llama

    files = {}
    for tag, lm_head in (("gptq-folder-lmhead-q4", True), ("gptq-folder-lmhead-f16", False)):
        folder = cache_dir() / "test-models" / \
            f"hf-qwen3moe-qwen3moe-a3b-L4-gptq-g128-sym{'-lmhead' if lm_head else ''}-s0-v1"
        if not (folder / "config.json").exists():
            print(f"writing {folder} ...", file=sys.stderr)
            make_hf_test_model("qwen3moe", folder,
                               QuantOptions("gptq", 128, sym=True, lm_head=lm_head),
                               preset="qwen3moe-a3b", layers=4, write_twin=False)
        files[tag] = str(folder)
    q4km = str(cached_test_model("qwen3moe", "qwen3moe-a3b", "Q4_K_M", layers=4))
    files["q4_0-gguf-pure"] = _pure_q4_0(q4km, q4km.replace("-Q4_K_M-", "-Q4_0-pure-"))
    files["q4_0-gguf"] = quantize_with_llama(q4km, q4km.replace("-Q4_K_M-", "-Q4_0-"),
                                             "MOSTLY_Q4_0")
    import statistics

    import hetero_moe
    models = {k: hetero_moe.load(p, threads=args.threads, n_ctx=256, gpu="none")
              for k, p in files.items()}
    for m in models.values():
        _decode_tps(m, 4)                                  # warm up (page faults, pool)
    runs: dict[str, list] = {k: [] for k in files}
    for _ in range(args.rounds):
        for name, m in models.items():
            runs[name].append(_decode_tps(m, args.n))
            print(name, f"decode {runs[name][-1]:.2f} tok/s", file=sys.stderr)
    print(json.dumps({"median_decode_tps": {k: round(statistics.median(v), 2)
                                            for k, v in runs.items()}}))
    best = {k: round(max(v), 2) for k, v in runs.items()}
    print(json.dumps({"best_decode_tps": best,
                      "like_for_like": round(best["gptq-folder-lmhead-q4"] /
                                             best["q4_0-gguf-pure"], 3),
                      "as_shipped": round(best["gptq-folder-lmhead-f16"] / best["q4_0-gguf"], 3)}))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
