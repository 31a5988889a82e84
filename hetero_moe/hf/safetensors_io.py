"""Open `*.safetensors` shards memory-mapped: every tensor is a zero-copy numpy view of its bytes.

Format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data region (offsets relative to it).
BF16 has no numpy dtype, so views are raw bytes (uint8) and `dtype` says how to read them.
"""
from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GGUFFormatError

# safetensors dtype -> (bytes per element, numpy dtype or None when numpy has none)
DTYPES = {
    "F64": (8, np.float64), "F32": (4, np.float32), "F16": (2, np.float16), "BF16": (2, None),
    "I64": (8, np.int64), "I32": (4, np.int32), "I16": (2, np.int16), "I8": (1, np.int8),
    "U8": (1, np.uint8), "BOOL": (1, np.bool_),
}
MAX_HEADER = 100 << 20


@dataclass
class STensor:
    """One tensor of a shard: torch-order shape, its dtype name and a uint8 view of its bytes."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int                   # absolute byte offset in the shard
    path: str
    data: np.ndarray = field(repr=False)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def array(self) -> np.ndarray:
        """The tensor as a numpy array of its own dtype (a view; BF16 is uint16 bits)."""
        np_dt = DTYPES[self.dtype][1] or np.uint16
        return self.data.view(np_dt).reshape(self.shape) if self.data.ctypes.data % \
            np.dtype(np_dt).itemsize == 0 else self.data.copy().view(np_dt).reshape(self.shape)


class Shard:
    """One `.safetensors` file, mapped read-only (the `_parts` entry of an HF checkpoint)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors shard not found: {self.path}") from None
        try:
            self.size = os.fstat(fd).st_size
            if self.size < 8:
                raise GGUFFormatError(f"{self.path}: {self.size} bytes, too small for a "
                                      f"safetensors header (8 bytes)")
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        n = int.from_bytes(self.mm[:8], "little")
        if not 2 <= n <= min(MAX_HEADER, self.size - 8):
            raise GGUFFormatError(f"{self.path}: safetensors header length {n} is impossible for a "
                                  f"{self.size}-byte file (limit {MAX_HEADER})")
        try:
            header = json.loads(bytes(self.mm[8:8 + n]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GGUFFormatError(f"{self.path}: safetensors header is not valid JSON ({e})") \
                from None
        if not isinstance(header, dict):
            raise GGUFFormatError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        start = 8 + n
        self.tensors: dict[str, STensor] = {}
        for name, info in header.items():
            self.tensors[name] = self._tensor(name, info, start)

    def _tensor(self, name: str, info, start: int) -> STensor:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise GGUFFormatError(f"{where}: header entry is not an object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in DTYPES:
            raise GGUFFormatError(f"{where}: dtype {dt!r} is not supported "
                                  f"(supported: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise GGUFFormatError(f"{where}: shape {shape!r} is not a list of non-negative ints")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise GGUFFormatError(f"{where}: data_offsets {offs!r} are invalid")
        n_el = 1
        for d in shape:
            n_el *= d
        nbytes = n_el * DTYPES[dt][0]
        if offs[1] - offs[0] != nbytes:
            raise GGUFFormatError(f"{where}: {dt} {shape} needs {nbytes} bytes, data_offsets "
                                  f"span {offs[1] - offs[0]}")
        if start + offs[1] > self.size:
            raise GGUFFormatError(f"{where}: data ends at byte {start + offs[1]}, past the end of "
                                  f"the file ({self.size} bytes); the shard is truncated")
        view = np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=start + offs[0])
        return STensor(name, dt, tuple(shape), start + offs[0], self.path, view)


def open_shards(folder: Path) -> tuple[list[Shard], dict[str, STensor]]:
    """All shards of a checkpoint folder (through model.safetensors.index.json when present) and
    every tensor by name; a shard the index names but the folder lacks is an error naming it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GGUFFormatError(f"{index}: no valid 'weight_map' ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) missing from {folder}: "
                                    f"{', '.join(missing)}")
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = None
        if not names:
            raise FileNotFoundError(f"{folder}: no *.safetensors files and no "
                                    f"model.safetensors.index.json")
    shards = [Shard(folder / n) for n in names]
    tensors: dict[str, STensor] = {}
    for s in shards:
        for name, t in s.tensors.items():
            if name in tensors:
                raise GGUFFormatError(f"{s.path}: tensor {name!r} also appears in "
                                      f"{tensors[name].path}")
            tensors[name] = t
    if weight_map is not None:
        for name, shard in weight_map.items():
            t = tensors.get(name)
            if t is None or Path(t.path).name != shard:
                raise GGUFFormatError(f"{index}: tensor {name!r} should be in {shard}, but "
                                      f"{'is in ' + t.path if t else 'no shard holds it'}")
    return shards, tensors
