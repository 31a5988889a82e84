"""GGUF loading: metadata, zero-copy tensors, split files, and clear errors for bad input."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import hetero_moe
from hetero_moe.errors import (ContextLengthError, GGUFFormatError, MissingKeyError,
                               MissingTensorError, UnsupportedError)
from hetero_moe.gguf import GGUFFile

from .ggufgen import D, tiny_llama_tensors, write_tiny_llama


@pytest.fixture()
def tiny(tmp_path):
    return write_tiny_llama(tmp_path / "tiny.gguf")


def _field_pos(data: bytes, tensor: str) -> int:
    """Byte position of `tensor`'s info record (after its name) in the header."""
    name = tensor.encode()
    key = struct.pack("<Q", len(name)) + name
    i = data.find(key)
    assert i > 0
    return i + len(key)


def _patched(tmp_path, src: str, edit) -> str:
    data = bytearray(open(src, "rb").read())
    data = edit(data) or data
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data))
    return str(out)


def test_metadata_and_zero_copy(tiny):
    g = GGUFFile(tiny)
    assert g.architecture == "llama"
    assert g.metadata["llama.embedding_length"] == D
    t = g.tensors["blk.0.attn_q.weight"]
    assert t.shape == (D, D) and t.type_name == "F32"
    assert not t.data.flags.owndata and not t.data.flags.writeable  # a view into the mmap
    want = tiny_llama_tensors()["blk.0.attn_q.weight"]
    assert np.array_equal(t.data.view(np.float32).reshape(D, D), want)


def test_split_files_load_as_one(tmp_path, tiny):
    split = write_tiny_llama(tmp_path / "model.gguf", split_max_tensors=8)
    parts = sorted(p.name for p in tmp_path.glob("model-*-of-*.gguf"))
    assert len(parts) >= 2, parts
    first = tmp_path / parts[0]
    g = GGUFFile(first)
    assert len(g.paths) == len(parts)
    assert set(g.tensors) == set(GGUFFile(tiny).tensors)
    ids = [1, 5, 9, 3]
    a = hetero_moe.load(first).logits(ids)
    b = hetero_moe.load(tiny).logits(ids)
    assert np.array_equal(a.numpy(), b.numpy())


def test_split_missing_part(tmp_path):
    write_tiny_llama(tmp_path / "model.gguf", split_max_tensors=8)
    parts = sorted(tmp_path.glob("model-*-of-*.gguf"))
    parts[-1].unlink()
    with pytest.raises(GGUFFormatError, match="missing"):
        GGUFFile(parts[0])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        hetero_moe.load(tmp_path / "nope.gguf")


def test_wrong_magic(tmp_path, tiny):
    bad = _patched(tmp_path, tiny, lambda d: d.__setitem__(slice(0, 4), b"GGML"))
    with pytest.raises(GGUFFormatError, match="magic"):
        hetero_moe.load(bad)


def test_wrong_version(tmp_path, tiny):
    bad = _patched(tmp_path, tiny, lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 99)))
    with pytest.raises(GGUFFormatError, match="version 99"):
        hetero_moe.load(bad)


@pytest.mark.parametrize("where,field", [(8, "tensors"), (16, "metadata keys")])
def test_absurd_counts(tmp_path, tiny, where, field):
    bad = _patched(tmp_path, tiny,
                   lambda d: d.__setitem__(slice(where, where + 8), struct.pack("<Q", 1 << 60)))
    with pytest.raises(GGUFFormatError, match=field):
        GGUFFile(bad)


def test_absurd_array_length(tmp_path, tiny):
    # a huge string length inside the first key
    bad = _patched(tmp_path, tiny, lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 1 << 50)))
    with pytest.raises(GGUFFormatError, match="truncated or corrupt"):
        GGUFFile(bad)


@pytest.mark.parametrize("keep", [20, 100, 1000])
def test_truncated_header(tmp_path, tiny, keep):
    bad = _patched(tmp_path, tiny, lambda d: d[:keep])
    with pytest.raises(GGUFFormatError):
        GGUFFile(bad)


