"""The OpenAI-compatible request bodies (pydantic), their checks, and the error shape.

Every client mistake becomes a 400 with {"error": {"message", "type", "param", "code"}}: FastAPI's
default 422 makes the OpenAI SDKs' users guess, and a 5xx makes them retry. Messages name the
field and the allowed range, never the request's own content (a body can be megabytes).
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sampling import MAX_LOGPROBS, SamplingParams

MAX_STOP = 16               # stop sequences per request (OpenAI allows 4)
MAX_ERROR_CHARS = 300       # longest message an error body carries

# OpenAI's defaults, for what neither the request nor the GGUF sets
OPENAI_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0,
                       repeat_last_n=64, frequency_penalty=0.0, presence_penalty=0.0)
# llama.cpp's general.sampling.* keys (the model author's recommended sampling)
GGUF_SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                      "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
                      "repeat_penalty": "general.sampling.penalty_repeat",
                      "repeat_last_n": "general.sampling.penalty_last_n"}


def effective_sampling(defaults: dict) -> dict:
    """The value each sampling field takes when a request leaves it out: the model's `defaults`
    (its GGUF's general.sampling.*), else OpenAI's."""
    return {name: defaults.get(name, v) for name, v in OPENAI_DEFAULTS.items()}


class APIError(Exception):
    """An error response: HTTP status, OpenAI error type, the parameter at fault, a code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code, self.headers = code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code=None) -> dict:
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS - 3] + "..."
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class RequestError(ValueError):
    """A check across fields (raised in a model validator, where pydantic's location is the
    whole body): carries the field the error response names as its `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    # unknown fields (user, metadata, ...) are accepted and ignored, as llama.cpp and vLLM do
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None

    def text(self, i: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, p in enumerate(self.content):
            if p.type != "text" or p.text is None:
                raise bad_request(f"messages[{i}].content[{j}] has type {p.type!r}; only text "
                                  f"parts are supported", f"messages.{i}.content", "unsupported")
            parts.append(p.text)
        return "".join(parts)


class _Sampling(_Body):
    """The sampling fields both endpoints share (OpenAI's plus llama.cpp's extras)."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = None
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repeat_penalty: Optional[float] = Field(None, gt=0)
    repeat_last_n: Optional[int] = Field(None, ge=-1)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    cache_prompt: bool = True

    @field_validator("temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty",
                     "presence_penalty")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not (v == -1 or 0 <= v < 2 ** 64):
            raise ValueError("must be -1 (random) or in [0, 2**64)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v is not None and v != 1:
            raise ValueError(f"n={v} is not supported: this server returns one choice per "
                             f"request (send n separate requests)")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options", "stream_options is only allowed with stream=true")
        return self

    def sampling(self, max_tokens: int | None, defaults: dict, logprobs: int | None = None,
                 echo: bool = False) -> SamplingParams:
        """SamplingParams: each field from the request, else the model's `defaults` (the GGUF's
        general.sampling.*), else OpenAI's."""
        fields = effective_sampling(defaults)
        for name in OPENAI_DEFAULTS:
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        seed = None if self.seed in (None, -1) else self.seed
        p = SamplingParams(max_tokens=max_tokens, seed=seed, stop=self.stop, logprobs=logprobs,
                           echo=echo, **fields)
        return p.validate()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "top_logprobs needs logprobs=true")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestError("response_format", f"response_format type "
                               f"{str(self.response_format.get('type'))[:40]!r} is not "
                               f"supported (only 'text')")
        if self.tools:
            raise RequestError("tools", "tools (function calling) are not supported")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def plain_messages(self) -> list[dict]:
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text(i)})
        return out


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.suffix:
            raise RequestError("suffix", "suffix (fill-in-the-middle) is not supported")
        if self.best_of not in (None, 1):
            raise RequestError("best_of", f"best_of={self.best_of} is not supported (only 1)")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)) and len(p) != 1:
            raise RequestError("prompt", f"one prompt per request, got a batch of {len(p)} "
                                         f"(send them as separate requests)")
        return self

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]
        return p


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


# pydantic names the member of a union an error came from in its location (messages.0.content.str,
# prompt.list[int].0, ...): a type, not a field of the request
_UNION_TAG = re.compile(r"^(str|int|float|bool|bytes|none|[A-Za-z_-]+\[.*\]|[A-Z][A-Za-z0-9_]*)$")


def _is_tag(x) -> bool:
    return isinstance(x, str) and bool(_UNION_TAG.match(x))


def _loc(e: dict) -> list:
    return [x for x in e.get("loc", ()) if x != "body"]


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's first error, without the offending input.

    param is the field's path without pydantic's union-member tags; where a value matches none of
    a union's types, the member the input got furthest into is reported (a list of content parts
    with a part lacking `type` is reported there, not as "not a string"); an error of a check
    across fields (a model validator) names the field it blames."""
    if not errors:
        return "invalid request body", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    group = [e]                     # the errors this message stands for
    tag = next((i for i, x in enumerate(_loc(e)) if _is_tag(x)), None)
    if tag is not None:             # one error per member of a union: pick one
        head = _loc(e)[:tag]
        group = [x for x in errors if _loc(x)[:tag] == head and len(_loc(x)) > tag
                 and _is_tag(_loc(x)[tag])]
        deepest = max(len(_loc(x)) for x in group)
        if deepest == tag + 1:      # the value has none of the union's types
            param = ".".join(str(x) for x in head)
            kinds = " or ".join(str(_loc(x)[tag]) for x in group)
            return f"{param}: wrong type (expected {kinds}){_more(len(errors) - len(group))}", \
                param
        e = next(x for x in group if len(_loc(x)) == deepest)
    loc = [str(x) for x in _loc(e) if not _is_tag(x)]
    msg = str(e.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if not loc:
        if e.get("type") == "missing":
            return "the request body is empty: send a JSON object", None
        if e.get("type") in ("model_attributes_type", "model_type", "dict_type"):
            return "the request body must be a JSON object", None
        param = getattr((e.get("ctx") or {}).get("error"), "param", None)   # a RequestError
        return msg + _more(len(errors) - 1), param
    param = ".".join(loc)
    return f"{param}: {msg}{_more(len(errors) - len(group))}", param


def _more(n: int) -> str:
    return f" (and {n} more error(s))" if n > 0 else ""
