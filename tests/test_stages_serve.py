"""`hetero-moe serve --replicas 2` on Ray Serve (a local cluster on 127.0.0.1): requests are spread
over both replicas, answers equal the model's greedy text, streams come through."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray", reason="--replicas needs Ray: pip install 'hetero-moe[ray]'")
pytest.importorskip("ray.serve", reason="--replicas needs Ray Serve: pip install 'ray[serve]'")
pytest.importorskip("fastapi", reason="the server needs pip install -e '.[server]'")
httpx = pytest.importorskip("httpx")

import hetero_moe  # noqa: E402
from hetero_moe.testing.make_model import cached_test_model  # noqa: E402


def _port() -> int:
    """A free port below the kernel's ephemeral range (32768-60999) and above Ray's worker ports
    (10002-19999): a port the kernel hands out for bind(0) can be handed again to one of the
    processes Ray starts before Serve's proxy binds it (seen once: "Failed to bind")."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def _start_serve(path: str, env: dict) -> tuple[subprocess.Popen, int]:
    """Start `serve --replicas 2` and wait for its "ready" line; on a port lost to another process
    between the check and Serve's bind, start again on another (three tries)."""
    for _ in range(3):
        port = _port()
        # one slot per replica: each answer is a single-sequence greedy run, bit for bit the one
        # Model.generate makes (two slots decode as a batch, whose GEMM tiles sum in another
        # order: on this 8-layer random model that can part the greedy text after a few tokens)
        proc = subprocess.Popen([sys.executable, "-m", "hetero_moe.cli", "serve", path,
                                 "--replicas", "2", "-np", "1", "--ctx", "256", "-t", "1",
                                 "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env)
        # the proxy answers as soon as one replica runs; the CLI says "ready" once serve.run has
        # returned, i.e. every replica is up (polling /health raced the second replica's start)
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
        reader.start()
        deadline = time.monotonic() + 150
        try:
            while not any("ready in" in ln for ln in lines):
                if proc.poll() is not None:
                    reader.join(10)
                    break
                assert time.monotonic() < deadline, "replicas not ready in 150 s: " + "".join(lines)
                time.sleep(0.5)
            else:
                return proc, port
        except BaseException:
            _stop(proc)
            raise
        out = "".join(lines)
        assert "Failed to bind" in out, out[-3000:]
    raise AssertionError("serve could not bind a port in three tries: " + out[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_two_replicas_share_requests():
    import ray
    if ray.is_initialized():
        ray.shutdown()
    path = str(cached_test_model("qwen3moe", layers=8))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(hetero_moe.__file__)), os.environ.get("PYTHONPATH", "")]))
    proc, port = _start_serve(path, env)
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
                "cache_prompt": False}

        def post(_):
            r = httpx.post(base + "/v1/completions", json=body, timeout=60)
            return r.status_code, r.headers.get("x-hetero-replica"), r.json()
        with cf.ThreadPoolExecutor(6) as ex:
            got = list(ex.map(post, range(12)))
        assert all(code == 200 for code, _, _ in got), got
        assert len({rep for _, rep, _ in got}) == 2, "one replica served every request"
        m = hetero_moe.load(path, threads=1, n_ctx=256, gpu="none")
        want = m.generate("Once upon a time", max_tokens=12, temperature=0).text
        m.close()
        assert {j["choices"][0]["text"] for _, _, j in got} == {want}
        text = ""
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text == want
    finally:
        _stop(proc)
