"""Hugging Face checkpoint folders (config.json + safetensors + tokenizer.json), including
GPTQ/AWQ int4, opened as a GGUFFile-like object (see checkpoint.py)."""
from .checkpoint import HFCheckpoint, is_hf_folder

__all__ = ["HFCheckpoint", "is_hf_folder", "open_model"]


def open_model(path):
    """A GGUFFile for a .gguf path, an HFCheckpoint for a Hugging Face folder."""
    if is_hf_folder(path):
        return HFCheckpoint(path)
    from ..gguf import GGUFFile
    return GGUFFile(path)
