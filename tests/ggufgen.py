"""Tiny hand-made GGUF files for loader tests (F32 llama, a few KB)."""
from __future__ import annotations

import numpy as np
import gguf

D, H, HKV, FF, V, L = 32, 4, 2, 64, 64, 2


def tiny_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hd = D // H

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    t = {"token_embd.weight": w(V, D), "output_norm.weight": np.ones(D, np.float32),
         "output.weight": w(V, D)}
    for i in range(L):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": np.ones(D, np.float32),
                  p + "attn_q.weight": w(H * hd, D), p + "attn_k.weight": w(HKV * hd, D),
                  p + "attn_v.weight": w(HKV * hd, D), p + "attn_output.weight": w(D, H * hd),
                  p + "ffn_norm.weight": np.ones(D, np.float32),
                  p + "ffn_gate.weight": w(FF, D), p + "ffn_up.weight": w(FF, D),
                  p + "ffn_down.weight": w(D, FF)})
    return t


def write_tiny_llama(path, arch: str = "llama", drop: tuple = (), extra: dict | None = None,
                     meta_drop: tuple = (), n_ctx: int = 128, split_max_tensors: int = 0,
                     raw_types: dict | None = None) -> str:
    """Write a tiny llama GGUF; `drop` removes tensors, `extra` adds some, `raw_types` maps a
    tensor name to (bytes, ggml type) to store it verbatim with that type."""
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    meta = {
        "context_length": (w.add_context_length, n_ctx),
        "embedding_length": (w.add_embedding_length, D),
        "block_count": (w.add_block_count, L),
        "feed_forward_length": (w.add_feed_forward_length, FF),
        "head_count": (w.add_head_count, H),
        "head_count_kv": (w.add_head_count_kv, HKV),
        "rms_eps": (w.add_layer_norm_rms_eps, 1e-5),
        "rope_base": (w.add_rope_freq_base, 10000.0),
    }
    for k, (fn, v) in meta.items():
        if k not in meta_drop:
            fn(v)
    w.add_vocab_size(V)
    tensors = tiny_llama_tensors()
    tensors.update(extra or {})
    for name, arr in tensors.items():
        if name in drop:
            continue
        if raw_types and name in raw_types:
            data, qtype = raw_types[name]
            w.add_tensor(name, data, raw_shape=arr.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
