"""`hetero-moe serve` as a client sees it: the official openai client (sync and streaming, chat
and completions, logprobs, stop, seed, usage) and httpx for every error case, against the real
server in a subprocess on 127.0.0.1."""
from __future__ import annotations

import json

import pytest

import hetero_moe

from .conftest import tiny_model
from .test_server_util import ServerProcess, need_server_packages

KEY = "test-key-123"
CTX = 256
MAX_BODY = 65536


@pytest.fixture(scope="module")
def path():
    return tiny_model("qwen3moe")


@pytest.fixture(scope="module")
def srv(path):
    need_server_packages()
    s = ServerProcess(path, "--parallel", "2", "--ctx", str(CTX), "--max-body", str(MAX_BODY),
                      "--metrics", api_key=KEY)
    yield s
    code = s.stop()
    out = s.output()
    s.cleanup()
    assert code == 0, out
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def ref(path):
    m = hetero_moe.load(path, threads=2, n_ctx=CTX)
    yield m
    m.close()


@pytest.fixture(scope="module")
def oai(srv):
    return srv.openai()


@pytest.fixture(scope="module")
def http(srv):
    with srv.client() as c:
        yield c


def model_id(srv):
    return srv.openai().models.list().data[0].id


# -- basics ---------------------------------------------------------------------------------------
def test_startup_line_and_health(srv):
    out = srv.output()
    assert "2 slot(s) x 256 ctx" in out and "KV cache" in out and "ready on http://127.0.0.1:" in out
    assert "API key required" in out
    import httpx
    r = httpx.get(srv.url + "/health")                  # open without the key
    assert r.status_code == 200 and r.json()["status"] == "ok"
    # while loading, /health was 503 (the server listens before the model is loaded)
    assert set(srv.health_statuses) <= {503, 200}


def test_models_meta(oai, srv, path):
    models = oai.models.list().data
    assert len(models) == 1 and models[0].id == "qwen3moe-tiny-L2-Q4_K_M-s0-v1.gguf"
    with srv.client() as c:
        meta = c.get("/v1/models").json()["data"][0]["meta"]
    assert meta["n_ctx"] == CTX and meta["n_params"] > 0 and meta["size"] > 0
    assert meta["experts"]["count"] == 8 and meta["experts"]["used"] == 2
    assert "Q4_K" in meta["quant_types"] and meta["placement"].startswith("CPU only")
    assert meta["slots"] == 2


