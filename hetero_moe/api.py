"""Python embedding API: `hetero_moe.load(path) -> Model`."""
from __future__ import annotations

import gc
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .config_env import default_repack, default_threads, malloc_tuning
from .errors import ContextLengthError, HeteroMoEError, MissingTensorError, UnsupportedError
from .gguf import GGUFFile
from .layers.linear import KernelOptions
from .layers.sparse_attn import SparseAttnConfig
from .layers.sparse_attn import resolve as resolve_sparse
from .models.base import ModelConfig, config_from_gguf
from .models.transformer import Transformer
from .runtime.memory import prefault, release, return_large_blocks_to_os
from .runtime.placement import plan_placement

DEFAULT_MAX_CTX = 4096
PREFILL_CHUNK = 512


@dataclass
class Timings:
    """Where the time went: prompt evaluation (prefill) and token generation (decode)."""
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    cached_tokens: int = 0          # prompt tokens whose keys/values were reused (cache_prompt)
    generated_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens          # the tokens evaluated
        return n / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class TokenLogprob:
    """One token with its log-probability and the top-N alternatives (id, text, logprob)."""
    token: int
    text: str
    logprob: float | None
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Completion:
    """The result of generate()/chat().

    text: generated text (prompt text first when echo=True); tokens: generated ids;
    finish_reason: "stop" (end-of-generation token or stop sequence) or "length";
    logprobs: per generated token when requested; prompt_logprobs: per prompt token with echo.
    """
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: list[int]
    timings: Timings
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class ModelBusyError(HeteroMoEError, RuntimeError):
    """The model is owned by another user (a running server): its cache and scratch buffers are
    not free for this call."""