def test_truncated_data(tmp_path, tiny):
    bad = _patched(tmp_path, tiny, lambda d: d[:-100])
    with pytest.raises(GGUFFormatError, match="runs past the end"):
        hetero_moe.load(bad)


def test_tensor_offset_out_of_bounds(tmp_path, tiny):
    def edit(d):
        p = _field_pos(bytes(d), "blk.0.ffn_up.weight")
        n_dims = struct.unpack_from("<I", d, p)[0]
        off = p + 4 + 8 * n_dims + 4
        d[off:off + 8] = struct.pack("<Q", 1 << 40)
    bad = _patched(tmp_path, tiny, edit)
    with pytest.raises(GGUFFormatError, match="blk.0.ffn_up.weight.*past the end"):
        GGUFFile(bad)


def test_bad_dimension_count(tmp_path, tiny):
    def edit(d):
        p = _field_pos(bytes(d), "output.weight")
        d[p:p + 4] = struct.pack("<I", 9)
    with pytest.raises(GGUFFormatError, match="output.weight.*9 dimensions"):
        GGUFFile(_patched(tmp_path, tiny, edit))


def test_unknown_tensor_type(tmp_path, tiny):
    def edit(d):
        p = _field_pos(bytes(d), "output.weight")
        n_dims = struct.unpack_from("<I", d, p)[0]
        t = p + 4 + 8 * n_dims
        d[t:t + 4] = struct.pack("<I", 777)
    with pytest.raises(UnsupportedError, match="output.weight.*777"):
        GGUFFile(_patched(tmp_path, tiny, edit))


def test_unknown_architecture(tmp_path):
    p = write_tiny_llama(tmp_path / "x.gguf", arch="llama9000")
    with pytest.raises(UnsupportedError, match="'llama9000'.*supported: .*qwen3moe"):
        hetero_moe.load(p)


