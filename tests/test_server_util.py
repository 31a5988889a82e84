"""Starting the real `hetero-moe serve` in a subprocess for the server tests (no tests here).

The server binds 127.0.0.1 only, on a port it picks itself (--port 0); its startup line gives
the URL. /health is polled until the model is loaded.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest

HOST = "127.0.0.1"              # the tests never bind or call any other address
START_TIMEOUT = 120.0


class ServerProcess:
    """`hetero-moe serve MODEL --host 127.0.0.1 --port 0 ARGS...` as a subprocess."""

    def __init__(self, model: str, *args: str, api_key: str | None = None, wait: bool = True):
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "hetero_moe.cli", "serve", model, "--host", HOST,
               "--port", "0", *args] + (["--api-key", api_key] if api_key else [])
        env = dict(os.environ, HETERO_MOE_THREADS=os.environ.get("HETERO_MOE_THREADS", "2"))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_for_url()
        self.health_statuses: list[int] = []
        if wait:
            self.wait_ready()

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_for_url(self) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.output())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.02)
        raise RuntimeError(f"server did not start:\n{self.output()}")

    def wait_ready(self) -> None:
        import httpx
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT:
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                self.health_statuses.append(r.status_code)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.02)
        raise RuntimeError(f"server not healthy in {START_TIMEOUT} s:\n{self.output()}")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 60.0):
        import httpx
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout)

    def openai(self):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                             max_retries=0, timeout=120)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        self.log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def need_server_packages():
    for mod in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "httpx", "openai"):
        pytest.importorskip(mod, reason="the server tests need the server extra: "
                                        "pip install -e '.[test]'")


def wait_until(cond, timeout: float = 20.0, every: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    return cond()