# -- generation through the openai client ---------------------------------------------------------
def test_chat_greedy_equals_model_generate(oai, srv, ref):
    msgs = [{"role": "user", "content": "Name three prime numbers."}]
    r = oai.chat.completions.create(model=model_id(srv), messages=msgs, max_tokens=24,
                                    temperature=0)
    want = ref.chat(msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ref.chat_ids(msgs))
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_greedy_equals_model_generate(oai, srv, ref):
    prompt = "The quick brown fox jumps over the lazy dog. Once upon a time,"
    r = oai.completions.create(model=model_id(srv), prompt=prompt, max_tokens=32, temperature=0)
    want = ref.generate(prompt, max_tokens=32, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == 32 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stream_equals_non_stream(oai, srv, kind):
    mid = model_id(srv)
    kw = dict(model=mid, max_tokens=40, temperature=0, cache_prompt=False)
    if kind == "chat":
        call = oai.chat.completions.create
        kw["messages"] = [{"role": "user", "content": "Tell me a story about ünïcödé 🦊."}]
    else:
        call = oai.completions.create
        kw["prompt"] = "Ünïcödé text: 日本語 and emoji 🦊"
    extra = {"cache_prompt": kw.pop("cache_prompt")}
    full = call(**kw, extra_body=extra)
    chunks = list(call(**kw, stream=True, stream_options={"include_usage": True},
                       extra_body=extra))
    ids = {c.id for c in chunks}
    assert len(ids) == 1                                   # one id for all chunks
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
    body = [c for c in chunks if c.choices]
    if kind == "chat":
        assert body[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in body)
        want = full.choices[0].message.content
    else:
        text = "".join(c.choices[0].text for c in body)
        want = full.choices[0].text
    assert text == want
    finals = [c for c in body if c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0] is body[-1]
    assert finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert usage[0].usage.completion_tokens == full.usage.completion_tokens


def test_stream_raw_sse_framing(http):
    """The wire format: data: lines, the role first, finish_reason, usage, then [DONE]."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.strip()]
    assert all(ln.startswith("data: ") or ln.startswith(":") for ln in lines)
    data = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "timings" in events[-2]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0


def test_logprobs_chat(oai, srv):
    r = oai.chat.completions.create(model=model_id(srv), messages=[{"role": "user", "content":
                                                                      "Hello"}],
                                    max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.token == t.top_logprobs[0].token            # greedy picks the top token
        assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_logprobs_completion_with_echo(oai, srv, ref):
    prompt = "The capital of France is"
    r = oai.completions.create(model=model_id(srv), prompt=prompt, max_tokens=4, temperature=0,
                               logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text.startswith(prompt)
    ids = ref.tokenize(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 4 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = ref.logits(ids).log_softmax(-1)
    for i in range(1, len(ids)):                           # prompt logprobs: teacher-forced
        assert abs(lp.token_logprobs[i] - float(rows[i - 1, ids[i]])) < 1e-3
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_stop_sequence(oai, srv):
    mid = model_id(srv)
    prompt = "1, 2, 3, 4,"
    base = oai.completions.create(model=mid, prompt=prompt, max_tokens=24, temperature=0)
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    r = oai.completions.create(model=mid, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]
    s = list(oai.completions.create(model=mid, prompt=prompt, max_tokens=24, temperature=0,
                                    stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_seed_determinism_without_prompt_cache(oai, srv):
    mid = model_id(srv)
    kw = dict(model=mid, messages=[{"role": "user", "content": "Once upon a time"}],
              max_tokens=16, temperature=1.0, extra_body={"cache_prompt": False, "top_k": 0})
    a = oai.chat.completions.create(seed=42, **kw).choices[0].message.content
    b = oai.chat.completions.create(seed=42, **kw).choices[0].message.content
    c = oai.chat.completions.create(seed=43, **kw).choices[0].message.content
    assert a == b and a != c


def test_prompt_cache_reuse_and_usage(oai, srv, ref):
    mid = model_id(srv)
    msgs = [{"role": "system", "content": "You are a helpful assistant. " * 4},
            {"role": "user", "content": "Count to five."}]
    r1 = oai.chat.completions.create(model=mid, messages=msgs, max_tokens=8, temperature=0)
    msgs2 = msgs + [{"role": "assistant", "content": r1.choices[0].message.content},
                    {"role": "user", "content": "Again."}]
    r2 = oai.chat.completions.create(model=mid, messages=msgs2, max_tokens=8, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(ref.chat_ids(msgs)) - 1           # the first turn came from the cache
    r3 = oai.chat.completions.create(model=mid, messages=msgs2, max_tokens=8, temperature=0,
                                     extra_body={"cache_prompt": False})
    assert r3.usage.prompt_tokens_details.cached_tokens == 0
    raw = r2.model_dump()
    assert raw["timings"]["cache_n"] == cached
    assert raw["timings"]["prompt_n"] == r2.usage.prompt_tokens - cached


def test_prompt_cache_picks_the_slot_with_the_longest_prefix(http):
    """2 slots: prompt a, then b, then b + more reuses b's slot (least-recently-used would pick
    a's), then a + more reuses a's (most-recently-used would pick b's). Token-id prompts, and one
    generated token (never written to the cache), so a slot holds exactly its prompt."""
    a = list(range(1000, 1040))
    b = list(range(2000, 2030))

    def cached(ids: list[int]) -> int:
        r = http.post(COMPL, json={"prompt": ids, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached(a) == 0 and cached(b) == 0
    assert cached(b + list(range(3000, 3010))) == len(b)
    assert cached(a + list(range(4000, 4010))) == len(a)


def test_max_completion_tokens_and_penalties(oai, srv):
    r = oai.chat.completions.create(model=model_id(srv), messages=[{"role": "user",
                                                                    "content": "Hi"}],
                                    max_completion_tokens=5, temperature=0.7, top_p=0.9, seed=1,
                                    presence_penalty=0.5, frequency_penalty=0.5,
                                    extra_body={"top_k": 20, "min_p": 0.05,
                                                "repeat_penalty": 1.1, "repeat_last_n": 32})
    assert r.usage.completion_tokens <= 5


def test_tokenize_detokenize(http, ref):
    text = "Hello world, ünïcödé!"
    r = http.post("/tokenize", json={"content": text})
    assert r.status_code == 200 and r.json()["tokens"] == ref.tokenize(text, add_special=False)
    r = http.post("/tokenize", json={"content": text, "with_pieces": True})
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == ref.tokenize(text, add_special=False)
    r = http.post("/detokenize", json={"tokens": ref.tokenize(text, add_special=False)})
    assert r.status_code == 200 and r.json()["content"] == text


def test_metrics(http):
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("hetero_moe_requests_total", "hetero_moe_prompt_tokens_total",
                 "hetero_moe_generated_tokens_total", "hetero_moe_prefill_tokens_per_second",
                 "hetero_moe_decode_tokens_per_second", "hetero_moe_queue_depth",
                 "hetero_moe_slots_busy", "hetero_moe_time_to_first_token_seconds_bucket"):
        assert name in text, name
    gen = [ln for ln in text.splitlines() if ln.startswith("hetero_moe_generated_tokens_total")]
    assert float(gen[0].split()[-1]) > 0


# -- sampling defaults: request, else the GGUF's general.sampling.*, else OpenAI's ---------------
GGUF_SAMPLING = {"general.sampling.temp": 0.5, "general.sampling.top_k": 1,
                 "general.sampling.top_p": 0.75, "general.sampling.penalty_last_n": 32,
                 "general.sampling.penalty_repeat": -1.0}     # invalid: ignored


def with_metadata(src: str, dst, extra: dict) -> str:
    """A copy of the GGUF `src` with the metadata `extra` added (ints as INT32, floats as
    FLOAT32)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    new = {k: MetadataDetails(gguf.GGUFValueType.INT32 if isinstance(v, int) else
                              gguf.GGUFValueType.FLOAT32, v) for k, v in extra.items()}
    copy_with_new_metadata(reader, gguf.GGUFWriter(str(dst), arch), new, [])
    return str(dst)


def test_sampling_precedence_unit():
    from hetero_moe.server import sampling_defaults
    from hetero_moe.server.protocol import OPENAI_DEFAULTS, ChatCompletionRequest

    gguf_defaults = sampling_defaults(dict(GGUF_SAMPLING))       # .get() is all it reads
    assert gguf_defaults == {"temperature": 0.5, "top_k": 1, "top_p": 0.75, "repeat_last_n": 32}
    req = ChatCompletionRequest(messages=MSG, temperature=0.25, min_p=0.1)
    p = req.sampling(8, gguf_defaults)
    assert (p.temperature, p.min_p) == (0.25, 0.1)                # the request
    assert (p.top_k, p.top_p, p.repeat_last_n) == (1, 0.75, 32)   # the GGUF
    assert p.repeat_penalty == OPENAI_DEFAULTS["repeat_penalty"] == 1.0   # OpenAI's (the
    assert p.presence_penalty == 0.0                                     # GGUF's is invalid)
    q = ChatCompletionRequest(messages=MSG).sampling(8, {})
    assert (q.temperature, q.top_k, q.top_p) == (1.0, 0, 1.0)     # no GGUF keys: OpenAI's


def test_gguf_sampling_defaults_served(path, tmp_path):
    """A model whose GGUF recommends top_k=1: a request that names no sampling field decodes
    greedily whatever its seed; one that sets top_k=0 samples (the request wins); /v1/models
    shows the values in effect."""
    need_server_packages()
    model = with_metadata(path, tmp_path / "sampling.gguf", GGUF_SAMPLING)
    s = ServerProcess(model, "--parallel", "1", "--ctx", "128")
    try:
        with s.client() as c:
            meta = c.get("/v1/models").json()["data"][0]["meta"]
            assert meta["sampling_defaults"] == {
                "temperature": 0.5, "top_p": 0.75, "top_k": 1, "min_p": 0.0,
                "repeat_penalty": 1.0, "repeat_last_n": 32, "frequency_penalty": 0.0,
                "presence_penalty": 0.0}
            assert meta["sampling_from_gguf"] == ["repeat_last_n", "temperature", "top_k",
                                                  "top_p"]

            def text(**kw) -> str:
                r = c.post(COMPL, json={"prompt": "Once upon a time", "max_tokens": 16,
                                        "cache_prompt": False, **kw})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            greedy = text(temperature=0)
            assert text(seed=1) == text(seed=2) == greedy               # the GGUF's top_k=1
            sampled = {text(seed=i, top_k=0, temperature=1.0, top_p=1.0) for i in (1, 2, 3)}
            assert len(sampled) > 1 and greedy not in sampled           # the request's top_k
    finally:
        code = s.stop()
        out = s.output()
        s.cleanup()
    assert code == 0 and "Traceback" not in out, out


# -- errors ---------------------------------------------------------------------------------------
SECRET = "SECRET-INPUT-MARKER"
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
MSG = [{"role": "user", "content": SECRET}]

BAD = [
    (CHAT, b"{not json", None),
    (CHAT, b"[1, 2, 3]", None),
    (CHAT, b"", None),
    (CHAT, {"model": "gpt-4", "messages": MSG}, "model"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": SECRET}]}, "messages.0.role"),
    (CHAT, {"messages": MSG, "n": 2}, "n"),
    (CHAT, {"messages": MSG, "temperature": -1}, "temperature"),
    (CHAT, {"messages": MSG, "temperature": SECRET}, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, "top_p"),
    (CHAT, {"messages": MSG, "min_p": 1.5}, "min_p"),
    (CHAT, {"messages": MSG, "max_tokens": -1}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 1.5}, "max_completion_tokens"),
    (CHAT, {"messages": MSG, "presence_penalty": 3}, "presence_penalty"),
    (CHAT, {"messages": MSG, "seed": -5}, "seed"),
    (CHAT, {"messages": MSG, "stop": [""]}, "stop"),
    (CHAT, {"messages": MSG, "stop": ["a"] * 17}, "stop"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, "tools"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, "response_format"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"text": SECRET}]}]},
     "messages.0.content.0.type"),
    (CHAT, {"messages": MSG, "stop": 5}, "stop"),
    (CHAT, {"messages": MSG, "stop": [SECRET, 5]}, "stop.1"),
    (CHAT, {"messages": [{"role": "user", "content": SECRET * 200}]}, "messages"),  # > ctx
    (COMPL, {"prompt": SECRET * 200}, "prompt"),                                   # > ctx
    (COMPL, {"prompt": ""}, "prompt"),
    (COMPL, {"prompt": [1, 2, 10 ** 9]}, "prompt"),
    (COMPL, {"prompt": ["a", "b"]}, "prompt"),
    (COMPL, {"prompt": 5}, "prompt"),
    (COMPL, {"prompt": [SECRET, 5]}, "prompt.1"),
    (COMPL, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMPL, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMPL, {"prompt": "x", "best_of": 3}, "best_of"),
    (COMPL, {"prompt": "x", "n": 3}, "n"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/tokenize", {"content": 5}, "content"),
]