def test_missing_tensor(tmp_path):
    p = write_tiny_llama(tmp_path / "x.gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(MissingTensorError, match="blk.1.ffn_down.weight"):
        hetero_moe.load(p)


def test_unused_tensor(tmp_path):
    p = write_tiny_llama(tmp_path / "x.gguf", extra={"blk.0.mystery.weight": np.ones(4, np.float32)})
    with pytest.raises(MissingTensorError, match="blk.0.mystery.weight"):
        hetero_moe.load(p)


def test_wrong_tensor_shape(tmp_path):
    p = write_tiny_llama(tmp_path / "x.gguf",
                         extra={"blk.0.attn_k.weight": np.ones((3, D), np.float32)})
    with pytest.raises(GGUFFormatError, match=r"blk.0.attn_k.weight.*\[3, 32\]"):
        hetero_moe.load(p)


def test_missing_key(tmp_path):
    p = write_tiny_llama(tmp_path / "x.gguf", meta_drop=("embedding_length",))
    with pytest.raises(MissingKeyError, match="llama.embedding_length"):
        hetero_moe.load(p)


def test_f64_weight_is_unsupported(tmp_path):
    import gguf
    w = tiny_llama_tensors()["blk.0.attn_q.weight"].astype(np.float64)
    p = write_tiny_llama(tmp_path / "x.gguf", extra={"blk.0.attn_q.weight": w})
    assert GGUFFile(p).tensors["blk.0.attn_q.weight"].ggml_type == gguf.GGMLQuantizationType.F64
    with pytest.raises(UnsupportedError, match="blk.0.attn_q.weight.*F64"):
        hetero_moe.load(p)


def test_context_length(tiny):
    m = hetero_moe.load(tiny, n_ctx=16)
    m.logits(list(range(16)))
    with pytest.raises(ContextLengthError, match="context window of 16"):
        m.logits(list(range(17)))


def test_bad_token_and_options(tiny):
    m = hetero_moe.load(tiny)
    with pytest.raises(ValueError, match="token id 64"):
        m.logits([1, 64])
    with pytest.raises(ValueError, match="no tokens"):
        m.logits([])
    with pytest.raises(TypeError, match="bogus"):
        hetero_moe.load(tiny, bogus=1)


def test_chunked_prefill_matches_single_pass(tiny, monkeypatch):
    from hetero_moe import api
    m = hetero_moe.load(tiny)
    ids = [(7 * i) % 64 for i in range(40)]
    full = m.logits(ids)
    monkeypatch.setattr(api, "PREFILL_CHUNK", 7)
    chunked = m.logits(ids)
    assert np.allclose(full.numpy(), chunked.numpy(), rtol=1e-4, atol=1e-4)


def test_decode_matches_prefill(tiny):
    m = hetero_moe.load(tiny)
    ids = [(5 * i + 1) % 64 for i in range(12)]
    full = m.logits(ids)
    m.eval(ids[:6], 0)
    rows = [m.eval([t], 6 + i) for i, t in enumerate(ids[6:])]
    assert np.allclose(full[6:].numpy(), np.concatenate([r.numpy() for r in rows]),
                       rtol=1e-4, atol=1e-4)


def test_repr_and_config(tiny):
    m = hetero_moe.load(tiny)
    assert "arch=llama" in repr(m) and "layers=2" in repr(m)
    assert m.config.n_embd == D and m.config.rope_type == "norm"


def _with_vocab(path, n: int) -> tuple[str, list[str], list[float]]:
    """A tiny llama with an n-token vocabulary (strings, scores, types) in its metadata."""
    import gguf
    tokens = [f"tok{i}\u00e9" for i in range(n)]
    scores = [float(i) / 4 for i in range(n)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(2)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([1] * n)
    w.add_array("test.small", [1, 2, 3])
    w.add_tensor("t.weight", np.zeros(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path), tokens, scores


def test_large_arrays_read_on_first_use(tmp_path):
    """The vocabulary is read when asked for (get, require, metadata), not at open."""
    from hetero_moe import gguf as G
    n = G.LAZY_ARRAY_MIN + 5
    path, tokens, scores = _with_vocab(tmp_path / "vocab.gguf", n)
    g = GGUFFile(path)
    assert isinstance(g._md["tokenizer.ggml.tokens"], G._LazyArray)     # not read at open
    assert g._md["test.small"] == [1, 2, 3]                               # small: read at open
    assert g.array_len("tokenizer.ggml.tokens") == n
    assert g.array_len("test.small") == 3 and g.array_len("general.architecture") is None
    assert g.get("tokenizer.ggml.tokens") == tokens
    assert g.require("tokenizer.ggml.scores", list) == scores
    assert isinstance(g._md["tokenizer.ggml.token_type"], G._LazyArray)   # one key at a time
    md = g.metadata
    assert md["tokenizer.ggml.token_type"] == [1] * n
    assert not any(isinstance(v, G._LazyArray) for v in md.values())
    g2 = GGUFFile(path)
    g2.close()                                     # the metadata outlives the maps
    assert g2.metadata["tokenizer.ggml.tokens"] == tokens


def test_truncated_large_array_fails_at_open(tmp_path):
    from hetero_moe import gguf as G
    path, tokens, _ = _with_vocab(tmp_path / "vocab.gguf", G.LAZY_ARRAY_MIN + 5)
    data = open(path, "rb").read()
    cut = data.index(tokens[G.LAZY_ARRAY_MIN].encode()) + 2       # inside a late token
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(GGUFFormatError, match="truncated or corrupt"):
        GGUFFile(bad)


def test_builtin_type_table_matches_gguf_constants():
    """The loader's own table of ggml type sizes agrees with gguf.constants (which it falls back
    to for ids it does not list)."""
    from hetero_moe import gguf as G
    ref = G._ggml_type_sizes()
    for tid, v in G._GGML_TYPES.items():
        assert ref.get(tid, v) == v, (tid, v, ref.get(tid))     # (an older gguf lacks new ids)
    sizes = G._TypeSizes()
    for tid, v in ref.items():
        assert sizes.get(tid) == v
    assert sizes.get(10_000) is None
