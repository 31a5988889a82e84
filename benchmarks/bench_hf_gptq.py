#!/usr/bin/env python
"""Decode speed: a GPTQ int4 Hugging Face folder against the same model as a Q4_0 GGUF.

Both are Qwen3-30B-A3B-shaped (D 2048, 128 experts of 768, top-8, 32/4 heads of 128, vocab 49152),
4 layers, from make_model's random weights: the folder quantized like GPTQ (sym, group 128), the
GGUFs by llama.cpp's quantizer (MOSTLY_Q4_0, requantized from the cached Q4_K_M file). The folder's
lm_head is fp16, as GPTQ tools leave it. Pairings:
  same model: the folder against a Q4_0 GGUF whose output.weight is F16 as well
      (llama_model_quantize's output_tensor_type = F16): the same bytes per token;
  lm_head="q8_0": the folder loaded with its lm_head re-quantized to Q8_0 at load, against
      llama.cpp's default Q4_0 mix (output.weight Q6_K);
  --like-for-like adds the folder with its lm_head quantized by GPTQ too (GPTQModel's
      lm_head: true) against a "pure" Q4_0 GGUF (output.weight Q4_0 as well).
All load in one process; rounds alternate between them (A/B/A/B: greedy decode of 32 tokens after
a 16-token prompt); the median and the best decode of each are printed, and the lm_head="q8_0"
logits are compared with the fp16 lm_head's on a 128-token prompt.

    python benchmarks/bench_hf_gptq.py [--rounds 6] [-n 32] [-t THREADS] [--like-for-like]
        [--json out.json]
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


def _f16_output_q4_0(src: str, dst: str) -> str:
    """llama.cpp's Q4_0 mix with output.weight kept in F16 (as the GPTQ folder's lm_head)."""
    import ctypes
    import os

    import llama_cpp
    if not os.path.exists(dst):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        p.allow_requantize = True
        p.output_tensor_type = llama_cpp.GGML_TYPE_F16
        p.nthread = 2
        if llama_cpp.llama_model_quantize(src.encode(), (dst + ".part").encode(),
                                          ctypes.byref(p)) != 0:
            raise SystemExit(f"llama.cpp failed to quantize {src}")
        os.replace(dst + ".part", dst)
    return dst


def _lm_head_error(a, b) -> dict:
    """b's logits against a's (the float lm_head): relative L2 error per position, top-1."""
    import numpy as np
    a, b = a.numpy(), b.numpy()
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    return {"median_rel_err": round(float(np.median(rel)), 5),
            "p98_rel_err": round(float(np.percentile(rel, 98)), 5),
            "top1_agree": round(float((a.argmax(1) == b.argmax(1)).mean()), 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--like-for-like", action="store_true",
                    help="also the folder with a GPTQ lm_head against a pure Q4_0 GGUF")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from hetero_moe.config_env import cache_dir
    from hetero_moe.testing.make_hf_model import QuantOptions, make_hf_test_model
    from hetero_moe.testing.make_model import cached_test_model
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from reference import quantize_with_llama

    files, opts = {}, {}
    pairs = (("gptq-folder", False),) + ((("gptq-folder-lmhead-q4", True),)
                                         if args.like_for_like else ())
    for tag, lm_head in pairs:
        folder = cache_dir() / "test-models" / \
            f"hf-qwen3moe-qwen3moe-a3b-L4-gptq-g128-sym{'-lmhead' if lm_head else ''}-s0-v1"
        if not (folder / "config.json").exists():
            print(f"writing {folder} ...", file=sys.stderr)
            make_hf_test_model("qwen3moe", folder,
                               QuantOptions("gptq", 128, sym=True, lm_head=lm_head),
                               preset="qwen3moe-a3b", layers=4, write_twin=False)
        files[tag] = str(folder)
    q4km = str(cached_test_model("qwen3moe", "qwen3moe-a3b", "Q4_K_M", layers=4))
    files["gptq-folder-lm_head-q8_0"] = files["gptq-folder"]
    opts["gptq-folder-lm_head-q8_0"] = {"lm_head": "q8_0"}
    files["q4_0-gguf-f16-output"] = _f16_output_q4_0(q4km, q4km.replace("-Q4_K_M-",
                                                                        "-Q4_0-f16out-"))
    files["q4_0-gguf"] = quantize_with_llama(q4km, q4km.replace("-Q4_K_M-", "-Q4_0-"),
                                             "MOSTLY_Q4_0")
    if args.like_for_like:
        files["q4_0-gguf-pure"] = _pure_q4_0(q4km, q4km.replace("-Q4_K_M-", "-Q4_0-pure-"))
    import statistics

    import hetero_moe
    models = {k: hetero_moe.load(p, threads=args.threads, n_ctx=256, gpu="none",
                                 **opts.get(k, {}))
              for k, p in files.items()}
    for k, m in models.items():
        print(k, m.gguf.tensors["output.weight"].type_name, file=sys.stderr)
    probe = list(range(100, 228))
    err = _lm_head_error(models["gptq-folder"].logits(probe),
                         models["gptq-folder-lm_head-q8_0"].logits(probe))
    print(json.dumps({"lm_head_q8_0_vs_f16": err}))
    for m in models.values():
        _decode_tps(m, 4)                                  # warm up (page faults, pool)
    runs: dict[str, list] = {k: [] for k in files}
    for _ in range(args.rounds):
        for name, m in models.items():
            runs[name].append(_decode_tps(m, args.n))
            print(name, f"decode {runs[name][-1]:.2f} tok/s", file=sys.stderr)
    med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    best = {k: round(max(v), 2) for k, v in runs.items()}
    ratios = {"same_model (folder / gguf f16 output)":
              round(med["gptq-folder"] / med["q4_0-gguf-f16-output"], 3),
              "lm_head_q8_0 (folder / default q4_0 gguf)":
              round(med["gptq-folder-lm_head-q8_0"] / med["q4_0-gguf"], 3),
              "as_shipped (folder / default q4_0 gguf)":
              round(med["gptq-folder"] / med["q4_0-gguf"], 3)}
    if args.like_for_like:
        ratios["like_for_like (gptq lm_head / pure)"] = round(
            med["gptq-folder-lmhead-q4"] / med["q4_0-gguf-pure"], 3)
    print(json.dumps({"median_decode_tps": med, "best_decode_tps": best,
                      "median_ratios": ratios}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
