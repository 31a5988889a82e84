"""Process memory policy: malloc's mmap threshold, and prefaulting the weights' page tables.

Prefill makes many short-lived tensors of a few MiB. glibc's malloc raises its mmap threshold
after such blocks are freed and then serves them from the heap, which keeps the freed memory
resident; a fixed 1 MiB threshold makes every large block its own mapping, returned to the OS on
free. On a machine sized to the model file this is the difference between fitting and swapping.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

M_MMAP_THRESHOLD = -3          # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD = 1 << 20

_done: list[bool] = []


def return_large_blocks_to_os() -> bool:
    """Pin glibc's mmap threshold (once per process); False where malloc is not glibc's."""
    if _done:
        return _done[0]
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(getattr(libc, "mallopt", None)) and libc.mallopt(M_MMAP_THRESHOLD,
                                                                     MMAP_THRESHOLD) == 1
    except OSError:
        ok = False
    _done.append(ok)
    return ok


MADV_POPULATE_READ = 22        # Linux 5.14+: fill page tables for a range, reading it if needed
PREFAULT_MAX_FRACTION = 0.5    # only for weights below this share of the machine's RAM


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prefault(g, skip: set[str] = frozenset()) -> int:
    """Map every page of the model's tensors (but those in `skip`) into the process at load, so
    the first prompt does not take a page fault per 64 KiB of weights (~10% of a cold 512-token
    prompt on a 1.5 GiB model). Only when the weights fit comfortably in RAM (a model larger
    than that streams through the page cache instead), on Linux 5.14+, and unless
    HETERO_MOE_PREFAULT=0. Returns the bytes prefaulted."""
    if os.environ.get("HETERO_MOE_PREFAULT", "1") == "0":
        return 0
    ranges: dict[int, list[tuple[int, int]]] = {}
    parts = {id(p.mm): p.mm for p in getattr(g, "_parts", [])}
    by_path = {p.path: p.mm for p in getattr(g, "_parts", [])}
    total = 0
    for t in g.tensors.values():
        mm = by_path.get(t.path)
        if t.name in skip or mm is None or t.nbytes == 0:
            continue
        ranges.setdefault(id(mm), []).append((t.offset, t.offset + t.nbytes))
        total += t.nbytes
    mem = _mem_total()
    if not mem or total > PREFAULT_MAX_FRACTION * mem:
        return 0
    page = mmap.PAGESIZE
    done = 0
    for key, rs in ranges.items():
        mm = parts[key]
        rs.sort()
        merged: list[list[int]] = []
        for a, b in rs:
            a = a // page * page
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        for a, b in merged:
            try:
                mm.madvise(MADV_POPULATE_READ, a, min(b, len(mm)) - a)
            except (OSError, ValueError):
                return done                    # an older kernel: leave it to page faults
            done += b - a
    return done


def release(g, names, part: tuple[int, int] | None = None) -> int:
    """Drop this process's mapping of the pages wholly inside the named tensors (the GPU tier
    holds its own copies): they leave the process's RSS and stay in the page cache. part=(lo, hi):
    only the pages inside those bytes of each tensor. Returns the bytes released."""
    by_path = {p.path: p.mm for p in getattr(g, "_parts", [])}
    page = mmap.PAGESIZE
    done = 0
    for name in names:
        t = g.tensors.get(name)
        mm = by_path.get(t.path) if t is not None else None
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            continue
        lo, hi = part if part is not None else (0, t.nbytes)
        a = -(-(t.offset + lo) // page) * page           # whole pages only: neighbours keep theirs
        b = (t.offset + min(hi, t.nbytes)) // page * page
        if b > a:
            try:
                mm.madvise(mmap.MADV_DONTNEED, a, b - a)
            except (OSError, ValueError):
                continue
            done += b - a
    return done


REPACK_RESERVE = 2 << 30        # bytes repack="auto" leaves free beside the repacked copies ...
REPACK_RESERVE_FRACTION = 0.10  # ... or this share of RAM, whichever is larger


def resolve_repack(mode: str, tensors, cpu_kernels: str) -> dict:
    """What load(repack=mode) does with these tensors (the ones this process maps): {"mode", "on",
    "why"}. "auto": on when the C++ kernels run and the copies of the tensors they have a 16-row
    layout for fit the memory available now, less max(REPACK_RESERVE, REPACK_RESERVE_FRACTION of
    RAM): anonymous memory cannot be paged back to the file, so a model near the size of RAM
    stays mapped (and streams through the page cache)."""
    if mode != "auto":
        return {"mode": mode, "on": mode == "on", "why": f"repack={mode!r}"}
    try:
        from .. import cpu_backend
        built = cpu_backend.available()
    except ImportError:
        built = False
    if cpu_kernels == "torch" or not built:
        return {"mode": mode, "on": False, "why": "the C++ kernels do not run (torch path)"}
    from ..layers.linear import NOT_REPACKED
    need = sum(t.nbytes for t in tensors
               if t.name not in NOT_REPACKED and cpu_backend.repack_pays(t.ggml_type))
    if need == 0:
        return {"mode": mode, "on": False, "why": "no tensor has a 16-row layout that pays with "
                                                  "this CPU's kernels"}
    import psutil
    vm = psutil.virtual_memory()
    room = vm.available - max(REPACK_RESERVE, int(REPACK_RESERVE_FRACTION * vm.total))
    if need > room:
        return {"mode": mode, "on": False,
                "why": f"the repacked copies ({need / 2**30:.1f} GiB) would not fit the memory "
                       f"available ({vm.available / 2**30:.1f} GiB, less a reserve)"}
    return {"mode": mode, "on": True, "why": f"{need / 2**30:.2f} GiB of weights with a 16-row "
                                             f"layout fit the {vm.available / 2**30:.1f} GiB "
                                             f"available"}
