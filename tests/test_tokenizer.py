"""Tokenizer parity with llama.cpp (through llama-cpp-python, vocab-only loads).

Vocabularies: SmolLM2 (byte-level BPE, pre "smollm"), Gemma3-270M (SentencePiece-style), a cut of
Gemma's with Llama-2 flags (space prefix, BOS+EOS), a tiny one with the special tokens llama.cpp
recognises by text, and SmolLM2's re-labelled with every `tokenizer.ggml.pre` value we claim.
Ids (encode), bytes (decode), token attributes, EOG sets and BOS/EOS flags must all agree.
Streaming decode is checked against our own decode.
"""
from __future__ import annotations

import ctypes
import random
import struct

import pytest

from hetero_moe.errors import HeteroMoEError, UnsupportedError
from hetero_moe.gguf import read_metadata
from hetero_moe.tokenizer import PRE_TOKENIZERS, StreamDecoder, TokenAttr, Tokenizer

try:
    import llama_cpp
except ImportError:   # parity tests skip; the rest still run
    llama_cpp = None


def needs_llama(fn):
    skip = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is the reference")
    return pytest.mark.llama(skip(fn))


CORPUS = [
    "",
    " ",
    "  ",
    "\n",
    "Hello world",
    " Hello world",
    "   leading spaces and trailing   ",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it? I'll go; we've been.",
    "THE QUICK Brown fOX, CamelCaseWords and snake_case_words; HTTPServer parseJSON",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }  // comment\n\t\treturn x->y;",
    "1234567890 3.14159265358979 -42 1,000,000 0x1F 2024-01-31 12:30:45 99999999999999999999",
    "tabs\tand\t\ttabs\t\t\t, newlines\n\nand\r\nwindows\r\n\n\n   \n \n\t \n",
    "whitespace runs:     five     and          ten and 31:                               end",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇯🇵 🦩 flags and ZWJ",
    "unicode: café naïve résumé Straße ĳ ﬁ Å Ω µ ½ ² ™ © ® … — – “quotes” «guillemets»",
    "中文：你好，世界！我爱自然语言处理。日本語のテキスト、カタカナ。한국어 텍스트입니다.",
    "العربية: مرحبا بالعالم، كيف حالك؟ ١٢٣٤٥",
    "हिन्दी: नमस्ते दुनिया, आप कैसे हैं? १२३",
    "Русский текст: Привет, мир! Ёлка ёжик. Українська: ґїє.",
    "Ελληνικά: Γειά σου Κόσμε. עברית: שלום עולם. ไทย: สวัสดีชาวโลก",
    "mixed: abc123def 456ghi ...!!!??? ,,, ;;; ::: ''' \"\"\" ``` ~~~ @@@ ### $$$ %%% ^^^ &&& ***",
    "contractions: 'S 'T 'RE 'VE 'M 'LL 'D 's 't 're 've 'm 'll 'd ' s ' , 'x",
    "cleanup: a , b . c ? d ! e ' f 's g 're h 've i 'm j 'll k 't",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic\u2028line\u2029para\u0085nel\u000bvt\u000cff",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>text<|im_end|> <|im_start|>",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n<eos><bos><pad>",
    "html <table><tr><td>cell</td></tr></table> <b>bold</b> <unused5> <0x41> <mask>",
    "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀋𠂢 \U0001fae8 \u0378\ue000 ᚠᛇᚻ",
    "a" * 300 + " " + "ab" * 150 + " " + "9" * 64,
]

MODES = [(True, True), (False, False), (True, False), (False, True)]


