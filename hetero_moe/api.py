"""Python embedding API: `hetero_moe.load(path) -> Model`."""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import torch

from .config_env import default_threads
from .errors import ContextLengthError, HeteroMoEError
from .gguf import GGUFFile
from .layers.linear import KernelOptions
from .models.base import ModelConfig, config_from_gguf
from .models.transformer import Transformer
from .runtime.placement import plan_placement

DEFAULT_MAX_CTX = 4096
PREFILL_CHUNK = 512


class Model:
    """A loaded GGUF model. Create with :func:`load`.

    Attributes:
        config: the typed hyper-parameters (`ModelConfig`).
        path: the GGUF file (first part of a split model).
        n_ctx: the context window this instance was created with.
    """

    def __init__(self, gguf: GGUFFile, config: ModelConfig, net: Transformer, threads: int,
                 load_seconds: float):
        self.gguf, self.config, self.net = gguf, config, net
        self.path = gguf.path
        self.n_ctx = net.n_ctx
        self.threads = threads
        self.load_seconds = load_seconds
        self._tokenizer = None

    # -- logits ------------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> torch.Tensor:
        t = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids,
                            dtype=torch.long).flatten()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.config.n_vocab):
            bad = [int(v) for v in t if not 0 <= int(v) < self.config.n_vocab][0]
            raise ValueError(f"token id {bad} is out of range [0, {self.config.n_vocab})")
        return t

    def eval(self, token_ids: Sequence[int], pos0: int = 0, all_logits: bool = False
             ) -> torch.Tensor:
        """Feed tokens at positions pos0.. (keeping the cache before pos0) -> logits.

        Returns [T, V] float32 if all_logits else the last position's [1, V].
        Raises ContextLengthError if pos0 + len(token_ids) exceeds n_ctx.
        """
        ids = self._check_ids(token_ids)
        T = ids.numel()
        if T == 0:
            raise ValueError("no tokens to evaluate")
        if pos0 + T > self.n_ctx:
            raise ContextLengthError(
                f"{pos0 + T} tokens do not fit in the context window of {self.n_ctx} "
                f"(load with n_ctx=... up to the model's {self.config.n_ctx_train})")
        if pos0 > self.net.cache.pos:
            raise ValueError(f"cannot evaluate at position {pos0}: the cache holds "
                             f"{self.net.cache.pos} positions")
        self.net.cache.reset(pos0)
        outs = []
        with torch.inference_mode():
            for s in range(0, T, PREFILL_CHUNK):
                logits = self.net.forward(ids[s:s + PREFILL_CHUNK], pos0 + s,
                                          all_logits=all_logits)
                if all_logits or s + PREFILL_CHUNK >= T:
                    outs.append(logits)
        return torch.cat(outs) if all_logits else outs[-1]

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits: float32 [len(token_ids), n_vocab], row i predicts token i+1.

        Args:
            token_ids: prompt token ids (ints in [0, n_vocab)).
        Returns:
            torch.Tensor float32 of shape [len, vocab].
        Raises:
            ContextLengthError: the input is longer than the context window.
            ValueError: empty input or a token id out of range.
        """
        return self.eval(token_ids, 0, all_logits=True)

    # -- info --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        c = self.config
        moe = (f", experts={c.n_expert} top-{c.n_expert_used} ffn={c.n_ff_exp}"
               + (f" shared={c.n_ff_shexp}" if c.n_ff_shexp else "")) if c.is_moe else ""
        return (f"Model({os.path.basename(self.path)!r}, arch={c.arch}, layers={c.n_layer}, "
                f"d={c.n_embd}, heads={c.n_head}/{c.n_head_kv}x{c.head_dim}, vocab={c.n_vocab}"
                f"{moe}, n_ctx={self.n_ctx}, threads={self.threads})")


def load(path: str | os.PathLike, threads: int | None = None, *, n_ctx: int | None = None,
         gpu: str | bool = "auto", cpu_kernels: str = "auto", progress: bool = False,
         **options) -> Model:
    """Open a GGUF model (single file, or the first part of a split model).

    Args:
        path: the .gguf file.
        threads: CPU threads (default: usable cores, or HETERO_MOE_THREADS).
        n_ctx: context window (default: the model's training context, capped at 4096).
        gpu: "auto" (CUDA when present), False/"cpu", or a torch device string.
        cpu_kernels: "auto" (C++ quantized kernels when built) or "torch" (reference path).
        progress: show a progress bar on stderr while loading.
    Returns:
        Model.
    Raises:
        FileNotFoundError: no such file.
        GGUFFormatError: malformed file (the message names file, key/tensor and value).
        MissingTensorError / MissingKeyError: the file lacks what its architecture needs.
        UnsupportedError: unknown architecture or tensor type.
    """
    if options:
        raise TypeError(f"unknown option(s) for load(): {', '.join(sorted(options))}")
    if cpu_kernels not in ("auto", "torch"):
        raise ValueError(f"cpu_kernels must be 'auto' or 'torch', got {cpu_kernels!r}")
    t0 = time.perf_counter()
    threads = threads or default_threads()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        from . import cpu_backend
        if cpu_backend.available():
            cpu_backend.set_num_threads(threads)
    except ImportError:
        pass
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    if n_ctx is None:
        n_ctx = min(cfg.n_ctx_train or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    if not 1 <= n_ctx <= (1 << 20):
        raise ValueError(f"n_ctx must be in 1..{1 << 20}, got {n_ctx}")
    plan = plan_placement(gpu)
    bar = None
    cb = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.n_layer, desc=f"loading {os.path.basename(str(path))}",
                   unit="layer", file=sys.stderr, leave=False)

        def cb(i, n):
            bar.update(1)
    try:
        net = Transformer(cfg, g, plan, n_ctx, KernelOptions(cpu_kernels=cpu_kernels), cb)
    finally:
        if bar is not None:
            bar.close()
    return Model(g, cfg, net, threads, time.perf_counter() - t0)
