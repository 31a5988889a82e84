"""Side by side: hetero-moe vs llama.cpp (llama-cpp-python) on the same GGUF, same threads.

Runs A/B/A/B... (alternating, medians) so the machine's drift hits both equally, and prints
prefill tokens/s (512-token prompt), decode tokens/s (64 tokens after that prompt, so attention
reads 512-576 cached positions), decode tokens/s from an empty context (64 tokens after a 1-token
prompt: llama-bench's own tg64), their ratios, peak RSS vs file size, and decode bytes-per-token
over time as a fraction of measured read bandwidth.

    python benchmarks/bench_vs_llama.py --model qwen3moe-a3b --threads 2 --rounds 3 --json out.json
    python benchmarks/bench_vs_llama.py --model deepseek-v2-lite --layers 4
    python benchmarks/bench_vs_llama.py --model smollm2
    python benchmarks/bench_vs_llama.py --model gemma3
    python benchmarks/bench_vs_llama.py --model path/to/file.gguf
    python benchmarks/bench_vs_llama.py --model qwen3moe-a3b --quant Q4_K_M,Q3_K_M,Q2_K

    python benchmarks/bench_vs_llama.py --model qwen3moe-a3b --depth 8192,32768 --rounds 2

--depth also measures decode after that many cached positions (long context), for each engine.

hetero-moe runs as load() does by default (repack="auto": on a CPU whose kernels have them, the
weights converted at load to 16-row interleaved layouts, the counterpart of ik_llama.cpp's
`-rtr 1`; the JSON's "repack" says what was done). --plain adds it with the file's layout as mapped
(load(repack="off")) as an engine of its own.
--ik-bench PATH adds ik_llama.cpp as a third engine, twice: as is and with run-time repacking
(`-rtr 1`), through its own `llama-bench` (PATH; built from ik_llama.cpp's source, see README), on
the same file and threads; absent, those columns are left out. Its decode is llama-bench's
`-gp N_PROMPT,N_GEN` (generation after the prompt, like the others') and its empty-context decode
is llama-bench's `-n N_GEN`. The CPU's SIMD flags and the kernel
variant hetero-moe ran are printed and written to the JSON.

--quant picks the llama.cpp file type of a preset model; several (comma-separated) are measured in
the same run, interleaved round by round, and each one's ratios are also given relative to the
first one's (the baseline), which is what to compare on a noisy machine.

Each engine runs in its own subprocess so peak RSS is measured per engine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # measure this checkout's hetero_moe, not an installed one


def resolve_model(name: str, layers: int, quant: str = "Q4_K_M") -> str:
    if os.path.exists(name):
        return name
    if name == "smollm2":
        from hetero_moe.assets import smollm2_path
        return str(smollm2_path())
    if name == "gemma3":
        from hetero_moe.assets_gemma import gemma3_path
        return str(gemma3_path(progress=True))
    if name == "demo":
        from hetero_moe.demo import demo_model_path
        return str(demo_model_path())
    from hetero_moe.testing.make_model import PRESETS, cached_test_model
    if name in PRESETS:
        arch = {"qwen3moe-a3b": "qwen3moe", "deepseek-v2-lite": "deepseek2"}.get(name, name.split("-")[0])
        return str(cached_test_model(arch, preset=name, quant=quant, layers=layers))
    raise SystemExit(f"unknown model {name!r}: give a .gguf path, 'smollm2', 'gemma3', 'demo' or a preset "
                     f"({', '.join(PRESETS)})")


# -- one engine run, in a child process -----------------------------------------------------------
DEPTH_CHUNK = 2048   # long-context fill: prompt chunks of this many tokens


def _rss(field: str) -> int:
    """This process's VmHWM (peak) or VmRSS in bytes, from /proc/self/status. ru_maxrss is only
    the fallback: Linux starts an exec'd child's at the RSS of the process that spawned it, so a
    child of this script (~220 MiB with torch imported) never reads below that."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(engine: str, path: str, threads: int, n_prompt: int, n_gen: int,
           depths: list[int]) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    n_ctx = max([n_prompt] + depths) + n_gen + 8
    at = {}
    repack = None
    if engine in ("hetero-moe", PLAIN):
        import hetero_moe
        import hetero_moe.api    # noqa: F401 (load's imports, torch's included, before measuring)
        imports = _rss("VmRSS")
        m = hetero_moe.load(path, threads=threads, n_ctx=n_ctx,
                            repack="off" if engine == PLAIN else "auto")
        repack = {k: m.repack[k] for k in ("on", "why", "tensors", "bytes")}
        ids = rng.integers(10, m.config.n_vocab, size=n_prompt).tolist()
        m.eval(ids[:8], 0)                                   # warm-up
        t0 = time.perf_counter()
        logits = m.eval(ids, 0)
        pre = time.perf_counter() - t0
        tok = int(logits[-1].numpy().argmax())
        t0 = time.perf_counter()
        for i in range(n_gen):
            tok = int(m.eval([tok], n_prompt + i)[-1].numpy().argmax())
        dec = time.perf_counter() - t0
        tok = int(m.eval([tok], 0)[-1].numpy().argmax())            # from an empty context
        t0 = time.perf_counter()
        for i in range(n_gen):
            tok = int(m.eval([tok], 1 + i)[-1].numpy().argmax())
        empty = time.perf_counter() - t0
        for d in depths:
            fill = rng.integers(10, m.config.n_vocab, size=d).tolist()
            for s0 in range(0, d, DEPTH_CHUNK):
                logits = m.eval(fill[s0:s0 + DEPTH_CHUNK], s0)
            tok = int(logits[-1].numpy().argmax())
            t0 = time.perf_counter()
            for i in range(n_gen):
                tok = int(m.eval([tok], d + i)[-1].numpy().argmax())
            at[d] = n_gen / (time.perf_counter() - t0)
    else:
        import llama_cpp
        imports = _rss("VmRSS")
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx + 64, n_batch=n_prompt,
                              n_ubatch=n_prompt, n_threads=threads, n_threads_batch=threads,
                              verbose=False, n_gpu_layers=0)
        n_vocab = llm.n_vocab()

        def last_logits():
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,))
        ids = rng.integers(10, n_vocab, size=n_prompt).tolist()
        llm.eval(ids[:8])
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        pre = time.perf_counter() - t0
        tok = int(np.argmax(last_logits()))
        t0 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        dec = time.perf_counter() - t0
        llm.reset()                                          # from an empty context
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
        t0 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        empty = time.perf_counter() - t0
        for d in depths:
            llm.reset()
            llm.eval(rng.integers(10, n_vocab, size=d).tolist())    # in n_batch chunks
            tok = int(np.argmax(last_logits()))
            t0 = time.perf_counter()
            for _ in range(n_gen):
                llm.eval([tok])
                tok = int(np.argmax(last_logits()))
            at[d] = n_gen / (time.perf_counter() - t0)
    peak = _rss("VmHWM")
    out = {"prefill_tps": n_prompt / pre, "decode_tps": n_gen / dec, "decode_empty_tps": n_gen / empty,
           "peak_rss": peak, "import_rss": imports}
    if repack is not None:
        out["repack"] = repack
    for d, v in at.items():
        out[f"decode_tps@{d}"] = v
    return out


