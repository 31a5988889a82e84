"""One pipeline stage: layers [first, last) of a GGUF model, in one process (a Ray actor, or in
process for tests), with a KV cache per sequence for its layers only.

The stage maps only its own tensors: the header is parsed, then each run of the stage's tensors
is mapped on its own (page-aligned spans of the file) and the whole-file map is closed, so other
stages' pages are never mapped here, let alone touched. The stage's blocks are renamed blk.0.. and
built by the ordinary decoder (models/transformer.py) with block_count = its layer count; tensors
the decoder insists on but the stage never uses (the embedding table on later stages, the lm_head
on earlier ones) are zero-byte placeholders.

Numerics equal the single-process model's: a prompt runs the per-op path layer by layer, a decode
step the whole-stage C++ step (csrc/decode.cpp with this stage's layers, its lm_head replaced by a
one-row placeholder on all but the last stage), so hidden states leave a stage exactly as they
leave that layer in one process.

Dimension key: T tokens, B sequences in a decode step, D n_embd, V vocabulary.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import mmap
import os
import re
import threading
import time

import numpy as np
import torch

from ..errors import HeteroMoEError, UnsupportedError
from ..gguf import GGUFFile, TensorInfo
from ..runtime.planner import layer_of
from .split import StageSpec

# Architectures whose blocks are built and run the same whatever their absolute index (a stage
# renumbers its layers from 0); an architecture with per-layer patterns (sliding-window layers,
# NoPE layers) must say how to keep its layer index before it can be staged.
STAGE_ARCHS = ("llama", "qwen3moe", "qwen2moe", "olmoe", "deepseek2")
SPAN_GAP = mmap.PAGESIZE    # tensors closer than this share one mapping (no one else's pages)
TRACE_LEN = 4096            # work intervals a stage remembers (for the pipeline's overlap)
SMALL_PLACEHOLDER = 1 << 20


class CacheLostError(HeteroMoEError, RuntimeError):
    """A sequence's KV cache is not on this stage (it restarted): the prompt must be evaluated
    again."""


class _Span:
    """One mapping of part of a file: bytes [start, start + len(mm)) of `path`."""

    def __init__(self, path: str, start: int, end: int):
        page = mmap.ALLOCATIONGRANULARITY
        self.path, self.start = path, start // page * page
        fd = os.open(path, os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, end - self.start, access=mmap.ACCESS_READ, offset=self.start)
        finally:
            os.close(fd)

    def view(self, t: TensorInfo) -> np.ndarray:
        return np.frombuffer(self.mm, dtype=np.uint8, count=t.nbytes, offset=t.offset - self.start)


def _placeholder(nbytes: int) -> np.ndarray:
    """Bytes that take no memory (one zero, broadcast): for tensors a stage never reads."""
    return np.broadcast_to(np.zeros(1, dtype=np.uint8), (nbytes,))


class StageGGUF(GGUFFile):
    """The GGUF model as one stage sees it: metadata with block_count = the stage's layers, its
    own tensors (renamed blk.0..) mapped span by span, placeholders for the rest the decoder
    expects. spec=None: the header alone (the driver), nothing mapped."""

    def __init__(self, path, spec: StageSpec | None):
        full = GGUFFile(path)
        arch = full.architecture
        self.paths, self.version = full.paths, full.version
        self.metadata, self.value_types = dict(full.metadata), dict(full.value_types)
        self._file_size = full.file_size
        # the header's table without data; then the whole-file maps go
        table = {n: dataclasses.replace(t, data=_placeholder(t.nbytes))
                 for n, t in full.tensors.items()}
        full.tensors.clear()
        for p in full._parts:
            p.tensors.clear()
        full.close()
        del full
        self.spans: list[_Span] = []
        self.stage_bytes = 0
        self.repacked_bytes = 0      # tensors whose pages a repacked copy replaced (release)
        self._parts = []
        if spec is None:
            self.tensors = table
            return
        if arch not in STAGE_ARCHS:
            raise UnsupportedError(f"{self.path}: architecture {arch!r} cannot be split into "
                                   f"pipeline stages yet (supported: {', '.join(STAGE_ARCHS)})")
        n = self.metadata.get(f"{arch}.block_count")
        if n != spec.n_layer:
            raise HeteroMoEError(f"{self.path}: the split is for {spec.n_layer} layers, the file "
                                 f"has {n}")
        tied = "output.weight" not in table
        own: dict[str, tuple[TensorInfo, bool]] = {}      # stage name -> (tensor, mapped here)
        for name, t in table.items():
            i = layer_of(name)
            if i is not None and not spec.owns(name):
                continue
            new = name if i is None else re.sub(r"^blk\.\d+\.", f"blk.{i - spec.first}.", name)
            # the first stage reads embedding rows with pread (layers/linear.py Embedding), so
            # the table is mapped only where it is the lm_head (tied, on the last stage)
            mapped = (tied and spec.is_last) if name == "token_embd.weight" else spec.owns(name)
            own[new] = (t, mapped)
        self.metadata[f"{arch}.block_count"] = spec.last - spec.first
        lead = f"{arch}.leading_dense_block_count"
        if lead in self.metadata:
            self.metadata[lead] = max(0, min(int(self.metadata[lead]) - spec.first,
                                             spec.last - spec.first))
        by_path: dict[str, list[TensorInfo]] = {}
        for t, mapped in own.values():
            if mapped:
                by_path.setdefault(t.path, []).append(t)
        where: dict[str, _Span] = {}
        for path_, ts in by_path.items():
            ts.sort(key=lambda t: t.offset)
            group: list[TensorInfo] = []
            for t in ts + [None]:
                if group and (t is None or t.offset > group[-1].offset + group[-1].nbytes
                              + SPAN_GAP):
                    span = _Span(path_, group[0].offset, max(u.offset + u.nbytes for u in group))
                    self.spans.append(span)
                    for u in group:
                        where[u.name] = span
                    group = []
                if t is not None:
                    group.append(t)
        self.tensors = {}
        self._span_of: dict[str, tuple[_Span, TensorInfo]] = {}
        for new, (t, mapped) in own.items():
            if mapped:
                data = where[t.name].view(t)
                self._span_of[new] = (where[t.name], t)
                self.stage_bytes += t.nbytes
            else:            # small ones (an output norm) real zeros: float views need strides
                data = np.zeros(t.nbytes, np.uint8) if t.nbytes <= SMALL_PLACEHOLDER else t.data
            self.tensors[new] = dataclasses.replace(t, name=new, data=data)

    @property
    def file_size(self) -> int:
        return self._file_size

    def mapped_bytes(self) -> int:
        return sum(len(s.mm) for s in self.spans)

    def prefault(self) -> int:
        """Map the stage's pages at load (see runtime/memory.py prefault), unless
        HETERO_MOE_PREFAULT=0."""
        from ..runtime.memory import MADV_POPULATE_READ
        if os.environ.get("HETERO_MOE_PREFAULT", "1") == "0":
            return 0
        done = 0
        for s in self.spans:
            try:
                s.mm.madvise(MADV_POPULATE_READ)
            except (OSError, ValueError, AttributeError):
                return done
            done += len(s.mm)
        return done

    def release(self, name: str, part: tuple[int, int] | None = None) -> int:
        """Drop this process's pages wholly inside the named tensor (its repacked copy replaced
        them; part=(lo, hi): inside those bytes of it, a chunk repacked so far); they stay in the
        page cache. Returns the bytes released."""
        hit = getattr(self, "_span_of", {}).get(name)
        if hit is None or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        span, t = hit
        lo, hi = part if part is not None else (0, t.nbytes)
        if part is None:
            self.repacked_bytes += t.nbytes
        page = mmap.PAGESIZE
        a = -(-(t.offset - span.start + lo) // page) * page
        b = (t.offset - span.start + min(hi, t.nbytes)) // page * page
        if b <= a:
            return 0
        try:
            span.mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):
            return 0
        return b - a

    def close(self) -> None:
        self.tensors.clear()
        for s in self.spans:
            try:
                s.mm.close()
            except BufferError:
                pass              # views still alive: the mapping goes with them


class _NoHead:
    """A one-row float16 lm_head of zeros: the fused C++ step of a stage that is not the last
    computes it (a few hundred bytes) instead of the real one."""

    def __init__(self, d: int):
        from ..layers.linear import CpuKernelMethod
        self.method, self.name = CpuKernelMethod(), "(no lm_head on this stage)"
        self.raw = self.kraw = np.zeros(2 * d, dtype=np.uint8)
        self.ggml_type = self.ktype = 1
        self.n_out, self.n_in, self.bias = 1, d, None


def file_rss(paths) -> tuple[int, int]:
    """(resident, mapped) bytes of this process's mappings of the given files (/proc/self/smaps)."""
    want = {os.path.realpath(str(p)) for p in paths}
    rss = size = 0
    cur = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):          # a mapping's header line
                    parts = line.split()
                    cur = len(parts) >= 6 and os.path.realpath(parts[5]) in want
                elif cur and first == "Rss:":
                    rss += int(line.split()[1]) * 1024
                elif cur and first == "Size:":
                    size += int(line.split()[1]) * 1024
    except OSError:
        return 0, 0
    return rss, size


