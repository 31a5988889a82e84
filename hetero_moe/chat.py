"""Chat templates (the Jinja2 text in `tokenizer.chat_template`) rendered as HF transformers and
llama-cpp-python render them, and turned into prompt token ids as llama.cpp does.

A model without a template gets ChatML, the same fallback llama.cpp uses.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from .errors import HeteroMoEError

# ChatML, llama.cpp's fallback when a model ships no template
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class ChatTemplateError(HeteroMoEError, ValueError):
    """A chat template failed to compile or raised while rendering."""


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' chat-template tojson: keeps non-ASCII, key order as given
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template raised: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        # transformers' {% generation %}...{% endgeneration %} marks assistant text; render as is
        tags = {"generation"}

        def parse(self, parser):
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render `messages` with a Jinja2 chat template (None: ChatML). `extra` (tools, documents,
    custom flags) is passed to the template; `tools` and `documents` default to None."""
    import jinja2
    tmpl = _compile(template if template is not None else CHATML_TEMPLATE)
    ctx = {"tools": None, "documents": None, **extra}
    try:
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **ctx)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e


def chat_prompt_ids(tokenizer, template: str | None, messages: list[dict],
                    add_generation_prompt: bool = True, **extra) -> list[int]:
    """Prompt ids for a chat: the rendered text, tokenized with special tokens parsed.

    As in llama.cpp's chat path: a BOS (EOS) the template already wrote at the start (end) is
    dropped from the text when the tokenizer adds one itself, so there is exactly one. (Unlike
    llama-cpp-python, which never adds BOS to a templated prompt.)"""
    bos = tokenizer.token_str(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_str(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=bos, eos_token=eos, **extra)
    if tokenizer.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    if tokenizer.add_eos and eos and text.endswith(eos):
        text = text[:-len(eos)]
    return tokenizer.encode(text, add_special=True, parse_special=True)