IK_ENGINES = {"ik_llama.cpp": 0, "ik_llama.cpp -rtr": 1}
PLAIN = "hetero-moe --repack off"  # --plain: ours on the file's layout (no 16-row repacking)


def run_ik(bench: str, rtr: int, path, threads, n_prompt, n_gen, depths=()) -> dict:
    """One llama-bench run of ik_llama.cpp (pp, tg and tg after each depth), from a child process
    of its own, so the peak RSS of its only child is llama-bench's -> the same fields as _child."""
    import resource
    cmd = [bench, "-m", path, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen), "-r", "1",
           "-o", "json", "-rtr", str(rtr)]
    for d in sorted({n_prompt, *depths}):      # generation after the prompt, and after each depth
        cmd += ["-gp", f"{d},{n_gen}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = json.loads(r.stdout[r.stdout.index("["):])
    # llama-bench's peak; it starts at this small process's RSS (~20 MiB), see _rss
    res = {"peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    for row in rows:
        if row["n_gen"] == 0:
            res["prefill_tps"] = row["avg_ts"]
        elif row["n_prompt"] == 0:
            res["decode_empty_tps"] = row["avg_ts"]
        else:
            res[f"decode_tps@{row['n_prompt']}"] = row["avg_ts"]
    res["decode_tps"] = res[f"decode_tps@{n_prompt}"]    # the same depth as the other engines'
    if n_prompt not in depths:
        del res[f"decode_tps@{n_prompt}"]
    return res


def run_engine(engine, path, threads, n_prompt, n_gen, depths=(), ik_bench=None) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--model", path, "--threads", str(threads),
           "--n-prompt", str(n_prompt), "--n-gen", str(n_gen),
           "--depth", ",".join(str(d) for d in depths), "--ik-bench", ik_bench or ""]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{engine} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def decode_bytes_per_token(path: str) -> int:
    """Weight bytes one decode token reads: all non-expert tensors + top-k of E experts."""
    from hetero_moe.gguf import GGUFFile
    from hetero_moe.models.base import config_from_gguf
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    total = 0
    for t in g:
        if "_exps." in t.name:
            total += t.nbytes * cfg.n_expert_used // cfg.n_expert
        elif t.name == "token_embd.weight" and not cfg.tied_embeddings:
            total += t.nbytes // cfg.n_vocab                     # one row
        else:
            total += t.nbytes
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="qwen3moe-a3b")
    ap.add_argument("--layers", type=int, default=4, help="layers of a preset model (4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds; medians reported (3)")
    ap.add_argument("--quant", default="Q4_K_M",
                    help="file type(s) of a preset model, comma-separated; the first is the baseline "
                         "(Q4_K_M)")
    ap.add_argument("--depth", default="",
                    help="comma-separated cached-position counts: also measure decode after each "
                         "(e.g. 8192,32768)")
    ap.add_argument("--ik-bench", metavar="PATH", default="",
                    help="ik_llama.cpp's llama-bench: adds it as an engine, as is and with -rtr 1")
    ap.add_argument("--plain", action="store_true",
                    help=f"also run hetero-moe on the file's layout, not repacked at load ({PLAIN!r})")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.depths = [int(d) for d in a.depth.split(",") if d.strip()]
    if any(d <= 0 for d in a.depths):
        raise SystemExit(f"--depth: positive position counts, got {a.depth!r}")
    if a.child:
        if a.child in IK_ENGINES:
            res = run_ik(a.ik_bench, IK_ENGINES[a.child], a.model, a.threads, a.n_prompt, a.n_gen,
                         a.depths)
        else:
            res = _child(a.child, a.model, a.threads, a.n_prompt, a.n_gen, a.depths)
        print(json.dumps(res))
        return
    if a.ik_bench and not os.access(a.ik_bench, os.X_OK):
        raise SystemExit(f"--ik-bench {a.ik_bench!r} is not an executable llama-bench")
    quants = [q.strip() for q in a.quant.split(",") if q.strip()]
    paths = {q: resolve_model(a.model, a.layers, q) for q in quants}
    engines = ["hetero-moe"] + ([PLAIN] if a.plain else []) + ["llama.cpp"] \
        + (list(IK_ENGINES) if a.ik_bench else [])
    runs = {q: {e: [] for e in engines} for q in quants}
    cpu = cpu_facts()
    print(f"CPU: {cpu['flags']}; hetero-moe kernels: {cpu['variant']}", file=sys.stderr)
    for r in range(a.rounds):
        for q in quants:
            order = engines if r % 2 == 0 else engines[::-1]       # A/B, then B/A
            for engine in order:
                if engine not in runs[q]:
                    continue
                try:
                    res = run_engine(engine, paths[q], a.threads, a.n_prompt, a.n_gen, a.depths,
                                     a.ik_bench)
                except RuntimeError as e:
                    if engine not in IK_ENGINES:
                        raise
                    # a peer that cannot run this file is left out of it, not the whole run
                    print(f"{engine} cannot run {os.path.basename(paths[q])}; its column is left "
                          f"out:\n{str(e)[-600:]}", file=sys.stderr)
                    del runs[q][engine]
                    continue
                runs[q][engine].append(res)
                print(f"round {r + 1} {q:7s} {engine:10s} prefill {res['prefill_tps']:8.1f} tok/s  "
                      f"decode {res['decode_tps']:7.1f} tok/s  peak RSS {res['peak_rss'] / 2**20:7.0f} "
                      f"MiB", file=sys.stderr)
    bw = None
    try:
        sys.path.insert(0, HERE)
        from bandwidth import measure_bandwidth  # type: ignore
        bw = measure_bandwidth()
    except Exception as e:  # the probe is optional
        print(f"(bandwidth probe unavailable: {e})", file=sys.stderr)
    results = {q: summarize(paths[q], runs[q], a, bw) for q in quants}
    for res in results.values():
        res["cpu"] = cpu
    base = results[quants[0]]
    for q in quants:
        res = results[q]
        res["prefill_ratio_vs_baseline"] = res["prefill_ratio"] / base["prefill_ratio"]
        res["decode_ratio_vs_baseline"] = res["decode_ratio"] / base["decode_ratio"]
        report(res, a)
    if len(quants) > 1:
        print(f"\nratios (ours / llama.cpp), and relative to {quants[0]}'s:")
        print(f"{'quant':10s}{'prefill':>10s}{'decode':>10s}{'prefill/base':>14s}{'decode/base':>13s}")
        for q in quants:
            res = results[q]
            print(f"{q:10s}{res['prefill_ratio']:10.2f}{res['decode_ratio']:10.2f}"
                  f"{res['prefill_ratio_vs_baseline']:14.2f}{res['decode_ratio_vs_baseline']:13.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results[quants[0]] if len(quants) == 1 else results, f, indent=2)


def cpu_facts() -> dict:
    """The CPU's SIMD flags (from /proc/cpuinfo where readable) and the kernel variant in use."""
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                         "avx512_vnni", "avx512_bf16", "avx_vnni") if x in have]
                    break
    except OSError:
        pass
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        from hetero_moe import cpu_backend
        variant = cpu_backend.features().get("variant", "?") if cpu_backend.available() else "none"
    except Exception as e:  # reported, not fatal
        variant = f"unavailable ({e})"
    return {"model": model, "flags": " ".join(flags), "variant": variant}


