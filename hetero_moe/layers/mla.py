"""Multi-head Latent Attention (DeepSeek-V2/V3) over a cache of compressed latents.

Per token the cache holds c (the RMS-normed latent, C dims) and k_pe (the rotated key part, R dims),
shared by all heads. Head h's key is [c @ k_b[h], k_pe] and its value c @ v_b[h]^T.
Two equal ways to attend:
  expanded: decompress every cached latent to per-head keys/values, then ordinary attention
            (cheaper for long prompts: the decompression is paid once per cached token);
  absorbed: fold k_b into the query and v_b into the output, so scores and the weighted sum run
            over the latent itself, as one KV head (cheaper for decode: nothing per cached token
            but a dot product). `latent_attention` is that inner step.
Decode always runs absorbed. Prompts run absorbed too for split k_b/v_b files, as llama.cpp computes
them (its rounding: query in the cache's f16, k_b/v_b activations quantized along their rows);
legacy kv_b files, which llama.cpp runs expanded, take whichever form costs fewer multiply-adds.

Dimension key: T tokens in this call, L cached positions after it, H heads, C kv_lora_rank,
R RoPE dims, N no-RoPE key dims, Dv value dims, Cq q_lora_rank, D model width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from ..gguf import TensorInfo
from ..models.base import ModelConfig
from ..quant.act import fake_quant
from ..runtime.kv_cache import LatentLayerCache
from .attention import rms_norm
from .linear import QuantLinear
from .sparse_attn import SparseAttnConfig
from .sparse_attn import cpu as sparse_cpu
from .rope_yarn import YarnRope


def causal_mask(T: int, L: int, pos0: int, device) -> torch.Tensor:
    """[T, L] True where query pos0+t may see cached position j."""
    j = torch.arange(L, device=device)
    i = torch.arange(pos0, pos0 + T, device=device)
    return j[None, :] <= i[:, None]


# query rows per score matrix on the GPU tier (runtime/planner.py sizes its scratch by it)
QUERY_BLOCK = 128


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a float32 activation and a weight that may be kept in float16 (the GPU tier):
    on CUDA in f16 with fp32 accumulation, elsewhere in float32."""
    if b.dtype == a.dtype:
        return torch.matmul(a, b)
    if a.is_cuda:
        return torch.matmul(a.to(b.dtype), b).float()
    return torch.matmul(a, b.float())


def _cpu_kernels() -> bool:
    from .. import cpu_backend
    return cpu_backend.available()


