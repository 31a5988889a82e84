"""Sparse attention: NSA (compression + selection + sliding window) and its training-free
approximation."""
from .config import MODES, SparseAttnConfig, resolve

__all__ = ["MODES", "SparseAttnConfig", "resolve"]