def summarize(path: str, runs: dict, a, bw) -> dict:
    med = {e: {k: statistics.median(x[k] for x in v) for k in v[0] if k != "repack"}
           for e, v in runs.items()}
    size = os.path.getsize(path)
    bpt = decode_bytes_per_token(path)
    out = {
        "model": path, "file_size": size, "threads": a.threads, "n_prompt": a.n_prompt,
        "n_gen": a.n_gen, "rounds": a.rounds, "median": med, "runs": runs,
        "prefill_ratio": med["hetero-moe"]["prefill_tps"] / med["llama.cpp"]["prefill_tps"],
        "decode_ratio": med["hetero-moe"]["decode_tps"] / med["llama.cpp"]["decode_tps"],
        "rss_over_file": med["hetero-moe"]["peak_rss"] / size,
        "decode_ratio_at_depth": {d: med["hetero-moe"][f"decode_tps@{d}"]
                                  / med["llama.cpp"][f"decode_tps@{d}"] for d in a.depths},
        "decode_bytes_per_token": bpt, "read_bandwidth_gbs": bw,
        "repack": runs["hetero-moe"][0].get("repack"),     # what load(repack="auto") did
    }
    for ours, key in (("hetero-moe", "ratios"), (PLAIN, "ratios_plain")):
        if ours not in runs:
            continue
        for e in runs:          # every peer's ratios (ours / theirs)
            if e not in ("hetero-moe", PLAIN):
                out.setdefault(key, {})[e] = {
                    "prefill": med[ours]["prefill_tps"] / med[e]["prefill_tps"],
                    "decode": med[ours]["decode_tps"] / med[e]["decode_tps"],
                    "decode_empty": med[ours]["decode_empty_tps"] / med[e]["decode_empty_tps"],
                    **{f"decode@{d}": med[ours][f"decode_tps@{d}"] / med[e][f"decode_tps@{d}"]
                       for d in a.depths}}
    if bw:
        for e in runs:
            out[f"{e}_roofline_fraction"] = bpt * med[e]["decode_tps"] / (bw * 1e9)
    return out


