"""The `hetero-moe` command line, run as a user would (subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys

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
