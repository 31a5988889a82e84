"""The HTTP side: FastAPI routes, SSE streaming, API keys, body limits, errors, metrics.

Handlers run on the event loop; they tokenize (in a worker thread), check the request, hand a
Job to the engine and turn its events into OpenAI responses: one JSON body, or SSE chunks
(a first chunk with the role, content chunks, a chunk with finish_reason, a usage chunk when
asked, then `data: [DONE]`; an error mid-stream is an error event, then [DONE]).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import HeteroMoEError
from .engine import Done, Failed, Job, Piece, PromptInfo, TokenLP
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest, bad_request, error_body, validation_message)

log = logging.getLogger("hetero_moe.server")

MAX_BODY = 8 << 20           # bytes; a longer body is a 400
DRAIN_LIMIT = 64 << 20       # a refused body up to this size is read to its end first
OPEN_PATHS = ("/health", "/v1/health")


@dataclass
class State:
    """What the routes share. model/engine are None while the model loads."""
    api_keys: list[str] = field(default_factory=list)
    metrics: object | None = None          # metrics.Metrics with --metrics
    max_body: int = MAX_BODY
    model: object | None = None
    engine: object | None = None
    model_id: str = ""
    aliases: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    sampling_defaults: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: str | None = None

    def ready(self) -> bool:
        return self.engine is not None and self.load_error is None

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_id, *self.aliases):
            raise APIError(400, f"model {name[:100]!r} is not served here; this server serves "
                                f"{self.model_id!r} (GET /v1/models)", "invalid_request_error",
                           "model", "model_not_found")


def _json(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _err(status: int, message: str, type: str, param=None, code=None, headers=None):
    return _json(status, error_body(message, type, param, code), headers)


class Guard:
    """ASGI middleware: loading state, API keys, and the body limit (the body is read here, up
    to max_body, and replayed to the app; later receive() calls go to the client)."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if st.api_keys and path not in OPEN_PATHS and not self._authorized(headers):
            return await _err(401, "invalid or missing API key (send Authorization: Bearer KEY "
                                   "or X-Api-Key: KEY)", "authentication_error",
                              code="invalid_api_key")(scope, receive, send)
        if path not in OPEN_PATHS and not st.ready():
            msg = f"the model failed to load: {st.load_error}" if st.load_error else \
                "Loading model"
            return await _err(503, msg, "unavailable_error", code="loading",
                              headers={"Retry-After": "2"})(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        if declared > st.max_body:
            return await self._too_big(scope, receive, send, declared <= DRAIN_LIMIT)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > st.max_body:
                return await self._too_big(scope, receive, send, msg.get("more_body", False))
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False
        # every POST route takes JSON: read it so whatever the client declared (curl -d sends
        # a form type)
        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", [])
                                     if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")])

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return bool(given) and any(hmac.compare_digest(given.encode(), k.encode())
                                   for k in self.state.api_keys)

    async def _too_big(self, scope, receive, send, drain: bool):
        # read (and drop) the rest of a moderately large body, so the client, still sending,
        # gets the answer rather than a reset connection; a huge one is cut off
        got = 0
        while drain and got < DRAIN_LIMIT:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            got += len(msg.get("body", b""))
            drain = msg.get("more_body", False)
        return await _err(400, f"the request body is larger than {self.state.max_body} bytes",
                          "invalid_request_error", code="body_too_large",
                          headers={"Connection": "close"})(scope, receive, send)


def create_app(state: State) -> FastAPI:
    app = FastAPI(title="hetero-moe", docs_url=None, redoc_url=None)
    app.state.hm = state

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _json(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        msg, param = validation_message(exc.errors())
        return _err(400, msg, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) \
            else str(exc.detail)
        return _err(exc.status_code, msg, kind)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error")
        return _err(500, f"internal error: {type(exc).__name__}", "server_error")

    # -- info ------------------------------------------------------------------------------
    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        if state.load_error:
            return _err(503, f"the model failed to load: {state.load_error}",
                        "unavailable_error", code="load_failed")
        if not state.ready():
            return _err(503, "Loading model", "unavailable_error", code="loading",
                        headers={"Retry-After": "2"})
        eng = state.engine
        if eng.error is not None:
            return _err(503, f"the engine stopped: {eng.error}", "unavailable_error")
        return {"status": "ok", "slots_idle": len(eng.slots) - eng.busy(),
                "slots_processing": eng.busy(), "queued": eng.queued()}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_id, "object": "model", "created": state.created,
            "owned_by": "hetero-moe", "meta": state.meta}]}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return _err(501, "metrics are off: start the server with --metrics",
                        "not_supported_error")
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    # -- tokens ----------------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        tok = state.model.tokenizer
        ids = await anyio.to_thread.run_sync(
            lambda: tok.encode(req.content, add_special=req.add_special, parse_special=True))
        if not req.with_pieces:
            return {"tokens": ids}
        out = []
        for t in ids:
            b = tok.token_bytes(t)
            try:
                piece = b.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(b)
            out.append({"id": t, "piece": piece})
        return {"tokens": out}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        n = state.model.config.n_vocab
        bad = next((t for t in req.tokens if not 0 <= t < n), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {n})", "tokens",
                              "invalid_token")
        return {"content": state.model.detokenize(req.tokens)}

    # -- generation ------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        state.check_model(req.model)
        messages = req.plain_messages()
        model = state.model
        try:
            ids = await anyio.to_thread.run_sync(model.chat_ids, messages)
        except HeteroMoEError as e:
            raise bad_request(f"the chat template failed on these messages: {e}", "messages")
        budget = req.token_budget()
        job = _job(state, req, ids, budget, req.n_logprobs(), echo=False, param="messages")
        return await _respond(state, request, job, req, chat=True)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        state.check_model(req.model)
        model = state.model
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            ids = await anyio.to_thread.run_sync(model.tokenize, prompt)
        else:
            n = model.config.n_vocab
            bad = next((t for t in prompt if not 0 <= t < n), None)
            if bad is not None:
                raise bad_request(f"prompt token id {bad} is outside the vocabulary [0, {n})",
                                  "prompt", "invalid_token")
            ids = list(prompt)
        budget = 16 if req.max_tokens is None else req.max_tokens      # OpenAI's default
        job = _job(state, req, ids, budget, req.logprobs, echo=req.echo, param="prompt")
        return await _respond(state, request, job, req, chat=False)

    return app