def report(out: dict, a) -> None:
    med, size, bw, bpt = out["median"], out["file_size"], out["read_bandwidth_gbs"], out["decode_bytes_per_token"]
    print(f"\nmodel {os.path.basename(out['model'])} ({size / 2**20:.0f} MiB), {a.threads} threads, "
          f"{a.rounds} rounds, medians")
    print(f"{'':32s}{'prefill tok/s':>15s}{'decode tok/s':>15s}{'decode, empty':>15s}"
          f"{'peak RSS/file':>15s}{'imports/file':>14s}")
    for e in med:
        imp = med[e].get("import_rss")       # RSS after importing the engine (torch, for ours)
        print(f"{e:32s}{med[e]['prefill_tps']:15.1f}{med[e]['decode_tps']:15.1f}"
              f"{med[e]['decode_empty_tps']:15.1f}{med[e]['peak_rss'] / size:15.2f}"
              + (f"{imp / size:14.2f}" if imp else ""))
    for key, label in (("ratios", "ratio vs "), ("ratios_plain", "--repack off vs ")):
        for e, r in out.get(key, {}).items():
            print(f"{label + e:32s}{r['prefill']:15.2f}{r['decode']:15.2f}{r['decode_empty']:15.2f}")
    print(f"CPU: {out['cpu']['model']} ({out['cpu']['flags']}); hetero-moe kernels: "
          f"{out['cpu']['variant']}")
    rp = out.get("repack")
    if rp:
        print(f"hetero-moe repack (auto): " + (f"{rp['tensors']} tensors, {rp['bytes'] / 2**20:.0f} "
                                              f"MiB in 16-row layouts" if rp["on"] else "off")
              + f" ({rp['why']})")
    for d in a.depths:
        print(f"decode after {d} cached positions: " + ", ".join(
            f"{e} {med[e][f'decode_tps@{d}']:.1f} tok/s" for e in med) + "; ours / theirs: " +
            ", ".join(f"{e} {r[f'decode@{d}']:.2f}x" for e, r in out["ratios"].items()))
    if bw:
        print(f"decode reads {bpt / 2**20:.1f} MiB/token; bandwidth {bw:.1f} GB/s; roofline "
              f"{bw * 1e9 / bpt:.0f} tok/s; fraction reached: " + ", ".join(
                  f"{e} {out[f'{e}_roofline_fraction']:.2f}" for e in med))


if __name__ == "__main__":
    main()
