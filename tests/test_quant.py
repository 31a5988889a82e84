"""Quant table and torch dequantizers, bit-exact against gguf's numpy reference (`gguf.quants`).

Three layers: random blocks for every type, real blocks from SmolLM2 and from llama.cpp's own
quantizer run on it, and the error cases.
"""
from __future__ import annotations

import ctypes
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as ref_dequantize

from hetero_moe.errors import GGUFFormatError, UnsupportedError
from hetero_moe.quant import (QUANT_TYPES, QuantType, dequantize, dequantize_rows, quant_type,
                              row_bytes, set_kernels, type_name)

TYPES = sorted(QUANT_TYPES)
NAMES = [QUANT_TYPES[t].name for t in TYPES]
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
LEGACY = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}

# Byte offsets of the f16 scale fields inside each block; random bytes there would give NaN/inf.
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "IQ4_NL": [0], "IQ4_XS": [0],
}
F32_FIELDS = {"Q8_K": [0]}

# llama.cpp output types requantized from SmolLM2 (hidden 576 is not a multiple of 256, so some
# tensors fall back to other types: more coverage). The Q2_K and Q3_K_M mixtures bump every
# 256-wide tensor to a bigger type, so Q2_K / Q3_K only appear with `pure` (one type for all
# tensors that allow it).
FTYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q2_K-pure", "Q3_K_M-pure"]


def sane_scales(rng, n: int, dtype) -> np.ndarray:
    """Finite scales over many magnitudes, both signs, a few exact zeros."""
    x = rng.uniform(0.5, 1.0, n) * np.exp2(rng.integers(-20, 6, n)) * rng.choice([-1.0, 1.0], n)
    x[rng.random(n) < 0.05] = 0.0
    return x.astype(dtype)


