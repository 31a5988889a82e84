"""Scratch tensors reused by every layer of a prompt.

With glibc's mmap threshold pinned low (runtime/memory.py), every large temporary is a fresh
mapping whose pages fault in (zero-filled) on first touch: on a 512-token prompt of a 2048-wide
model that was ~15% of the prompt's time. The few large per-layer intermediates (normed input,
q, k/v, layer output) are written into these grow-only buffers instead, which costs their size
once and no faults after the first prompt.
"""
from __future__ import annotations

import math

import torch


class Workspace:
    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        """A float32 tensor of `shape` backed by buffer `name` (its previous contents are
        garbage). Two names never share memory; one name always does."""
        n = math.prod(shape)
        b = self._bufs.get(name)
        if b is None or b.numel() < n:
            b = self._bufs[name] = torch.empty(n, dtype=torch.float32)
        return b[:n].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * 4 for b in self._bufs.values())
