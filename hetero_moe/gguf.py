"""Open GGUF files (single or split), memory-mapped, with zero-copy tensor views.

The parser is strict: every read is bounds-checked against the file size, counts are checked
against what the file could possibly hold, and every failure is a GGUFFormatError that names the
file, the key or tensor, the value and the limit.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import GGUFFormatError, MissingKeyError, UnsupportedError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF metadata value types: id -> (name, struct format or None for variable size)
_VALUE_TYPES = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "<Q"), 11: ("int64", "<q"),
    12: ("float64", "<d"),
}
_NUMPY_OF = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
             6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# arrays of at least this many elements (the vocabulary, its scores, types and merges) are read
# into Python values on first use: a model driven by token ids never builds them (for a 150k
# vocabulary ~30 MiB of str/float objects, ~10 MiB for 50k)
LAZY_ARRAY_MIN = 1024


# ggml type id -> (name, block size, bytes per block), as gguf.constants has them (a test checks
# that they agree). A type id not listed here is looked up there: importing it brings in the
# whole gguf package (reader, writer, yaml: ~3 MiB of memory and 0.2 s), which a load otherwise
# does without.
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}


def _ggml_type_sizes() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), for every type ggml defines
    (gguf.constants' table)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    return {int(t): (t.name, bs, ts) for t, (bs, ts) in GGML_QUANT_SIZES.items()
            if isinstance(t, GGMLQuantizationType)}


class _TypeSizes:
    """_GGML_TYPES, then gguf.constants' table for ids it lacks (read once, when first needed)."""

    def __init__(self):
        self._all: dict[int, tuple[str, int, int]] | None = None

    def get(self, ttype: int) -> tuple[str, int, int] | None:
        v = _GGML_TYPES.get(ttype)
        if v is None:
            if self._all is None:
                self._all = _ggml_type_sizes()
            v = self._all.get(ttype)
        return v


@dataclass
class TensorInfo:
    """One tensor of a GGUF file. `shape` is torch order (reversed ggml `ne`)."""
    name: str
    ne: tuple[int, ...]          # ggml order: ne[0] is the contiguous dimension
    ggml_type: int
    type_name: str
    offset: int                  # absolute byte offset in its file
    nbytes: int
    path: str
    data: np.ndarray = field(repr=False)   # uint8 [nbytes], read-only view into the mmap

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