# -- helpers ------------------------------------------------------------------------------------
def _load(path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _vocab(llm):
    return llama_cpp.llama_model_get_vocab(llm.model)


def ref_encode(llm, text: str, add_special: bool, parse_special: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)


def ref_piece(llm, token_id: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(_vocab(llm), token_id, buf, 256, 0, special)
    assert 0 <= n <= 256, n
    return buf.raw[:n]


def ref_decode(llm, ids: list[int], special: bool) -> bytes:
    """llama.cpp's llama_detokenize(remove_special=False, unparse_special=special)."""
    vocab = _vocab(llm)
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, False, special)
    assert n >= 0, n
    return buf.raw[:n]


def _model_or_skip(fn):
    try:
        return fn()
    except HeteroMoEError as e:
        pytest.skip(f"model unavailable: {e}")


def check_encode(tok: Tokenizer, llm, texts, modes=MODES) -> None:
    for text in texts:
        for add_special, parse_special in modes:
            want = ref_encode(llm, text, add_special, parse_special)
            got = tok.encode(text, add_special=add_special, parse_special=parse_special)
            assert got == want, (text, add_special, parse_special)


def check_decode(tok: Tokenizer, llm, id_lists) -> None:
    for ids in id_lists:
        for skip in (False, True):
            want = ref_decode(llm, ids, special=not skip)
            assert tok.decode_bytes(ids, skip_special=skip) == want, (ids, skip)
            assert tok.decode(ids, skip_special=skip) == want.decode("utf-8", errors="replace")


def random_id_lists(n_vocab: int, seed: int, count: int = 30, length: int = 12):
    rng = random.Random(seed)
    return [[rng.randrange(n_vocab) for _ in range(rng.randrange(1, length))] for _ in range(count)]


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    from hetero_moe.assets import smollm2_path
    path = _model_or_skip(smollm2_path)
    md = read_metadata(path)
    return md, Tokenizer.from_gguf_metadata(md, source=str(path)), path


@pytest.fixture(scope="module")
def gemma():
    from hetero_moe.assets_gemma import gemma3_path
    path = _model_or_skip(gemma3_path)
    md = read_metadata(path)
    return md, Tokenizer.from_gguf_metadata(md, source=str(path)), path


@pytest.fixture(scope="module")
def smol_ref(smol):
    return _load(smol[2])


@pytest.fixture(scope="module")
def gemma_ref(gemma):
    return _load(gemma[2])


def _check_vocab_facts(tok: Tokenizer, llm) -> None:
    vocab = _vocab(llm)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    assert tok.vocab_size == n
    bos, eos = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)
    assert tok.bos_id == (None if bos < 0 else bos)
    assert tok.eos_id == (None if eos < 0 else eos)
    assert tok.add_bos == bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    assert tok.add_eos == bool(llama_cpp.llama_vocab_get_add_eos(vocab))
    assert tok.eog_ids == {i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    attrs = [llama_cpp.llama_vocab_get_attr(vocab, i) for i in range(n)]
    assert [int(a) for a in tok.attrs] == attrs


# -- SmolLM2 ------------------------------------------------------------------------------------
@needs_llama
def test_smollm2_vocab_facts(smol, smol_ref):
    _, tok, _ = smol
    _check_vocab_facts(tok, smol_ref)
    assert tok.eog_ids >= {tok.eos_id}


@needs_llama
def test_smollm2_encode(smol, smol_ref):
    check_encode(smol[1], smol_ref, CORPUS)


@needs_llama
def test_smollm2_decode(smol, smol_ref):
    _, tok, _ = smol
    llm = smol_ref
    ids = [tok.encode(t) for t in CORPUS if t]
    check_decode(tok, llm, ids + random_id_lists(tok.vocab_size, seed=1))
    # llama-cpp-python's own detokenize (no BOS first, pieces under its 32-byte buffer)
    for t in CORPUS:
        ids = tok.encode(t, add_special=False, parse_special=True)
        if ids and ids[0] != tok.bos_id and all(len(tok.token_bytes(i)) <= 32 for i in ids):
            assert tok.decode_bytes(ids, skip_special=True) == llm.detokenize(ids)


@needs_llama
def test_smollm2_token_pieces(smol, smol_ref):
    _, tok, _ = smol
    for i in range(tok.vocab_size):
        assert tok.token_bytes(i) == ref_piece(smol_ref, i, special=True)
    vocab = _vocab(smol_ref)
    for i in range(0, tok.vocab_size, 97):
        assert tok.token_text(i) == llama_cpp.llama_vocab_get_text(vocab, i).decode()
        assert tok.token_str(i) == ref_piece(smol_ref, i, True).decode("utf-8", errors="replace")
    assert tok.token_str(tok.encode(" the", add_special=False)[0]) == " the"


# -- Gemma3 (SentencePiece-style) --------------------------------------------------------------
@needs_llama
def test_gemma3_vocab_facts(gemma, gemma_ref):
    _, tok, _ = gemma
    assert tok.model == "llama"
    _check_vocab_facts(tok, gemma_ref)
    for i in range(0, tok.vocab_size, 7):
        assert tok.token_bytes(i) == ref_piece(gemma_ref, i, special=True)


@needs_llama
def test_gemma3_encode(gemma, gemma_ref):
    extra = ["<start_of_image>x<end_of_image>", "▁already▁escaped ▁", "\t\t\t\t\t\t\t\t\tx",
             "<table>" * 3, "x" + " " * 40 + "y", "<unused0><unused1><unused10>"]
    check_encode(gemma[1], gemma_ref, CORPUS + extra)


@needs_llama
def test_gemma3_decode(gemma, gemma_ref):
    _, tok, _ = gemma
    ids = [tok.encode(t) for t in CORPUS]
    check_decode(tok, gemma_ref, ids + random_id_lists(tok.vocab_size, seed=2))


@needs_llama
def test_spm_space_prefix_bos_eos(gemma, tmp_path):
    # Llama-2-style SentencePiece flags on a cut of Gemma's vocabulary: a space before the text and
    # after every special token, the first piece's space dropped on decode, BOS and EOS added
    md, _, _ = gemma
    # the 30000 best entries plus every single character, the alphabet the merges start from
    keep = [i for i, t in enumerate(md["tokenizer.ggml.tokens"]) if i < 30000 or len(t) == 1]
    n = len(keep)
    cut = {k: [md[k][i] for i in keep]
           for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}
    path = tmp_path / "spm.gguf"
    write_vocab_gguf(path, {**md, **cut}, add_space_prefix=True, add_bos_token=True,
                     add_eos_token=True)
    md2 = read_metadata(path)
    tok, llm = Tokenizer.from_gguf_metadata(md2, source=str(path)), _load(path)
    assert tok.add_space_prefix and tok.add_bos and tok.add_eos
    _check_vocab_facts(tok, llm)
    texts = CORPUS[:12] + CORPUS[25:29] + [" x", "<start_of_turn> a<end_of_turn>b", "😀 中文"]
    check_encode(tok, llm, texts)
    ids = [tok.encode(t) for t in texts] + [tok.encode(t, add_special=False) for t in texts if t]
    check_decode(tok, llm, ids + random_id_lists(n, seed=4))
    for text in texts:
        _check_stream(tok, text)


# -- every claimed tokenizer.ggml.pre value, on SmolLM2's vocabulary ---------------------------
_LLAMA_KEYS = {  # the llama hyper-parameters a vocab-only load reads
    "llama.context_length": 2048, "llama.embedding_length": 64, "llama.block_count": 1,
    "llama.feed_forward_length": 128, "llama.attention.head_count": 1,
}


def write_vocab_gguf(path, md: dict, pre: str | None = None, **flags: bool) -> None:
    """A GGUF holding only tokenizer metadata (`pre` and add_* flags replaced) and the llama keys a
    vocab-only load reads."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    if "general.name" in md:
        w.add_name(md["general.name"])
    for k, v in _LLAMA_KEYS.items():
        w.add_uint32(k, v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(pre if pre is not None else md.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in md:
        w.add_token_scores(md["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in md:
        w.add_token_merges(md["tokenizer.ggml.merges"])
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        if "tokenizer.ggml." + key in md:
            w.add_uint32("tokenizer.ggml." + key, md["tokenizer.ggml." + key])
    for key, value in flags.items():   # add_bos_token, add_eos_token, add_space_prefix
        w.add_bool("tokenizer.ggml." + key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _relabel(data: bytes, old: str, new: str) -> bytes:
    """Same GGUF bytes with the tokenizer.ggml.pre string value changed (no tensors follow)."""
    key = b"tokenizer.ggml.pre"
    head = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8)
    old_kv = head + struct.pack("<Q", len(old.encode())) + old.encode()
    assert data.count(old_kv) == 1
    out = data.replace(old_kv, head + struct.pack("<Q", len(new.encode())) + new.encode())
    return out + b"\0" * (-len(out) % 32)


PRE_CORPUS = [t for t in CORPUS if len(t) < 200 and "<start_of_turn>" not in t] + [
    "Hello, World! HELLO world hello WORLD. ÉCOLE école ÀÉÎ",
    "numbers 1 12 123 1234 12345 123456 1234567 ١٢٣٤ ⅷ ½",
    "CJK 你好世界 こんにちは カタカナ ｶﾀｶﾅ 안녕하세요 ﾃｽﾄ",
    "punct!!! ... ,,, ?!?! (paren) [brack] {brace} <angle> | pipe ~ ^ ` $ + = < >",
    "  two spaces, then\n\n\nnewlines\r\n\ttab end  ",
]
# a few lines that tell the pre-tokenizers apart, for names that share a group's rules
PRE_PROBE = [PRE_CORPUS[7], PRE_CORPUS[11], PRE_CORPUS[12], PRE_CORPUS[16], PRE_CORPUS[-2],
             "cleanup: a , b . c ? d ! e ' f 's g 're h 've"]


@pytest.fixture(scope="module")
def pre_base(smol, tmp_path_factory):
    md, _, _ = smol
    path = tmp_path_factory.mktemp("pre") / "base.gguf"
    write_vocab_gguf(path, md, "default")
    return read_metadata(path), path.read_bytes(), path.parent


def _groups() -> list[list[str]]:
    by_spec: dict = {}
    for name, spec in PRE_TOKENIZERS.items():
        by_spec.setdefault(spec, []).append(name)
    return list(by_spec.values())


@needs_llama
@pytest.mark.parametrize("names", _groups(), ids=lambda names: names[0])
def test_pre_tokenizer_parity(pre_base, names):
    md, base, folder = pre_base
    tok = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.pre": names[0]}, source=names[0])
    ids = [tok.encode(t, add_special=False) for t in PRE_PROBE]
    for k, name in enumerate(names):
        path = folder / f"{name}.gguf"
        path.write_bytes(_relabel(base, "default", name))
        llm = _load(path)
        _check_vocab_facts(tok, llm)
        if k == 0:   # the whole corpus once per group, a probe for the other names
            check_encode(tok, llm, PRE_CORPUS, MODES[:2])
            check_decode(tok, llm, ids + random_id_lists(tok.vocab_size, seed=3, count=10))
        else:
            check_encode(tok, llm, PRE_PROBE, MODES[:1])
            check_decode(tok, llm, ids)
        del llm
        path.unlink()


@needs_llama
def test_vocab_gguf_loads(pre_base):
    # the GGUFWriter file itself (pre "default") loads in llama.cpp and tokenizes as we do
    md, _, folder = pre_base
    llm = _load(folder / "base.gguf")
    tok = Tokenizer.from_gguf_metadata(md, source="base")
    assert tok.pre == "default"
    assert ref_encode(llm, "Hello world 123", True, True) == tok.encode("Hello world 123")


def _tiny_vocab(name: str) -> dict:
    """A byte-level vocabulary with the special tokens llama.cpp treats by their text."""
    from hetero_moe.tokenizer import _gpt2_byte_chars
    special = ["<|endoftext|>", "<|end|>", "<|return|>", "<|call|>", "<|channel|>", "<|message|>",
               "<fim_prefix>", "<fim_pad>", "<|reserved_unused_1|>", "<s>", "</s>", "<unk>"]
    words = ["Ġt", "Ġth", "Ġthe", "<|im_end|>"]   # the last one typed normal, made control
    tokens = _gpt2_byte_chars() + special + words
    types = [1] * 256 + [3] * len(special) + [1] * len(words)
    return {"general.name": name, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": ["Ġ t", "Ġt h", "Ġth e"],
            "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 256}


@needs_llama
@pytest.mark.parametrize("name", ["tiny", "Phi-3 tiny"])
def test_tokens_known_by_text(tmp_path, name):
    # EOG by text (minus harmony's <|end|>), FIM tokens, "unused", gpt-oss' always-rendered
    # tokens, and Phi-3's right-strip after special tokens
    path = tmp_path / "tiny.gguf"
    write_vocab_gguf(path, _tiny_vocab(name))
    md = read_metadata(path)
    tok, llm = Tokenizer.from_gguf_metadata(md, source=str(path)), _load(path)
    _check_vocab_facts(tok, llm)
    texts = ["the<|end|>  the <|channel|> x<|im_end|>\n the", " the<fim_pad> <s> </s>  \t<unk>y"]
    check_encode(tok, llm, texts)
    check_decode(tok, llm, [tok.encode(t) for t in texts] + random_id_lists(tok.vocab_size, 9))
    assert tok.token_text(min(tok.eog_ids)) == "<|endoftext|>"


# -- streaming ----------------------------------------------------------------------------------
STREAM_TEXTS = [
    "emoji 😀😃 👨‍👩‍👧‍👦 🦩🪸 𠀋𠂢𝔘 and ascii",
    "cleanup: a , b . c ? d ! e ' f 's g 're h 've i 'm j 'll k 't x ' ' y  ,z",
    "中文，你好！ العربية हिन्दी Привет",
    " ' ' ' 's 're 've 'rv ,,, . . .",
]


def _stream(tok: Tokenizer, ids, skip_special=True) -> list[str]:
    dec = StreamDecoder(tok, skip_special=skip_special)
    return [dec.add(i) for i in ids] + [dec.flush()]


def _check_stream(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special=False)
    for skip in (True, False):
        chunks = _stream(tok, ids, skip)
        assert "".join(chunks) == tok.decode(ids, skip_special=skip)
        assert not any("\ufffd" in c for c in chunks)


def test_stream_decoder_smollm2(smol):
    _, tok, _ = smol
    for text in STREAM_TEXTS + CORPUS:
        _check_stream(tok, text)
    # an emoji split over several byte-level tokens yields nothing until it is complete
    ids = tok.encode("🪸", add_special=False)
    assert len(ids) > 1
    chunks = _stream(tok, ids)
    assert chunks[:-2] == [""] * (len(ids) - 1) and "".join(chunks) == "🪸"


def test_stream_decoder_clean_spaces(smol):
    md, _, _ = smol
    tok = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.pre": "gpt-2"}, source="gpt-2")
    assert tok.clean_spaces
    for text in STREAM_TEXTS + CORPUS:
        _check_stream(tok, text)
    rng = random.Random(5)
    pieces = [" ", "'", "s", "re", "ve", "m", ",", ".", "?", "x", " '", "' ", "r", "v"]
    for _ in range(200):
        _check_stream(tok, "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 20))))


def test_stream_decoder_gemma3(gemma):
    _, tok, _ = gemma
    for text in STREAM_TEXTS + CORPUS:
        _check_stream(tok, text)
    ids = tok.encode("𠀋", add_special=False)   # not in the vocabulary: four <0xXX> byte tokens
    assert len(ids) == 4 and all(tok.token_attr(i) & TokenAttr.BYTE for i in ids)
    assert _stream(tok, ids) == ["", "", "", "𠀋", ""]


# -- errors -------------------------------------------------------------------------------------
def test_unsupported_model_and_pre(smol):
    md, _, _ = smol
    with pytest.raises(UnsupportedError, match=r"file\.gguf.*'bert'.*gpt2, llama"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.model": "bert"}, source="file.gguf")
    with pytest.raises(UnsupportedError, match=r"file\.gguf.*'no-such-pre'.*smollm"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.pre": "no-such-pre"},
                                     source="file.gguf")


def test_bad_token_id(smol):
    _, tok, _ = smol
    with pytest.raises(ValueError, match="49152"):
        tok.decode([1, 49152])
    with pytest.raises(ValueError, match="-1"):
        tok.token_bytes(-1)
