"""Chat template rendering and prompt ids, against llama-cpp-python's Jinja2ChatFormatter."""
from __future__ import annotations

import pytest

from hetero_moe.chat import CHATML_TEMPLATE, ChatTemplateError, chat_prompt_ids, render_chat
from hetero_moe.errors import HeteroMoEError
from hetero_moe.gguf import read_metadata
from hetero_moe.tokenizer import Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant. Answer in one word."},
    {"role": "user", "content": "What colour is the sky? ☁️ 天空"},
]


@pytest.fixture(scope="module")
def smol():
    from hetero_moe.assets import smollm2_path
    try:
        path = smollm2_path()
    except HeteroMoEError as e:
        pytest.skip(f"model unavailable: {e}")
    md = read_metadata(path)
    return path, md, Tokenizer.from_gguf_metadata(md, source=str(path))


@pytest.mark.llama
def test_smollm2_matches_llama_cpp_python(smol):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    path, md, tok = smol
    template = md["tokenizer.chat_template"]
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    bos = llm._model.token_get_text(llm.token_bos())
    eos = llm._model.token_get_text(llm.token_eos())
    for messages in (MESSAGES, MESSAGES[1:]):   # without a system message the template adds one
        for gen in (True, False):
            ref = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                      add_generation_prompt=gen)(messages=messages)
            text = render_chat(template, messages, add_generation_prompt=gen,
                               bos_token=bos, eos_token=eos)
            assert text == ref.prompt
            # llama-cpp-python tokenizes chat prompts with add_bos=not added_special, special=True
            want = llm.tokenize(ref.prompt.encode(), add_bos=not ref.added_special, special=True)
            assert chat_prompt_ids(tok, template, messages, add_generation_prompt=gen) == want
    assert text.startswith("<|im_start|>system\n")


def test_bos_not_doubled(smol):
    _, md, tok = smol
    tmpl = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    t2 = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.add_bos_token": True}, source="bos")
    ids = chat_prompt_ids(t2, tmpl, [{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids == t2.encode("hi")
    # a vocabulary that does not add BOS keeps the template's one
    ids = chat_prompt_ids(tok, tmpl, [{"role": "user", "content": "hi"}])
    assert ids == tok.encode("<|im_start|>hi")


def test_template_features():
    tmpl = ("{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
            "{{ m.content | tojson }}{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}"
            "{% generation %}G{% endgeneration %}{{ strftime_now('%Y') | length }}{{ flag }}")
    out = render_chat(tmpl, [{"role": "user", "content": "é\"x"}], flag="!")
    assert out == '"é\\"x"G4!'
    with pytest.raises(ChatTemplateError, match="bad role"):
        render_chat(tmpl, [{"role": "bad", "content": ""}])
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat("{% for %}", [])


def test_sandboxed():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError, match="append"):
        render_chat("{% set _ = messages.append(1) %}", [])


def test_no_template_falls_back_to_chatml(smol):
    _, _, tok = smol
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(None, msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(None, msgs, add_generation_prompt=False) == \
        render_chat(CHATML_TEMPLATE, msgs, add_generation_prompt=False)
    assert chat_prompt_ids(tok, None, msgs) == tok.encode(render_chat(None, msgs))