class _Reader:
    """Bounds-checked little-endian reader over a buffer."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(
                f"{self.path}: truncated or corrupt file: reading {what} needs {n} bytes at offset "
                f"{self.pos}, but the file is {self.size} bytes")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp keeps invalid UTF-8 in vocab strings as raw bytes; do the same, losslessly
            return raw.decode("utf-8", errors="surrogateescape")


def _read_value(r: _Reader, vtype: int, key: str, depth: int = 0, lazy: bool = False):
    if vtype not in _VALUE_TYPES:
        raise GGUFFormatError(f"{r.path}: key {key!r} has unknown value type {vtype} "
                              f"(valid: 0..12)")
    name, fmt = _VALUE_TYPES[vtype]
    if fmt is not None:
        return r.unpack(fmt, f"value of key {key!r}")
    if vtype == 8:
        return r.string(f"string value of key {key!r}")
    # array
    if depth > 0:
        raise GGUFFormatError(f"{r.path}: key {key!r} holds a nested array, which GGUF does not allow")
    etype = r.unpack("<I", f"array type of key {key!r}")
    count = r.unpack("<Q", f"array length of key {key!r}")
    if etype not in _VALUE_TYPES or etype == 9:
        raise GGUFFormatError(f"{r.path}: key {key!r} is an array of unknown/invalid type {etype}")
    efmt = _VALUE_TYPES[etype][1]
    min_elem = struct.calcsize(efmt) if efmt else 8
    if count * min_elem > r.size - r.pos:
        raise GGUFFormatError(
            f"{r.path}: key {key!r} claims {count} array elements, more than the "
            f"{r.size - r.pos} bytes left in the file can hold")
    if count >= LAZY_ARRAY_MIN and lazy:
        start = r.pos
        _skip_array(r, etype, count, key)     # bounds-checked now, so a bad file fails at open
        return _LazyArray(r.buf, r.path, key, etype, count, start)
    return _array_values(r, etype, count, key)


def _array_values(r: _Reader, etype: int, count: int, key: str) -> list:
    efmt = _VALUE_TYPES[etype][1]
    if efmt is not None:
        n = count * struct.calcsize(efmt)
        r.need(n, f"array of key {key!r}")
        arr = np.frombuffer(r.buf, dtype=_NUMPY_OF[etype], count=count, offset=r.pos)
        r.pos += n
        return arr.tolist()
    return [r.string(f"element {i} of key {key!r}") for i in range(count)]


def _skip_array(r: _Reader, etype: int, count: int, key: str) -> None:
    """Move past an array with the checks reading it makes (bar decoding)."""
    efmt = _VALUE_TYPES[etype][1]
    if efmt is not None:
        n = count * struct.calcsize(efmt)
        r.need(n, f"array of key {key!r}")
        r.pos += n
        return
    buf, size, unpack = r.buf, r.size, struct.Struct("<Q").unpack_from
    pos = r.pos
    for i in range(count):
        if pos + 8 > size:
            r.pos = pos
            r.need(8, f"length of element {i} of key {key!r}")
        n = unpack(buf, pos)[0]
        pos += 8
        if pos + n > size:
            r.pos = pos
            r.need(n, f"element {i} of key {key!r}")
        pos += n
    r.pos = pos


class _LazyArray:
    """A large metadata array not yet read into Python values (GGUFFile reads it on first use)."""

    __slots__ = ("buf", "path", "key", "etype", "count", "pos", "header_end")

    def __init__(self, buf, path: str, key: str, etype: int, count: int, pos: int):
        self.buf, self.path, self.key = buf, path, key
        self.etype, self.count, self.pos = etype, count, pos
        self.header_end = 0       # the header's whole pages end here (dropped again after a read)

    def __len__(self) -> int:
        return self.count

    def read(self) -> list:
        r = _Reader(self.buf, self.path)
        r.pos = self.pos
        out = _array_values(r, self.etype, self.count, self.key)
        _drop_pages(self.buf, self.pos, min(r.pos, self.header_end))
        return out


def _drop_pages(mm, a: int, b: int) -> None:
    """Let the mapped pages of header bytes [a, b) go from this process (they stay in the page
    cache); b is page-aligned or the header's end."""
    a = a // mmap.PAGESIZE * mmap.PAGESIZE
    if b > a and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):
            pass


def split_paths(path: str | os.PathLike) -> list[Path]:
    """All files of a split model given any one of them (a single file maps to itself)."""
    p = Path(path)
    m = _SPLIT_RE.match(p.name)
    if not m:
        return [p]
    count = int(m.group("count"))
    if count < 1:
        raise GGUFFormatError(f"{p}: split file name says 0 parts")
    paths = [p.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf")
             for i in range(1, count + 1)]
    missing = [str(q) for q in paths if not q.exists()]
    if missing:
        raise GGUFFormatError(f"{p}: split model of {count} files is missing: {', '.join(missing)}")
    return paths