def latent_attention(q: torch.Tensor, latent: torch.Tensor, n_value: int, scale: float,
                     pos0: int) -> torch.Tensor:
    """Attention of absorbed queries over the latent cache, as a single shared KV head.

    q [T, H, C+R] (query already multiplied by k_b), latent [L, C+R] (key: all dims, value: the
    first n_value = C dims) -> [T, H, C], the weighted sum of latents per head.
    """
    T, H, K = q.shape
    L = latent.shape[0]
    if latent.device.type == "cpu" and L == pos0 + T and _cpu_kernels():
        # the C++ attention kernels, the latent as one KV head (key: all dims, value: a prefix of
        # each row); a prompt skips the masked half of the scores
        from .. import cpu_backend
        lat = latent.contiguous()
        k, v = lat[:, None, :], lat[:, None, :n_value]
        if T == 1:
            return cpu_backend.attn_decode(q[0].contiguous(), k, v, scale).view(1, H, n_value)
        return cpu_backend.attn_prefill(q.contiguous(), k, v, pos0, scale)
    if latent.is_cuda and T > QUERY_BLOCK:     # bound the score matrix (the planner's scratch)
        return torch.cat([latent_attention(q[s:s + QUERY_BLOCK], latent, n_value, scale, pos0 + s)
                          for s in range(0, T, QUERY_BLOCK)])
    s = (q.reshape(T * H, K) @ latent.T).view(T, H, L) * scale          # [T, H, L]
    if T > 1:
        s = s.masked_fill(~causal_mask(T, L, pos0, q.device)[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p.view(T * H, L) @ latent[:, :n_value]).view(T, H, n_value)


class MLAttention:
    """MLA with a q projection (attn_q, or attn_q_a -> norm -> attn_q_b), attn_kv_a_mqa -> norm,
    per-head k_b [H, C, N] / v_b [H, Dv, C] (dequantized once), attn_output.

    Called like Attention: (x [T, D], pos0, cache) -> [T, D].
    """

    def __init__(self, cfg: ModelConfig, q: QuantLinear | None, q_a: QuantLinear | None,
                 q_a_norm: torch.Tensor | None, q_b: QuantLinear | None, kv_a: QuantLinear,
                 kv_a_norm: torch.Tensor, k_b: torch.Tensor, v_b: torch.Tensor, o: QuantLinear,
                 rope: YarnRope, k_b_type: int | None = None, v_b_type: int | None = None,
                 act_quant: bool = False, transposed_copies: bool = True,
                 k_b_blocks: TensorInfo | None = None, v_b_blocks: TensorInfo | None = None):
        """transposed_copies: keep contiguous transposes of k_b / v_b (the CPU path's layout);
        the GPU tier keeps one copy each and multiplies through transposed views.
        k_b_blocks / v_b_blocks (with k_b / v_b None): the GGUF tensors themselves, multiplied per
        head by the CPU kernels (activations quantized along their rows, as llama.cpp does), with
        no float copy; one is made only if the expanded form is ever asked for."""
        m = cfg.mla
        self.cfg, self.m = cfg, m
        self.q, self.q_a, self.q_a_norm, self.q_b = q, q_a, q_a_norm, q_b
        self.kv_a, self.kv_a_norm, self.o, self.rope = kv_a, kv_a_norm, o, rope
        self.k_b_raw, self.v_b_raw = k_b_blocks, v_b_blocks
        self._transposed_copies = transposed_copies
        self.k_b = self.k_b_t = self.v_b = self.v_b_t = None
        if k_b is not None:
            self._set_k_b(k_b)
        if v_b is not None:
            self._set_v_b(v_b)
        # llama.cpp quantizes the activation along the weight's rows: q_nope / the attention
        # output for split k_b / v_b (rows N / C long, its absorbed form), the latent c for a
        # legacy kv_b (rows C long, its expanded form). The other form keeps f32 activations.
        self.k_b_type = k_b_type if act_quant else None
        self.v_b_type = v_b_type if act_quant else None
        self.quant_form = "absorbed" if m.split else "expanded"
        self.prefill_form = "absorbed" if m.split else "auto"   # "absorbed", "expanded", "auto"

    def _set_k_b(self, k_b: torch.Tensor) -> None:
        self.k_b = k_b                                      # [H, C, N]
        self.k_b_t = k_b.transpose(1, 2)                    # [H, N, C]
        if self._transposed_copies:
            self.k_b_t = self.k_b_t.contiguous()

    def _set_v_b(self, v_b: torch.Tensor) -> None:
        self.v_b = v_b                                      # [H, Dv, C]
        self.v_b_t = v_b.transpose(1, 2)                    # [H, C, Dv]
        if self._transposed_copies:
            self.v_b_t = self.v_b_t.contiguous()

    def _float_heads(self) -> None:
        """Float copies of k_b / v_b made from the blocks (the expanded form needs them)."""
        from .linear import float_tensor
        if self.k_b is None:
            self._set_k_b(float_tensor(self.k_b_raw))
        if self.v_b is None:
            self._set_v_b(float_tensor(self.v_b_raw))

    @staticmethod
    def _per_head(t: TensorInfo, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, cols] -> [T, H, rows]: head h through the h-th [rows, cols] matrix of the
        stack t ([H, rows, cols] in GGUF blocks) with the CPU kernels."""
        from .. import cpu_backend
        H, rows, cols = t.shape
        per = t.data.nbytes // H
        out = torch.empty(x.shape[0], H, rows, dtype=torch.float32)
        for h in range(H):
            out[:, h] = cpu_backend.matmul(t.data[h * per:(h + 1) * per], t.ggml_type, rows, cols,
                                           x[:, h].float().contiguous())
        return out

    def _aq(self, x: torch.Tensor, ggml_type: int | None, form: str) -> torch.Tensor:
        if ggml_type is None or form != self.quant_form:
            return x
        return fake_quant(x, ggml_type)

    def project(self, x: torch.Tensor, pos0: int):
        """-> q_nope [T, H, N], q_pe [T, H, R] (rotated), new latent rows [T, C+R]."""
        cfg, m = self.cfg, self.m
        T = x.shape[0]
        if self.q is not None:
            q = self.q(x)                                              # [T, H*(N+R)]
        else:
            q = self.q_b(rms_norm(self.q_a(x), self.q_a_norm, cfg.rms_eps))
        q = q.view(T, cfg.n_head, m.k_head)
        q_nope, q_pe = q[..., :m.qk_nope], q[..., m.qk_nope:]
        kv = self.kv_a(x)                                              # [T, C+R]
        c = rms_norm(kv[:, :m.kv_lora], self.kv_a_norm, cfg.rms_eps)   # [T, C]
        k_pe = self.rope(kv[:, None, m.kv_lora:], pos0)[:, 0]         # [T, R]
        return q_nope, self.rope(q_pe, pos0), torch.cat((c, k_pe), dim=-1)

    def absorbed_is_cheaper(self, T: int, L: int) -> bool:
        """Multiply-adds of the absorbed form vs decompressing L latents (see the module doc)."""
        m = self.m
        C, N, R, Dv = m.kv_lora, m.qk_nope, m.qk_rope, m.v_head
        absorbed = T * (N * C + L * (2 * C + R) + C * Dv)
        expanded = L * C * (N + Dv) + T * L * (N + R + Dv)
        return absorbed <= expanded

    def attend_absorbed(self, q_nope, q_pe, latent, pos0, q_dtype=torch.float32,
                        inner=None) -> torch.Tensor:
        """-> [T, H, Dv]; the query is rounded to q_dtype (the cache's), as a matmul against an
        f16 cache does in llama.cpp. inner(q [T, H, C+R], latent, pos0) -> [T, H, C] replaces the
        dense latent attention (sparse attention does)."""
        m = self.m
        if self.k_b_raw is not None:
            q_abs = self._per_head(self.k_b_raw, q_nope)               # [T, H, C]
        else:
            qn = self._aq(q_nope, self.k_b_type, "absorbed").transpose(0, 1)       # [H, T, N]
            q_abs = _mm(qn, self.k_b_t).transpose(0, 1)               # [T, H, C]
        q = torch.cat((q_abs, q_pe), dim=-1)                           # [T, H, C+R]
        if q_dtype != torch.float32:
            q = q.to(q_dtype).float()
        if inner is not None:
            o_lat = inner(q, latent, pos0)
        else:
            o_lat = latent_attention(q, latent, m.kv_lora, m.kq_scale, pos0)   # [T, H, C]
        if self.v_b_raw is not None:
            return self._per_head(self.v_b_raw, o_lat)                 # [T, H, Dv]
        o_lat = self._aq(o_lat, self.v_b_type, "absorbed").transpose(0, 1)         # [H, T, C]
        return _mm(o_lat, self.v_b_t).transpose(0, 1)                 # [T, H, Dv]

    def attend_expanded(self, q_nope, q_pe, latent, pos0, q_dtype=None) -> torch.Tensor:
        """-> [T, H, Dv]"""
        m = self.m
        if self.k_b is None or self.v_b is None:
            self._float_heads()
        T, H, L = q_nope.shape[0], self.cfg.n_head, latent.shape[0]
        c, k_pe = latent[:, :m.kv_lora], latent[:, m.kv_lora:]         # [L, C], [L, R]
        k_nope = _mm(self._aq(c, self.k_b_type, "expanded"), self.k_b)           # [H, L, N]
        v = _mm(self._aq(c, self.v_b_type, "expanded"), self.v_b_t)              # [H, L, Dv]
        k = torch.cat((k_nope, k_pe[None].expand(H, L, m.qk_rope)), dim=-1)   # [H, L, N+R]
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)          # [H, T, N+R]
        mask = causal_mask(T, L, pos0, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=m.kq_scale)
        return out.transpose(0, 1)                                     # [T, H, Dv]

    def __call__(self, x: torch.Tensor, pos0: int, cache: LatentLayerCache,
                 absorbed: bool | None = None, sparse: SparseAttnConfig | None = None,
                 ws=None) -> torch.Tensor:
        """ws (the decoder's scratch) is not used here: MLA's intermediates are small."""
        T = x.shape[0]
        q_nope, q_pe, new = self.project(x, pos0)
        latent = cache.append(new, pos0)                               # [L, C+R]
        if cache.sparse is not None:            # rewritten positions void their compressed blocks
            cache.sparse.truncate(pos0)
        n_sparse = 0 if sparse is None else sparse.sparse_rows(T, latent.shape[0])
        if n_sparse:
            if sparse.mode == "nsa":
                raise UnsupportedError(f"sparse_attn mode 'nsa' has no learned weights for "
                                       f"Multi-head Latent Attention ({self.cfg.arch}); use "
                                       f"'approx'")
            C = self.m.kv_lora

            def inner(q, lat, p0):                                     # one KV head: the latent
                o = sparse_cpu.attend(q, lat[:, None, :], lat[:, None, :C], p0, cache, sparse,
                                      self.m.kq_scale)
                return o.view(q.shape[0], q.shape[1], C)
            if n_sparse == T:
                out = self.attend_absorbed(q_nope, q_pe, latent, pos0, cache.latent.dtype, inner)
                return self.o(out.reshape(T, self.cfg.n_head * self.m.v_head))
        if absorbed is None:
            form = "absorbed" if T == 1 else self.prefill_form
            absorbed = (form == "absorbed" or
                        form == "auto" and self.absorbed_is_cheaper(T, latent.shape[0]))
        attend = self.attend_absorbed if absorbed else self.attend_expanded
        out = attend(q_nope, q_pe, latent, pos0, cache.latent.dtype)
        if n_sparse:                                 # the prompt's last row: a decode step
            out[-n_sparse:] = self.attend_absorbed(q_nope[-n_sparse:], q_pe[-n_sparse:], latent,
                                                   pos0 + T - n_sparse, cache.latent.dtype,
                                                   inner)
        return self.o(out.reshape(T, self.cfg.n_head * self.m.v_head))
