"""`hetero-moe serve --replicas R`: R copies of the model (or of the pipeline, with --stages)
behind Ray Serve, which spreads requests over them and restarts a replica that dies.

Each Serve replica owns one `hetero-moe serve` process on a free loopback port (the server as it
runs alone: slots, queue, batched decode, SSE streams, /metrics) and passes requests to it,
streaming the answer back. A process rather than the app in the replica's own process: the server
owns its engine thread and its shutdown, and its KV caches and weights then live and die with it.
Ray Serve's proxy listens on --host/--port; every response says which replica served it
(X-Hetero-Replica).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from ..errors import HeteroMoEError

START_TIMEOUT_S = 600.0
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_argv(path: str, args) -> list[str]:
    """The `hetero-moe serve` command line of one replica (its own options, less the cluster's)."""
    argv = [path, "--parallel", str(args.parallel), "--queue", str(args.queue),
            "--batch", args.batch, "--chunk", str(args.chunk), "--chunk-ms", str(args.chunk_ms)]
    for flag, v in (("--ctx", args.ctx_size), ("-t", args.threads), ("--stages", args.stages),
                    ("--stage-cpus", args.stage_cpus),
                    ("--ram-per-host", getattr(args, "ram_per_host", None))):
        if v is not None:
            argv += [flag, str(v)]
    if getattr(args, "spread", False):
        argv.append("--spread")
    if args.stages:
        argv += ["--ray-address", "auto"]          # the replica's stages join this cluster
    if args.metrics:
        argv.append("--metrics")
    return argv


class ReplicaServer:
    """The body of a Serve deployment: one `hetero-moe serve` process and a streaming proxy."""

    def __init__(self, argv: list[str], api_keys: list[str]):
        import httpx
        self.port = _free_port()
        env = dict(os.environ)
        if api_keys:
            env["HETERO_MOE_REPLICA_KEY"] = ",".join(api_keys)
            argv = argv + ["--api-key", ",".join(api_keys)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hetero_moe.cli", "serve", *argv, "--host", "127.0.0.1",
             "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, text=True)
        self.name = f"replica-{os.getpid()}"
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self.port}/health"
        while True:
            if self.proc.poll() is not None:
                raise HeteroMoEError(f"{self.name}: hetero-moe serve exited with "
                                     f"{self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise HeteroMoEError(f"{self.name}: the server did not become ready in "
                                     f"{START_TIMEOUT_S:g} s")
            time.sleep(0.3)
        # the pipe would fill up and block the server: drain it from here on
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=None)

    async def __call__(self, request):
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        req = self.client.build_request(request.method, request.url.path,
                                        params=request.query_params, headers=headers,
                                        content=await request.body())
        resp = await self.client.send(req, stream=True)
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
        out["x-hetero-replica"] = self.name
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=out,
                                 background=BackgroundTask(resp.aclose))

    def check_health(self):
        """Ray Serve's health check: the server process is alive."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: hetero-moe serve exited with "
                               f"{self.proc.returncode}")

    def __del__(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def build(path: str, args, api_keys: list[str], replica_cpus: float | None = None):
    """The Serve application: args.replicas copies of ReplicaServer."""
    from ray import serve
    cpus = replica_cpus if replica_cpus is not None else \
        (0.1 if args.stages else float(args.threads or 1))
    dep = serve.deployment(ReplicaServer, name="hetero-moe", num_replicas=args.replicas,
                           ray_actor_options={"num_cpus": cpus},
                           max_ongoing_requests=max(8, 4 * (args.parallel + args.queue)),
                           health_check_period_s=5)
    return dep.bind(server_argv(path, args), list(api_keys))


def serve_replicas(path: str, args, load_options: dict, api_keys: list[str],
                   out=sys.stderr) -> int:
    """Run until SIGINT/SIGTERM."""
    from .pipeline import connect
    if args.replicas < 1:
        raise HeteroMoEError(f"--replicas must be >= 1, got {args.replicas}")
    try:
        from ray import serve
    except ImportError:
        raise HeteroMoEError("--replicas runs on Ray Serve: pip install 'hetero-moe[ray]' "
                             "(ray[serve])") from None
    connect(args.ray_address or "local")
    serve.start(http_options={"host": args.host, "port": args.port})
    t0 = time.perf_counter()
    print(f"hetero-moe serve: starting {args.replicas} replica(s) of {os.path.basename(path)} "
          f"on Ray Serve", file=out, flush=True)
    serve.run(build(path, args, api_keys), name="hetero-moe", route_prefix="/")
    print(f"hetero-moe serve: {args.replicas} replica(s) ready in "
          f"{time.perf_counter() - t0:.1f} s on http://{args.host}:{args.port}", file=out,
          flush=True)
    done = threading.Event()
    old = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        done.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        serve.shutdown()
    print("hetero-moe serve: stopped", file=out, flush=True)
    return 0
