"""Exception types. Every error a user can trigger derives from HeteroMoEError."""


class HeteroMoEError(Exception):
    """Base class for all hetero-moe errors."""


class GGUFFormatError(HeteroMoEError, ValueError):
    """A GGUF file is malformed: bad magic/version, truncated, counts or offsets out of range."""


class MissingTensorError(GGUFFormatError):
    """A tensor the architecture needs is absent, or the file holds one nobody uses."""


class MissingKeyError(GGUFFormatError):
    """A metadata key the architecture needs is absent or has the wrong type."""


class UnsupportedError(HeteroMoEError, ValueError):
    """Valid input we do not support: unknown architecture, tensor type, tokenizer model, ..."""


class ContextLengthError(HeteroMoEError, ValueError):
    """Input (plus requested generation) does not fit in the context window."""
