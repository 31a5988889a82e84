"""Tokenizer built from GGUF metadata that produces the same ids and text as llama.cpp.

Two GGUF tokenizer models are supported:
  "gpt2"  byte-level BPE: the text is split by the regexes llama.cpp picks for `tokenizer.ggml.pre`,
          bytes are mapped to GPT-2's printable alphabet, then the GGUF merges apply by rank.
  "llama" SentencePiece-style BPE (Llama 1/2, Gemma, ...): spaces become U+2581, then adjacent
          pieces merge highest-score first, unknown characters fall back to <0xXX> byte tokens.
The merge loops run in HF `tokenizers` (BPE model). For "llama" the merge list is derived from the
vocabulary: every split of a token into two tokens is a merge, ranked by the merged token's score;
or, for a Hugging Face tokenizer.json (hf/tokenizer.py), its own merges are given as
`tokenizer.ggml.merges` and its space prefix rule as `tokenizer.hf.prepend_scheme` ("prepend": the
legacy Prepend("▁") normalizer, on every fragment between added tokens, as llama.cpp does;
"always" / "first": Metaspace's, which skip a fragment that already starts with a space, "first"
only at the start of the text; "never").

Around the merges we follow llama.cpp's rules (src/llama-vocab.cpp): token attributes from
`token_type` plus the tokens it recognises by text (EOG, FIM, "unused"), the special-token
partition (control tokens only with parse_special, user-defined tokens always, longest first),
BOS/EOS insertion, SPM space prefix after special tokens, token pieces and `clean_spaces`.
"""
from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

from .errors import GGUFFormatError, MissingKeyError, UnsupportedError


class TokenAttr(IntFlag):
    """llama.cpp's llama_token_attr bits."""
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# GGUF tokenizer.ggml.token_type value -> attribute bits (plain ints: IntFlag ops are slow)
_TYPE_ATTR = {0: 0, 1: int(TokenAttr.NORMAL), 2: int(TokenAttr.UNKNOWN), 3: int(TokenAttr.CONTROL),
              4: int(TokenAttr.USER_DEFINED), 5: int(TokenAttr.UNUSED), 6: int(TokenAttr.BYTE)}
_CONTROL = int(TokenAttr.CONTROL)
_UNUSED = int(TokenAttr.UNUSED)
_HIDDEN = int(TokenAttr.UNKNOWN | TokenAttr.CONTROL)       # rendered only with special=True
_SPECIAL = int(TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN)  # matched in raw text
_C_SPACE = " \t\n\v\f\r"                                   # C isspace() in the "C" locale
_SPM_SPACE = "\u2581"

SUPPORTED_MODELS = ("gpt2", "llama")

# ---------------------------------------------------------------------------------------------
# pre-tokenizer regexes, as llama.cpp applies them (each one splits the pieces of the previous one;
# matches and the gaps between them both become pieces)
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_BAILINGMOE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
# case runs: "letter that is not a-z" stands for upper/title/modifier/other letters
_UPPER_RUN = r"((?=[\p{L}])([^a-z]))"
_LOWER_RUN = r"((?=[\p{L}])([^A-Z]))"
_RE_TEKKEN = (r"[^\r\n\p{L}\p{N}]?" + _UPPER_RUN + "*" + _LOWER_RUN + "+"
              r"|[^\r\n\p{L}\p{N}]?" + _UPPER_RUN + "+" + _LOWER_RUN + "*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_GPT4O = (r"[^\r\n\p{L}\p{N}]?" + _UPPER_RUN + "*" + _LOWER_RUN + "+" + _CONTRACTIONS + "?"
             r"|[^\r\n\p{L}\p{N}]?" + _UPPER_RUN + "+" + _LOWER_RUN + "*" + _CONTRACTIONS + "?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Non-ASCII classes are written as escapes: NFC-normalising editors would rewrite some of them.
# llama.cpp runs regexes without \p{..} on text whose non-ASCII whitespace became \v, so such
# whitespace never falls in their non-ASCII ranges: "&&[^\s]" takes it out.
_RE_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_CJK_DEEPSEEK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff&&[^\\s]]+"
_CJK_DEEPSEEK3 = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_PUNCT_DEEPSEEK = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002&&[^\\s]]+"
_RE_DEEPSEEK3 = ('[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+'
                 r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LATIN_DEEPSEEK = (
    "\\s?["
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
    "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-"
    "\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00"
    "-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
    "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
    "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
    "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13"
    "-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
    "]+")

_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (_RE_LLAMA3,),
    "deepseek-llm": ("[\r\n]", _LATIN_DEEPSEEK, _PUNCT_DEEPSEEK, r"\s+$", _CJK_DEEPSEEK, r"\p{N}+"),
    "deepseek3": (r"\p{N}{1,3}", _CJK_DEEPSEEK3, _RE_DEEPSEEK3),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_DEEPSEEK, r"\p{N}"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", _RE_GPT2),
    "gpt2": (_RE_GPT2,),
    "qwen2": (_RE_QWEN2,),
    "qwen35": (_RE_QWEN35,),
    "bloom": (_RE_BLOOM,),
    "tekken": (_RE_TEKKEN,),
    "gpt4o": (_RE_GPT4O,),
    "seed-coder": (_RE_SEED_CODER,),
    "bailingmoe": (_RE_BAILINGMOE,),
}