class Stage:
    """Layers [spec.first, spec.last) of the model at `path`, with a KV cache per sequence id.

    run() takes token ids (the first stage) or hidden states [T, D] float32 (the others) and
    returns hidden states, or logits [T or 1, V] float32 on the last stage."""

    def __init__(self, path: str, spec: StageSpec, n_ctx: int, threads: int = 1,
                 cpu_kernels: str = "auto", repack: str | None = None):
        from ..config_env import malloc_tuning
        from ..layers.linear import KernelOptions
        from ..models.base import config_from_gguf
        from ..models.transformer import Transformer
        from ..runtime.memory import resolve_repack, return_large_blocks_to_os
        from ..runtime.placement import plan_placement
        t0 = time.perf_counter()
        self.spec, self.path = spec, str(path)
        torch.set_num_threads(threads)
        if malloc_tuning():
            return_large_blocks_to_os()
        from .. import cpu_backend
        if cpu_backend.available():
            cpu_backend.set_num_threads(threads)
        self.g = StageGGUF(path, spec)
        self.cfg = config_from_gguf(self.g)
        self.g.prefault()      # before the layers: repacked tensors then drop their pages
        from .pipeline import stage_cache_type
        from ..config_env import default_repack
        self.repack = resolve_repack(repack or default_repack(),
                                     [t for _, t in self.g._span_of.values()], cpu_kernels)
        self.net = Transformer(self.cfg, self.g, plan_placement("none"), n_ctx,
                               KernelOptions(cpu_kernels=cpu_kernels, repack=self.repack["on"],
                                             release=self.g.release),
                               cache_type=stage_cache_type(self.cfg, cpu_kernels))
        self.caches: dict[int, object] = {}
        self._fused = None
        self.trace: collections.deque = collections.deque(maxlen=TRACE_LEN)
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0

    # -- caches ----------------------------------------------------------------------------------
    def _cache(self, cid: int, pos0: int):
        c = self.caches.get(cid)
        if c is None:
            if pos0 > 0:
                raise CacheLostError(
                    f"stage {self.spec.index} ({self.spec.layers()}) holds no KV cache for "
                    f"sequence {cid} but was asked to go on at position {pos0}: the stage "
                    f"restarted since; evaluate the prompt again")
            c = self.caches[cid] = self.net.new_cache()
        return c

    def free(self, cids) -> None:
        for cid in cids:
            self.caches.pop(cid, None)

    # -- compute ---------------------------------------------------------------------------------
    def _fused_ready(self) -> bool:
        """The whole-stage C++ decode step (built on first use), as Transformer._fused_ready."""
        if self._fused is None:
            from ..runtime import fused_decode
            net = self.net
            view = net
            if not self.spec.is_last:
                cfg = dataclasses.replace(net.cfg, n_vocab=1)
                view = copy.copy(net)          # the same blocks and caches, no real lm_head
                view.cfg, view.out_norm = cfg, torch.ones(cfg.n_embd)
                view.lm_head = _NoHead(cfg.n_embd)
            ok = fused_decode.enabled_by_env()
            self._fused = (fused_decode.build(view) if ok else None) or False
        return bool(self._fused)

    def _input(self, x: np.ndarray) -> torch.Tensor:
        if self.spec.is_first:
            return torch.from_numpy(np.asarray(x, dtype=np.int64).copy())
        return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))

    def run(self, x: np.ndarray, positions: list[int], cids: list[int],
            all_logits: bool = False) -> np.ndarray:
        """One sequence's prompt chunk (len(cids) == 1, x of T tokens at positions[0]..) or one
        decode token for each of B sequences (x of B rows, row b at positions[b] of cids[b])."""
        with self._lock:
            t0 = time.perf_counter()
            inp = self._input(x)
            with torch.inference_mode():
                if len(cids) == 1 and inp.shape[0] > 1:
                    out = self._prompt(inp, int(positions[0]), cids[0], all_logits)
                else:
                    out = self._decode(inp, [int(p) for p in positions], cids)
            self.trace.append((t0, time.perf_counter(), len(cids), inp.shape[0]))
            return out.numpy()

    def _threads(self, T: int) -> None:
        from ..models import transformer as tr
        want = 1 if T < tr.TORCH_THREADS_MIN_T else self.net.torch_threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
            tr._pool_spin(tr.DECODE_SPIN_US if want == 1 else tr.BATCH_SPIN_US)

    def _prompt(self, x: torch.Tensor, pos0: int, cid: int, all_logits: bool) -> torch.Tensor:
        """Transformer.forward's per-op path over this stage's blocks."""
        from ..layers.attention import rms_norm
        from ..models import transformer as tr
        net, cfg = self.net, self.cfg
        cache = self._cache(cid, pos0)
        if pos0 > cache.pos:
            raise ValueError(f"cannot evaluate at position {pos0}: the cache holds {cache.pos} "
                             f"positions")
        cache.reset(pos0)
        T = x.shape[0]
        self._threads(T)
        if self.spec.is_first:
            x = net.embed(x)                                    # [T, D]
        ws = net.ws if T > tr.SMALL_BATCH and net._cpu_norm() else None
        if ws is None:
            for i, b in enumerate(net.blocks):
                x = x + b.attn(rms_norm(x, b.attn_norm, cfg.rms_eps), pos0, cache.layers[i])
                x = x + b.ffn(rms_norm(x, b.ffn_norm, cfg.rms_eps))
        else:
            from .. import cpu_backend
            D = x.shape[1]
            x = x.float().contiguous()
            for i, b in enumerate(net.blocks):
                xn = cpu_backend.rms_norm(x, b.attn_norm, cfg.rms_eps, out=ws.get("xn", T, D))
                x.add_(b.attn(xn, pos0, cache.layers[i], ws=ws))
                xn = cpu_backend.rms_norm(x, b.ffn_norm, cfg.rms_eps, out=ws.get("xn", T, D))
                x.add_(b.ffn(xn, ws=ws))
        cache.pos = pos0 + T
        if not self.spec.is_last:
            return x
        if not all_logits:
            x = x[-1:]
        return net.lm_head(rms_norm(x, net.out_norm, cfg.rms_eps)).float()

    def _decode(self, x: torch.Tensor, positions: list[int], cids: list[int]) -> torch.Tensor:
        """Transformer.forward_batch over this stage's blocks: the fused C++ step where the model
        has it, else the per-op path (rows together where forward_batch runs them together)."""
        from ..layers.attention import rms_norm
        net, cfg = self.net, self.cfg
        B = len(cids)
        if x.shape[0] != B or len(positions) != B:
            raise ValueError(f"decode step: {x.shape[0]} rows, {len(positions)} positions and "
                             f"{B} sequences; expected one of each per sequence")
        caches = [self._cache(c, p) for c, p in zip(cids, positions)]
        for c, p in zip(caches, positions):
            if p > c.pos:
                raise ValueError(f"cannot evaluate at position {p}: the cache holds {c.pos} "
                                 f"positions")
            c.reset(p)
        if self._fused_ready():
            self._threads(1)
            for cache, p in zip(caches, positions):
                for c in cache.layers:
                    if p + 1 > c.n_ctx:
                        from ..errors import ContextLengthError
                        raise ContextLengthError(f"position {p + 1} exceeds the context length "
                                                 f"{c.n_ctx}")
            h = net.embed(x).float().clone() if self.spec.is_first else x.contiguous()
            logits = self._fused.steps(h, positions, caches)
            for cache, p in zip(caches, positions):
                for c in cache.layers:
                    c.length = p + 1
                cache.pos = p + 1
            return logits if self.spec.is_last else h
        sp = net.sparse
        if B == 1 or not net._batch_ok(positions, sp):
            rows = [self._prompt_row(x[r:r + 1], positions[r], cids[r]) for r in range(B)]
            return torch.cat(rows)
        self._threads(B)
        h = net.embed(x) if self.spec.is_first else x
        for i, b in enumerate(net.blocks):
            xn = rms_norm(h, b.attn_norm, cfg.rms_eps)
            h = h + net._attn_rows(b.attn, xn, positions, [c.layers[i] for c in caches])
            h = h + b.ffn(rms_norm(h, b.ffn_norm, cfg.rms_eps))
        for c, p in zip(caches, positions):
            c.pos = p + 1
        if not self.spec.is_last:
            return h
        return net.lm_head(rms_norm(h, net.out_norm, cfg.rms_eps)).float()

    def _prompt_row(self, x, pos, cid):
        return self._prompt(x, pos, cid, all_logits=False)

    # -- reports ---------------------------------------------------------------------------------
    def info(self) -> dict:
        """Where this stage runs and what it holds."""
        import socket
        rss, mapped = file_rss(self.g.paths)
        try:
            import psutil
            proc_rss = psutil.Process().memory_info().rss
        except ImportError:
            proc_rss = 0
        s = self.spec
        return {"stage": s.index, "first_layer": s.first, "last_layer": s.last - 1,
                "repacked_bytes": self.g.repacked_bytes,
                "pid": os.getpid(), "host": socket.gethostname(),
                "stage_bytes": self.g.stage_bytes, "mapped_bytes": self.g.mapped_bytes(),
                "spans": len(self.g.spans),
                "file_rss": rss, "file_mapped": mapped, "process_rss": proc_rss,
                "load_seconds": self.load_seconds, "sequences": len(self.caches),
                "fused_decode": bool(self._fused) if self._fused is not None else None}

    def take_trace(self) -> list[tuple[float, float, int, int]]:
        """Work intervals (start, end, sequences, rows) since the last call, in time.time()'s
        clock of this host (perf_counter shifted)."""
        shift = time.time() - time.perf_counter()
        out = [(a + shift, b + shift, n, r) for a, b, n, r in self.trace]
        self.trace.clear()
        return out

    def ping(self) -> int:
        return os.getpid()