class ModelClosedError(HeteroMoEError, RuntimeError):
    """The model was closed (Model.close())."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Model:
    """A loaded GGUF model. Create with :func:`load`.

    One model, many threads: every call that touches the KV cache and scratch buffers (eval,
    logits, generate, stream, chat) holds the model's lock for each step, so calls from several
    threads wait for each other; a stream paused between tokens while another call used the
    cache re-evaluates what it needs before its next step. While a server owns the model
    (`exclusive()`), calls from other threads raise ModelBusyError. tokenize/detokenize need
    no lock.

    Attributes:
        config: the typed hyper-parameters (`ModelConfig`).
        path: the GGUF file (first part of a split model).
        n_ctx: the context window this instance was created with.
        repack: what load(repack=...) did: {"mode", "on", "why", "tensors", "bytes"} (the
            tensors converted to the kernels' 16-row layouts and their bytes).
    """

    def __init__(self, gguf: GGUFFile, config: ModelConfig, net: Transformer, threads: int,
                 load_seconds: float):
        self.gguf, self.config, self.net = gguf, config, net
        self.path = gguf.path
        self.n_ctx = net.n_ctx
        self.threads = threads
        self.load_seconds = load_seconds
        self._tokenizer = None
        self._cached: list[int] = []   # tokens whose keys/values are in the cache
        self._cached_sparse: SparseAttnConfig | None = None   # the attention they were made with
        self._cache_user: object | None = None   # the generation that wrote the cache last
        self._lock = threading.RLock()
        self._owner: str | None = None           # exclusive() holder, by name
        self._owner_thread: int | None = None
        self._closed = False
        self.last_completion: Completion | None = None
        self.repack: dict = {"mode": "off", "on": False, "why": "", "tensors": 0, "bytes": 0}

    # -- one model, many callers -----------------------------------------------------------------
    @contextmanager
    def _use(self):
        """Hold the model for one step of a call (waits for other threads' steps)."""
        with self._lock:
            if self._closed:
                raise ModelClosedError(f"{self.path}: the model is closed")
            if self._owner is not None and threading.get_ident() != self._owner_thread:
                raise ModelBusyError(f"the model is owned by {self._owner}; calls from other "
                                     f"threads are refused until it is released (send requests "
                                     f"to it, or load a second Model)")
            yield

    @contextmanager
    def exclusive(self, owner: str):
        """Own the model from this thread (a server's engine): other threads' calls raise
        ModelBusyError until the block ends. Waits for a step in progress elsewhere."""
        with self._use():
            if self._owner is not None:
                raise ModelBusyError(f"the model is already owned by {self._owner}")
            self._owner, self._owner_thread = owner, threading.get_ident()
        try:
            yield self
        finally:
            with self._lock:
                self._owner = self._owner_thread = None
                self._cached, self._cache_user = [], None   # the owner used the cache freely

    def close(self) -> None:
        """Release the weights' memory maps, file descriptors and caches. Later calls raise
        ModelClosedError (tokenize/detokenize keep working). Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            if self._owner is not None and threading.get_ident() != self._owner_thread:
                raise ModelBusyError(f"cannot close: the model is owned by {self._owner}")
            self._closed = True
            if self._tokenizer is None and self.gguf.get("tokenizer.ggml.tokens") is not None:
                _ = self.tokenizer          # built from metadata, so it outlives the maps
            net, self.net = self.net, None
            if hasattr(net, "close"):       # a pipeline's stage actors (distributed/)
                net.close()
            emb = getattr(net, "embed", None)
            fd = getattr(emb, "_fd", None)
            if fd is not None and fd >= 0:
                os.close(fd)
                emb._fd = -1
            del net, emb
            self._cached = []
            self.gguf.tensors.clear()       # the tensors' views into the maps
            for part in getattr(self.gguf, "_parts", ()):
                getattr(part, "tensors", {}).clear()
            gc.collect()
            self.gguf.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- logits ------------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> torch.Tensor:
        if isinstance(ids, list) and 0 < len(ids) <= 16 and all(type(v) is int for v in ids):
            # a decode step's few ids: checked in Python (a handful of torch ops cost more)
            if min(ids) < 0 or max(ids) >= self.config.n_vocab:
                bad = [v for v in ids if not 0 <= v < self.config.n_vocab][0]
                raise ValueError(f"token id {bad} is out of range [0, {self.config.n_vocab})")
            return torch.tensor(ids, dtype=torch.long)
        t = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids,
                            dtype=torch.long).flatten()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.config.n_vocab):
            bad = [int(v) for v in t if not 0 <= int(v) < self.config.n_vocab][0]
            raise ValueError(f"token id {bad} is out of range [0, {self.config.n_vocab})")
        return t

    @property
    def sparse_attn(self) -> SparseAttnConfig:
        """The sparse-attention settings calls use unless they pass sparse_attn=."""
        return self.net.sparse

    def _sparse(self, value) -> SparseAttnConfig:
        sp = resolve_sparse(value, self.net.sparse)
        if sp.mode == "nsa" and getattr(self.config, "mla", None) is not None:
            raise UnsupportedError(f"sparse_attn mode 'nsa' has no learned weights for Multi-head "
                                   f"Latent Attention models ({self.config.arch}); use 'approx'")
        if sp.mode == "nsa" and self.net.nsa_missing:
            raise MissingTensorError(f"{self.path}: sparse_attn mode 'nsa' needs tensor "
                                     f"{self.net.nsa_missing!r}, which is missing (use 'approx' "
                                     f"for a model trained without NSA)")
        return sp

    def eval(self, token_ids: Sequence[int], pos0: int = 0, all_logits: bool = False,
             sparse_attn=None) -> torch.Tensor:
        """Feed tokens at positions pos0.. (keeping the cache before pos0) -> logits.

        sparse_attn: this call's sparse attention (None: the loaded default; "off", "approx",
        "nsa" or a SparseAttnConfig).
        Returns [T, V] float32 if all_logits else the last position's [1, V].
        Raises ContextLengthError if pos0 + len(token_ids) exceeds n_ctx.
        """
        with self._use():
            # the cache keeps what it held before pos0 (known if _cached reaches that far)
            sp = self._sparse(sparse_attn)
            keep = len(self._cached) >= pos0 and (pos0 == 0 or sp == self._cached_sparse)
            if keep:
                del self._cached[pos0:]         # in place: a decode step costs O(1), not O(pos)
            else:
                self._cached = []
            self._cache_user = None
            out = self._eval(token_ids, pos0, all_logits, sp)
            if keep:
                self._cached.extend(int(t) for t in token_ids)
                self._cached_sparse = sp
            return out

    def _eval(self, token_ids: Sequence[int], pos0: int = 0, all_logits: bool = False,
              sparse_attn=None) -> torch.Tensor:
        if not all_logits and sparse_attn is self.net.sparse and len(token_ids) == 1 \
                and pos0 < self.n_ctx:
            tok = token_ids[0]              # a decode step: one C++ call where the model has it
            step = getattr(self.net, "decode_token", None)      # (a staged model has none)
            if step is not None and type(tok) is int and 0 <= tok < self.config.n_vocab:
                with torch.inference_mode():
                    out = step(tok, pos0)
                if out is not None:
                    return out
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
        sp = self._sparse(sparse_attn)
        self.net.cache.reset(pos0)
        outs = []
        with torch.inference_mode():
            # a GPU tier's scratch is planned for its chunk
            chunk = self.net.plan.plan.chunk if self.net.executor is not None else PREFILL_CHUNK
            for s in range(0, T, chunk):
                logits = self.net.forward(ids[s:s + chunk], pos0 + s,
                                          all_logits=all_logits, sparse=sp)
                if all_logits or s + chunk >= T:
                    outs.append(logits)
        return torch.cat(outs) if all_logits else outs[-1]

    def logits(self, token_ids: Sequence[int], sparse_attn=None) -> torch.Tensor:
        """Teacher-forced logits: float32 [len(token_ids), n_vocab], row i predicts token i+1.

        Args:
            token_ids: prompt token ids (ints in [0, n_vocab)).
            sparse_attn: None (the loaded default), a mode name or a SparseAttnConfig.
        Returns:
            torch.Tensor float32 of shape [len, vocab].
        Raises:
            ContextLengthError: the input is longer than the context window.
            ValueError: empty input or a token id out of range.
        """
        with self._use():
            sp = self._sparse(sparse_attn)
            self._cached, self._cache_user = [], None
            out = self._eval(token_ids, 0, all_logits=True, sparse_attn=sp)
            self._cached, self._cached_sparse = [int(t) for t in token_ids], sp
            return out

    # -- text ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer built from the file's own tokenizer metadata (on first use)."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_gguf_metadata(self.gguf.metadata, source=self.path)
        return self._tokenizer

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True
                 ) -> list[int]:
        """Token ids of `text` (with BOS/EOS as the model asks when add_special)."""
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    def _params(self, params, kw):
        from .sampling import SamplingParams
        if params is not None and kw:
            raise TypeError("pass either params=SamplingParams(...) or keyword arguments, not both")
        if params is None:
            params = SamplingParams(**kw)
        return params.validate()

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        return ids

    def _prefill(self, run: object, ids: list[int], sp, reuse: bool) -> tuple[torch.Tensor, int]:
        """Put ids in the cache for generation `run` -> (the last position's logits [V], tokens
        reused). reuse: keep the longest prefix the cache already holds (at least one token is
        evaluated, for its logits). Call under _use()."""
        keep = 0
        if reuse and sp == self._cached_sparse:
            keep = min(common_prefix(self._cached, ids), len(ids) - 1)
        self._cached, self._cached_sparse, self._cache_user = self._cached[:keep], sp, run
        logits = self._eval(ids[keep:], keep, sparse_attn=sp)[-1]
        self._cached = list(ids)
        return logits, keep

    def _events(self, ids: list[int], p, sparse_attn=None, cache_prompt: bool = False
                ) -> Iterator:
        """Generate: yields text pieces; returns the Completion (StopIteration.value).

        cache_prompt: reuse the keys/values of the longest prefix of ids the cache holds from
        the call before (a chat's earlier turns); off, the whole prompt is evaluated, so a
        call's result does not depend on the calls before it (a suffix evaluated on its own
        rounds differently from one prefill)."""
        from .sampling import Sampler, StopMatcher, token_logprob
        from .tokenizer import StreamDecoder
        tok = self.tokenizer if self.gguf.get("tokenizer.ggml.tokens") is not None else None
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; the context window is "
                                     f"{self.n_ctx} (load with n_ctx=... up to the model's "
                                     f"{self.config.n_ctx_train})")
        run = object()          # this generation, as the cache's user
        sampler = Sampler(p, self.config.n_vocab)
        text_of = (lambda t: tok.token_str(t)) if tok else str
        timings = Timings(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        prompt_lp = None
        with self._use():
            sp = self._sparse(sparse_attn)
            if p.echo:
                self._cached, self._cached_sparse, self._cache_user = [], sp, run
                rows = self._eval(ids, 0, all_logits=True, sparse_attn=sp)
                self._cached = list(ids)
                logits = rows[-1]
            else:
                logits, timings.cached_tokens = self._prefill(run, ids, sp, cache_prompt)
        if p.echo:
            prompt_lp = [TokenLogprob(ids[0], text_of(ids[0]), None)]
            for i in range(1, len(ids)):
                top = [(t, text_of(t), lp) for t, lp in sampler.top_logprobs(rows[i - 1],
                                                                              p.logprobs or 0)]
                prompt_lp.append(TokenLogprob(ids[i], text_of(ids[i]),
                                              token_logprob(rows[i - 1], ids[i]), top))
        timings.prefill_seconds = time.perf_counter() - t0
        dec = StreamDecoder(tok, skip_special=True) if tok else None
        stops = StopMatcher(p.stop_list())
        eog = tok.eog_ids if tok else frozenset()
        history = list(ids)
        out_ids: list[int] = []
        lps: list[TokenLogprob] | None = [] if p.logprobs is not None else None
        pieces: list[str] = []
        finish = "length"
        t1 = time.perf_counter()
        pos = len(ids)
        while len(out_ids) < p.max_tokens:
            if pos >= self.n_ctx:
                break
            t = sampler.sample(logits, history)
            if t in eog:
                finish = "stop"
                break
            if lps is not None:
                top = [(i, text_of(i), lp) for i, lp in sampler.top_logprobs(logits, p.logprobs)]
                lps.append(TokenLogprob(t, text_of(t), token_logprob(logits, t), top))
            out_ids.append(t)
            history.append(t)
            piece = dec.add(t) if dec else ""
            emit, stopped = stops.feed(piece) if piece else ("", False)
            if emit:
                pieces.append(emit)
                yield emit
            if stopped:
                finish = "stop"
                break
            if len(out_ids) >= p.max_tokens or pos + 1 >= self.n_ctx:
                break
            with self._use():
                if self._cache_user is run and len(self._cached) == pos:
                    logits = self._eval([t], pos, sparse_attn=sp)[-1]
                    self._cached.append(t)
                else:       # another call used the cache while this one was paused
                    logits, _ = self._prefill(run, history, sp, reuse=True)
            pos += 1
        if not stops.stopped:
            tail = stops.feed(dec.flush())[0] if dec else ""
            tail += "" if stops.stopped else stops.flush()
            if tail:
                pieces.append(tail)
                yield tail
        timings.generated_tokens = len(out_ids)
        timings.decode_seconds = time.perf_counter() - t1
        text = "".join(pieces)
        if p.echo:
            text = (tok.decode(ids) if tok else "") + text
        return Completion(text, out_ids, finish, list(ids), timings, lps, prompt_lp)

    def generate(self, prompt: str | Sequence[int], params=None, sparse_attn=None,
                 cache_prompt: bool = False, **sampling) -> Completion:
        """Complete a prompt.

        Args:
            prompt: text, or a list of token ids.
            params: a SamplingParams, or its fields as keyword arguments (max_tokens, temperature,
                top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty,
                presence_penalty, seed, stop, logprobs, echo).
            sparse_attn: this call's sparse attention ("off", "approx", "nsa" or a
                SparseAttnConfig); None keeps the setting chosen at load().
            cache_prompt: reuse the cached keys/values of the longest prefix this prompt shares
                with the previous call's prompt and output (a chat's earlier turns); off by
                default, so results never depend on earlier calls.
        Returns:
            Completion (text, tokens, finish_reason, logprobs, timings).
        Raises:
            SamplingParamError: a sampling value out of range (the message names it).
            ContextLengthError: the prompt does not fit in the context window.
        """
        p = self._params(params, sampling)
        gen = self._events(self._prompt_ids(prompt), p, sparse_attn, cache_prompt)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                self.last_completion = stop.value
                return stop.value

    def stream(self, prompt: str | Sequence[int], params=None, sparse_attn=None,
               cache_prompt: bool = False, **sampling) -> Iterator[str]:
        """Like generate(), yielding text pieces as they are produced (never a split UTF-8
        character). The Completion is in `model.last_completion` afterwards."""
        p = self._params(params, sampling)
        ids = self._prompt_ids(prompt)
        self.last_completion = yield from self._events(ids, p, sparse_attn, cache_prompt)

    @property
    def chat_template(self) -> str | None:
        """The GGUF's chat template, else the architecture's own (Gemma's turns), else None
        (chat then falls back to ChatML)."""
        return self.gguf.get("tokenizer.chat_template") or self.config.chat_template

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template."""
        from .chat import chat_prompt_ids
        return chat_prompt_ids(self.tokenizer, self.chat_template, messages,
                               add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[dict], params=None, stream: bool = False, sparse_attn=None,
             cache_prompt: bool = False, **sampling):
        """Reply to a conversation [{"role": "user", "content": "..."}, ...] rendered through the
        GGUF's chat template. Returns a Completion, or an iterator of text pieces if stream.
        cache_prompt=True reuses the earlier turns' keys/values (see generate())."""
        ids = self.chat_ids(messages)
        return self.stream(ids, params, sparse_attn, cache_prompt, **sampling) if stream else \
            self.generate(ids, params, sparse_attn, cache_prompt, **sampling)

    # -- placement ---------------------------------------------------------------------------
    @property
    def plan(self):
        """The placement plan in use (`plan.to_dict()` is `hetero-moe plan --json`); a CPU-only
        model has a plan without a GPU tier."""
        placement = self.net.plan
        if placement.plan is None:
            from .runtime.planner import make_plan
            placement.plan = make_plan(self.gguf, self.config, n_ctx=self.n_ctx, gpu="none",
                                       threads=self.threads)
        return placement.plan

    @property
    def executor(self):
        """The heterogeneous executor (None on a CPU-only model)."""
        return self.net.executor

    def memory(self) -> dict:
        """What the GPU tier holds (bytes by group) next to the plan's numbers; {"mode": "none"}
        for a CPU-only model."""
        if self.net.executor is None:
            return {"mode": "none", "held_bytes": 0}
        return self.net.executor.memory()

    # -- info --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        c = self.config
        moe = (f", experts={c.n_expert} top-{c.n_expert_used} ffn={c.n_ff_exp}"
               + (f" shared={c.n_ff_shexp}" if c.n_ff_shexp else "")) if c.is_moe else ""
        return (f"Model({os.path.basename(self.path)!r}, arch={c.arch}, layers={c.n_layer}, "
                f"d={c.n_embd}, heads={c.n_head}/{c.n_head_kv}x{c.head_dim}, vocab={c.n_vocab}"
                f"{moe}, n_ctx={self.n_ctx}, threads={self.threads})")


def _placement(g: GGUFFile, cfg: ModelConfig, gpu, plan, vram, n_ctx, sparse, threads):
    """The placement for load(): CPU only, or a GPU tier that follows a plan (given or made)."""
    from .runtime.planner import Plan, PlanError, make_plan
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(str(plan))
    elif isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    if gpu == "auto" and plan is not None and plan.gpu_device == "interpret":
        gpu = "interpret"
    mode = ("cuda" if torch.cuda.is_available() else "none") if gpu == "auto" else \
        {True: "cuda", "cuda": "cuda", "cuda:0": "cuda", "interpret": "interpret", False: "none",
         None: "none", "none": "none", "cpu": "none"}.get(gpu)
    if mode is None:
        raise ValueError(f"gpu must be 'auto', 'cuda', 'interpret', 'none' or a bool, got {gpu!r}")
    if n_ctx is None:
        n_ctx = plan.n_ctx if plan is not None else \
            min(cfg.n_ctx_train or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    if not 1 <= n_ctx <= (1 << 20):
        raise ValueError(f"n_ctx must be in 1..{1 << 20}, got {n_ctx}")
    if mode == "none":
        return plan_placement("none"), n_ctx
    if sparse.enabled:
        raise UnsupportedError("sparse attention runs on the CPU-only path (gpu='none') for now")
    if plan is None:
        plan = make_plan(g, cfg, vram=vram, n_ctx=n_ctx, gpu=mode, threads=threads)
    else:
        name = os.path.basename(g.path)
        if plan.model != name:
            raise PlanError(f"the plan is for {plan.model}, not {name}")
        if plan.n_ctx != n_ctx:
            raise PlanError(f"the plan sizes the cache for n_ctx={plan.n_ctx}, but n_ctx={n_ctx} "
                            f"was asked for; make a new plan or drop n_ctx")
        missing = [t for t in g.tensors if t not in plan.placement]
        if missing:
            raise PlanError(f"the plan does not place tensor {missing[0]!r} of {name}")
    if not plan.fits:
        raise PlanError(f"{g.path}: the model does not fit the GPU plan: {plan.reason} "
                        f"(gpu='none' runs it on the CPU alone)")
    return plan_placement(mode, plan=plan), n_ctx


def load(path: str | os.PathLike, threads: int | None = None, *, n_ctx: int | None = None,
         gpu: str | bool = "auto", cpu_kernels: str = "auto", progress: bool = False,
         sparse_attn: str | SparseAttnConfig | None = None, plan=None,
         vram: str | int | None = None, stream_min_tokens: int | None = None,
         stages: int | None = None, cluster: str | None = None, repack: bool | str | None = None,
         lm_head: str | None = None, cache_type: str | None = None, **options) -> Model:
    """Open a GGUF model (single file, or the first part of a split model), or a Hugging Face
    folder (config.json, safetensors shards, tokenizer.json; float or GPTQ/AWQ int4 weights).

    Args:
        path: the .gguf file, or the folder.
        threads: CPU threads (default: usable cores, or HETERO_MOE_THREADS).
        n_ctx: context window (default: the model's training context, capped at 4096).
        gpu: "auto" (CUDA when present, else CPU only), "cuda", "none"/False (CPU only), or
            "interpret": the whole GPU tier (same plan, Triton kernels, executor and CPU/GPU
            overlap) on CPU tensors through Triton's interpreter; slow, for tests and debugging.
        plan: a Plan from hetero_moe.plan(), its to_dict(), or a plan JSON file; without one a
            GPU run plans for itself (vram: its GPU budget, default the device's free memory,
            or 24 GiB for "interpret").
        stream_min_tokens: with a GPU tier, prompt chunks of at least this many tokens upload
            the cold experts they hit to the GPU instead of running them on the CPU (default
            (experts / experts per token) * 32; 0: never).
        cpu_kernels: "auto" (C++ quantized kernels when built) or "torch" (reference path).
        repack: "auto" (default; HETERO_MOE_REPACK sets another), "on"/True or "off"/False:
            convert the CPU's weights that the C++ kernels have a 16-row interleaved layout for
            (Q4_0, Q5_0; Q2_K, Q3_K, Q4_K, Q6_K, Q8_0, IQ4_NL and IQ4_XS where the kernels
            have VNNI) to it at load (same bytes; the copy replaces the mapped
            pages, so memory stays ~the file size). Prompts run ~1.7x and decode ~1.35x faster
            (a3b preset, Zen 4) for ~1 s per GB at load (2 threads). "auto" repacks when the C++
            kernels run and the copies fit in the memory available now with room to spare
            (else the weights stay mapped from the file, which also runs models larger than
            RAM) and no GPU tier runs (its expert uploads read the file's blocks); Model.repack
            says what was done and why.
        lm_head: None (default: as stored) or "q8_0": re-quantize a float (F32/F16/BF16)
            lm_head (or the tied embedding table) into Q8_0 at load. GPTQ/AWQ folders usually
            keep it in fp16, and decode reads it whole every token; Q8_0 halves those bytes
            (its effect on the logits: README, Hugging Face folders).
        cache_type: the KV cache's element type on the CPU: "f16" (half the bytes and memory of
            "f32"; llama.cpp's default, rounded the same way) or "f32". Default: "f16" where the
            C++ attention kernels read the cache, "f32" on the torch path (cpu_kernels="torch",
            kernels not built) and with sparse_attn (its torch ops read the cache). With a GPU
            tier the plan's cache type applies (hetero_moe.plan(cache_type=...)).
        progress: show a progress bar on stderr while loading.
        sparse_attn: default attention for every call: "off" (dense, the default), "approx"
            (training-free block selection over mean-pooled keys), "nsa" (learned NSA weights
            from the file: blk.N.nsa_*), or a SparseAttnConfig for block sizes and thresholds.
        stages, cluster: run the layers as `stages` pipeline stages, each a Ray actor that maps
            only its own tensors, on `cluster` ("local": a Ray instance on this machine,
            "auto", "ray://HOST:PORT"); CPU only. More options (stage_cpus, micro_batches,
            timeout_s, max_restarts, sequences, ram_per_host, layers): hetero_moe.distributed.
            load_staged.
    Returns:
        Model.
    Raises:
        FileNotFoundError: no such file.
        GGUFFormatError: malformed file (the message names file, key/tensor and value).
        MissingTensorError / MissingKeyError: the file lacks what its architecture needs.
        UnsupportedError: unknown architecture or tensor type.
    """
    repack_mode = {True: "on", False: "off", None: default_repack()}.get(repack, repack) \
        if isinstance(repack, (bool, type(None))) else repack
    if repack_mode not in ("auto", "on", "off"):
        raise ValueError(f"repack must be 'auto', 'on' or 'off' (or a bool), got {repack!r}")
    if stages is not None or cluster is not None:
        from .distributed import load_staged
        if gpu not in ("auto", "none", False, None) or plan is not None or sparse_attn not in (
                None, "off") or lm_head is not None:
            raise UnsupportedError("pipeline stages run on the CPU with dense attention and "
                                   "the file's weights: drop gpu=, plan=, sparse_attn= and "
                                   "lm_head= (or stages=)")
        return load_staged(path, stages=1 if stages is None else stages, cluster=cluster,
                           threads=threads, n_ctx=n_ctx, cpu_kernels=cpu_kernels,
                           repack=repack_mode, progress=progress, **options)
    if options:
        raise TypeError(f"unknown option(s) for load(): {', '.join(sorted(options))}")
    if cpu_kernels not in ("auto", "torch"):
        raise ValueError(f"cpu_kernels must be 'auto' or 'torch', got {cpu_kernels!r}")
    if cache_type not in (None, "f16", "f32"):
        raise ValueError(f"cache_type must be 'f16' or 'f32' (or None: the default), got "
                         f"{cache_type!r}")
    t0 = time.perf_counter()
    threads = threads or default_threads()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if malloc_tuning():
        return_large_blocks_to_os()
    try:
        from . import cpu_backend
        if cpu_backend.available():
            cpu_backend.set_num_threads(threads)
    except ImportError:
        pass
    sparse = resolve_sparse(sparse_attn)
    from .hf import open_model          # a .gguf file, or a Hugging Face folder (GPTQ/AWQ int4)
    g = open_model(path)
    from .hf.quant import quantize_lm_head
    quantize_lm_head(g, lm_head)
    cfg = config_from_gguf(g)
    if sparse.mode == "nsa" and getattr(cfg, "mla", None) is not None:
        raise UnsupportedError(f"{path}: sparse_attn mode 'nsa' has no learned weights for "
                               f"Multi-head Latent Attention models ({cfg.arch}); use 'approx'")
    placement, n_ctx = _placement(g, cfg, gpu, plan, vram, n_ctx, sparse, threads)
    if cache_type is not None and placement.has_gpu and placement.plan.cache_type != cache_type:
        raise ValueError(f"cache_type={cache_type!r} differs from the GPU plan's "
                         f"{placement.plan.cache_type!r} cache: plan with cache_type="
                         f"{cache_type!r} (or leave cache_type out)")
    if stream_min_tokens is not None:
        if stream_min_tokens < 0:
            raise ValueError(f"stream_min_tokens must be >= 0 (0: never), got {stream_min_tokens}")
        placement.stream_min_tokens = stream_min_tokens
    repack_info = _resolve_repack(repack_mode, g, placement, cpu_kernels)
    bar = None
    cb = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.n_layer, desc=f"loading {os.path.basename(str(path))}",
                   unit="layer", file=sys.stderr, leave=False)

        def cb(i, n):
            bar.update(1)
    try:
        repacked: set[str] = set()

        def drop(name: str, part: tuple[int, int] | None = None) -> None:
            """A repacked tensor's mapped pages leave the process (part: a chunk of it so far)."""
            if part is None:
                repacked.add(name)
            release(g, [name], part)

        net = Transformer(cfg, g, placement, n_ctx,
                          KernelOptions(cpu_kernels=cpu_kernels, repack=repack_info["on"],
                                        release=drop), cb,
                          sparse=sparse, cache_type=cache_type)
    finally:
        if bar is not None:
            bar.close()
    # the layers' weights: the embedding table is read row by row (never mapped), and the
    # lm_head is read once per call, after the layers (their temporaries are gone by then)
    on_gpu = {n for n, v in (placement.plan.placement.items() if placement.has_gpu else ())
              if v == "gpu"}
    prefault(g, {"token_embd.weight", "output.weight"} | on_gpu | repacked)
    release(g, on_gpu)
    repack_info["tensors"] = len(repacked)
    repack_info["bytes"] = sum(g.tensors[n].nbytes for n in repacked if n in g.tensors)
    model = Model(g, cfg, net, threads, time.perf_counter() - t0)
    model.repack = repack_info
    return model


def _resolve_repack(mode: str, g, placement, cpu_kernels: str) -> dict:
    """Whether load() repacks (runtime/memory.resolve_repack): never in "auto" with a GPU tier,
    whose expert uploads read the file's blocks (repack="on" may)."""
    if mode == "auto" and placement.has_gpu:
        return {"mode": mode, "on": False, "why": "a GPU tier: its expert uploads read the "
                                                  "file's blocks"}
    from .runtime.memory import resolve_repack
    return resolve_repack(mode, g.tensors.values(), cpu_kernels)
