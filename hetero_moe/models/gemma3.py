"""`gemma3`: Gemma 3 text models (270M .. 27B), with llama.cpp's semantics and metadata keys.

Per block: RMSNorm -> attention (per-head q/k RMSNorm, NEOX RoPE) -> RMSNorm -> residual add ->
RMSNorm -> GeGLU FFN (GELU, tanh form) -> RMSNorm -> residual add. Token embeddings are scaled by
sqrt(n_embd); the output projection is the embedding table unless the file has `output.weight`.
Norm weights are used as stored: llama.cpp's converter already added Gemma's "1 +" to them.

Attention: with `gemma3.attention.sliding_window` > 0, layers are local or global by the pattern
(`attention.sliding_window_pattern`, a period, default 6: layer i is local unless i % 6 == 5, or
one boolean per layer). A local layer sees its last `sliding_window` positions (itself included)
and rotates with base `rope.freq_base_swa` (default 10000), unscaled; a global layer sees every
position and rotates with `rope.freq_base` and the file's rope scaling. Without a window every
layer is global and the logits are soft-capped by `final_logit_softcapping` (which such a file
must carry); with one, llama.cpp applies no soft-capping. The softmax scale is 1/sqrt(key_length),
except for the 62-layer (27B) model: 1/sqrt(n_embd / n_head).
"""
import math

import numpy as np

from ..errors import MissingKeyError, UnsupportedError
from ..gguf import GGUFFile
from .base import ROPE_NEOX, ArchSpec, ModelConfig, common_config, register

# llama.cpp (llama-cpp-python 0.3.36, checked by loading files with other values) reads both
# `attention.sliding_window_pattern` and `rope.freq_base_swa` for gemma3; these are its defaults
# when the file lacks them (as the 270M file does). Its local layers never take the rope scaling.
SWA_PATTERN = 6              # default local:global period
ROPE_BASE_SWA = 10000.0      # default rope base of the local layers
N_LAYER_27B = 62             # llama.cpp picks the 27B attention scale by layer count

# Gemma's turn format, as llama.cpp's built-in "gemma" template renders it (llm_chat_apply_template,
# LLM_CHAT_TEMPLATE_GEMMA): every content is trimmed of C isspace() characters (not Python's wider
# str.strip() set); system messages are concatenated and held until the next turn whose role is not
# "model" (assistant), which they open followed by a blank line; the assistant's role is "model".
# No BOS in the text: the tokenizer adds it, as llama.cpp does when it tokenizes the prompt.
CHAT_TEMPLATE = (
    "{%- set ws = ' \\t\\n\\r\\x0b\\x0c' -%}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + message['content'].strip(ws) -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if ns.system and role != 'model' -%}"
    "{{- ns.system + '\\n\\n' -}}{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{{- message['content'].strip(ws) + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def _swa_layers(g: GGUFFile, key: str, n_layer: int) -> tuple[bool, ...]:
    """Which layers are local (sliding-window), as llama.cpp (llama-cpp-python 0.3.36) reads
    `attention.sliding_window_pattern` for gemma3: it does not hard-code the period, it reads the
    key as a scalar period or a per-layer array (get_key_or_arr, default 6). Period p: layer i is
    local iff i % p < p - 1 (p = 0: every layer local; set_swa_pattern). Array: entry i true means
    layer i is local (an integer array counts non-zero as true); llama.cpp takes an array of
    another length too (missing layers global), which we refuse as malformed."""
    value = g.get(key, SWA_PATTERN)
    if isinstance(value, list):
        if len(value) != n_layer or not all(isinstance(v, (bool, int)) for v in value):
            raise UnsupportedError(f"{g.path}: key {key!r} = {value!r}: a per-layer pattern must "
                                   f"hold {n_layer} booleans (one per layer)")
        return tuple(bool(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedError(f"{g.path}: key {key!r} = {value!r}: expected a layer period (an "
                               f"integer >= 0) or {n_layer} booleans (one per layer)")
    return tuple(value == 0 or i % value < value - 1 for i in range(n_layer))


def parse_config(g: GGUFFile) -> ModelConfig:
    m, kw = common_config(g, "gemma3", ROPE_NEOX)
    n_layer = kw["n_layer"]
    if m.int("{arch}.expert_count", 0):
        raise UnsupportedError(f"{g.path}: key {m.key('{arch}.expert_count')!r} is set: gemma3 is "
                               f"a dense architecture here (no routed experts)")
    if kw["n_ff"] <= 0:
        raise MissingKeyError(f"{g.path}: key {m.key('{arch}.feed_forward_length')!r} is missing "
                              f"or 0")
    window = m.int("{arch}.attention.sliding_window", 0)
    if window > 0:
        kw["swa_window"] = window
        kw["swa_layers"] = _swa_layers(g, m.key("{arch}.attention.sliding_window_pattern"), n_layer)
        kw["rope_base_swa"] = m.float("{arch}.rope.freq_base_swa", ROPE_BASE_SWA)
    else:
        cap = m.float("{arch}.final_logit_softcapping", 0.0)
        if not cap > 0:
            raise MissingKeyError(f"{g.path}: gemma3 without a sliding window needs key "
                                  f"{m.key('{arch}.final_logit_softcapping')!r} > 0 (llama.cpp "
                                  f"divides the logits by it), got {cap}")
        kw["final_softcap"] = cap
    if n_layer == N_LAYER_27B:
        kw["attn_scale"] = 1.0 / math.sqrt(float(kw["n_embd"] // kw["n_head"]))
    else:
        kw["attn_scale"] = 1.0 / math.sqrt(float(kw["head_dim"]))
    kw["embd_scale"] = float(np.sqrt(np.float32(kw["n_embd"])))   # sqrtf(n_embd), in float32
    kw["qk_norm"] = "head"
    kw["post_norms"] = True
    kw["ffn_act"] = "gelu"
    kw["rms_eps"] = m.float("{arch}.attention.layer_norm_rms_epsilon")
    kw["chat_template"] = CHAT_TEMPLATE
    return ModelConfig(**kw)


SPEC = register(ArchSpec("gemma3", parse_config, "Gemma 3 (interleaved sliding-window attention)"))