class _GGUFPart:
    """One physical GGUF file: header, metadata, tensor infos, mmap."""

    def __init__(self, path: Path, type_sizes: _TypeSizes):
        self.path = str(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"model file not found: {self.path}") from None
        except IsADirectoryError:
            raise GGUFFormatError(f"{self.path}: is a directory, not a GGUF file") from None
        try:
            size = os.fstat(fd).st_size
            if size < 24:
                raise GGUFFormatError(f"{self.path}: file is {size} bytes, too small for a GGUF "
                                      f"header (24 bytes)")
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.size = size
        r = _Reader(self.mm, self.path)
        magic = bytes(self.mm[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {magic!r}, expected "
                                  f"{GGUF_MAGIC!r})")
        r.pos = 4
        self.version = r.unpack("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"{self.path}: GGUF version {self.version} is not supported "
                                  f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        n_tensors = r.unpack("<Q", "tensor count")
        n_kv = r.unpack("<Q", "metadata count")
        # a key needs >= 8 (len) + 1 + 4 (type) + 1 bytes; a tensor info >= 8 + 1 + 4 + 8 + 4 + 8
        if n_kv * 14 > size:
            raise GGUFFormatError(f"{self.path}: header claims {n_kv} metadata keys, impossible "
                                  f"in a {size}-byte file")
        if n_tensors * 33 > size:
            raise GGUFFormatError(f"{self.path}: header claims {n_tensors} tensors, impossible "
                                  f"in a {size}-byte file")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}
        for i in range(n_kv):
            key = r.string(f"metadata key #{i}")
            vtype = r.unpack("<I", f"value type of key {key!r}")
            if key in self.metadata:
                raise GGUFFormatError(f"{self.path}: duplicate metadata key {key!r}")
            self.metadata[key] = _read_value(r, vtype, key, lazy=True)
            self.value_types[key] = vtype
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{self.path}: general.alignment = {alignment!r} is not a "
                                  f"positive power of two")
        infos = []
        for i in range(n_tensors):
            name = r.string(f"name of tensor #{i}")
            n_dims = r.unpack("<I", f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions "
                                      f"(allowed 1..{MAX_DIMS})")
            ne = tuple(r.unpack("<Q", f"shape of tensor {name!r}") for _ in range(n_dims))
            ttype = r.unpack("<I", f"type of tensor {name!r}")
            off = r.unpack("<Q", f"data offset of tensor {name!r}")
            infos.append((name, ne, ttype, off))
        data_start = (r.pos + alignment - 1) // alignment * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ttype, off in infos:
            if name in self.tensors:
                raise GGUFFormatError(f"{self.path}: duplicate tensor name {name!r}")
            sizes = type_sizes.get(ttype)
            if sizes is None:
                raise UnsupportedError(f"{self.path}: tensor {name!r} has unknown ggml type id "
                                       f"{ttype}")
            tname, bs, ts = sizes
            if any(d == 0 for d in ne) or any(d > (1 << 40) for d in ne):
                raise GGUFFormatError(f"{self.path}: tensor {name!r} has invalid shape {list(ne)}")
            if ne[0] % bs:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} of type {tname} has a row of "
                                      f"{ne[0]} elements, not a multiple of its block size {bs}")
            n_el = 1
            for d in ne:
                n_el *= d
            nbytes = n_el // bs * ts
            if off % alignment:
                raise GGUFFormatError(f"{self.path}: tensor {name!r} data offset {off} is not "
                                      f"aligned to {alignment}")
            start = data_start + off
            if start + nbytes > size:
                raise GGUFFormatError(
                    f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) runs past the "
                    f"end of the file ({size} bytes); the file is truncated or corrupt")
            view = np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=start)
            self.tensors[name] = TensorInfo(name, ne, ttype, tname, start, nbytes, self.path, view)
        # the header (metadata, vocabulary) is parsed: let its pages go from this process
        # (they stay in the page cache); tensor data starts at data_start or later
        header = data_start // mmap.PAGESIZE * mmap.PAGESIZE
        _drop_pages(self.mm, 0, header)
        for v in self.metadata.values():
            if isinstance(v, _LazyArray):
                v.header_end = header