@pytest.mark.parametrize("route,body,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_are_400(http, route, body, param):
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert SECRET not in r.text                          # the input is never echoed back
    assert len(r.content) < 1000
    assert err["param"] == param, err       # None: the body as a whole


# the whole message for some of them: the "must be a JSON object" wording only where the body is
# not one, and a path without pydantic's union-member tags (content.str, prompt.list[str], ...)
BAD_MESSAGES = [
    (CHAT, b"[1, 2, 3]", "the request body must be a JSON object"),
    (CHAT, b"", "the request body is empty: send a JSON object"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs needs logprobs=true"),
    (CHAT, {"messages": MSG, "stream_options": {"include_usage": True}},
     "stream_options is only allowed with stream=true"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]},
     "tools (function calling) are not supported"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]},
     "messages.0.content: wrong type (expected str or list[ContentPart])"),
    (CHAT, {"messages": [{"role": "user", "content": [{"text": SECRET}]}]},
     "messages.0.content.0.type: Field required"),
    (CHAT, {"messages": MSG, "stop": [SECRET, 5]}, "stop.1: Input should be a valid string"),
    (COMPL, {"prompt": "x", "suffix": "y"}, "suffix (fill-in-the-middle) is not supported"),
    (COMPL, {"prompt": "x", "best_of": 3}, "best_of=3 is not supported (only 1)"),
    (COMPL, {"prompt": ["a", "b"]},
     "one prompt per request, got a batch of 2 (send them as separate requests)"),
    (COMPL, {"prompt": 5},
     "prompt: wrong type (expected str or list[str] or list[int] or list[list[int]])"),
]


@pytest.mark.parametrize("route,body,message", BAD_MESSAGES,
                         ids=[f"{i}" for i in range(len(BAD_MESSAGES))])
def test_bad_request_messages(http, route, body, message):
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == message


def test_oversized_body_is_400(http):
    big = {"messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    r = http.post(CHAT, json=big)
    assert r.status_code == 400 and r.json()["error"]["code"] == "body_too_large"


def test_openai_client_sees_bad_request(oai, srv):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model_id(srv), messages=MSG, n=2)
    assert "n=2" in str(e.value)


def test_unknown_route_and_method(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"X-Api-Key": "wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(srv, headers):
    import httpx
    for method, route in (("GET", "/v1/models"), ("POST", CHAT), ("GET", "/metrics"),
                          ("POST", "/tokenize")):
        r = httpx.request(method, srv.url + route, headers=headers, json={"content": "x"})
        assert r.status_code == 401, (route, r.text)
        assert r.json()["error"]["type"] == "authentication_error"


def test_x_api_key_header_works(srv):
    import httpx
    r = httpx.get(srv.url + "/v1/models", headers={"X-Api-Key": KEY})
    assert r.status_code == 200


def test_openai_client_without_key(srv):
    import openai
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
