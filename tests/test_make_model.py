"""Random-weight test models: layout and metadata as llama.cpp expects, and llama.cpp loads and runs them."""
import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from hetero_moe.errors import HeteroMoEError, UnsupportedError
from hetero_moe.testing import make_model as mm

REPO = Path(__file__).resolve().parent.parent
TINY_CASES = [(arch, "tiny") for arch, spec in mm.ARCHES.items() if spec.mla_split is None] + \
    [("llama", "tiny-tied")]
DS_CASES = [("deepseek2", "tiny-lite"), ("deepseek2", "tiny-v3"), ("deepseek2-kvb", "tiny-lite")]
PROMPT = b"The quick brown fox jumps over the lazy dog."


# --- a fast GGUF header reader (gguf.GGUFReader takes seconds on the 100k tokenizer strings) -----------

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_header(path):
    """(metadata, {tensor name: (ggml type name, numpy-order shape, absolute data offset)}).

    String arrays come back as their length.
    """
    with open(path, "rb") as f:
        buf = f.read(64 << 20)
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        s = buf[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            it, n = take("I"), take("Q")
            if it == 8:
                for _ in range(n):
                    string()
                return n
            return [value(it) for _ in range(n)]
        return take(_SCALAR[t])

    magic, version, n_tensors, n_kv = take("4sIQQ")
    assert magic == b"GGUF" and version == 3
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        ttype, offset = take("I"), take("Q")
        infos.append((name, gguf.GGMLQuantizationType(ttype).name, tuple(reversed(dims)), offset))
    align = meta.get("general.alignment", 32)
    start = -(-pos // align) * align
    return meta, {n: (t, shape, start + off) for n, t, shape, off in infos}


def f32_tensor(path, name):
    _, tensors = read_header(path)
    ttype, shape, offset = tensors[name]
    assert ttype == "F32"
    return np.fromfile(path, dtype=np.float32, count=int(np.prod(shape)), offset=offset).reshape(shape)


# --- models, built once per session -----------------------------------------------------------------

@pytest.fixture(scope="session")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("test-models")
    made = {}

    def get(arch, preset="tiny", quant="Q4_K_M", layers=None):
        key = (arch, preset, quant, layers)
        if key not in made:
            made[key] = mm.make_test_model(arch, root / f"{arch}-{preset}-{quant}-{layers}.gguf",
                                           preset=preset, quant=quant, layers=layers, progress=False)
        return made[key]
    return get


def _llama_cpp():
    return pytest.importorskip("llama_cpp")


# The layout checks read the same files the llama.cpp tests run, when llama.cpp is there to make them.
LAYOUT_QUANT = "Q4_K_M" if importlib.util.find_spec("llama_cpp") else "F32"


# --- tables -----------------------------------------------------------------------------------------

def test_tensor_names_are_llama_cpp_names_for_each_arch():
    arch_by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    for arch, spec in mm.ARCHES.items():
        allowed = set(gguf.MODEL_TENSORS[arch_by_name[spec.gguf_arch]])
        for role in ("token_embd", "output_norm", "output") + spec.layer_roles:
            assert gguf.MODEL_TENSOR[mm.ROLES[role].tensor] in allowed, (arch, role)


def test_every_quantized_row_is_a_multiple_of_qk_k():
    """Except in the deepseek2 presets, whose real shapes make llama.cpp fall back (tested below)."""
    for preset, p in mm.PRESETS.items():
        if p.mla is not None:
            continue
        for arch in (p.only or mm.ARCHES):
            try:
                s = mm.resolve_shape(arch, preset)
            except UnsupportedError:
                continue
            for t in mm.tensor_plan(arch, s):
                if len(t.shape) >= 2:
                    assert t.shape[-1] % mm.QK_K == 0, (preset, arch, t.name, t.shape)


def test_a3b_shapes_match_qwen3_30b_a3b():
    s = mm.resolve_shape("qwen3moe", "qwen3moe-a3b")
    shapes = {t.name: t.shape for t in mm.tensor_plan("qwen3moe", s)}
    assert s.n_layer == 4
    assert shapes["blk.0.attn_q.weight"] == (4096, 2048)
    assert shapes["blk.0.attn_k.weight"] == (512, 2048)
    assert shapes["blk.0.attn_output.weight"] == (2048, 4096)
    assert shapes["blk.0.attn_q_norm.weight"] == (128,)
    assert shapes["blk.3.ffn_gate_exps.weight"] == (128, 768, 2048)
    assert shapes["blk.3.ffn_down_exps.weight"] == (128, 2048, 768)
    assert shapes["blk.0.ffn_gate_inp.weight"] == (128, 2048)
    # about 10.4 GB of F32 before quantizing
    assert 9e9 < mm.f32_size("qwen3moe", "qwen3moe-a3b") < 11e9


def test_v2_lite_shapes_match_deepseek_v2_lite():
    s = mm.resolve_shape("deepseek2", "deepseek-v2-lite")
    shapes = {t.name: t.shape for t in mm.tensor_plan("deepseek2", s)}
    assert s.n_layer == 4 and s.n_head_kv == 1
    assert shapes["blk.0.attn_q.weight"] == (16 * 192, 2048)
    assert shapes["blk.0.attn_kv_a_mqa.weight"] == (512 + 64, 2048)
    assert shapes["blk.0.attn_k_b.weight"] == (16, 512, 128)
    assert shapes["blk.0.attn_v_b.weight"] == (16, 128, 512)
    assert shapes["blk.0.attn_output.weight"] == (2048, 16 * 128)
    assert shapes["blk.0.ffn_gate.weight"] == (10944, 2048)
    assert "blk.0.ffn_gate_inp.weight" not in shapes
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, 1408, 2048)
    assert shapes["blk.3.ffn_down_exps.weight"] == (64, 2048, 1408)
    assert shapes["blk.1.ffn_up_shexp.weight"] == (2 * 1408, 2048)
    assert "blk.1.exp_probs_b.bias" not in shapes and "blk.1.attn_q_a.weight" not in shapes
    # about 8.1 GB of F32 before quantizing
    assert 7.5e9 < mm.f32_size("deepseek2", "deepseek-v2-lite") < 8.5e9


class _KeyRecorder:
    def __init__(self):
        self.keys = {}

    def __getattr__(self, name):
        if name.startswith("add_"):
            return lambda key, value: self.keys.__setitem__(key, value)
        raise AttributeError(name)


@pytest.mark.parametrize("layers,written", [(2, True), (26, False), (27, False), (28, True)])
def test_lite_q_lora_rank_key_as_llama_cpp_reads_it(layers, written):
    """llama.cpp reads q_lora_rank unless the block count says "lite" (26/27), so a tiny lite file
    states q_lora_rank = 0 instead, and a 26/27-block one leaves it out like the converter."""
    w = _KeyRecorder()
    s = mm.resolve_shape("deepseek2", "tiny-lite", layers=layers)
    mm._add_mla_metadata(w, lambda k: k.format(arch="deepseek2"), s, split=True)
    assert ("deepseek2.attention.q_lora_rank" in w.keys) == written
    assert w.keys.get("deepseek2.attention.q_lora_rank", 0) == 0
    assert w.keys["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)


# --- files without llama.cpp ------------------------------------------------------------------------

@pytest.mark.parametrize("arch,preset", TINY_CASES)
def test_file_layout_and_metadata(build, arch, preset):
    path = build(arch, preset, LAYOUT_QUANT)
    meta, tensors = read_header(path)
    spec, s = mm.ARCHES[arch], mm.resolve_shape(arch, preset)
    a = spec.gguf_arch
    plan = {t.name: t.shape for t in mm.tensor_plan(arch, s)}
    assert {n: shp for n, (_, shp, _) in tensors.items()} == plan
    assert all(t != "F64" for t, _, _ in tensors.values())   # NumPy 2 must not promote to float64
    assert meta["general.architecture"] == a
    assert meta[f"{a}.block_count"] == 2
    assert meta[f"{a}.embedding_length"] == 256
    assert meta[f"{a}.attention.head_count"] == 4
    assert meta[f"{a}.attention.head_count_kv"] == (4 if spec.mha_only else 2)
    assert meta["tokenizer.ggml.tokens"] == 49152
    assert meta["tokenizer.ggml.merges"] == 48900
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert "tokenizer.chat_template" in meta
    assert ("output.weight" in tensors) == (preset != "tiny-tied")
    if spec.moe:
        assert meta[f"{a}.expert_count"] == 8 and meta[f"{a}.expert_used_count"] == 2
        ff_key = f"{a}.{spec.expert_ff_key}"
        assert meta[ff_key] == 256
    else:
        assert f"{a}.expert_count" not in meta
        assert meta[f"{a}.feed_forward_length"] == 512
    if spec.shared_expert:
        assert meta[f"{a}.expert_shared_feed_forward_length"] == 256
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"][1] == (256,)
        assert tensors["blk.1.attn_q.bias"][1] == (256,)


@pytest.mark.parametrize("arch,preset", DS_CASES)
def test_deepseek2_layout_and_metadata(build, arch, preset):
    path = build(arch, preset, LAYOUT_QUANT)
    meta, tensors = read_header(path)
    spec, s = mm.ARCHES[arch], mm.resolve_shape(arch, preset)
    m, a = s.p.mla, "deepseek2"
    assert {n: shp for n, (_, shp, _) in tensors.items()} == \
        {t.name: t.shape for t in mm.tensor_plan(arch, s)}
    assert meta["general.architecture"] == a and meta[f"{a}.block_count"] == 2
    assert meta[f"{a}.attention.head_count_kv"] == (1 if spec.mla_split else 4)
    assert meta[f"{a}.attention.kv_lora_rank"] == 128
    assert meta[f"{a}.attention.q_lora_rank"] == m.q_lora
    assert meta[f"{a}.rope.dimension_count"] == 32
    if spec.mla_split:
        assert (meta[f"{a}.attention.key_length"], meta[f"{a}.attention.value_length"]) == (160, 128)
        assert (meta[f"{a}.attention.key_length_mla"], meta[f"{a}.attention.value_length_mla"]) == (96, 64)
        assert tensors["blk.0.attn_k_b.weight"][1] == (4, 128, 64)
    else:
        assert (meta[f"{a}.attention.key_length"], meta[f"{a}.attention.value_length"]) == (96, 64)
        assert f"{a}.attention.key_length_mla" not in meta
        assert tensors["blk.0.attn_kv_b.weight"][1] == (4 * (64 + 64), 128)
    assert meta[f"{a}.leading_dense_block_count"] == 1
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors
    assert meta[f"{a}.expert_gating_func"] == (2 if preset == "tiny-v3" else 1)
    assert ("blk.1.exp_probs_b.bias" in tensors) == (preset == "tiny-v3")
    assert (f"{a}.expert_group_count" in meta) == (preset == "tiny-v3")
    assert meta[f"{a}.expert_shared_count"] == m.n_shared
    assert meta[f"{a}.rope.scaling.type"] == "yarn"
    assert meta[f"{a}.rope.scaling.original_context_length"] == 4096


@pytest.mark.parametrize("arch,preset", DS_CASES)
def test_deepseek2_q4_k_m_fallback_types_are_all_supported(build, arch, preset):
    """Rows that are not a multiple of 256 get llama.cpp's fallback types; we read them all."""
    _llama_cpp()
    from hetero_moe import quant
    supported = {quant.type_name(t).split()[0] for t in quant.QUANT_TYPES}
    _, tensors = read_header(build(arch, preset))
    fallbacks = 0
    for name, (t, shape, _) in tensors.items():
        assert t in supported, (name, t)
        if len(shape) >= 2 and shape[-1] % mm.QK_K:
            assert not t.endswith("_K"), (name, t, shape)
            fallbacks += 1
    assert fallbacks >= 2   # k_b / v_b or kv_b rows are 64 / 128 long


def test_weight_values_and_scales(build):
    path = build("qwen2moe", "tiny", "F32")
    assert all(t == "F32" for t, _, _ in read_header(path)[1].values())
    plan = {t.name: t for t in mm.tensor_plan("qwen2moe", mm.resolve_shape("qwen2moe", "tiny"))}
    for name in ("blk.1.attn_v.bias", "blk.0.ffn_up_shexp.weight"):
        assert np.array_equal(f32_tensor(path, name), mm._init_tensor(plan[name], seed=0)), name
    norm = f32_tensor(path, "blk.0.attn_norm.weight")
    assert abs(norm.mean() - 1) < 0.02 and 0.02 < norm.std() < 0.1
    assert abs(f32_tensor(path, "token_embd.weight").std() - 1.0) < 0.01
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_shexp.weight"):
        w = f32_tensor(path, name)
        assert abs(w.std() * np.sqrt(w.shape[-1]) - 1.0) < 0.02, name
    out = f32_tensor(path, "output.weight")
    assert abs(out.std() * np.sqrt(256) - mm.LM_HEAD_GAIN) < 0.05


def test_weights_depend_on_name_and_seed_only():
    s1, s2 = mm.resolve_shape("qwen2moe", "tiny", layers=1), mm.resolve_shape("qwen2moe", "tiny")
    p1 = {t.name: t for t in mm.tensor_plan("qwen2moe", s1)}
    p2 = {t.name: t for t in mm.tensor_plan("qwen2moe", s2)}
    for name in ("blk.0.attn_k.bias", "blk.0.ffn_gate_inp_shexp.weight", "output_norm.weight"):
        a = mm._init_tensor(p1[name], seed=0)
        assert np.array_equal(a, mm._init_tensor(p2[name], seed=0)), name
        assert not np.array_equal(a, mm._init_tensor(p2[name], seed=1)), name
    assert not np.array_equal(mm._init_tensor(p2["blk.0.attn_k.bias"], 0),
                              mm._init_tensor(p2["blk.1.attn_k.bias"], 0))


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    made = []
    real = mm._init_tensor

    def init(t, seed):
        if len(made) == 5:
            raise KeyboardInterrupt
        made.append(t.name)
        return real(t, seed)
    monkeypatch.setattr(mm, "_init_tensor", init)
    with pytest.raises(KeyboardInterrupt):
        mm.make_test_model("llama", tmp_path / "x.gguf", layers=1, progress=False)
    assert len(made) == 5 and list(tmp_path.iterdir()) == []

    monkeypatch.setattr(mm, "_init_tensor", real)
    monkeypatch.setattr(mm, "_quantize", lambda *a, **k: (_ for _ in ()).throw(HeteroMoEError("no")))
    with pytest.raises(HeteroMoEError):
        mm.make_test_model("llama", tmp_path / "x.gguf", layers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cached_test_model_builds_once(tmp_path, monkeypatch):
    mm._tokenizer_kv()   # warm the in-process tokenizer copy before pointing the cache elsewhere
    monkeypatch.setenv("HETERO_MOE_CACHE", str(tmp_path))
    p1 = mm.cached_test_model("qwen3moe", quant="F32", layers=1, seed=3)
    assert p1.parent == tmp_path / "test-models"
    assert p1.name == f"qwen3moe-tiny-L1-F32-s3-v{mm.FORMAT_VERSION}.gguf"
    mtime = p1.stat().st_mtime_ns
    p2 = mm.cached_test_model("qwen3moe", quant="F32", layers=1, seed=3)
    assert p2 == p1 and p2.stat().st_mtime_ns == mtime
    assert mm.cache_name("qwen3moe", "tiny", "F32", None, 0).startswith("qwen3moe-tiny-L2-F32-s0-")
    assert [p.name for p in (tmp_path / "test-models").iterdir()] == [p1.name]


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="mixtral"), "unknown architecture 'mixtral'; choose one of: llama, llama-moe"),
    (dict(arch="llama", preset="huge"), "unknown preset 'huge'"),
    (dict(arch="llama", preset="qwen3moe-a3b"), "preset 'qwen3moe-a3b' is for qwen3moe, not 'llama'"),
    (dict(arch="qwen3moe", preset="tiny-tied"), "is for llama, qwen3, not 'qwen3moe'"),
    (dict(arch="llama", quant="Q4_K_X"), "unknown quant 'Q4_K_X'"),
    (dict(arch="llama", layers=0), "layers must be a positive integer, got 0"),
    (dict(arch="llama", seed=-1), "seed must be a non-negative integer, got -1"),
    (dict(arch="deepseek2"), "preset 'tiny' has no MLA dimensions"),
    (dict(arch="llama", preset="tiny-lite"), "preset 'tiny-lite' is for deepseek2, deepseek2-kvb"),
])
def test_clear_errors(tmp_path, kwargs, match):
    with pytest.raises(UnsupportedError, match=match):
        mm.make_test_model(out_path=tmp_path / "x.gguf", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert mm.main(["--arch", "llama-moe", "--out", str(out), "--quant", "F32", "--layers", "1"]) == 0
    assert out.exists() and str(out) in capsys.readouterr().out
    assert mm.main(["--arch", "llama", "--preset", "qwen3moe-a3b", "--out", str(out)]) == 2
    assert "error: preset 'qwen3moe-a3b' is for qwen3moe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mm.main(["--arch", "gpt2", "--out", str(out)])


def test_script_help():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_test_model.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--arch" in res.stdout and "qwen3moe-a3b" in res.stdout


# --- llama.cpp --------------------------------------------------------------------------------------

def expected_q4_k_m_type(name, arch, preset):
    """llama.cpp's Q4_K_M choice for the tiny shapes (src/llama-quant.cpp), 2 layers."""
    tied, moe8 = preset == "tiny-tied", mm.ARCHES[arch].moe   # all tiny MoE models have 8 experts
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    last = layer == 1                  # use_more_bits(i, 2) holds for the last layer only
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q6_K"
    if name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")):
        return "F32"                   # 1-D tensors and the router stay F32
    if name.endswith(("attn_k.weight", "attn_v.weight")) and moe8:
        return "Q8_0"                  # the 8-expert rule
    if name.endswith("attn_output.weight") and moe8:
        return "Q5_K"
    if name.endswith("attn_v.weight") or ".ffn_down" in name:
        return "Q6_K" if last else "Q4_K"
    return "Q4_K"


@pytest.mark.parametrize("arch,preset", TINY_CASES)
def test_q4_k_m_tensor_types(build, arch, preset):
    _llama_cpp()
    meta, tensors = read_header(build(arch, preset))
    assert meta["general.file_type"] == 15   # LLAMA_FTYPE_MOSTLY_Q4_K_M
    got = {n: t for n, (t, _, _) in tensors.items()}
    assert got == {n: expected_q4_k_m_type(n, arch, preset) for n in got}


def test_q8_0(build):
    _llama_cpp()
    meta, tensors = read_header(build("qwen2moe", "tiny", "Q8_0", layers=1))
    assert meta["general.file_type"] == mm.QUANT_FTYPES["Q8_0"]
    for name, (t, shape, _) in tensors.items():
        plain = len(shape) == 1 or name.endswith("ffn_gate_inp.weight")
        assert t == ("F32" if plain else "Q8_0"), name


def test_quant_names_match_llama_cpp_ftypes():
    llama_cpp = _llama_cpp()
    for name, ftype in mm.QUANT_FTYPES.items():
        want = llama_cpp.LLAMA_FTYPE_ALL_F32 if ftype is None else ftype
        assert getattr(llama_cpp, "LLAMA_FTYPE_" + ("ALL_F32" if ftype is None else "MOSTLY_" + name)) == want


@pytest.mark.parametrize("arch,preset", TINY_CASES + DS_CASES)
def test_llama_cpp_loads_and_logits_are_sharp(build, arch, preset):
    llama_cpp = _llama_cpp()
    path = build(arch, preset)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.n_vocab() == 49152
        tokens = llm.tokenize(PROMPT, add_bos=False)
        assert 5 <= len(tokens) < 20
        llm.eval(tokens)
        logits = np.array(llm.scores[:len(tokens)], dtype=np.float64)   # [T, V]
    finally:
        llm.close()
    assert np.isfinite(logits).all()
    assert (logits.std(axis=1) > 1.0).all()            # not flat
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    assert (margin > 1e-3).all(), margin               # no near-ties at the argmax
    assert len(set(logits.argmax(axis=1))) > 1         # the prediction depends on the input
