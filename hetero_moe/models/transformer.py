"""The decoder every registered architecture is built into.

Loading is strict: every tensor the config calls for must exist with the right shape, and every
tensor in the file must be used; either failure names the tensor.

Dimension key: T tokens, D n_embd, V vocabulary.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import ContextLengthError, GGUFFormatError, MissingTensorError, UnsupportedError
from ..gguf import GGUFFile, TensorInfo
from ..layers.attention import Attention, Rope, decode_attention, rms_norm
from ..layers.linear import Embedding, KernelOptions, QuantLinear, apply_group, float_tensor
from ..layers.moe import DenseFFN, ExpertStack, MoE
from ..layers.sparse_attn import SparseAttnConfig
from ..layers.sparse_attn.cpu import load_nsa_weights
from ..runtime.kv_cache import KVCache, LatentKVCache
from ..runtime.placement import PlacementPlan
from ..runtime.workspace import Workspace
from .base import ROPE_NEOX, ModelConfig

# tensors llama.cpp may carry that never change the output
_IGNORED = ("rope_freqs.weight",)
SMALL_BATCH = 4
# Prompts shorter than this run torch's ops on one thread: torch's idle intra-op threads spin on the
# cores the C++ kernels' pool is using (measured on 2 cores: 19-token prompts 1.5-1.9x faster on one
# torch thread, 128 tokens 1.15-1.3x, 512 tokens about even).
TORCH_THREADS_MIN_T = 256
# Pool workers poll this long between ops: in decode the gaps between C++ ops are short torch ops
# on one thread (a sleeping worker would cost a wake-up per op); with larger batches torch runs
# its own threads in the gaps and the pool must leave the cores to them.
DECODE_SPIN_US = 2000
BATCH_SPIN_US = 50


def _pool_spin(us: int) -> None:
    try:
        from .. import cpu_backend
    except ImportError:
        return
    if cpu_backend.available():
        cpu_backend.set_spin_us(us)
_IGNORED_SUFFIX = (".attn_rot_embd",)
_QK_KIND = {None: 0, "head": 1, "full": 2}   # attn_prep's qk_norm codes


def place_rope(plan: PlacementPlan, rope):
    """RoPE tables (cos, sin) on the GPU tier when there is one."""
    if plan.has_gpu:
        rope.cos, rope.sin = plan.put("rope.cos", rope.cos), plan.put("rope.sin", rope.sin)
    return rope


class _Tensors:
    """Hands out tensors by name and remembers which were used."""

    def __init__(self, g: GGUFFile):
        self.g = g
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...] | None = None,
            optional: bool = False) -> TensorInfo | None:
        t = self.g.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise MissingTensorError(f"{self.g.path}: required tensor {name!r} is missing")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise GGUFFormatError(f"{t.path}: tensor {name!r} has shape {list(t.shape)}, "
                                  f"expected {list(shape)} from the metadata")
        self.used.add(name)
        return t

    def check_all_used(self) -> None:
        unused = [n for n in self.g.tensors if n not in self.used and n not in _IGNORED
                  and not n.endswith(_IGNORED_SUFFIX)]
        if unused:
            more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
            raise MissingTensorError(f"{self.g.path}: tensor(s) not used by architecture "
                                     f"{self.g.architecture!r}: {', '.join(unused[:5])}{more}")


class Block:
    def __init__(self, attn_norm, attn, ffn_norm, ffn, post_attn_norm=None, post_ffn_norm=None):
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn
        # Gemma's norms of the attention and FFN outputs, before each residual add (or None)
        self.post_attn_norm, self.post_ffn_norm = post_attn_norm, post_ffn_norm


def _post(y: torch.Tensor, w, eps: float) -> torch.Tensor:
    return y if w is None else rms_norm(y, w, eps)


def _check_step(cache, pos0: int, lengths: bool = True) -> None:
    """The checks LayerCache.append makes, for a fused step writing position pos0 of cache."""
    for c in cache.layers:
        if pos0 + 1 > c.n_ctx:
            raise ContextLengthError(f"position {pos0 + 1} exceeds the context length {c.n_ctx}")
        if lengths and pos0 > c.length:
            raise ValueError(f"cache holds {c.length} positions; cannot write at {pos0}")


def _advance(cache, pos0: int) -> None:
    """After a fused step wrote position pos0: the cache holds pos0 + 1 positions."""
    for c in cache.layers:
        c.length = pos0 + 1
        if c.sparse is not None:            # the rewritten position voids its blocks
            c.sparse.truncate(pos0)
    cache.pos = pos0 + 1


class Transformer:
    """Embeddings -> blocks (attention + dense FFN or MoE) -> norm -> lm_head."""

    def __init__(self, cfg: ModelConfig, g: GGUFFile, plan: PlacementPlan, n_ctx: int,
                 options: KernelOptions, progress=None, sparse: SparseAttnConfig | None = None,
                 cache_type: str | None = None):
        self.cfg, self.plan, self.n_ctx = cfg, plan, n_ctx
        self.sparse = sparse or SparseAttnConfig()   # the default; forward(sparse=) overrides
        self.nsa_missing: str | None = None          # first absent NSA tensor, if any
        self.torch_threads = torch.get_num_threads()
        self.fused = None                            # whole-model C++ decode step: None = not built
        self.ws = Workspace()                        # prompts' reused intermediates
        self._cpu_ok: bool | None = None
        self.fused_reason: str | None = None         # why it could not be built
        self.executor = None                         # the heterogeneous step (a GPU tier)
        ts = _Tensors(g)
        dev = plan.device_of

        def lin(name, shape, bias=False):
            t = ts.get(name, shape)
            b = ts.get(name.replace(".weight", ".bias"), (shape[0],), optional=not bias) \
                if bias else ts.get(name.replace(".weight", ".bias"), (shape[0],), optional=True)
            tier = plan.tier_of(name)
            return QuantLinear(t, tier, dev(tier), options, bias=b, placement=plan)

        def vec(name, n, optional=False):
            t = ts.get(name, (n,), optional=optional)
            return None if t is None else plan.put(name, float_tensor(t), plan.tier_of(name))

        def vec_2d(name, shape):          # a router: a float matrix used as is
            return plan.put(name, float_tensor(ts.get(name, shape)), plan.tier_of(name))

        D, V = cfg.n_embd, cfg.n_vocab
        q_out, kv_out = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        tok = ts.get("token_embd.weight", (V, D))
        self.embed = Embedding(tok, plan.gpu_device)      # rows to where the layers run
        self.rope = Rope(cfg, n_ctx, "cpu")           # MLA blocks bring their own (YaRN)
        if cfg.mla is None:
            place_rope(plan, self.rope)
        self.rope_swa = None                          # sliding-window layers' RoPE (own base)
        if any(cfg.swa_layers):
            self.rope_swa = Rope(cfg, n_ctx, "cpu", base=cfg.rope_base_swa, freq_scale=1.0)
            if plan.has_gpu:
                self.rope_swa.cos = plan.put("rope_swa.cos", self.rope_swa.cos)
                self.rope_swa.sin = plan.put("rope_swa.sin", self.rope_swa.sin)
            if self.sparse.enabled:
                raise UnsupportedError(f"{g.path}: sparse attention ({self.sparse.mode!r}) is not "
                                       f"supported with sliding-window layers ({cfg.arch!r})")
        self.blocks: list[Block] = []
        if cfg.mla is not None:          # deepseek2: MLA attention, leading dense blocks
            from .deepseek2 import build_blocks
            self.blocks = build_blocks(cfg, ts, lin, vec, plan, options, n_ctx, progress)
        for i in range(len(self.blocks), cfg.n_layer):
            p = f"blk.{i}."
            qn = kn = None
            if cfg.qk_norm == "head":
                qn = vec(p + "attn_q_norm.weight", cfg.head_dim)
                kn = vec(p + "attn_k_norm.weight", cfg.head_dim)
            elif cfg.qk_norm == "full":
                qn = vec(p + "attn_q_norm.weight", q_out)
                kn = vec(p + "attn_k_norm.weight", kv_out)
            attn = Attention(cfg, lin(p + "attn_q.weight", (q_out, D), cfg.attn_bias),
                             lin(p + "attn_k.weight", (kv_out, D), cfg.attn_bias),
                             lin(p + "attn_v.weight", (kv_out, D), cfg.attn_bias),
                             lin(p + "attn_output.weight", (D, q_out)), self.rope, qn, kn)
            if cfg.window_of(i):
                attn.window, attn.rope = cfg.window_of(i), self.rope_swa
            if cfg.is_moe:
                E, Fe = cfg.n_expert, cfg.n_ff_exp
                router = vec_2d(p + "ffn_gate_inp.weight", (E, D))
                shared = shared_gate = None
                if cfg.n_ff_shexp:
                    Fs = cfg.n_ff_shexp
                    shared = DenseFFN(lin(p + "ffn_gate_shexp.weight", (Fs, D)),
                                      lin(p + "ffn_up_shexp.weight", (Fs, D)),
                                      lin(p + "ffn_down_shexp.weight", (D, Fs)))
                    if cfg.shexp_gate:
                        shared_gate = vec(p + "ffn_gate_inp_shexp.weight", D)
                ffn = MoE(cfg, i, router,
                          ExpertStack(ts.get(p + "ffn_gate_exps.weight"), E, Fe, D),
                          ExpertStack(ts.get(p + "ffn_up_exps.weight"), E, Fe, D),
                          ExpertStack(ts.get(p + "ffn_down_exps.weight"), E, D, Fe),
                          options, shared, shared_gate)
                if plan.has_gpu:
                    from ..runtime.hetero import HeteroMoE
                    ffn = HeteroMoE(ffn, plan)
            else:
                Fd = cfg.n_ff
                ffn = DenseFFN(lin(p + "ffn_gate.weight", (Fd, D)),
                               lin(p + "ffn_up.weight", (Fd, D)),
                               lin(p + "ffn_down.weight", (D, Fd)), cfg.ffn_act)
            attn.nsa = self._nsa_weights(ts, p, dev)
            post = (vec(p + "post_attention_norm.weight", D), vec(p + "post_ffw_norm.weight", D)) \
                if cfg.post_norms else (None, None)
            self.blocks.append(Block(vec(p + "attn_norm.weight", D), attn,
                                     vec(p + "ffn_norm.weight", D), ffn, *post))
            if progress is not None:
                progress(i + 1, cfg.n_layer)
        self.out_norm = vec("output_norm.weight", D)
        if cfg.tied_embeddings:
            self.lm_head = QuantLinear(tok, plan.tier_of("output.weight"),
                                       dev(plan.tier_of("output.weight")), options,
                                       placement=plan, key="output.weight")
        else:
            self.lm_head = lin("output.weight", (V, D))
        ts.check_all_used()
        if cfg.mla is not None:
            # sparse attention reads a few blocks of the latent in place: f32, so no call has to
            # convert the whole cache (the dense path's f16 matches llama.cpp's rounding)
            self.cache = LatentKVCache(cfg.n_layer, n_ctx, cfg.mla.latent_dim, plan.gpu_device,
                                       plan.cache_dtype or (
                                           self._cpu_cache_dtype(cache_type, options)
                                           if cache_type is not None else torch.float32
                                           if self.sparse.enabled else torch.float16))
        else:
            self.cache = KVCache(cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim,
                                 plan.gpu_device, plan.cache_dtype
                                 or self._cpu_cache_dtype(cache_type, options))
        self._main_cache = self.cache                # the cache self.fused is built on
        if plan.has_gpu:
            for i, c in enumerate(self.cache.layers):
                plan.held[f"kv_cache.{i}"] = sum(t.numel() * t.element_size() for t in (
                    (c.latent,) if hasattr(c, "latent") else (c.k_store, c.v_store)))
            from ..runtime.hetero import HeteroExecutor
            self.executor = HeteroExecutor(self)

    def _cpu_cache_dtype(self, cache_type: str | None, options: KernelOptions) -> torch.dtype:
        """The CPU KV cache's element type: cache_type's, else f16 where the C++ attention
        kernels read it (half the bytes per decode step; llama.cpp's default and rounding), f32
        where torch's ops would have to widen the whole cache on every call (the torch path,
        sparse attention)."""
        if cache_type is not None:
            return {"f16": torch.float16, "f32": torch.float32}[cache_type]
        if options.cpu_kernels == "torch" or self.sparse.enabled:
            return torch.float32
        try:
            from .. import cpu_backend
            return torch.float16 if cpu_backend.available() else torch.float32
        except ImportError:
            return torch.float32

    def _cpu_norm(self) -> bool:
        """Whether the residual stream is on the CPU with the C++ kernels built (norms and
        scratch buffers then go through them)."""
        if self._cpu_ok is None:
            from .. import cpu_backend
            self._cpu_ok = (cpu_backend.available() and self.embed.device == "cpu"
                            and self.out_norm.is_cpu
                            and all(b.attn_norm.is_cpu and b.ffn_norm.is_cpu
                                    for b in self.blocks))
        return self._cpu_ok

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, D], scaled where the architecture scales them (Gemma)."""
        x = self.embed(ids)
        return x * self.cfg.embd_scale if self.cfg.embd_scale else x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head of hidden states x [T, D] -> logits [T, V] float32."""
        return self._softcap(self.lm_head(rms_norm(x, self.out_norm, self.cfg.rms_eps)).float())

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.cfg.final_softcap
        return logits if not c else torch.tanh(logits / c) * c

    def _check_sparse(self, sp: SparseAttnConfig) -> None:
        if sp.enabled and self.rope_swa is not None:
            raise UnsupportedError(f"sparse attention ({sp.mode!r}) is not supported with "
                                   f"sliding-window layers ({self.cfg.arch!r})")

    def _fused_ready(self) -> bool:
        """Whether this decode step can take the whole-model C++ step (built on first use)."""
        if self.fused is None:
            from ..runtime import fused_decode
            if not fused_decode.enabled_by_env():
                self.fused_reason = "turned off by HETERO_MOE_FUSED_DECODE=0"
            self.fused = (fused_decode.build(self) if fused_decode.enabled_by_env() else None) \
                or False
        return bool(self.fused) and not any(
            getattr(b.ffn, "margin_log", None) is not None
            or getattr(b.ffn, "counts", None) is not None for b in self.blocks)

    def decode_token(self, tok: int, pos0: int) -> torch.Tensor | None:
        """forward([tok], pos0) of one token of the model's own cache in one C++ call (embedding
        row included) -> logits [1, V], or None where that call does not apply (a GPU tier, sparse
        attention turned on, a model the fused step does not cover, an embedding table it cannot
        read): the caller then runs forward(). Each decode step's Python costs ~10 us an
        operation, its caches cold after the step streamed the weights, so this path does little.
        The caller has checked tok against the vocabulary."""
        if self.executor is not None or self.cache is not self._main_cache \
                or self.sparse.enabled or not self._fused_ready() \
                or self.fused._emb_src is None:
            return None
        cache = self.cache
        if pos0 > cache.pos:
            raise ValueError(f"cannot evaluate at position {pos0}: the cache holds {cache.pos} "
                             f"positions")
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
            _pool_spin(DECODE_SPIN_US)
        _check_step(cache, pos0, lengths=False)
        logits = self._softcap(self.fused.token_step(tok, pos0))
        _advance(cache, pos0)
        return logits

    def _fused_step(self, ids: torch.Tensor, pos0: int) -> torch.Tensor:
        return self._fused_steps([int(ids[0])], [pos0], [self.cache])

    def _fused_steps(self, ids: list[int], positions: list[int], caches: list) -> torch.Tensor:
        """One token of each of B sequences through the whole-model C++ step -> logits [B, V]."""
        for cache, pos0 in zip(caches, positions):
            _check_step(cache, pos0)
        x = self._embed(torch.tensor(ids, dtype=torch.long)).float().clone()  # [B, D], in place
        if len(ids) == 1 and caches[0] is self._main_cache:
            logits = self.fused.step(x, positions[0])
        else:
            logits = self.fused.steps(x, positions, caches)
        logits = self._softcap(logits)
        for cache, pos0 in zip(caches, positions):
            _advance(cache, pos0)
        return logits

    def new_cache(self):
        """A KV cache of the same kind, size, device and type as the model's own (for another
        sequence: forward(..., cache=) and forward_batch use it)."""
        c0 = self._main_cache
        if isinstance(c0, LatentKVCache):
            l0 = c0.layers[0]
            return LatentKVCache(self.cfg.n_layer, self.n_ctx, l0.latent.shape[1],
                                 str(l0.latent.device), l0.latent.dtype)
        l0 = c0.layers[0]
        return KVCache(self.cfg.n_layer, self.n_ctx, self.cfg.n_head_kv, self.cfg.head_dim,
                       str(l0.k_store.device), l0.k_store.dtype)

    @contextmanager
    def using(self, cache):
        """Run the calls inside on `cache` instead of the model's own (one caller at a time: the
        model's owner serializes calls)."""
        if cache is None or cache is self.cache:
            yield
            return
        prev, self.cache = self.cache, cache
        try:
            yield
        finally:
            self.cache = prev

    def _batch_ok(self, positions: list[int], sp: SparseAttnConfig) -> bool:
        """Whether forward_batch can run its rows together: the CPU per-op path with dense
        attention over per-head K/V caches (everything else steps each sequence alone)."""
        return (self.executor is None and self.cfg.mla is None
                and not any(sp.sparse_rows(1, p + 1) for p in positions))

    @torch.inference_mode()
    def forward_batch(self, ids: list[int], positions: list[int], caches: list,
                      sparse: SparseAttnConfig | None = None) -> torch.Tensor:
        """One decode step of B sequences: token ids[b] at position positions[b] of caches[b]
        -> logits [B, V] float32.

        Norms, projections, router, experts and lm_head run over the B rows together (each
        weight block is read and unpacked once for all rows that use it); attention runs per
        sequence against its own cache. Where the model has the fused C++ decode step, the whole
        batch is one C++ call (decode_steps); else the per-op path runs the rows together (dense
        attention over per-head caches) or, for MLA, a GPU tier or sparse rows, one at a time.
        Every op is row-wise (activations are quantized per row), but the C++ matmul takes GEMM
        tiles for several rows and a GEMV for one, which sum in a different order: a row equals
        that sequence's step alone to float rounding (~1e-6 relative), not bit for bit."""
        B = len(ids)
        if not B == len(positions) == len(caches):
            raise ValueError(f"forward_batch: {len(ids)} ids, {len(positions)} positions and "
                             f"{len(caches)} caches; expected one of each per sequence")
        sp = self.sparse if sparse is None else sparse
        self._check_sparse(sp)
        if self.executor is None and not any(sp.sparse_rows(1, p + 1) for p in positions) \
                and self._fused_ready():
            if torch.get_num_threads() != 1:
                torch.set_num_threads(1)
                _pool_spin(DECODE_SPIN_US)
            return self._fused_steps([int(t) for t in ids], [int(p) for p in positions], caches)
        if B == 1 or not self._batch_ok(positions, sp):
            rows = []
            for t, p, c in zip(ids, positions, caches):
                with self.using(c):
                    rows.append(self.forward(torch.tensor([t]), p, all_logits=False, sparse=sp))
            return torch.cat(rows)
        cfg = self.cfg
        want = 1 if B < TORCH_THREADS_MIN_T else self.torch_threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
            _pool_spin(DECODE_SPIN_US if want == 1 else BATCH_SPIN_US)
        x = self._embed(torch.tensor(ids, dtype=torch.long))         # [B, D]
        for i, b in enumerate(self.blocks):
            xn = rms_norm(x, b.attn_norm, cfg.rms_eps)
            x = x + _post(self._attn_rows(b.attn, xn, positions, [c.layers[i] for c in caches]),
                          b.post_attn_norm, cfg.rms_eps)
            x = x + _post(b.ffn(rms_norm(x, b.ffn_norm, cfg.rms_eps)), b.post_ffn_norm, cfg.rms_eps)
        for c, p in zip(caches, positions):
            c.pos = p + 1
        return self._logits(x)

    def _attn_rows(self, a: Attention, x: torch.Tensor, positions: list[int],
                   lcs: list) -> torch.Tensor:
        """Attention of B decode rows x [B, D], row b at positions[b] over its cache lcs[b]:
        q/k/v and the output projection over all rows, the rest (Attention's T = 1 path) per row."""
        cfg = self.cfg
        B, H, Hkv, Dh = x.shape[0], cfg.n_head, cfg.n_head_kv, cfg.head_dim
        q, k, v = apply_group([a.q, a.k, a.v], x)          # [B, H*Dh], [B, Hkv*Dh] x2
        q = q.view(B, H, Dh)
        k = k.view(B, Hkv, Dh)
        v = v.view(B, Hkv, Dh)
        out = torch.empty(B, H * Dh, dtype=torch.float32, device=x.device)
        for r, (pos, lc) in enumerate(zip(positions, lcs)):
            qr, kr, vr = q[r:r + 1], k[r:r + 1], v[r:r + 1]  # [1, H|Hkv, Dh]
            if a._prep_in_cpp(qr, lc):
                lc.reserve(pos, 1)
                from .. import cpu_backend
                cpu_backend.attn_prep(qr, kr, vr, lc.k_store, lc.v_store, pos, q_norm=a.q_norm,
                                      k_norm=a.k_norm, qk_norm=_QK_KIND[cfg.qk_norm],
                                      cos=a.rope.cos, sin=a.rope.sin, n_rot=a.rope.n_rot,
                                      neox=a.rope.kind == ROPE_NEOX, eps=cfg.rms_eps)
                keys, values = lc.commit(pos + 1)
            else:
                if cfg.qk_norm == "full":
                    qr = rms_norm(qr.reshape(1, -1), a.q_norm, cfg.rms_eps).view(qr.shape)
                    kr = rms_norm(kr.reshape(1, -1), a.k_norm, cfg.rms_eps).view(kr.shape)
                elif cfg.qk_norm == "head":
                    qr = rms_norm(qr, a.q_norm, cfg.rms_eps)
                    kr = rms_norm(kr, a.k_norm, cfg.rms_eps)
                qr, kr = a.rope(qr, pos), a.rope(kr, pos)
                keys, values = lc.append(kr, vr, pos)
            if lc.sparse is not None:
                lc.sparse.truncate(pos)
            lo = max(0, keys.shape[0] - a.window) if a.window else 0   # the sliding window
            out[r] = decode_attention(qr[0], keys[lo:], values[lo:], a.scale).reshape(-1)
        return a.o(out)

    def _nsa_weights(self, ts: _Tensors, p: str, dev):
        """A layer's learned sparse-attention tensors: loaded whenever the file has them (so a
        per-call `nsa` override can use them), required when the model loads in `nsa` mode."""
        def get(name):
            t = ts.get(name, optional=True)
            return None if t is None else self.plan.put(name, float_tensor(t),
                                                        self.plan.tier_of(name))
        try:
            w = load_nsa_weights(get, p)
        except KeyError as e:
            raise MissingTensorError(f"{ts.g.path}: NSA tensor {e.args[0]!r} is missing while "
                                     f"the layer has the other NSA tensors") from None
        if w is None:
            self.nsa_missing = self.nsa_missing or p + "nsa_cmp_k.weight"
            if self.sparse.mode == "nsa":
                raise MissingTensorError(f"{ts.g.path}: sparse_attn mode 'nsa' needs tensor "
                                         f"{self.nsa_missing!r}, which is missing (use 'approx' "
                                         f"for a model trained without NSA)")
        elif self.sparse.mode == "nsa":
            try:
                w.check(self.sparse, self.cfg.n_head, self.cfg.head_dim, self.cfg.head_dim)
            except ValueError as e:
                raise GGUFFormatError(f"{ts.g.path}: layer {p!r}: {e}") from None
        return w

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos0: int, all_logits: bool = True,
                sparse: SparseAttnConfig | None = None, cache=None) -> torch.Tensor:
        """Run tokens ids [T] at positions pos0..pos0+T-1 -> logits [T or 1, V] float32.
        sparse: this call's sparse-attention settings (default: the model's); cache: another
        sequence's KV cache (from new_cache()) instead of the model's own."""
        if cache is not None and cache is not self.cache:
            with self.using(cache):
                return self.forward(ids, pos0, all_logits, sparse)
        if self.executor is not None:
            return self.executor.forward(ids, pos0, all_logits, sparse)
        cfg = self.cfg
        sp = self.sparse if sparse is None else sparse
        self._check_sparse(sp)
        attn_kw = {"sparse": sp} if sp.enabled else {}
        # decode steps are many tiny torch ops: extra intra-op threads only contend with the
        # CPU kernels' pool on the same cores
        want = 1 if ids.shape[0] < TORCH_THREADS_MIN_T else self.torch_threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
            _pool_spin(DECODE_SPIN_US if want == 1 else BATCH_SPIN_US)
        if ids.shape[0] == 1 and not sp.sparse_rows(1, pos0 + 1) and self._fused_ready():
            return self._fused_step(ids, pos0)
        x = self._embed(ids)                                    # [T, D]
        ws = self.ws if ids.shape[0] > SMALL_BATCH and self._cpu_norm() else None
        eps = cfg.rms_eps
        if ws is None:
            for i, b in enumerate(self.blocks):
                x = x + _post(b.attn(rms_norm(x, b.attn_norm, eps), pos0, self.cache.layers[i],
                                     **attn_kw), b.post_attn_norm, eps)
                x = x + _post(b.ffn(rms_norm(x, b.ffn_norm, eps)), b.post_ffn_norm, eps)
        else:      # prompts: large intermediates in reused buffers, residual sums in place
            from .. import cpu_backend
            T, D = x.shape
            x = x.float().contiguous()
            for i, b in enumerate(self.blocks):
                xn = cpu_backend.rms_norm(x, b.attn_norm, cfg.rms_eps, out=ws.get("xn", T, D))
                x.add_(_post(b.attn(xn, pos0, self.cache.layers[i], ws=ws, **attn_kw),
                             b.post_attn_norm, eps))
                xn = cpu_backend.rms_norm(x, b.ffn_norm, cfg.rms_eps, out=ws.get("xn", T, D))
                x.add_(_post(b.ffn(xn, ws=ws), b.post_ffn_norm, eps))
        if not all_logits:
            x = x[-1:]
        self.cache.pos = pos0 + ids.shape[0]
        return self._logits(x)