def _job(state: State, req, ids: list[int], budget: int | None, logprobs, echo: bool,
         param: str) -> Job:
    n_ctx = state.engine.n_ctx
    if not ids:
        raise bad_request("the prompt is empty (no tokens)", param, "empty_prompt")
    if len(ids) >= n_ctx:
        raise bad_request(f"the prompt has {len(ids)} tokens; the context window of a slot is "
                          f"{n_ctx} tokens (it must leave room for at least one generated token)",
                          param, "context_length_exceeded")
    max_tokens = n_ctx if budget is None else budget
    try:
        params = req.sampling(max_tokens, state.sampling_defaults, logprobs, echo)
    except ValueError as e:
        raise bad_request(str(e))
    return Job(ids, params, None, cache_prompt=req.cache_prompt, logprobs=logprobs, echo=echo)


class _Feed:
    """The engine's events for one job, on the event loop."""

    def __init__(self, job: Job):
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()
        job.emit = self.put

    def put(self, ev) -> None:          # engine thread
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, ev)
        except RuntimeError:            # the loop is gone (shutdown)
            pass


async def _respond(state: State, request: Request, job: Job, req, chat: bool):
    feed = _Feed(job)
    state.engine.submit(job)           # APIError 503 when full
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    shape = _ChatShape(state, rid, created, job) if chat else \
        _TextShape(state, rid, created, job)
    if req.stream:
        return EventSourceResponse(_stream(state, feed, job, shape, req.include_usage),
                                   sep="\n", ping=15)
    return await _collect(state, request, feed, job, shape)


async def _stream(state: State, feed: _Feed, job: Job, shape, include_usage: bool):
    eng = state.engine
    try:
        first = shape.first_chunk()
        if first is not None:
            yield _data(first)
        ev = None
        while True:
            ev = await feed.q.get() if ev is None else ev
            if isinstance(ev, Piece):
                # pieces that queued up while this client was being served go out as one
                # chunk: under load the per-chunk cost shrinks instead of piling up
                text, lps, ev = [ev.text], list(ev.logprobs), None
                while not feed.q.empty():
                    nxt = feed.q.get_nowait()
                    if not isinstance(nxt, Piece):
                        ev = nxt
                        break
                    text.append(nxt.text)
                    lps += nxt.logprobs
                merged = Piece("".join(text), lps)
                if merged.text or merged.logprobs:
                    yield _data(shape.piece_chunk(merged))
                continue
            if isinstance(ev, PromptInfo):
                chunk = shape.prompt_chunk(ev)
                ev = None
                if chunk is not None:
                    yield _data(chunk)
            elif isinstance(ev, Done):
                yield _data(shape.final_chunk(ev))
                if include_usage:
                    yield _data(shape.usage_chunk(ev))
                yield "[DONE]"
                return
            elif isinstance(ev, Failed):
                yield _data(ev.error.body())
                yield "[DONE]"
                return
            else:
                ev = None
    finally:
        if not job.finished:
            eng.cancel(job)