class GGUFFile:
    """A GGUF model: one file or all parts of a split model, opened from any part.

    Attributes:
        paths: the files, in split order.
        metadata: key -> plain Python value (str, int, float, bool, or list of those). Arrays
            of LAZY_ARRAY_MIN or more elements are read from the file when first used: through
            get()/require() one key at a time, through `metadata` all at once.
        tensors: name -> TensorInfo, across all parts.
    """

    _lazy = False              # whether _md may still hold unread arrays

    def __init__(self, path: str | os.PathLike):
        type_sizes = _TypeSizes()
        self.paths = split_paths(path)
        parts = [_GGUFPart(p, type_sizes) for p in self.paths]
        self._parts = parts
        self._md = dict(parts[0].metadata)
        self._lazy = True
        self.value_types = dict(parts[0].value_types)
        self.version = parts[0].version
        n_split = self._md.get("split.count", 1)
        if len(parts) > 1 or n_split != 1:
            if n_split != len(parts):
                raise GGUFFormatError(f"{self.paths[0]}: split.count = {n_split} but "
                                      f"{len(parts)} split files were found")
            for i, part in enumerate(parts):
                no = part.metadata.get("split.no")
                if no != i:
                    raise GGUFFormatError(f"{part.path}: split.no = {no!r}, expected {i}")
        self.tensors: dict[str, TensorInfo] = {}
        for part in parts:
            for name, t in part.tensors.items():
                if name in self.tensors:
                    raise GGUFFormatError(f"{part.path}: tensor {name!r} also appears in "
                                          f"{self.tensors[name].path}")
                self.tensors[name] = t
        want = self._md.get("split.tensors.count")
        if want is not None and want != len(self.tensors):
            raise GGUFFormatError(f"{self.paths[0]}: split.tensors.count = {want} but the parts "
                                  f"hold {len(self.tensors)} tensors")

    @property
    def metadata(self) -> dict[str, Any]:
        self._read_arrays()
        return self._md

    @metadata.setter
    def metadata(self, md: dict[str, Any]) -> None:
        self._md, self._lazy = md, False

    def _read_arrays(self) -> None:
        if self._lazy:
            for k, v in list(self._md.items()):
                if isinstance(v, _LazyArray):
                    self._md[k] = v.read()
            self._lazy = False

    def _value(self, key: str):
        v = self._md[key]
        if isinstance(v, _LazyArray):
            v = self._md[key] = v.read()
        return v

    def array_len(self, key: str) -> int | None:
        """Length of the array under `key` without reading it (None: absent or not an array)."""
        v = self._md.get(key)
        return len(v) if isinstance(v, (list, _LazyArray)) else None

    @property
    def path(self) -> str:
        return str(self.paths[0])

    @property
    def file_size(self) -> int:
        return sum(p.size for p in self._parts)

    @property
    def architecture(self) -> str:
        return self.require("general.architecture", str)

    def require(self, key: str, kind: type | tuple = (int, float, str, bool, list)):
        """Metadata value for `key`, checked to be of `kind`; MissingKeyError names the key."""
        if key not in self._md:
            raise MissingKeyError(f"{self.path}: required metadata key {key!r} is missing")
        v = self._value(key)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is int and isinstance(v, bool):
            raise MissingKeyError(f"{self.path}: key {key!r} = {v!r} should be an integer")
        if not isinstance(v, kind):
            want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise MissingKeyError(f"{self.path}: key {key!r} = {v!r} should be of type {want}")
        return v

    def get(self, key: str, default=None, kind: type | tuple | None = None):
        """Metadata value for `key` or `default`; type-checked like `require` when present."""
        if key not in self._md:
            return default
        return self.require(key, kind) if kind is not None else self._value(key)

    def tensor(self, name: str) -> TensorInfo:
        from .errors import MissingTensorError
        t = self.tensors.get(name)
        if t is None:
            raise MissingTensorError(f"{self.path}: required tensor {name!r} is missing")
        return t

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def close(self) -> None:
        self._read_arrays()      # while the maps are open: the metadata outlives them
        for p in self._parts:
            try:
                p.mm.close()
            except BufferError:
                pass  # numpy views still alive; the mapping goes when they do

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, arch={self._md.get('general.architecture')!r}, "
                f"tensors={len(self.tensors)}, files={len(self.paths)})")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a GGUF file as plain Python values."""
    return GGUFFile(path).metadata
