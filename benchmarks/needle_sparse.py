"""Needle in a haystack: does sparse attention (`approx`) retrieve a fact wherever dense does?

SmolLM2-135M-Instruct (trained context 8192) reads filler text with one needle sentence at
several depths and is asked for it at the end (chat template, greedy). For each prompt length and
depth we report whether dense and sparse answers contain the code, and how many of the greedy
tokens agree with dense over a longer generation (--gen tokens, first divergence).

Sparse settings are the defaults except min_len, lowered to half the prompt where the prompt is
shorter than 4096 tokens so that sparse attention is really used there. Prompts of one length
share their filler; every run evaluates its whole prompt.

    python benchmarks/needle_sparse.py [--lengths 2048,4096,8000] [--depths 0.1,0.5,0.9]
        [--gen 48] [--json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

NEEDLE = "The secret code is 7-4-1-9."
ANSWER = "7-4-1-9"
QUESTION = "What is the secret code mentioned in the text above? Answer with the code only."

_SUBJECTS = ["The river", "A quiet village", "The old library", "Every autumn the market",
             "The mountain road", "A small bakery", "The harbor", "The school garden",
             "An early train", "The museum hall", "A patient farmer", "The city council"]
_VERBS = ["welcomed", "described", "remembered", "prepared for", "looked after", "talked about",
          "waited for", "painted", "counted", "repaired"]
_OBJECTS = ["the travelers from the north", "a long winter", "the colors of the sunset",
            "its busy weekend visitors", "the new bridge", "the evening lights",
            "a festival of music", "the fishing boats", "the first snow", "the morning fog"]


def filler_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
            for _ in range(n)]


def build_prompt(model, n_tokens: int, depth: float, sentences: list[str]) -> list[int]:
    """Chat prompt ids of about n_tokens with the needle after `depth` of the filler."""
    def ids_for(k):
        body = sentences[:k]
        at = round(depth * len(body))
        text = " ".join(body[:at] + [NEEDLE] + body[at:])
        return model.chat_ids([{"role": "user", "content": text + "\n\n" + QUESTION}])
    lo, hi = 1, len(sentences)
    while lo < hi:                         # most filler sentences that fit n_tokens
        mid = (lo + hi + 1) // 2
        if len(ids_for(mid)) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return ids_for(lo)


def run(lengths, depths, gen, log=print):
    import hetero_moe
    from hetero_moe.assets import smollm2_path
    from hetero_moe.layers.sparse_attn import SparseAttnConfig
    n_ctx = max(lengths) + gen + 8
    model = hetero_moe.load(smollm2_path(), n_ctx=n_ctx)
    sentences = filler_sentences(4000)
    rows = []
    for L in lengths:
        sparse = SparseAttnConfig(mode="approx", min_len=min(2048, L // 2))
        prompts = {d: build_prompt(model, L, d, sentences) for d in depths}
        out = {}
        for name, sp in (("dense", "off"), ("sparse", sparse)):
            for d in sorted(depths):
                t0 = time.perf_counter()
                c = model.generate(prompts[d], max_tokens=gen, temperature=0, sparse_attn=sp)
                out[name, d] = (c, time.perf_counter() - t0)
                log(f"  {L} depth {d:.2f} {name}: {c.text[:60]!r} "
                    f"({c.timings.prompt_tokens} new prompt tokens, {out[name, d][1]:.0f} s)")
        for d in depths:
            dc, sc = out["dense", d][0], out["sparse", d][0]
            agree = 0
            for a, b in zip(dc.tokens, sc.tokens):
                if a != b:
                    break
                agree += 1
            rows.append({"length": len(prompts[d]), "target": L, "depth": d,
                         "min_len": sparse.min_len, "dense_ok": ANSWER in dc.text,
                         "sparse_ok": ANSWER in sc.text, "dense_text": dc.text,
                         "sparse_text": sc.text, "agree_tokens": agree,
                         "gen_tokens": min(len(dc.tokens), len(sc.tokens)),
                         "dense_s": out["dense", d][1], "sparse_s": out["sparse", d][1]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8000")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--gen", type=int, default=48, help="greedy tokens per answer (48)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run([int(x) for x in args.lengths.split(",")],
               [float(x) for x in args.depths.split(",")], args.gen,
               log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| prompt tokens | depth | dense | sparse | greedy tokens equal to dense |")
    print("|---:|---:|:---:|:---:|---:|")
    for r in rows:
        print(f"| {r['length']} | {r['depth']:.0%} | {'yes' if r['dense_ok'] else 'no'} | "
              f"{'yes' if r['sparse_ok'] else 'no'} | {r['agree_tokens']}/{r['gen_tokens']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