def _data(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def _collect(state: State, request: Request, feed: _Feed, job: Job, shape):
    eng = state.engine

    async def watch():                 # a client that leaves frees its slot at once
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                eng.cancel(job)
                feed.q.put_nowait(None)
                return
    watcher = asyncio.create_task(watch())
    pieces, lps, prompt = [], [], None
    try:
        while True:
            ev = await feed.q.get()
            if ev is None:
                return Response(status_code=499)
            if isinstance(ev, Piece):
                pieces.append(ev.text)
                lps.extend(ev.logprobs)
            elif isinstance(ev, PromptInfo):
                prompt = ev
            elif isinstance(ev, Done):
                return shape.full(ev, "".join(pieces), lps, prompt)
            elif isinstance(ev, Failed):
                e = ev.error
                return _json(e.status, e.body(), e.headers)
    finally:
        watcher.cancel()
        if not job.finished:
            eng.cancel(job)


# -- response shapes ----------------------------------------------------------------------------
def _top(t: TokenLP) -> list[dict]:
    return [{"token": s, "logprob": lp, "bytes": list(b)} for _, s, b, lp in t.top]


class _ChatShape:
    def __init__(self, state: State, rid: str, created: int, job: Job):
        self.base = {"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": state.model_id}
        self.job = job

    def _chunk(self, delta: dict, finish=None, logprobs=None) -> dict:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}]}

    @staticmethod
    def _lp(lps: list[TokenLP]) -> dict:
        return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes),
                             "top_logprobs": _top(t)} for t in lps], "refusal": None}

    def first_chunk(self):
        return self._chunk({"role": "assistant", "content": ""})

    def prompt_chunk(self, ev: PromptInfo):
        return None

    def piece_chunk(self, ev: Piece) -> dict:
        return self._chunk({"content": ev.text}, logprobs=self._lp(ev.logprobs)
                           if ev.logprobs else None)

    def final_chunk(self, ev: Done) -> dict:
        c = self._chunk({}, ev.finish_reason)
        c["timings"] = ev.timings()
        return c

    def usage_chunk(self, ev: Done) -> dict:
        return {**self.base, "choices": [], "usage": ev.usage()}

    def full(self, ev: Done, text: str, lps: list[TokenLP], prompt) -> dict:
        return {"id": self.base["id"], "object": "chat.completion", "created": self.base["created"],
                "model": self.base["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": self._lp(lps) if self.job.logprobs is not None
                             else None,
                             "finish_reason": ev.finish_reason}],
                "usage": ev.usage(), "timings": ev.timings()}


class _TextShape:
    def __init__(self, state: State, rid: str, created: int, job: Job):
        self.base = {"id": rid, "object": "text_completion", "created": created,
                     "model": state.model_id}
        self.job = job
        self.model = state.model
        self.offset = 0

    def _chunk(self, text: str, finish=None, logprobs=None) -> dict:
        return {**self.base, "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                                          "finish_reason": finish}]}

    def _lp(self, lps: list[TokenLP]) -> dict | None:
        if self.job.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in lps:
            out["tokens"].append(t.text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append({s: lp for _, s, _, lp in t.top} if t.logprob is not None
                                       else None)
            out["text_offset"].append(self.offset)
            self.offset += len(t.text)
        return out

    def _prompt_text(self) -> str:
        return self.model.detokenize(self.job.prompt) if self.job.echo else ""

    def first_chunk(self):
        return None

    def prompt_chunk(self, ev: PromptInfo):
        if not self.job.echo:
            return None
        return self._chunk(self._prompt_text(), logprobs=self._lp(ev.logprobs or []))

    def piece_chunk(self, ev: Piece) -> dict:
        return self._chunk(ev.text, logprobs=self._lp(ev.logprobs))

    def final_chunk(self, ev: Done) -> dict:
        c = self._chunk("", ev.finish_reason)
        c["timings"] = ev.timings()
        return c

    def usage_chunk(self, ev: Done) -> dict:
        return {**self.base, "choices": [], "usage": ev.usage()}

    def full(self, ev: Done, text: str, lps: list[TokenLP], prompt) -> dict:
        all_lps = ((prompt.logprobs or []) if prompt is not None and self.job.echo else []) + lps
        return {**self.base, "choices": [{"index": 0, "text": self._prompt_text() + text,
                                          "logprobs": self._lp(all_lps),
                                          "finish_reason": ev.finish_reason}],
                "usage": ev.usage(), "timings": ev.timings()}
