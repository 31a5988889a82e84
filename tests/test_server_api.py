"""One model, many callers (the Python API side of serving): the model's lock, ownership by a
server, close(), prompt caching across calls, and the CLI chat that reuses earlier turns and
survives Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

import hetero_moe
from hetero_moe.api import ModelBusyError, ModelClosedError

from .conftest import tiny_model
from .reference import MIN_SAME_BEFORE_TIE

TIE = 0.5          # greedy runs may part only where the alone run's top-2 logprobs are this close
N_GEN = 24         # tokens per greedy comparison: room for MIN_SAME_BEFORE_TIE identical ones


@pytest.fixture(scope="module")
def path():
    return tiny_model("qwen3moe")


@pytest.fixture()
def model(path):
    m = hetero_moe.load(path, threads=2, n_ctx=256)
    yield m
    m.close()


def _gguf_fds(path: str) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(path)
        except OSError:
            pass
    return n


def test_close_releases_maps_and_descriptors(path):
    before = _gguf_fds(path)
    with hetero_moe.load(path, threads=2, n_ctx=128) as m:
        m.generate("hello", max_tokens=3, temperature=0)
        assert _gguf_fds(path) > before
        assert os.path.realpath(path) in open("/proc/self/maps").read()
    assert _gguf_fds(path) == before
    assert os.path.realpath(path) not in open("/proc/self/maps").read()
    with pytest.raises(ModelClosedError):
        m.generate("hello", max_tokens=3)
    assert m.tokenize("hello")                      # the tokenizer outlives the maps
    m.close()                                       # twice: harmless


def test_other_threads_get_a_clear_error_while_owned(model):
    errors = []
    with model.exclusive("a test server"):
        def other():
            try:
                model.generate("hi", max_tokens=2)
            except ModelBusyError as e:
                errors.append(str(e))
        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        assert model.generate("hi", max_tokens=2, temperature=0).tokens   # the owner may
    assert errors and "a test server" in errors[0]
    assert model.generate("hi", max_tokens=2, temperature=0).tokens       # released


def _same_up_to_tie(got: list[int], alone) -> None:
    """`got` follows the run alone, or parts where that run's top two are within TIE, and only
    after MIN_SAME_BEFORE_TIE identical tokens (tests/reference.py's rule)."""
    for j, (a, b) in enumerate(zip(got, alone.tokens)):
        if a != b:
            top = {t: lp for t, _, lp in alone.logprobs[j].top}
            assert a in top, f"token {j}: {a} is not among the alone run's top two {top}:\n" \
                             f"{got}\n{alone.tokens}"
            gap = top[b] - top[a]
            assert gap <= TIE, f"token {j}: the alone run prefers {b} over {a} by {gap:.3f}:\n" \
                               f"{got}\n{alone.tokens}"
            assert j >= MIN_SAME_BEFORE_TIE, \
                f"token {j}: parted at a near-tie ({gap:.3f}) before {MIN_SAME_BEFORE_TIE} " \
                f"identical tokens: too little compared\n{got}\n{alone.tokens}"
            return
    assert len(got) == len(alone.tokens), (got, alone.tokens)


def test_two_threads_share_a_model_safely(model):
    """Calls from two threads wait for each other step by step; each one's result is its result
    alone (up to a near-tie where a paused call re-evaluated its tokens)."""
    prompts = ["Once upon a time", "The capital of France is"]
    alone = [model.generate(p, max_tokens=N_GEN, temperature=0, logprobs=2) for p in prompts]
    got: list = [None, None]

    def run(i):
        got[i] = model.generate(prompts[i], max_tokens=N_GEN, temperature=0)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for i in range(2):
        _same_up_to_tie(got[i].tokens, alone[i])


def test_interleaved_streams_in_one_thread(model):
    """A stream paused while another call used the cache re-evaluates what it needs."""
    want = model.generate("Once upon a time", max_tokens=N_GEN, temperature=0, logprobs=2)
    s = model.stream("Once upon a time", max_tokens=N_GEN, temperature=0)
    first = next(s)
    other = model.generate("Something else entirely, much longer than that", max_tokens=5)
    rest = "".join(s)
    assert model.last_completion.text == first + rest
    _same_up_to_tie(model.last_completion.tokens, want)
    assert len(other.tokens) == 5


def test_cache_prompt_reuses_the_previous_turn(model):
    msgs = [{"role": "user", "content": "Name three colors."}]
    c1 = model.chat(msgs, max_tokens=10, temperature=0, cache_prompt=True)
    msgs += [{"role": "assistant", "content": c1.text}, {"role": "user", "content": "More."}]
    c2 = model.chat(msgs, max_tokens=10, temperature=0, cache_prompt=True)
    assert c2.timings.cached_tokens >= len(model.chat_ids(msgs[:1]))
    c3 = model.chat(msgs, max_tokens=10, temperature=0)         # default: no reuse
    assert c3.timings.cached_tokens == 0
    # a direct eval in between invalidates nothing it did not touch, and never corrupts
    model.eval(model.tokenize("unrelated text"), 0)
    c4 = model.chat(msgs, max_tokens=10, temperature=0, cache_prompt=True)
    assert c4.timings.cached_tokens <= 1


def test_cli_chat_reuses_turns_and_ctrl_c_cancels_the_reply(path):
    """Two turns over stdin: the second prefills only the new turn; SIGINT during a long reply
    ends that reply and the session goes on."""
    # a context (4096) the first reply cannot fill before the signal arrives (the tiny model
    # decodes ~1300-2100 tok/s: 2-3 s), so the signal always meets a reply in progress; greedy, so
    # the reply is the same every run (this model and prompt: to the context's end, no early
    # end-of-text). The child gets SIGINT's default disposition: a test run started in the
    # background inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    p = subprocess.Popen([sys.executable, "-m", "hetero_moe.cli", "run", path, "-n", "100000",
                          "--temp", "0", "-c", "4096"], stdin=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p.stdin.write("Tell me a very long story.\n")
        p.stdin.flush()
        p.stdout.read(20)                           # the reply is streaming
        p.send_signal(signal.SIGINT)
        out, err = p.communicate("And another one?\n/exit\n", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "[reply interrupted]" in err
    # the second reply ran to the end of the context or a stop, and reused the first turn
    assert "cached)" in err, err


def test_cli_chat_drops_old_turns_when_the_context_is_full(path):
    """A chat turn that no longer fits the context drops the oldest exchange and goes on; a
    message that cannot fit alone is refused with the reason, and the session goes on."""
    r = subprocess.run([sys.executable, "-m", "hetero_moe.cli", "run", path, "-n", "200",
                        "--temp", "0", "-c", "160"],
                       input="Hello there.\nAnd again?\nOnce more?\n" + "word " * 400 +
                             "\nLast one?\n/exit\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[context full: the oldest turn was dropped]" in r.stderr
    assert "the message was not sent" in r.stderr
    assert r.stderr.count("[prefill:") == 4          # every other turn got its reply


def test_cli_serve_help():
    r = subprocess.run([sys.executable, "-m", "hetero_moe.cli", "serve", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--host", "--port", "--parallel", "--ctx", "--api-key", "--api-key-file",
                "--metrics", "--threads", "--gpu"):
        assert opt in r.stdout, opt
