"""`hetero-moe serve`: an OpenAI-compatible HTTP server over one model.

    engine.py    slots (a KV cache each), the bounded FIFO queue, the step loop with batched decode
    app.py       FastAPI routes, SSE streaming, API keys, body limit, error shape
    protocol.py  request bodies (pydantic), sampling defaults, error helpers
    metrics.py   Prometheus /metrics (with --metrics)

The server binds a socket first (so /health answers 503 while the model loads), loads the model
on a thread, then starts the engine. SIGINT/SIGTERM: stop taking requests, let the running ones
finish (up to the drain time, then they get an error event), then exit; a second signal exits
at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time

from ..errors import HeteroMoEError

DEFAULT_PORT = 8080
DEFAULT_PARALLEL = 4
DEFAULT_QUEUE = 64
DEFAULT_DRAIN_SECONDS = 30.0


def read_api_keys(api_key: str | None, api_key_file: str | None) -> list[str]:
    """Keys from --api-key (a comma-separated list) and --api-key-file (one per line)."""
    keys = [k.strip() for k in (api_key or "").split(",") if k.strip()]
    if api_key_file:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                file_keys = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        except OSError as e:
            raise HeteroMoEError(f"cannot read --api-key-file {api_key_file}: {e}") from None
        if not file_keys:
            raise HeteroMoEError(f"--api-key-file {api_key_file} holds no key")
        keys += file_keys
    return keys


def sampling_defaults(gguf) -> dict:
    """The model author's sampling (llama.cpp's general.sampling.* keys), where the file has
    them and they are valid."""
    from ..sampling import SamplingParamError, SamplingParams
    from .protocol import GGUF_SAMPLING_KEYS
    out = {}
    for name, key in GGUF_SAMPLING_KEYS.items():
        v = gguf.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = int(v) if name in ("top_k", "repeat_last_n") else float(v)
            try:
                SamplingParams(**{name: v}).validate()
            except SamplingParamError:
                continue
            out[name] = v
    return out


def model_meta(model, engine, sampling: dict | None = None) -> dict:
    """/v1/models' `meta`: sizes, types, experts, placement, and the sampling a request gets for
    the fields it leaves out (`sampling`: the GGUF's general.sampling.* values, from
    sampling_defaults; the rest are OpenAI's)."""
    from .protocol import effective_sampling
    c = model.config
    types: dict[str, int] = {}
    n_params = 0
    for t in model.gguf:
        n_params += t.n_elements
        types[t.type_name] = types.get(t.type_name, 0) + 1
    meta = {
        "arch": c.arch, "n_ctx": engine.n_ctx, "n_ctx_train": c.n_ctx_train,
        "n_params": n_params, "size": model.gguf.file_size, "n_vocab": c.n_vocab,
        "n_layer": c.n_layer, "quant_types": types,
        "experts": ({"count": c.n_expert, "used": c.n_expert_used, "ffn": c.n_ff_exp,
                     "shared_ffn": c.n_ff_shexp} if c.is_moe else None),
        "placement": placement_summary(model),
        "slots": len(engine.slots), "kv_bytes_per_slot": engine.kv_bytes_per_slot(),
        "batched_decode": engine.batch,      # auto | on | off
        "sampling_defaults": effective_sampling(sampling or {}),
        "sampling_from_gguf": sorted(sampling or {}),
    }
    return meta


def placement_summary(model) -> str:
    if model.executor is None:
        return f"CPU only ({model.threads} threads)"
    return model.plan.summary()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given: asyncio sets TCP_NODELAY only on sockets that say IPPROTO_TCP (without it
    # every small response waits ~40 ms for a delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise HeteroMoEError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          parallel: int = DEFAULT_PARALLEL, queue: int = DEFAULT_QUEUE,
          api_keys: list[str] | None = None, metrics: bool = False,
          load_options: dict | None = None, drain_seconds: float = DEFAULT_DRAIN_SECONDS,
          max_body: int | None = None, batch: str = "auto", chunk: int | None = None,
          chunk_ms: float | None = None, verbose: bool = False, out=sys.stderr) -> int:
    """Run the server until SIGINT/SIGTERM. Returns the process exit status."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    from .app import MAX_BODY, Guard, State, create_app
    if parallel < 1:
        raise HeteroMoEError(f"--parallel must be >= 1, got {parallel}")
    if queue < 0:
        raise HeteroMoEError(f"--queue must be >= 0, got {queue}")
    # streams end when the engine has finished them, not when uvicorn starts to stop
    if hasattr(AppStatus, "disable_automatic_graceful_drain"):
        AppStatus.disable_automatic_graceful_drain()
    state = State(api_keys=list(api_keys or []), max_body=max_body or MAX_BODY)
    name = os.path.basename(model_path)
    state.model_id, state.aliases = name, (name[:-5],) if name.endswith(".gguf") else ()
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{bound}"
    config = uvicorn.Config(Guard(create_app(state), state), log_level="info" if verbose
                            else "warning", access_log=verbose, lifespan="off",
                            timeout_graceful_shutdown=5, timeout_keep_alive=5)

    class _Server(uvicorn.Server):
        def capture_signals(self):        # ours are installed below
            return contextlib.nullcontext()
    server = _Server(config)
    status = {"code": 0, "signals": 0}
    print(f"hetero-moe serve: loading {name}; listening on {url} (GET /health: 503 until "
          f"loaded)", file=out, flush=True)

    def load():
        from .. import load as load_model
        from .engine import DEFAULT_CHUNK, DEFAULT_CHUNK_MS, Engine
        from .metrics import Metrics
        try:
            t0 = time.perf_counter()
            model = load_model(model_path, **(load_options or {}))
            if model.gguf.get("tokenizer.ggml.tokens") is None:
                raise HeteroMoEError(f"{model_path} has no tokenizer; the server needs one")
            _ = model.tokenizer
            engine = Engine(model, parallel, queue, chunk or DEFAULT_CHUNK, batch=batch,
                            chunk_ms=DEFAULT_CHUNK_MS if chunk_ms is None else
                            (chunk_ms or None))
            state.model, state.sampling_defaults = model, sampling_defaults(model.gguf)
            state.meta = model_meta(model, engine, state.sampling_defaults)
            if metrics:
                state.metrics = Metrics(engine)
            engine.start()
            state.engine = engine
        except Exception as e:          # report, and stop the server
            state.load_error = str(e)
            print(f"hetero-moe: error: {e}", file=out, flush=True)
            status["code"] = 1
            server.should_exit = True
            return
        c = model.config
        experts = f", {c.n_expert} experts top-{c.n_expert_used}" if c.is_moe else ""
        kv = engine.kv_bytes_per_slot()
        print(f"hetero-moe serve: {name} ({c.arch}, {_fmt_bytes(model.gguf.file_size)}{experts}) "
              f"loaded in {time.perf_counter() - t0:.1f} s | {placement_summary(model)} | "
              f"{parallel} slot(s) x {engine.n_ctx} ctx, KV cache {_fmt_bytes(kv)} per slot "
              f"({_fmt_bytes(kv * parallel)} in all, committed as used) | queue {queue} | "
              f"batched decode: {batch} | "
              f"{'API key required | ' if state.api_keys else ''}"
              f"{'metrics on | ' if metrics else ''}ready on {url}", file=out, flush=True)

    def stop_when_drained():
        eng = state.engine
        if eng is not None:
            busy = eng.busy() + eng.queued()
            print(f"hetero-moe serve: shutting down ({busy} request(s) in flight, up to "
                  f"{drain_seconds:g} s to finish)", file=out, flush=True)
            eng.stop(drain_seconds)
            eng.join(drain_seconds + 10)
        server.should_exit = True

    def on_signal(sig, frame):
        status["signals"] += 1
        if status["signals"] == 1:
            threading.Thread(target=stop_when_drained, name="hetero-moe-drain",
                             daemon=True).start()
        else:                           # a second signal: now
            if state.engine is not None:
                state.engine.stop(0)
            server.should_exit = server.force_exit = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    loader = threading.Thread(target=load, name="hetero-moe-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        eng = state.engine
        if eng is not None:
            eng.stop(0)
            eng.join(10)
        if state.model is not None and (eng is None or not eng._thread.is_alive()):
            state.model.close()
        sock.close()
    print("hetero-moe serve: stopped", file=out, flush=True)
    return status["code"]
