"""hetero-moe: a heterogeneous CPU/GPU runtime for 4-bit Mixture-of-Experts models."""

from .errors import (ContextLengthError, GGUFFormatError, HeteroMoEError, MissingKeyError,
                     MissingTensorError, UnsupportedError)

__version__ = "0.1.0"

__all__ = ["load", "plan", "HeteroMoEError", "GGUFFormatError", "MissingTensorError", "MissingKeyError",
           "UnsupportedError", "ContextLengthError", "__version__"]


def load(path, threads=None, **options):
    """Open a GGUF model. See :func:`hetero_moe.api.load`."""
    from .api import load as _load
    return _load(path, threads=threads, **options)


def plan(path, vram=None, ram=None, n_ctx=4096, **options):
    """Plan which tensors of a GGUF model a GPU holds, from its header alone.
    See :func:`hetero_moe.runtime.planner.plan`."""
    from .runtime.planner import plan as _plan
    return _plan(path, vram=vram, ram=ram, n_ctx=n_ctx, **options)
