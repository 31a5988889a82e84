"""Process memory policy.

Prefill makes many short-lived tensors of a few MiB. glibc's malloc raises its mmap threshold
after such blocks are freed and then serves them from the heap, which keeps the freed memory
resident; a fixed 1 MiB threshold makes every large block its own mapping, returned to the OS on
free. On a machine sized to the model file this is the difference between fitting and swapping.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3          # mallopt parameter (glibc malloc.h)
import os
MMAP_THRESHOLD = int(os.environ.get("XTHR", 1 << 20))

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
