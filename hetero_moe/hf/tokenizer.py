"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) as GGUF `tokenizer.*` keys,
the way llama.cpp's converter writes them, so `hetero_moe.tokenizer.Tokenizer` builds it unchanged.

Byte-level BPE vocabularies ("gpt2" in GGUF) are supported: vocab + merges, added tokens (special
ones as control tokens, the others user-defined), ids beyond the tokenizer padded as unused
"[PAD{i}]" up to config.json's vocab_size, the pre-tokenizer recognised from its regexes (and
`ignore_merges`, `clean_up_tokenization_spaces`), BOS/EOS/UNK/PAD and the chat template.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import GGUFFormatError, UnsupportedError
from ..tokenizer import _CONTRACTIONS, _RE_GPT2, _SPLITS, PRE_TOKENIZERS

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"


def _read(p: Path) -> dict:
    try:
        v = json.loads(p.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise GGUFFormatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise GGUFFormatError(f"{p}: expected a JSON object")
    return v


def _splits(pre, src: str) -> tuple[str, ...]:
    """The regexes a tokenizers pre_tokenizer splits by, in order, in llama.cpp's spelling."""
    if pre is None:
        raise UnsupportedError(f"{src}: pre_tokenizer is null; only byte-level BPE is supported")
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(r for p in pre.get("pretokenizers", []) for r in _splits(p, src))
    if kind == "ByteLevel":
        return (_RE_GPT2,) if pre.get("use_regex", True) else ()
    if kind == "Digits":
        return (r"\p{N}",) if pre.get("individual_digits") else (r"\p{N}+",)
    if kind == "Split":
        pat = pre.get("pattern", {})
        r = pat.get("Regex", pat.get("String"))
        if not isinstance(r, str) or pre.get("behavior", "Isolated") != "Isolated":
            raise UnsupportedError(f"{src}: pre_tokenizer Split {pre!r} is not supported")
        return (r.replace(_HF_CONTRACTIONS, _CONTRACTIONS),)
    raise UnsupportedError(f"{src}: pre_tokenizer {kind!r} is not supported (byte-level BPE "
                           f"vocabularies only: ByteLevel, Split, Digits)")


def pre_name(tj: dict, clean_spaces: bool, src: str) -> str:
    """The `tokenizer.ggml.pre` value llama.cpp treats exactly like this tokenizer."""
    splits = _splits(tj.get("pre_tokenizer"), src)
    ignore = bool(tj.get("model", {}).get("ignore_merges", False))
    split = next((k for k, v in _SPLITS.items() if tuple(v) == splits), None)
    if split is None:
        raise UnsupportedError(f"{src}: pre-tokenizer regexes {list(splits)} match none that "
                               f"llama.cpp knows")
    for name, spec in PRE_TOKENIZERS.items():
        if (spec.split, spec.clean_spaces, spec.ignore_merges, spec.no_default_bos) == \
                (split, clean_spaces, ignore, False):
            return name
    raise UnsupportedError(f"{src}: no llama.cpp pre-tokenizer splits like {split!r} with "
                           f"clean_up_tokenization_spaces={clean_spaces} and "
                           f"ignore_merges={ignore}")


def _token_text(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def tokenizer_metadata(folder: Path, config: dict) -> dict:
    """GGUF tokenizer.* keys for the folder's tokenizer.json / tokenizer_config.json."""
    tj_path, tc_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tj_path.exists():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (only fast byte-level BPE "
                                f"tokenizers are supported)")
    tj = _read(tj_path)
    tc = _read(tc_path) if tc_path.exists() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedError(f"{tj_path}: model type {model.get('type')!r}"
                               f"{' with byte_fallback' if model.get('byte_fallback') else ''} is "
                               f"not supported (byte-level BPE only)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise GGUFFormatError(f"{tj_path}: model.vocab is missing or empty")
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in vocab.items()}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    n = max(by_id) + 1
    n_vocab = config.get("vocab_size", n)
    if n_vocab < n:
        raise GGUFFormatError(f"{folder / 'config.json'}: vocab_size {n_vocab} is smaller than "
                              f"the {n} ids of {tj_path}")
    tokens, types = [], []
    for i in range(n_vocab):
        t, k = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(t)
        types.append(k)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    clean = bool(tc.get("clean_up_tokenization_spaces", True))
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_name(tj, clean, str(tj_path)),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    ids = {t: i for i, t in enumerate(tokens)}
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        text = _token_text(tc.get(f"{key}_token"))
        if text is not None:
            if text not in ids:
                raise GGUFFormatError(f"{tc_path}: {key}_token {text!r} is not in the vocabulary")
            md[f"tokenizer.ggml.{name}"] = ids[text]
        elif isinstance(config.get(f"{key}_token_id"), int):
            md[f"tokenizer.ggml.{name}"] = config[f"{key}_token_id"]
    for key in ("add_bos_token", "add_eos_token"):
        if isinstance(tc.get(key), bool):
            md[f"tokenizer.ggml.{key}"] = tc[key]
    tmpl = tc.get("chat_template")
    if isinstance(tmpl, list):       # named templates: the default one
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    if tmpl is None and (folder / "chat_template.jinja").exists():
        tmpl = (folder / "chat_template.jinja").read_text("utf-8")
    if isinstance(tmpl, str):
        md["tokenizer.chat_template"] = tmpl
    return md
