"""KV cache: per layer, keys and values for positions [0, n_ctx)."""
from __future__ import annotations

import torch

from ..errors import ContextLengthError


class LayerCache:
    """Keys/values of one layer, filled up to `length`.

    Stored head-major (`k_store`, `v_store`: [Hkv, n_ctx, Dh], contiguous), so one head's
    positions are one contiguous run that decode attention streams at full speed (a
    position-major cache puts a head's rows a power-of-two stride apart, which the prefetchers
    do not follow: 3x slower decode attention once the cache has left the CPU caches). `k` and
    `v` are the same memory viewed as [n_ctx, Hkv, Dh]."""

    def __init__(self, n_ctx: int, n_head_kv: int, head_dim: int, device: str,
                 dtype: torch.dtype = torch.float32):
        # torch.empty: untouched pages cost no RAM, so a long context is cheap until used
        self.k_store = torch.empty(n_head_kv, n_ctx, head_dim, dtype=dtype, device=device)
        self.v_store = torch.empty(n_head_kv, n_ctx, head_dim, dtype=dtype, device=device)
        self.k = self.k_store.transpose(0, 1)
        self.v = self.v_store.transpose(0, 1)
        self.n_ctx = n_ctx
        self.length = 0
        self.sparse = None   # sparse attention's compressed-key cache, made on first use

    def append(self, k: torch.Tensor, v: torch.Tensor, pos0: int):
        """Store k/v [T, Hkv, Dh] at positions pos0.., return all keys/values up to pos0+T."""
        T = k.shape[0]
        if pos0 + T > self.n_ctx:
            raise ContextLengthError(f"position {pos0 + T} exceeds the context length "
                                     f"{self.n_ctx}")
        if pos0 > self.length:
            raise ValueError(f"cache holds {self.length} positions; cannot write at {pos0}")
        self.k[pos0:pos0 + T] = k
        self.v[pos0:pos0 + T] = v
        self.length = pos0 + T
        return self.k[:self.length], self.v[:self.length]

    def reserve(self, pos0: int, T: int) -> None:
        """The checks append() makes, for a caller that writes rows pos0..pos0+T-1 itself."""
        if pos0 + T > self.n_ctx:
            raise ContextLengthError(f"position {pos0 + T} exceeds the context length "
                                     f"{self.n_ctx}")
        if pos0 > self.length:
            raise ValueError(f"cache holds {self.length} positions; cannot write at {pos0}")

    def commit(self, length: int):
        """After the caller wrote rows up to `length`: all keys/values up to it."""
        self.length = length
        return self.k[:length], self.v[:length]


class KVCache:
    """All layers' caches plus the shared position counter."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, device: str,
                 dtype: torch.dtype = torch.float32):
        self.layers = [LayerCache(n_ctx, n_head_kv, head_dim, device, dtype)
                       for _ in range(n_layer)]
        self.n_ctx = n_ctx
        self.pos = 0

    def reset(self, pos: int = 0) -> None:
        """Forget positions >= pos (pos=0 forgets everything)."""
        self.pos = pos
        for c in self.layers:
            c.length = min(c.length, pos)
            if getattr(c, "sparse", None) is not None:
                c.sparse.truncate(pos)

    def bytes_per_token(self) -> int:
        c = self.layers[0]
        return 2 * len(self.layers) * c.k[0].numel() * c.k.element_size()


class LatentLayerCache:
    """One layer's MLA cache: per token the latent and its rotated key part, [n_ctx, C + R],
    shared by every head (one "KV head" whose key is all C + R dims and whose value is the first C).

    Stored in f16 by default, like llama.cpp's default cache type: half the bytes, and the same
    rounding (on DeepSeek-V2-Lite shapes that rounding is most of the difference to llama.cpp)."""

    def __init__(self, n_ctx: int, latent_dim: int, device: str,
                 dtype: torch.dtype = torch.float16):
        self.latent = torch.empty(n_ctx, latent_dim, dtype=dtype, device=device)
        self.n_ctx = n_ctx
        self.length = 0
        self.sparse = None   # sparse attention's compressed-key cache, made on first use

    def append(self, latent: torch.Tensor, pos0: int) -> torch.Tensor:
        """Store latent [T, C + R] at positions pos0.., return all rows up to pos0+T (float32)."""
        T = latent.shape[0]
        if pos0 + T > self.n_ctx:
            raise ContextLengthError(f"position {pos0 + T} exceeds the context length "
                                     f"{self.n_ctx}")
        if pos0 > self.length:
            raise ValueError(f"cache holds {self.length} positions; cannot write at {pos0}")
        self.latent[pos0:pos0 + T] = latent
        self.length = pos0 + T
        return self.latent[:self.length].float()   # a view when the cache is f32


class LatentKVCache(KVCache):
    """All layers' MLA latent caches plus the shared position counter."""

    def __init__(self, n_layer: int, n_ctx: int, latent_dim: int, device: str,
                 dtype: torch.dtype = torch.float16):
        self.layers = [LatentLayerCache(n_ctx, latent_dim, device, dtype) for _ in range(n_layer)]
        self.n_ctx = n_ctx
        self.pos = 0

    def bytes_per_token(self) -> int:
        c = self.layers[0]
        return len(self.layers) * c.latent[0].numel() * c.latent.element_size()
