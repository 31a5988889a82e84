"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) as GGUF `tokenizer.*` keys,
the way llama.cpp's converter writes them, so `hetero_moe.tokenizer.Tokenizer` builds it unchanged.

Byte-level BPE vocabularies ("gpt2" in GGUF) are supported: vocab + merges, added tokens (special
ones as control tokens, the others user-defined), ids beyond the tokenizer padded as unused
"[PAD{i}]" up to config.json's vocab_size, the pre-tokenizer recognised from its regexes (and
`ignore_merges`, `clean_up_tokenization_spaces`), BOS/EOS/UNK/PAD and the chat template.

SentencePiece-style BPE (byte_fallback, "▁" for spaces: Llama-2, Mistral, Mixtral) becomes a
"llama" vocabulary: <0xXX> pieces as byte tokens, the unk token as unknown, the tokenizer.json's
own merges (`tokenizer.ggml.merges`, which the Tokenizer ranks as given) and its space prefix rule
(`tokenizer.hf.prepend_scheme`): the legacy normalizer Prepend("▁") + Replace(" ", "▁")
("prepend"), or a Metaspace pre-tokenizer (split false) with prepend_scheme always / first / never.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import GGUFFormatError, UnsupportedError
from ..tokenizer import _CONTRACTIONS, _RE_GPT2, _SPLITS, PRE_TOKENIZERS

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
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


def _spm_scheme(tj: dict, src: str) -> str:
    """The space prefix rule of a SentencePiece-style tokenizer.json (see the module doc)."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    sp = "\u2581"
    norms = [] if norm is None else norm.get("normalizers", []) if norm.get("type") == \
        "Sequence" else [norm]
    kinds = []
    for n in norms:
        k = n.get("type")
        if k == "Prepend" and n.get("prepend") == sp:
            kinds.append("prepend")
        elif k == "Replace" and (n.get("pattern") or {}).get("String") == " " and \
                n.get("content") == sp:
            kinds.append("replace")
        else:
            raise UnsupportedError(f"{src}: normalizer {n!r} is not supported for a "
                                   f"SentencePiece-style (byte_fallback) BPE")
    if pre is None:
        if kinds == ["prepend", "replace"]:
            return "prepend"
        if kinds == ["replace"]:
            return "never"
        raise UnsupportedError(f"{src}: a byte_fallback BPE needs the normalizer Prepend(\u2581) "
                               f"+ Replace(' ', \u2581) or a Metaspace pre-tokenizer")
    if pre.get("type") != "Metaspace" or pre.get("replacement", sp) != sp or kinds:
        raise UnsupportedError(f"{src}: pre_tokenizer {pre.get('type')!r} (with normalizer "
                               f"{norm!r}) is not supported for a byte_fallback BPE (supported: "
                               f"Metaspace, or the Prepend + Replace normalizer)")
    if pre.get("split", True):
        raise UnsupportedError(f"{src}: Metaspace with split = true is not supported")
    scheme = pre.get("prepend_scheme")
    if scheme is None:
        scheme = "always" if pre.get("add_prefix_space", True) else "never"
    if scheme not in ("always", "first", "never"):
        raise UnsupportedError(f"{src}: Metaspace prepend_scheme {scheme!r} is not supported")
    return scheme


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
        raise FileNotFoundError(f"{folder}: no tokenizer.json (only fast BPE "
                                f"tokenizers are supported)")
    tj = _read(tj_path)
    tc = _read(tc_path) if tc_path.exists() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{tj_path}: model type {model.get('type')!r} is not supported "
                               f"(BPE only: byte-level, or SentencePiece-style with byte_fallback)")
    spm = bool(model.get("byte_fallback"))
    scheme = _spm_scheme(tj, str(tj_path)) if spm else None
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
    unk = model.get("unk_token")
    for i in range(n_vocab):
        t, k = by_id.get(i, (f"[PAD{i}]", UNUSED))
        if spm and k == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            k = BYTE
        elif spm and t == unk:
            k = UNKNOWN
        tokens.append(t)
        types.append(k)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if spm:
        md = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [-float(i) for i in range(n_vocab)],
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_space_prefix": scheme != "never",
            "tokenizer.hf.prepend_scheme": scheme,
        }
    else:
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
