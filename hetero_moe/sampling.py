"""Next-token sampling: parameters, the filter chain, logprobs, stop sequences over streamed text.

The chain follows llama.cpp's default order:

    penalties -> top_k -> top_p -> min_p -> temperature -> draw

top_p and min_p therefore see the distribution at temperature 1 (renormalized after top_k); the
temperature only reshapes the probabilities of the tokens that survived. Temperature 0 (or top_k 1)
is greedy: the argmax of the penalized logits, ties going to the lowest token id.

Dimension key: V = vocabulary size, K = candidates left after filtering, W = penalty window length.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import HeteroMoEError

MAX_LOGPROBS = 20
# Cumulative mass this close to top_p counts as reaching it, so a boundary such as p = 0.75 over
# probabilities 0.5 + 0.25 is not lost to float rounding.
_TOP_P_SLACK = 1e-6
# top_p first looks at this many best tokens; LLM distributions are peaked, so this usually does.
_TOP_P_FAST_K = 256
# Otherwise it buckets the logits by value and sorts only the bucket where the mass crosses top_p.
_TOP_P_BINS = 4096
# Tokens this far below the best logit (p ratio < 1e-35) share the last bucket.
_TOP_P_SPAN = 80.0


class SamplingParamError(HeteroMoEError, ValueError):
    """A sampling parameter has the wrong type or is out of its allowed range."""


# field -> (kind, range check or None, allowed range in words). kind: "int", "float", "bool", and
# "int?" for an int that may be None.
_RULES = {
    "max_tokens": ("int", lambda v: v >= 0, ">= 0"),
    "temperature": ("float", lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_k": ("int", None, "an int (<= 0 disables)"),
    "top_p": ("float", lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": ("float", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repeat_penalty": ("float", lambda v: v > 0, "> 0 (1 = off)"),
    "repeat_last_n": ("int", lambda v: v >= -1, ">= -1 (-1 = whole context, 0 = off)"),
    "frequency_penalty": ("float", None, "a finite number"),
    "presence_penalty": ("float", None, "a finite number"),
    "seed": ("int?", lambda v: 0 <= v < 2**64, "None (random) or in [0, 2**64)"),
    "logprobs": ("int?", lambda v: 0 <= v <= MAX_LOGPROBS, f"None or in [0, {MAX_LOGPROBS}]"),
    "echo": ("bool", None, "True or False"),
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_field(name: str, v) -> None:
    kind, ok, allowed = _RULES[name]
    if kind == "int?" and v is None:
        return
    type_ok = {"int": _is_int, "int?": _is_int, "float": _is_real,
               "bool": lambda x: isinstance(x, bool)}[kind](v)
    if not type_ok:
        want = {"int": "an int", "int?": "an int or None", "float": "a number",
                "bool": "a bool"}[kind]
        raise SamplingParamError(
            f"SamplingParams.{name}={v!r} has type {type(v).__name__}; expected {want}, {allowed}")
    if kind == "float" and not math.isfinite(v):
        raise SamplingParamError(f"SamplingParams.{name}={v!r} is not finite; allowed: {allowed}")
    if ok is not None and not ok(v):
        raise SamplingParamError(f"SamplingParams.{name}={v!r} is out of range; allowed: {allowed}")


def _stop_list(stop) -> list[str]:
    """Normalize a stop field (None, one string, or a list/tuple of strings) to a list."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise SamplingParamError(f"SamplingParams.stop={stop!r} has type {type(stop).__name__}; "
                                 "expected None, a string or a list of strings")
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise SamplingParamError(f"SamplingParams.stop[{i}]={s!r} has type {type(s).__name__};"
                                     " expected a non-empty string")
        if not s:
            raise SamplingParamError(f"SamplingParams.stop[{i}]='' is empty; a stop sequence "
                                     "needs at least one character")
    return list(items)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Call validate() before use."""
    max_tokens: int = 128           # 0 is allowed (with echo it scores a prompt)
    temperature: float = 0.8        # 0 -> greedy
    top_k: int = 40                 # <= 0 disables
    top_p: float = 0.95             # 1 disables
    min_p: float = 0.05             # 0 disables; keeps p >= min_p * p_max
    repeat_penalty: float = 1.0     # llama.cpp: divide positive logits, multiply the others
    repeat_last_n: int = 64         # penalty window; -1 = whole context, 0 = no penalties
    frequency_penalty: float = 0.0  # OpenAI: logit -= count * frequency_penalty
    presence_penalty: float = 0.0   # OpenAI: logit -= presence_penalty if count > 0
    seed: int | None = None         # same seed -> same tokens; None -> random
    stop: list[str] | str | None = None  # output ends before the first stop sequence
    logprobs: int | None = None     # top-N logprobs per generated token
    echo: bool = False              # also return the prompt tokens with their logprobs

    def validate(self) -> "SamplingParams":
        """Raise SamplingParamError naming the first bad field, its value and the allowed range."""
        for name in _RULES:
            _check_field(name, getattr(self, name))
        _stop_list(self.stop)
        return self

    def stop_list(self) -> list[str]:
        """The stop sequences as a list (empty when none)."""
        return _stop_list(self.stop)

    @classmethod
    def greedy(cls, **kw) -> "SamplingParams":
        """Temperature 0 and no penalties; keyword arguments override any field."""
        fields = dict(temperature=0.0, repeat_penalty=1.0, frequency_penalty=0.0,
                      presence_penalty=0.0)
        fields.update(kw)
        return cls(**fields).validate()


def _top_p_cutoff(logits: torch.Tensor, top_p: float) -> float:
    """The largest logit c such that the tokens with logit >= c hold at least top_p of the mass.

    This is llama.cpp's "smallest sorted prefix with cumulative probability >= p", except that
    tokens tied with the last one kept are all kept. It avoids sorting all of V.
    """
    n = logits.numel()
    lmax = logits.max()
    p = torch.exp(logits - lmax)                          # [n] unnormalized probabilities
    goal = (top_p - _TOP_P_SLACK) * float(p.sum(dtype=torch.float64))
    if n <= _TOP_P_FAST_K:
        vals = torch.sort(logits, descending=True).values
        cum = torch.cumsum(torch.exp(vals - lmax).double(), 0)
        return float(vals[min(int(torch.searchsorted(cum, goal)), n - 1)])
    vals = torch.topk(logits, _TOP_P_FAST_K).values       # sorted, descending
    cum = torch.cumsum(torch.exp(vals - lmax).double(), 0)
    if float(cum[-1]) >= goal:
        return float(vals[int(torch.searchsorted(cum, goal))])
    # Bucket by distance from the best logit; buckets are contiguous runs of the sorted order, so
    # only the bucket where the cumulative mass crosses the goal needs sorting.
    lmin = float(logits.min())
    span = min(float(lmax) - lmin, _TOP_P_SPAN) if math.isfinite(lmin) else _TOP_P_SPAN
    if span <= 0:
        return float(lmax)
    bins = ((lmax - logits) * (_TOP_P_BINS / span)).clamp_(max=_TOP_P_BINS - 1).long()  # [n]
    mass = torch.bincount(bins, weights=p.double(), minlength=_TOP_P_BINS)
    cum = torch.cumsum(mass, 0)
    b = min(int(torch.searchsorted(cum, goal)), _TOP_P_BINS - 1)
    before = float(cum[b - 1]) if b > 0 else 0.0
    vals = torch.sort(logits[bins == b], descending=True).values
    cum = before + torch.cumsum(torch.exp(vals - lmax).double(), 0)
    return float(vals[min(int(torch.searchsorted(cum, goal)), vals.numel() - 1)])


class Sampler:
    """Picks next tokens for one sequence; owns the random generator, so keep one per sequence."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params.validate()
        if not _is_int(vocab_size) or vocab_size <= 0:
            raise SamplingParamError(f"vocab_size={vocab_size!r} must be a positive int")
        self.vocab_size = int(vocab_size)
        self.generator = torch.Generator(device="cpu")
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(params.seed))
        self.seed = self.generator.initial_seed()         # the seed in use, to reproduce a run

    # -- the chain, step by step (public so each step can be checked on its own) --

    def _as_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 1 \
                or logits.numel() != self.vocab_size:
            shape = (tuple(logits.shape) if isinstance(logits, torch.Tensor)
                     else type(logits).__name__)
            raise HeteroMoEError(f"sampler logits have shape {shape}; expected [{self.vocab_size}]"
                                 " (one row of vocabulary logits)")
        return logits.detach().to("cpu", torch.float32)

    def penalize(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """Logits [V] after repeat/frequency/presence penalties over the last repeat_last_n
        tokens of history. Returns the input itself when no penalty applies, else a copy."""
        pr = self.params
        logits = self._as_logits(logits)
        n = pr.repeat_last_n
        if n == 0 or len(history) == 0 or (pr.repeat_penalty == 1.0 and
                                            pr.frequency_penalty == 0.0 and
                                            pr.presence_penalty == 0.0):
            return logits
        window = torch.as_tensor(history[-n:] if n > 0 else history, dtype=torch.long)  # [W]
        lo, hi = int(window.min()), int(window.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise HeteroMoEError(f"history holds token id {bad}, outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        ids, counts = torch.unique(window, return_counts=True)  # each token penalized once
        sel = logits[ids]
        if pr.repeat_penalty != 1.0:
            rp = float(pr.repeat_penalty)
            sel = torch.where(sel <= 0, sel * rp, sel / rp)
        sel = sel - counts.float() * float(pr.frequency_penalty) - float(pr.presence_penalty)
        out = logits.clone()
        out[ids] = sel
        return out

    def candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens top_k, top_p and min_p keep from logits [V] (already penalized):
        (ids [K] int64, their logits [K] float32), in no particular order."""
        ids, vals = self._filter(self._as_logits(logits))
        if ids is None:
            ids = torch.arange(vals.numel())
        return ids, vals

    def _filter(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        # ids None means "all of V, in vocabulary order" and saves materializing arange(V).
        pr = self.params
        ids, vals = None, logits
        if 0 < pr.top_k < vals.numel():
            vals, ids = torch.topk(vals, pr.top_k)                       # [K]
        # top_p and min_p both keep a run of the best tokens, so their intersection is the
        # higher of the two logit cutoffs; min_p's max logit is unchanged by top_k/top_p.
        cut = -math.inf
        if pr.top_p < 1.0:
            cut = _top_p_cutoff(vals, pr.top_p)
        if pr.min_p > 0.0:
            cut = max(cut, float(vals.max()) + math.log(pr.min_p))
        if cut > -math.inf:
            keep = torch.nonzero(vals >= cut).squeeze(1)
            vals = vals[keep]
            ids = keep if ids is None else ids[keep]
        return ids, vals

    def sample(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """The next token id. logits: [V] for the next position; history: every token id so far
        (prompt + generated), used by the penalties."""
        logits = self.penalize(logits, history)
        # numpy's argmax is vectorized (~10x torch's on a 150k vocabulary); the first maximum
        # (the lowest id) or the first NaN, which then fails the check
        best = int(logits.numpy().argmax())
        top = float(logits[best])
        if not math.isfinite(top):
            raise HeteroMoEError(f"sampler logits hold no usable maximum (max = {top}); "
                                 "they contain NaN/+inf or are all -inf")
        if self.params.temperature == 0 or self.params.top_k == 1:
            return best
        ids, vals = self._filter(logits)
        scaled = (vals - vals.max()) / float(self.params.temperature)
        cdf = torch.cumsum(torch.exp(scaled).double(), 0)   # [K]
        u = torch.rand(1, dtype=torch.float64, generator=self.generator) * cdf[-1]
        i = min(int(torch.searchsorted(cdf, u, right=True)), cdf.numel() - 1)
        return i if ids is None else int(ids[i])

    def top_logprobs(self, logits: torch.Tensor, n: int) -> list[tuple[int, float]]:
        """The n most likely tokens under the raw logits (before penalties and temperature), as
        (token id, log probability), most likely first."""
        return top_logprobs(self._as_logits(logits), n)


def top_logprobs(logits: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n best (token id, log_softmax(logits)[id]) pairs of logits [V], most likely first."""
    if not _is_int(n) or n < 0:
        raise SamplingParamError(f"top_logprobs n={n!r} must be an int >= 0")
    logits = logits.detach().to("cpu", torch.float32)
    n = min(int(n), logits.numel())
    if n == 0:
        return []
    vals, ids = torch.topk(logits, n)
    lps = vals - torch.logsumexp(logits, 0)
    return list(zip(ids.tolist(), lps.tolist()))


def token_logprob(logits: torch.Tensor, token_id: int) -> float:
    """log_softmax(logits)[token_id] for logits [V]."""
    v = logits.shape[-1]
    if not _is_int(token_id) or not 0 <= token_id < v:
        raise HeteroMoEError(f"token id {token_id!r} is outside the vocabulary [0, {v})")
    logits = logits.detach().to("cpu", torch.float32)
    return float(logits[token_id] - torch.logsumexp(logits, 0))


class StopMatcher:
    """Stop sequences over streamed text: holds back text that may begin a stop sequence."""

    def __init__(self, stops: list[str] | str | None):
        self.stops = _stop_list(stops)
        self._held = ""          # text not yet emitted: a suffix that may begin a stop sequence
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a piece of decoded text; returns (text safe to emit now, stopped?). After a stop,
        the output ends just before the stop sequence and further pieces are dropped."""
        if self.stopped:
            return "", True
        buf = self._held + text
        # The stop that completes first wins (ties: the one starting first), as if the text came
        # one character at a time, so how it is split into pieces doesn't matter. Every occurrence
        # starts inside buf, since a suffix that could begin a stop sequence is never emitted.
        hits = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return buf[:min(hits)[1]], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """At the end of generation: release held-back text (nothing if a stop matched)."""
        out, self._held = self._held, ""
        return out