def random_blocks(qt: QuantType, n_blocks: int, rng) -> np.ndarray:
    """uint8 [n_blocks, type_size] of random bits, scale fields forced finite."""
    if qt.block_size == 1:  # float types: random finite values
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.float32}[qt.name]
        x = sane_scales(rng, n_blocks, dtype) * rng.standard_normal(n_blocks).astype(dtype)
        if qt.name == "BF16":  # keep the top half of each f32
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
        return x.view(np.uint8).reshape(n_blocks, qt.type_size)
    b = rng.integers(0, 256, (n_blocks, qt.type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(qt.name, []):
        b[:, off:off + 2] = sane_scales(rng, n_blocks, np.float16).view(np.uint8).reshape(-1, 2)
    for off in F32_FIELDS.get(qt.name, []):
        b[:, off:off + 4] = sane_scales(rng, n_blocks, np.float32).view(np.uint8).reshape(-1, 4)
    return b


def reference(rows: np.ndarray, ggml_type: int) -> np.ndarray:
    """gguf's numpy dequantizer on uint8 [n_rows, row_bytes]; Q8_K (absent there) from its spec."""
    rows = np.ascontiguousarray(rows).view(np.uint8)
    if QUANT_TYPES[ggml_type].name == "Q8_K":
        blocks = rows.reshape(-1, 292)
        d = blocks[:, 0:4].copy().view(np.float32)
        q = blocks[:, 4:260].view(np.int8).astype(np.float32)
        return (d * q).reshape(rows.shape[0], -1)
    return ref_dequantize(rows, GGMLQuantizationType(ggml_type))


def assert_bit_exact(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == ref.shape
    ours = ours.contiguous().numpy()
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    assert not np.isnan(ref).any()
    diff = ours.view(np.uint32) != ref.view(np.uint32)
    if diff.any():
        i = np.flatnonzero(diff.ravel())[:5]
        pytest.fail(f"{diff.sum()} of {diff.size} values differ, e.g. at {i.tolist()}: "
                    f"ours {ours.ravel()[i].tolist()} vs ref {ref.ravel()[i].tolist()}")


# ---- the table -------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES)
def test_table_row_matches_gguf(ggml_type):
    qt = QUANT_TYPES[ggml_type]
    assert qt.ggml_type == ggml_type
    assert GGMLQuantizationType(ggml_type).name == qt.name
    assert GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)] == (qt.block_size, qt.type_size)
    # ggml's vec_dot_type: IQ4_XS pairs with Q8_K, IQ4_NL with Q8_0
    want_act = ("q8_K" if qt.name in K_QUANTS | {"IQ4_XS"} else
                "q8_0" if qt.name in LEGACY | {"IQ4_NL"} else None)
    assert qt.act_type == want_act
    assert quant_type(ggml_type) is qt
    assert row_bytes(ggml_type, 3 * qt.block_size) == 3 * qt.type_size


def test_table_covers_required_types():
    required = {"F32", "F16", "BF16"} | LEGACY | K_QUANTS
    assert required <= set(NAMES)


def test_set_kernels_fills_slots(monkeypatch):
    gt = int(GGMLQuantizationType.Q4_K)
    monkeypatch.setitem(QUANT_TYPES, gt, QUANT_TYPES[gt])  # restored after the test
    marker = object()
    gpu_before = QUANT_TYPES[gt].gpu_kernel     # None, or the Triton kernels once registered
    row = set_kernels(gt, cpu_kernel=marker)
    assert QUANT_TYPES[gt] is row and row.cpu_kernel is marker and row.gpu_kernel is gpu_before
    assert row.dequantize is QUANT_TYPES[gt].dequantize


# ---- random blocks ---------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES)
def test_random_blocks_bit_exact(ggml_type):
    qt = QUANT_TYPES[ggml_type]
    rng = np.random.default_rng(ggml_type)
    n_rows, blocks_per_row = 32, (3 if qt.block_size > 1 else 96)
    blocks = random_blocks(qt, n_rows * blocks_per_row, rng)
    rows = blocks.reshape(n_rows, -1)
    rows.flags.writeable = False  # like a read-only mmap: must be read without a warning
    ref = reference(rows, ggml_type)
    shape = (n_rows, blocks_per_row * qt.block_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dequantize(rows, ggml_type, shape)
    assert_bit_exact(ours, ref)
    assert not ours.isnan().any()
    ours.add_(1)  # the result is ours to write; the input is untouched
    assert np.array_equal(rows, blocks.reshape(n_rows, -1))


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_every_16_bit_pattern(name):
    """All 65536 values, subnormals and infinities included, match bit for bit. NaNs stay NaN;
    torch (like x86 F16C) quiets signaling f16 NaNs where numpy keeps the payload bit as is."""
    gt = int(GGMLQuantizationType[name])
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(1, -1)
    ours, ref = dequantize(raw, gt, (1, 1 << 16)).numpy(), reference(raw, gt)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES)
def test_input_kinds_and_row_slices(ggml_type):
    """numpy / bytes / memoryview / torch inputs agree; row slices match the whole; 3-D shapes."""
    qt = QUANT_TYPES[ggml_type]
    rng = np.random.default_rng(1000 + ggml_type)
    n_cols = 2 * qt.block_size if qt.block_size > 1 else 64
    shape = (3, 4, n_cols)  # e.g. [n_expert, n_ff, n_embd]
    raw = random_blocks(qt, 12 * n_cols // qt.block_size, rng).reshape(-1)
    whole = dequantize(raw, ggml_type, shape)
    assert_bit_exact(whole.view(12, n_cols), reference(raw.reshape(12, -1), ggml_type))
    for other in (raw.tobytes(), memoryview(raw), torch.from_numpy(raw.copy())):
        assert torch.equal(dequantize(other, ggml_type, shape), whole)
    # one expert, and an odd row range not starting at the first row
    assert torch.equal(dequantize_rows(raw, ggml_type, n_cols, 4, 8), whole[1])
    assert torch.equal(dequantize_rows(memoryview(raw), ggml_type, n_cols, 3, 10),
                       whole.view(12, n_cols)[3:10])
    assert dequantize_rows(raw, ggml_type, n_cols, 5, 5).shape == (0, n_cols)


@pytest.mark.parametrize("ggml_type", TYPES, ids=NAMES)
def test_misaligned_input(ggml_type):
    """Bytes at an odd address (e.g. a slice of a bigger buffer) still decode exactly."""
    qt = QUANT_TYPES[ggml_type]
    rng = np.random.default_rng(2000 + ggml_type)
    n_cols = qt.block_size * (2 if qt.block_size > 1 else 32)
    raw = random_blocks(qt, 2 * n_cols // qt.block_size, rng).reshape(-1)
    buf = np.zeros(raw.size + 1, dtype=np.uint8)
    buf[1:] = raw
    ours = dequantize(buf[1:], ggml_type, (2, n_cols))
    assert_bit_exact(ours, reference(raw.reshape(2, -1), ggml_type))


# ---- real blocks from real files -------------------------------------------------------------

def _write_slim(reader, dst, n_layers: int = 4) -> None:
    """Copy a GGUF keeping its first `n_layers` blocks and dropping the tokenizer arrays: the same
    tensor bytes and hyperparameters, but llama.cpp quantizes it in a fraction of the time and
    GGUFReader parses it in milliseconds (parsing ~100k vocab strings takes seconds)."""
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        if key == f"{arch}.block_count":
            w.add_uint32(key, n_layers)
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    if "tokenizer.ggml.tokens" in reader.fields and f"{arch}.vocab_size" not in reader.fields:
        w.add_uint32(f"{arch}.vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data))
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layers:
            continue
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def quant_models(tmp_path_factory):
    """name -> GGUFReader: SmolLM2 as shipped ("Q4_1-orig"), or its first layers requantized by
    llama.cpp (see _write_slim), made on first request."""
    readers = {}
    out_dir = tmp_path_factory.mktemp("quant_models")

    def get(name: str):
        if name in readers:
            return readers[name]
        if name == "Q4_1-orig":
            from hetero_moe.assets import smollm2_path
            readers[name] = gguf.GGUFReader(str(smollm2_path()))
            return readers[name]
        llama_cpp = pytest.importorskip("llama_cpp")
        slim = out_dir / "smollm2-slim.gguf"
        if not slim.exists():
            _write_slim(get("Q4_1-orig"), slim)
        dst = out_dir / f"smollm2-{name}.gguf"
        ftype, _, variant = name.partition("-")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.allow_requantize = True
        params.pure = variant == "pure"
        rc = llama_cpp.llama_model_quantize(str(slim).encode(), str(dst).encode(),
                                            ctypes.byref(params))
        assert rc == 0 and dst.exists(), f"llama_model_quantize to {name} failed (rc={rc})"
        readers[name] = gguf.GGUFReader(str(dst))
        return readers[name]
    return get


def _sample_rows(n_rows: int) -> list[tuple[int, int]]:
    """A few row ranges spread over the tensor: start, middle, end."""
    k = min(n_rows, 24)
    mid = (n_rows - k) // 2
    return sorted({(0, k), (mid, mid + k), (n_rows - k, n_rows)})


def check_file(reader) -> set[str]:
    """Compare every tensor type in the file against gguf's numpy; returns the type names seen."""
    path = reader.data.filename
    by_type: dict[int, list] = {}
    for t in reader.tensors:
        by_type.setdefault(int(t.tensor_type), []).append(t)
    seen = set()
    for gt, tensors in by_type.items():
        if gt not in QUANT_TYPES:  # a fallback type outside the table must fail clearly
            with pytest.raises(UnsupportedError, match=GGMLQuantizationType(gt).name):
                quant_type(gt, tensor=tensors[0].name, file=str(path))
            seen.add(f"({GGMLQuantizationType(gt).name}: unsupported)")
            continue
        seen.add(QUANT_TYPES[gt].name)
        # one tensor per distinct shape of each type
        for t in {tuple(x.shape.tolist()): x for x in tensors}.values():
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # torch order
            n_cols = shape[-1]
            raw = t.data.reshape(-1).view(np.uint8)
            rb = row_bytes(gt, n_cols)
            assert raw.size == t.n_bytes == rb * (t.n_elements // n_cols)
            rows = raw.reshape(-1, rb)
            if t.n_elements <= 1 << 18:
                assert_bit_exact(dequantize(t.data, gt, shape).reshape(-1, n_cols),
                                 reference(rows, gt))
            else:  # big tensors: a few row ranges (and dequantize_rows on the whole mmap)
                for r0, r1 in _sample_rows(rows.shape[0]):
                    assert_bit_exact(dequantize_rows(raw, gt, n_cols, r0, r1),
                                     reference(rows[r0:r1], gt))
    return seen


@pytest.fixture(scope="session")
def seen_types():
    return {}


@pytest.mark.parametrize("name", ["Q4_1-orig"] + [pytest.param(f, marks=pytest.mark.llama)
                                                    for f in FTYPES])
def test_real_file_bit_exact(name, quant_models, seen_types):
    seen_types[name] = check_file(quant_models(name))
    print(f"{name}: {sorted(seen_types[name])}")


@pytest.mark.llama
def test_real_files_cover_every_quant_type(quant_models, seen_types):
    for name in ["Q4_1-orig"] + FTYPES:
        if name not in seen_types:
            seen_types[name] = check_file(quant_models(name))
    seen = set().union(*seen_types.values())
    print("types seen in real files:", sorted(seen))
    assert ({"F32"} | LEGACY | K_QUANTS) <= seen


# ---- errors ----------------------------------------------------------------------------------

def test_unsupported_type_names_type_tensor_file():
    with pytest.raises(UnsupportedError) as e:
        quant_type(28, tensor="blk.0.ffn_up.weight", file="model.gguf")
    msg = str(e.value)
    assert "F64 (type 28)" in msg and "blk.0.ffn_up.weight" in msg and "model.gguf" in msg
    assert "Q4_K" in msg and "Q8_0" in msg  # lists what is supported
    with pytest.raises(UnsupportedError, match=r"unknown \(type 999\)"):
        quant_type(999)
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), 16, (256,))
    with pytest.raises(UnsupportedError, match="F64"):
        row_bytes(28, 4)
    assert type_name(12) == "Q4_K (type 12)"


def test_wrong_byte_count_names_both():
    gt = int(GGMLQuantizationType.Q4_K)
    with pytest.raises(GGUFFormatError, match=r"needs 288 bytes, got 287"):
        dequantize(np.zeros(287, np.uint8), gt, (2, 256))
    with pytest.raises(GGUFFormatError, match=r"needs 288 bytes, got 432"):
        dequantize(np.zeros(432, np.uint8), gt, (2, 256))
    with pytest.raises(GGUFFormatError, match=r"needs 8 bytes, got 6"):
        dequantize(b"\0" * 6, int(GGMLQuantizationType.F32), (2,))
    with pytest.raises(GGUFFormatError, match="not a whole number"):
        dequantize_rows(np.zeros(200, np.uint8), gt, 256, 0, 1)


def test_columns_not_multiple_of_block():
    with pytest.raises(GGUFFormatError, match=r"multiple of 256.*576"):
        row_bytes(int(GGMLQuantizationType.Q4_K), 576)
    with pytest.raises(GGUFFormatError, match=r"multiple of 32.*40"):
        dequantize(np.zeros(40, np.uint8), int(GGMLQuantizationType.Q8_0), (1, 40))
    with pytest.raises(GGUFFormatError, match=r"multiple of 32"):
        dequantize_rows(np.zeros(34, np.uint8), int(GGMLQuantizationType.Q8_0), 16, 0, 1)


def test_row_range_out_of_bounds():
    gt = int(GGMLQuantizationType.Q8_0)
    raw = np.zeros(4 * 34, np.uint8)
    with pytest.raises(GGUFFormatError, match=r"rows \[2, 5\).*4 rows"):
        dequantize_rows(raw, gt, 32, 2, 5)
    with pytest.raises(GGUFFormatError):
        dequantize_rows(raw, gt, 32, 3, 2)
