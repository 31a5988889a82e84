"""llama.cpp (llama-cpp-python) as the reference: logits, tokens, greedy continuations."""
from __future__ import annotations

import numpy as np


class LlamaRef:
    """A llama.cpp model on the CPU with all logits kept."""

    def __init__(self, path: str, n_ctx: int = 1024, threads: int = 2):
        import llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False,
                                   n_gpu_layers=0)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def logits_sequential(self, ids: list[int]) -> np.ndarray:
        """The same logits computed one token at a time (llama.cpp's decode path)."""
        self.llm.reset()
        rows = []
        for i, t in enumerate(ids):
            self.llm.eval([t])
            rows.append(np.array(self.llm.scores[i], dtype=np.float32))
        return np.stack(rows)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=special)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        out = []
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) >= n:
                break
        return out

    def close(self):
        self.llm.close() if hasattr(self.llm, "close") else None


def llama_chat_render(messages: list[dict], add_generation_prompt: bool = True,
                      template: bytes = b"gemma") -> str:
    """`messages` rendered by llama.cpp's llama_chat_apply_template with a built-in template by
    name (no model: the name picks llama.cpp's C++ handler, e.g. "gemma")."""
    import ctypes

    import llama_cpp
    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode())
          for m in messages])
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template, arr, len(messages),
                                                add_generation_prompt, buf, size)
        if n < 0:
            raise ValueError(f"llama.cpp does not know the chat template {template!r} ({n})")
        if n <= size:
            return buf.raw[:n].decode()
        size = n


NEAR_TIE_SIGMAS = 3.0


def compare_logits(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Per-position relative L2 error and top-1 agreement outside near-ties.

    A position is a near-tie when llama.cpp's top-1/top-2 margin is within three standard
    deviations of the error of that margin: with a per-logit RMS error e measured there, the
    difference of two logits' errors has deviation sqrt(2)*e, so the cut is 3*sqrt(2)*e. Only the
    other positions count for top-1 agreement. (A 2*e cut let ~3% of the positions just above it
    flip by noise alone, which made a 99% bar a coin toss on quantized files.)
    """
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    rel = rel_err(ours, ref)
    d = ours - ref
    rms = np.sqrt((d ** 2).mean(axis=1))
    top2 = np.partition(ref, -2, axis=1)[:, -2:]        # [.., second largest, largest]
    margin = top2[:, 1] - top2[:, 0]
    decided = margin > NEAR_TIE_SIGMAS * np.sqrt(2.0) * rms
    agree = ours.argmax(1) == ref.argmax(1)
    n_dec = int(decided.sum())
    return {
        "positions": len(ref),
        "max_rel_err": float(rel.max()),
        "mean_rel_err": float(rel.mean()),
        "decided": n_dec,
        "top1_agree_decided": float(agree[decided].mean()) if n_dec else 1.0,
        "top1_agree_all": float(agree.mean()),
    }


def rel_err(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Relative L2 error per position."""
    return np.linalg.norm(ours - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)


def quantize_with_llama(src: str, dst: str, ftype_name: str) -> str:
    """Re-type a GGUF with llama.cpp's own quantizer (e.g. "ALL_F32", "MOSTLY_Q4_K_M")."""
    import ctypes
    import os

    import llama_cpp
    if not os.path.exists(dst):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype_name}")
        p.allow_requantize = True
        p.nthread = 2
        tmp = dst + ".part"
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(p))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {ftype_name}) returned {rc}")
        os.replace(tmp, dst)
    return dst


MIN_SAME_BEFORE_TIE = 16   # identical tokens a greedy comparison must see before a near-tie excuses


def assert_same_greedy(got: list[int], want: list[int], rows, eog: frozenset, what: str,
                       n_gen: int, tie_margin: float, min_same: int = MIN_SAME_BEFORE_TIE) -> None:
    """`got` follows `want` up to where one run ends, or to a near-tie of the reference.

    A run shorter than n_gen stopped at an end-of-generation token; rows[j] are the reference's
    logits that chose want[j] (and its end-of-generation token after the last one). A parting at a
    near-tie is excused only after `min_same` identical tokens (else the comparison would have
    compared almost nothing: pick a prompt whose continuation is decided for longer).
    """
    def picks(seq, j):
        return {seq[j]} if j < len(seq) else set(eog)
    for j in range(n_gen):
        g, w = picks(got, j), picks(want, j)
        if g & w:
            if j >= len(got) or j >= len(want):
                return                          # both stopped here
            continue
        row = np.asarray(rows[j], dtype=np.float64)
        gap = max(row[t] for t in w) - max(row[t] for t in g)
        assert gap <= tie_margin, (
            f"{what}: greedy runs part at token {j} where the reference prefers its pick by "
            f"{gap:.3f} logits (> {tie_margin}):\n ours {got}\n want {want}")
        assert j >= min(min_same, n_gen), (
            f"{what}: greedy runs part at token {j}, a near-tie ({gap:.3f} logits), before "
            f"{min(min_same, n_gen)} identical tokens: too little compared\n ours {got}\n want {want}")
        return
