"""Environment variables, read in one place."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """Where fetched and generated models live (HETERO_MOE_CACHE, default ~/.cache/hetero-moe)."""
    root = os.environ.get("HETERO_MOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hetero-moe")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def default_threads() -> int:
    """HETERO_MOE_THREADS, else the number of usable cores."""
    v = os.environ.get("HETERO_MOE_THREADS")
    if v:
        return max(1, int(v))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def malloc_tuning() -> bool:
    """HETERO_MOE_MALLOC_TUNE=0 keeps glibc's default malloc policy (see runtime/memory.py)."""
    return os.environ.get("HETERO_MOE_MALLOC_TUNE", "1") != "0"


def default_repack() -> str:
    """HETERO_MOE_REPACK (auto, on, off), else "auto": load()'s repack when the call leaves it
    out."""
    v = os.environ.get("HETERO_MOE_REPACK", "").strip().lower() or "auto"
    if v not in ("auto", "on", "off"):
        raise ValueError(f"HETERO_MOE_REPACK must be auto, on or off, got {v!r}")
    return v
