"""Helpers for tests and benchmarks: random-weight GGUF models in llama.cpp's layout."""

from .make_model import (ARCHES, PRESETS, QUANT_FTYPES, cached_test_model, make_test_model)

__all__ = ["ARCHES", "PRESETS", "QUANT_FTYPES", "cached_test_model", "make_test_model"]