@dataclass(frozen=True)
class PreTokenizer:
    """What a `tokenizer.ggml.pre` value selects in llama.cpp for a "gpt2" vocabulary."""
    split: str                    # key of _SPLITS
    clean_spaces: bool = True     # detokenize drops " " before ?!., and in some contractions
    ignore_merges: bool = False   # a pre-token that is itself a vocab entry is taken whole
    add_bos: bool = False         # default for tokenizer.ggml.add_bos_token
    no_default_bos: bool = False  # no BOS unless tokenizer.ggml.bos_token_id names one


def _pre_table() -> dict[str, PreTokenizer]:
    P = PreTokenizer
    groups: list[tuple[tuple[str, ...], PreTokenizer]] = [
        (("default",), P("default")),
        (("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "lfm2"),
         P("llama3", ignore_merges=True, add_bos=True)),
        (("dbrx", "smaug-bpe"), P("llama3")),
        (("deepseek-llm",), P("deepseek-llm", clean_spaces=False)),
        (("deepseek-coder",), P("deepseek-coder", clean_spaces=False)),
        (("deepseek-v3", "hunyuan-dense"), P("deepseek3", clean_spaces=False)),
        (("falcon",), P("falcon")),
        (("gpt-2", "mpt", "olmo", "phi-2"), P("gpt2")),
        (("starcoder", "refact", "codeshell"), P("starcoder")),
        (("smollm", "command-r"), P("starcoder", clean_spaces=False)),
        (("qwen2", "deepseek-r1-qwen", "hunyuan", "grok-2"), P("qwen2", clean_spaces=False)),
        (("stablelm2",), P("qwen2")),
        (("qwen35",), P("qwen35", clean_spaces=False)),
        (("bloom",), P("bloom")),
        (("chatglm-bpe",), P("llama3", no_default_bos=True)),
        (("glm4",), P("llama3", ignore_merges=True, no_default_bos=True)),
        (("tekken",), P("tekken", clean_spaces=False, ignore_merges=True, add_bos=True)),
        (("gpt-4o", "llama4", "minimax-m2"), P("gpt4o", clean_spaces=False)),
        (("seed-coder",), P("seed-coder", clean_spaces=False)),
        (("bailingmoe", "bailingmoe2"), P("bailingmoe", clean_spaces=False)),
    ]
    return {name: spec for names, spec in groups for name in names}


PRE_TOKENIZERS: dict[str, PreTokenizer] = _pre_table()

# Tokens llama.cpp recognises by their text (llama_vocab::impl::load). Only the first match of each
# kind is taken there, in hash order; we take the lowest id.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~["))
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# special-token id keys, in the order llama.cpp reads them (later keys win)
_ID_KEYS = (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
            ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("sep", "seperator_token_id"),
            ("pad", "padding_token_id"), ("mask", "mask_token_id"),
            ("fim_pre", "fim_pre_token_id"), ("fim_suf", "fim_suf_token_id"),
            ("fim_mid", "fim_mid_token_id"), ("fim_pad", "fim_pad_token_id"),
            ("fim_rep", "fim_rep_token_id"), ("fim_sep", "fim_sep_token_id"),
            ("fim_pre", "prefix_token_id"), ("fim_suf", "suffix_token_id"),
            ("fim_mid", "middle_token_id"))


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _to_bytes(s: str) -> bytes:
    # vocab strings may carry invalid UTF-8 as surrogate escapes
    return s.encode("utf-8", "surrogateescape")


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# llama.cpp's clean_spaces passes, on bytes
_CLEAN_1 = re.compile(rb" (?=[?!.,])")
_CLEAN_2 = re.compile(rb" ' ")
_CLEAN_3 = re.compile(rb" (?='[sm]|'re|'ve)")
_CLEAN_UNSAFE = b" 'rv"   # a cut after any other byte leaves every cleaning pattern on one side


def _clean_spaces(b: bytes) -> bytes:
    return _CLEAN_3.sub(b"", _CLEAN_2.sub(b"'", _CLEAN_1.sub(b"", b)))


class Tokenizer:
    """GGUF vocabulary + llama.cpp's tokenization rules. Build with `from_gguf_metadata`."""

    def __init__(self, *, model: str, pre: str, tokens: list[str], attrs: list[int],
                 special_ids: dict[str, int | None], eog_ids: frozenset[int], add_bos: bool,
                 add_eos: bool, add_space_prefix: bool, clean_spaces: bool, hf: Any, source: str,
                 prepend_scheme: str = "prepend"):
        self.model = model
        self.prepend_scheme = prepend_scheme
        self.pre = pre
        self.source = source
        self.tokens = tokens
        self.attrs = attrs
        self.special_ids = special_ids
        self.bos_id = special_ids["bos"]
        self.eos_id = special_ids["eos"]
        self.eog_ids = eog_ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.clean_spaces = clean_spaces
        self._hf = hf
        self._pieces: list[bytes | None] = [None] * len(tokens)
        self._byte_of = {c: b for b, c in enumerate(_gpt2_byte_chars())} if model == "gpt2" else None
        # special tokens matched in raw text, longest (in bytes) first, as llama.cpp sorts them
        special = [i for i, a in enumerate(attrs) if a & _SPECIAL]
        special.sort(key=lambda i: -len(_to_bytes(tokens[i])))
        self._special = [(tokens[i], i, bool(attrs[i] & TokenAttr.LSTRIP),
                          bool(attrs[i] & TokenAttr.RSTRIP), not attrs[i] & _HIDDEN)
                         for i in special]

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, md: dict, *, source: str = "?") -> Tokenizer:
        """Tokenizer of a GGUF file from its metadata (plain Python values, arrays as lists)."""
        return _build(md, source)

    # -- properties ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_attr(self, token_id: int) -> TokenAttr:
        self._check_id(token_id)
        return TokenAttr(self.attrs[token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for (llama_token_to_piece with special=True)."""
        self._check_id(token_id)
        return self._piece(token_id)

    def token_str(self, token_id: int) -> str:
        """token_bytes as text (' the', '<|im_end|>'); a partial UTF-8 character becomes U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry itself ('Ġthe', '▁the', '<0x0A>'), as llama_vocab_get_text."""
        self._check_id(token_id)
        return self.tokens[token_id]

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self.tokens):
            raise ValueError(f"token id {token_id} out of range for the {len(self.tokens)}-token "
                             f"vocabulary of {self.source}")

    def _piece(self, i: int) -> bytes:
        p = self._pieces[i]
        if p is None:
            p = self._pieces[i] = self._make_piece(i)
        return p

    def _make_piece(self, i: int) -> bytes:
        attr, text = self.attrs[i], self.tokens[i]
        if attr & (_HIDDEN | TokenAttr.USER_DEFINED):
            return _to_bytes(text)
        if attr & TokenAttr.NORMAL:
            if self._byte_of is None:
                return _to_bytes(text.replace(_SPM_SPACE, " "))
            return self._unmap_bytes(text)
        if attr & TokenAttr.BYTE:   # "<0xAB>"
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                raise GGUFFormatError(f"{self.source}: byte token {i} is {text!r}, not <0xXX>") from None
        return b""  # unused / undefined tokens render as nothing

    def _unmap_bytes(self, text: str) -> bytes:
        out = bytearray()
        for ch in text:
            b = self._byte_of.get(ch)
            if b is not None:
                out.append(b)
            else:  # not a byte-level character: llama.cpp emits this marker
                utf8 = _to_bytes(ch) if not _has_surrogates(ch) else "\ufffd".encode()
                out += b"[UNK_BYTE_0x" + utf8.hex().encode() + _to_bytes(text) + b"]"
        return bytes(out)

    # -- encode --------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, as llama_tokenize(text, add_special, parse_special)."""
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise UnsupportedError(f"{self.source}: tokenizer.ggml.add_bos_token is set but the "
                                       f"vocabulary has no BOS token")
            out.append(self.bos_id)
        frags = self._partition(text, parse_special) if text else []
        raw: list[str] = []
        slots: list[int] = []   # index in `out` where each raw fragment's ids go
        prev_special = True
        for k, f in enumerate(frags):
            if isinstance(f, int):
                out.append(f)
                prev_special = True
                continue
            if self.model == "llama":
                if self.add_space_prefix and prev_special and self._prefix(f, k == 0):
                    f = " " + f
                f = f.replace(" ", _SPM_SPACE)
            slots.append(len(out))
            out.append(-1)
            raw.append(f)
            prev_special = False
        # one fragment at a time: encode_batch would start HF's thread pool, which warns on fork
        for slot, f in zip(reversed(slots), reversed(raw)):
            out[slot:slot + 1] = self._hf.encode(f, add_special_tokens=False).ids
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise UnsupportedError(f"{self.source}: tokenizer.ggml.add_eos_token is set but the "
                                       f"vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def _prefix(self, f: str, at_start: bool) -> bool:
        """Whether a fragment following a special token (or starting the text) gets the SPM
        space prefix."""
        scheme = self.prepend_scheme
        if scheme == "prepend":
            return True
        if scheme == "never" or f.startswith(" "):
            return False
        return scheme == "always" or at_start

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split out special tokens: each one, longest first, splits every remaining text fragment."""
        frags: list[str | int] = [text]
        chars = set(text)
        for s, tid, lstrip, rstrip, always in self._special:
            if not (parse_special or always) or s[0] not in chars or s not in text:
                continue
            new: list[str | int] = []
            for f in frags:
                if not isinstance(f, str) or s not in f:
                    new.append(f)
                    continue
                start = 0
                while (m := f.find(s, start)) >= 0:
                    left = f[start:m]
                    if lstrip:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        new.append(left)
                    new.append(tid)
                    start = m + len(s)
                    if rstrip:
                        while start < len(f) and f[start] in _C_SPACE:
                            start += 1
                if start < len(f):
                    new.append(f[start:])
            frags = new
        return frags

    # -- decode --------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """llama_detokenize(ids, remove_special=False, unparse_special=not skip_special)."""
        ids = list(ids)
        if not ids:
            return b""
        if min(ids) < 0 or max(ids) >= len(self.tokens):
            bad = next(i for i in ids if not 0 <= i < len(self.tokens))
            self._check_id(bad)
        parts = [b"" if skip_special and self.attrs[i] & _HIDDEN else self._piece(i) for i in ids]
        if self.add_space_prefix and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        out = b"".join(parts)
        return _clean_spaces(out) if self.clean_spaces else out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (see decode_bytes); invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model!r}, pre={self.pre!r}, vocab={len(self.tokens)}, "
                f"bos={self.bos_id}, eos={self.eos_id}, source={self.source!r})")


class StreamDecoder:
    """Incremental decode: the concatenation of add() results and flush() equals decode(all ids),
    and no returned string ends inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tok = tokenizer
        self.skip_special = skip_special
        self._first = True
        self._held = b""   # raw bytes whose clean_spaces result may still change
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        tok = self.tok
        tok._check_id(token_id)
        piece = b"" if self.skip_special and tok.attrs[token_id] & _HIDDEN else tok._piece(token_id)
        if self._first:
            self._first = False
            if tok.add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]
        if not tok.clean_spaces:
            return self._utf8.decode(piece)
        buf = self._held + piece
        cut = len(buf)
        while cut > 0 and buf[cut - 1] in _CLEAN_UNSAFE:
            cut -= 1
        self._held = buf[cut:]
        return self._utf8.decode(_clean_spaces(buf[:cut]))

    def flush(self) -> str:
        rest = _clean_spaces(self._held) if self._held else b""
        self._held = b""
        return self._utf8.decode(rest, final=True)


# ---------------------------------------------------------------------------------------------
def _key(md: dict, name: str, kind, source: str, default=None):
    v = md.get(name, default)
    if v is not default and not isinstance(v, kind):
        raise MissingKeyError(f"{source}: {name} has type {type(v).__name__}, expected "
                              f"{getattr(kind, '__name__', kind)}")
    return v


def _build(md: dict, source: str) -> Tokenizer:
    model = _key(md, "tokenizer.ggml.model", str, source)
    if model is None:
        raise MissingKeyError(f"{source}: no tokenizer.ggml.model key; cannot build a tokenizer")
    if model not in SUPPORTED_MODELS:
        raise UnsupportedError(f"{source}: tokenizer.ggml.model={model!r} is not supported "
                               f"(supported: {', '.join(SUPPORTED_MODELS)})")
    pre_name = _key(md, "tokenizer.ggml.pre", str, source) or "default"
    if model == "gpt2":
        pre = PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise UnsupportedError(f"{source}: tokenizer.ggml.pre={pre_name!r} is not supported for "
                                   f"tokenizer.ggml.model='gpt2' (supported: "
                                   f"{', '.join(sorted(PRE_TOKENIZERS))})")
    else:
        pre = None  # SentencePiece vocabularies ignore `pre`

    tokens = _key(md, "tokenizer.ggml.tokens", list, source)
    if not tokens:
        raise MissingKeyError(f"{source}: tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    text_to_id: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in text_to_id:
            raise GGUFFormatError(f"{source}: tokenizer.ggml.tokens holds {t!r} twice "
                                  f"(ids {text_to_id[t]} and {i})")
        text_to_id[t] = i
    types = _key(md, "tokenizer.ggml.token_type", list, source)
    if types is not None and len(types) < n:
        raise GGUFFormatError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries, "
                              f"fewer than the {n} tokens")
    scores = _key(md, "tokenizer.ggml.scores", list, source)
    if scores is not None and len(scores) < n:
        raise GGUFFormatError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries, "
                              f"fewer than the {n} tokens")
    attrs = [_TYPE_ATTR.get(t, 0) for t in types[:n]] if types is not None \
        else [int(TokenAttr.NORMAL)] * n

    # defaults, then metadata (llama_vocab::impl::load)
    spm = model == "llama"
    ids: dict[str, int | None] = dict.fromkeys(
        ("bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask",
         "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"))
    if spm:
        ids.update(bos=1, eos=2, unk=0)
        add_space_prefix, clean_spaces, add_bos = True, False, True
    else:
        ids.update(bos=None if pre.no_default_bos else 11, eos=11)
        add_space_prefix, clean_spaces, add_bos = False, pre.clean_spaces, pre.add_bos
    add_eos = False
    add_space_prefix = bool(_key(md, "tokenizer.ggml.add_space_prefix", bool, source,
                                 add_space_prefix))
    for name, value in ids.items():   # a default beyond the vocabulary means none
        if value is not None and value >= n:
            ids[name] = None
    for name, key in _ID_KEYS:
        v = _key(md, "tokenizer.ggml." + key, int, source)
        if v is not None and 0 <= v < n:
            ids[name] = v
    add_bos = bool(_key(md, "tokenizer.ggml.add_bos_token", bool, source, add_bos))
    add_eos = bool(_key(md, "tokenizer.ggml.add_eos_token", bool, source, add_eos))

    _mark_by_text(tokens, text_to_id, attrs, ids)
    eog = _eog_ids(text_to_id, attrs, ids, tokens)
    _name_rules(md, text_to_id, attrs)

    scheme = _key(md, "tokenizer.hf.prepend_scheme", str, source, "prepend")
    if scheme not in ("prepend", "always", "first", "never"):
        raise UnsupportedError(f"{source}: tokenizer.hf.prepend_scheme={scheme!r} is not "
                               f"supported (prepend, always, first, never)")
    if spm and _key(md, "tokenizer.ggml.merges", list, source) is not None:
        hf = _hf_merges(md, tokens, source, byte_fallback=True)
    elif spm:
        hf = _hf_spm(tokens, scores)
    else:
        hf = _hf_bpe(md, tokens, text_to_id, pre, source)
    return Tokenizer(model=model, pre=pre_name, tokens=tokens, attrs=attrs, special_ids=ids,
                     eog_ids=frozenset(eog), add_bos=add_bos, add_eos=add_eos,
                     add_space_prefix=add_space_prefix, clean_spaces=clean_spaces, hf=hf,
                     source=source, prepend_scheme=scheme)


def _mark_by_text(tokens, text_to_id, attrs, ids) -> None:
    """EOT/EOM/FIM tokens found by text become control tokens; control tokens named *unused* unused."""
    kinds = [("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items()]
    for kind, texts in kinds:
        if ids[kind] is not None:
            continue
        found = sorted(text_to_id[t] for t in texts if t in text_to_id)
        if found:
            ids[kind] = found[0]
            attrs[found[0]] |= _CONTROL
    for i, t in enumerate(tokens):
        if attrs[i] & _CONTROL and "unused" in t:
            attrs[i] |= _UNUSED


def _eog_ids(text_to_id, attrs, ids, tokens) -> set[int]:
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
    for t in _EOG_TEXTS:
        i = text_to_id.get(t)
        if i is not None:
            eog.add(i)
            attrs[i] |= _CONTROL
    for t in _ALWAYS_USER_DEFINED:
        if t in text_to_id:
            attrs[text_to_id[t]] = int(TokenAttr.USER_DEFINED)
    eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
    texts = {tokens[i]: i for i in eog}
    # harmony / solar-open vocabularies: "<|end|>" ends a message, not the generation
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        eog.discard(texts["<|end|>"])
        attrs[texts["<|end|>"]] = int(TokenAttr.USER_DEFINED)
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])
        attrs[texts["</s>"]] = int(TokenAttr.NORMAL)
    return eog


def _name_rules(md, text_to_id, attrs) -> None:
    """Per-model strip attributes llama.cpp sets by model / tokenizer name."""
    name = str(md.get("general.name", "")).lower()
    pre = str(md.get("tokenizer.ggml.pre", ""))
    arch = str(md.get("general.architecture", ""))
    if (any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
            or any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3"))):
        if "<mask>" in text_to_id:
            attrs[text_to_id["<mask>"]] |= TokenAttr.LSTRIP
    elif "phi-3" in name or "phi3" in name:
        for i, a in enumerate(attrs):
            if a & _SPECIAL:
                attrs[i] |= TokenAttr.RSTRIP
        for t, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
            if t in text_to_id:
                i = text_to_id[t]
                attrs[i] = attrs[i] | TokenAttr.RSTRIP if on else attrs[i] & ~TokenAttr.RSTRIP
    elif "modern-bert" in name and "[MASK]" in text_to_id:
        attrs[text_to_id["[MASK]"]] |= TokenAttr.LSTRIP


def _hf_vocab(tokens: list[str]) -> dict[str, int]:
    # entries with invalid UTF-8 cannot occur in encoded text; HF cannot hold them either
    if not _has_surrogates("".join(tokens)):
        return {t: i for i, t in enumerate(tokens)}
    return {t: i for i, t in enumerate(tokens) if not _has_surrogates(t)}


def _hf_merges(md, tokens, source: str, **bpe_options):
    """A `tokenizers` BPE of the vocabulary and the ranked merges of tokenizer.ggml.merges."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    merges_md = _key(md, "tokenizer.ggml.merges", list, source)
    if merges_md is None:
        raise MissingKeyError(f"{source}: tokenizer.ggml.model='gpt2' needs tokenizer.ggml.merges")
    vocab = _hf_vocab(tokens)
    merges, seen = [], set()
    for m in merges_md:
        pos = m.find(" ", 1)
        if pos < 0:
            continue
        a, b = m[:pos], m[pos + 1:]
        # the first rank of a pair wins; merges HF cannot represent (parts or result missing from
        # the vocabulary) are dropped: llama.cpp would split such a result back into characters
        if (a, b) in seen or a not in vocab or b not in vocab or a + b not in vocab:
            continue
        seen.add((a, b))
        merges.append((a, b))
    return HFTokenizer(models.BPE(vocab=vocab, merges=merges, **bpe_options))


def _hf_bpe(md, tokens, text_to_id, pre: PreTokenizer, source: str):
    from tokenizers import Regex, pre_tokenizers
    hf = _hf_merges(md, tokens, source, ignore_merges=pre.ignore_merges)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS[pre.split]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return hf


def _hf_spm(tokens: list[str], scores: Sequence[float] | None):
    """BPE whose merges replay llama.cpp's SPM loop: the highest-scoring adjacent pair that forms a
    vocabulary entry merges first."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    vocab = _hf_vocab(tokens)
    # every split of every entry into two entries, keyed (-score, id): split point k = 1, 2, ...
    # over a shrinking list (comprehensions, as this runs over every character of the vocabulary)
    found: list[tuple[float, int, str, str]] = []
    rest = [(t, i, -scores[i] if scores is not None else 0.0)
            for t, i in vocab.items() if len(t) > 1]
    k = 1
    while rest:
        found += [(s, i, t[:k], t[k:]) for t, i, s in rest if t[:k] in vocab and t[k:] in vocab]
        k += 1
        rest = [r for r in rest if len(r[0]) > k]
    found.sort()
    ranked = [(a, b) for _, _, a, b in found]
    bpe = models.BPE(vocab=vocab, merges=ranked, byte_fallback=True)
    return HFTokenizer(bpe)
