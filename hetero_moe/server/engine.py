"""The server's engine: slots, the request queue and the step loop, on one thread that owns the
model.

Each slot has its own KV cache (n_ctx positions). A step runs at most one prompt chunk of one
slot, then one decode step for every slot that is generating: their next tokens go through the
model together (Transformer.forward_batch: one weight read per step for all of them). A new
prompt is cut into chunks so the slots already generating wait at most one chunk between tokens;
while they do, a chunk is sized by time (chunk_ms, from the prompt speed measured on the previous
chunk, which includes the attention over the positions already cached), not only by tokens.

Over pipeline stages (a net with submit(), distributed/pipeline.py) the loop does not wait for a
whole step: the generating slots form groups, one per stage, each a work item in the pipeline;
a group is sampled and sent on as soon as its logits are back while the others are in other
stages, and prompt chunks are work items too (_step_pipelined).

Per-slot prompt caching: a slot remembers the tokens its cache holds; a request goes to the free
slot whose cached tokens share the longest prefix with its prompt, and only the rest of the
prompt is evaluated (`cache_prompt`, default on). Results then depend on what ran before (a
suffix evaluated on its own rounds differently from one prefill), as llama.cpp warns for the same
option.

Dimension key: B slots decoding in a step, V vocabulary.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..api import PREFILL_CHUNK, common_prefix
from ..sampling import Sampler, SamplingParams, StopMatcher, token_logprob, top_logprobs
from ..tokenizer import StreamDecoder
from .protocol import APIError

log = logging.getLogger("hetero_moe.server")

DEFAULT_CHUNK = 256          # most prompt tokens per step while other slots are generating
DEFAULT_CHUNK_MS = 100.0     # ... and the time such a step may take (sized from measured speed)
MIN_CHUNK = 16               # a prompt advances at least this much per step
# Between forward passes the engine samples, decodes text and hands it to the HTTP thread:
# pool workers spinning through that (the decode default is 2 ms) would take the cores those
# need; they sleep after this long instead.
IDLE_SPIN_US = 50
PIPELINE_POLL_S = 0.02       # a pipelined engine looks for new requests this often while it waits


def _set_spin(us: int) -> None:
    try:
        from .. import cpu_backend
        if cpu_backend.available():
            cpu_backend.set_spin_us(us)
    except ImportError:
        pass


# -- what the engine tells a request's handler ------------------------------------------------
@dataclass
class TokenLP:
    """A token with its logprob and the top alternatives (id, text, bytes, logprob)."""
    id: int
    text: str
    bytes: bytes
    logprob: float | None
    top: list[tuple[int, str, bytes, float]] = field(default_factory=list)


@dataclass
class Piece:
    """Generated text (never a split UTF-8 character) and the logprobs of the tokens it closes."""
    text: str
    logprobs: list[TokenLP] = field(default_factory=list)


@dataclass
class PromptInfo:
    """Sent once the prompt is evaluated: its logprobs (echo) and how much came from the cache."""
    cached_tokens: int
    logprobs: list[TokenLP] | None = None


@dataclass
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prompt_ms: float
    predicted_ms: float

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def timings(self) -> dict:
        """llama.cpp's `timings` block."""
        n_prompt = self.prompt_tokens - self.cached_tokens
        n_pred = self.completion_tokens

        def per(n, ms):
            return (ms / n if n else 0.0), (1000.0 * n / ms if ms > 0 else 0.0)
        ppt, pps = per(n_prompt, self.prompt_ms)
        dpt, dps = per(n_pred, self.predicted_ms)
        return {"cache_n": self.cached_tokens, "prompt_n": n_prompt, "prompt_ms": self.prompt_ms,
                "prompt_per_token_ms": ppt, "prompt_per_second": pps, "predicted_n": n_pred,
                "predicted_ms": self.predicted_ms, "predicted_per_token_ms": dpt,
                "predicted_per_second": dps}


@dataclass
class Failed:
    error: APIError


class Job:
    """One request inside the engine. `emit` is called from the engine thread with Piece,
    PromptInfo, Done or Failed events; Done or Failed is always the last."""

    def __init__(self, prompt: list[int], params: SamplingParams, emit: Callable, *,
                 cache_prompt: bool = True, logprobs: int | None = None, echo: bool = False):
        self.prompt, self.params, self.emit = prompt, params, emit
        self.cache_prompt = cache_prompt and not (echo and logprobs is not None)
        self.logprobs, self.echo = logprobs, echo
        self.cancelled = False
        self.finished = False
        self.t_submit = time.perf_counter()


class Slot:
    """A KV cache with the tokens it holds, and the generation running in it (if any)."""

    def __init__(self, i: int, cache):
        self.id, self.cache = i, cache
        self.tokens: list[int] = []       # ids at positions 0.. of the cache
        self.job: Job | None = None
        self.item = None                  # its work item in a pipeline (Engine, pipelined)
        self.last_used = 0.0
        self.state = "idle"               # idle | prefill | decode

    def begin(self, job: Job, keep: int, n_vocab: int, tok) -> None:
        self.job, self.state = job, "prefill"
        self.cache.reset(keep)
        self.tokens = self.tokens[:keep]
        self.done = keep                  # prompt tokens evaluated so far
        self.keep = keep
        self.prev_row: torch.Tensor | None = None    # echo: logits predicting prompt[done]
        self.prompt_lp: list[TokenLP] | None = None
        self.sampler = Sampler(job.params, n_vocab)
        self.stops = StopMatcher(job.params.stop_list())
        self.dec = StreamDecoder(tok, skip_special=True)
        self.history = list(job.prompt)
        self.out: list[int] = []
        self.pending_lp: list[TokenLP] = []
        self.pos = len(job.prompt)
        self.next_token = -1
        self.t_start = time.perf_counter()
        self.t_prefilled = self.t_start

    def release(self) -> None:
        self.job, self.state = None, "idle"
        self.last_used = time.perf_counter()
        self.sampler = self.dec = self.stops = self.prev_row = None


@dataclass
class Stats:
    """Counters the metrics endpoint reads (written by the engine thread only)."""
    requests: collections.Counter = field(default_factory=collections.Counter)  # by outcome
    prompt_tokens: int = 0            # evaluated (not cached)
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    batched_rows: int = 0             # sum of B over decode steps
    batched_steps: int = 0            # steps that ran their B rows in one forward
    ttft_seconds: collections.deque = field(                  # drained by the metrics reader
        default_factory=lambda: collections.deque(maxlen=100_000))


class DecodePolicy:
    """Whether B generating slots step together (one batched forward) or one after another
    (B single-sequence steps, each the fused C++ step where the model has it).

    "on"/"off" fix the choice; "auto" measures both for each B while serving and keeps the
    faster, re-measuring the other now and then. Where the model has the fused C++ step, a batched
    step is one C++ call for all B rows (projections, experts and lm_head as B-token GEMMs, which
    unpack each weight block once for all rows), and it wins from B = 3-4 on; on the per-op path
    (MLA, sparse attention, a GPU tier) the Python overhead per op decides, so it is measured."""
    TRIES = 3           # steps of each kind before choosing
    RECHECK = 200       # steps between re-measurements of the option not chosen
    ALPHA = 0.25        # weight of a new measurement in the running mean

    def __init__(self, mode: str = "auto"):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"batch mode must be 'auto', 'on' or 'off', got {mode!r}")
        self.mode = mode
        self.per_token: dict[tuple[int, bool], float] = {}   # (B, batched) -> seconds/token
        self.count: collections.Counter = collections.Counter()
        self.steps: collections.Counter = collections.Counter()

    def batched(self, B: int) -> bool:
        if B == 1:
            return False
        if self.mode != "auto":
            return self.mode == "on"
        self.steps[B] += 1
        for opt in (True, False):
            if self.count[(B, opt)] < self.TRIES:
                return opt
        best = self.per_token[(B, True)] <= self.per_token[(B, False)]
        return (not best) if self.steps[B] % self.RECHECK == 0 else best

    def record(self, B: int, batched: bool, seconds: float) -> None:
        k = (B, batched)
        v = seconds / B
        self.per_token[k] = v if k not in self.per_token else \
            (1 - self.ALPHA) * self.per_token[k] + self.ALPHA * v
        self.count[k] += 1

    def choice(self) -> dict:
        """{B: "batched" | "serial"} as chosen so far (auto), for /v1/models and metrics."""
        out = {}
        for B in sorted({b for b, _ in self.per_token}):
            a, b = self.per_token.get((B, True)), self.per_token.get((B, False))
            if a is not None and b is not None:
                out[B] = "batched" if a <= b else "serial"
        return out


class Engine:
    """Owns the model (Model.exclusive) on its own thread; handlers submit Jobs."""

    def __init__(self, model, n_slots: int = 1, queue_size: int = 64, chunk: int = DEFAULT_CHUNK,
                 batch: str = "auto", chunk_ms: float | None = DEFAULT_CHUNK_MS,
                 pipeline: bool | None = None):
        if n_slots < 1:
            raise ValueError(f"--parallel must be >= 1, got {n_slots}")
        if chunk_ms is not None and not chunk_ms > 0:
            raise ValueError(f"--chunk-ms must be > 0, got {chunk_ms}")
        if queue_size < 0:
            raise ValueError(f"queue size must be >= 0, got {queue_size}")
        self.model, self.net = model, model.net
        self.n_ctx = model.n_ctx
        self.tok = model.tokenizer
        self.eog = self.tok.eog_ids
        self.n_vocab = model.config.n_vocab
        self.sparse = model.net.sparse
        self.slots = [Slot(i, self.net.cache if i == 0 else self.net.new_cache())
                      for i in range(n_slots)]
        self.queue_size = queue_size
        plan_chunk = self.net.plan.plan.chunk if self.net.executor is not None else PREFILL_CHUNK
        self.chunk = max(1, min(chunk, plan_chunk))
        self.chunk_alone = plan_chunk          # nobody waiting: the whole chunk the model takes
        self.chunk_ms = chunk_ms               # None: chunks of `chunk` tokens, however long
        self._s_per_token: float | None = None  # the last prompt chunk's seconds per token
        self.policy = DecodePolicy(batch)
        self.batch = batch
        self.queue: collections.deque[Job] = collections.deque()
        self.cv = threading.Condition()
        self.stats = Stats()
        self._cancelled_queued = 0          # queued jobs cancelled since the last step (cv)
        self._stopping = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # a net with submit() (pipeline stages, distributed/pipeline.py) is kept full across
        # steps: _step_pipelined; pipeline=False keeps the one-step-at-a-time loop for it too
        can = callable(getattr(self.net, "submit", None))
        if pipeline and not can:
            raise ValueError("pipeline=True needs a model whose layers run as pipeline stages")
        self.pipelined = can if pipeline is None else bool(pipeline)
        self.groups = max(1, getattr(self.net, "micro_batches", None) or
                          len(getattr(self.net, "stages", ())) or 1)
        self._inflight: dict = {}           # Pending -> (kind, slots, info, t_sent)
        self._t_done = {"prefill": 0.0, "decode": 0.0}

    # -- sizes -------------------------------------------------------------------------------
    def kv_bytes_per_slot(self) -> int:
        return self.slots[0].cache.bytes_per_token() * self.n_ctx

    def busy(self) -> int:
        return sum(s.job is not None for s in self.slots)

    def queued(self) -> int:
        return len(self.queue)

    # -- the handlers' side ------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job, or raise APIError 503 when the queue is full or the server stops."""
        with self.cv:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise APIError(503, "the server is shutting down", "unavailable_error",
                               code="shutting_down", headers={"Retry-After": "5"})
            free = sum(s.job is None for s in self.slots)
            if len(self.queue) >= self.queue_size + free:
                raise APIError(503, f"the request queue is full ({self.queue_size} waiting, "
                                    f"{len(self.slots)} slots busy); retry later",
                               "unavailable_error", code="queue_full",
                               headers={"Retry-After": "1"})
            self.queue.append(job)
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: a queued job leaves the queue now (its place is free for the
        next request); a running one is dropped at the next step, which frees its slot."""
        with self.cv:
            if job.finished:
                return
            job.cancelled = True
            try:
                self.queue.remove(job)
            except ValueError:              # in a slot (or not queued yet)
                pass
            else:
                job.finished = True
                self._cancelled_queued += 1   # counted by the engine thread (Stats' writer)
            self.cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hetero-moe-engine", daemon=True)
        self._thread.start()

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop taking jobs; queued ones fail now, running ones get drain_seconds to finish
        (then an error event)."""
        with self.cv:
            self._stopping = True
            self._deadline = time.monotonic() + drain_seconds
            waiting = list(self.queue)
            self.queue.clear()
            self.cv.notify()
        for job in waiting:
            self._fail(job, APIError(503, "the server is shutting down", "unavailable_error",
                                     code="shutting_down"))

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with self.model.exclusive("the hetero-moe server"):
                step = self._step_pipelined if self.pipelined else self._step
                while step():
                    pass
        except BaseException as e:      # keep the process up; every caller gets an answer
            self.error = e
            log.exception("engine stopped")
            with self.cv:
                self._stopping = True
                jobs = list(self.queue)
                self.queue.clear()
            jobs += [s.job for s in self.slots if s.job is not None]
            for job in jobs:
                self._fail(job, APIError(500, f"the engine failed: {type(e).__name__}: {e}",
                                         "server_error"))
        finally:
            for s in self.slots:
                if s.job is not None:
                    s.release()

    def _step(self) -> bool:
        """One round: admit, drop the cancelled, one prompt chunk, one decode step. False when
        stopped and drained."""
        with self.cv:
            if self._cancelled_queued:
                self.stats.requests["cancelled"] += self._cancelled_queued
                self._cancelled_queued = 0
            self._admit()
            if self._stopping and self._deadline is not None and \
                    time.monotonic() > self._deadline:
                for s in self.slots:
                    if s.job is not None:
                        self._fail(s.job, APIError(503, "the server shut down before this "
                                                        "request finished", "unavailable_error",
                                                   code="shutting_down"))
                        s.release()
            if not any(s.job is not None for s in self.slots):
                if self._stopping:
                    return False
                self.cv.wait(0.5)
                return True
        for s in self.slots:
            if s.job is not None and s.job.cancelled:
                self.stats.requests["cancelled"] += 1
                s.job.finished = True
                s.release()
        prefill = [s for s in self.slots if s.state == "prefill"]
        decode = [s for s in self.slots if s.state == "decode"]
        if prefill:
            s = min(prefill, key=lambda s: s.job.t_submit)
            self._guard([s], self._prefill_chunk, s, bool(decode))
        if decode:
            self._guard(decode, self._decode, decode)
        return True

    def _guard(self, slots: list[Slot], fn, *args) -> None:
        """Run a step; on an exception fail the slots' jobs and forget their caches."""
        try:
            fn(*args)
        except Exception as e:
            log.exception("step failed")
            self._fail_slots(slots, e)

    def _fail_slots(self, slots: list[Slot], e: Exception) -> None:
        lost = getattr(e, "caches_lost", False)  # a pipeline stage restarted: every
        for s in self.slots if lost else slots:  # slot's cache is gone (distributed/)
            if lost:
                s.tokens = []
            if s.job is not None:
                self._fail(s.job, APIError(500, f"generation failed: {type(e).__name__}: "
                                                f"{e}", "server_error"))
                s.tokens = []
                s.release()

    # -- the pipelined loop (a net with submit(): pipeline stages) -----------------------------
    def _step_pipelined(self) -> bool:
        """One round over a pipeline: admit, drop the cancelled, send work into the pipeline
        (one prompt chunk and up to `groups` decode micro-batches in flight), take what came
        back. Work items are not waited for together: as soon as one group's logits are back it
        is sampled and its next step sent, while the other groups are still in other stages.

        A slot has at most one item in flight. Its cache position and tokens advance only when
        that item's result is taken, and a slot whose job was cancelled (or failed at shutdown)
        stays taken until its item is back, so no later request can reuse its cache before."""
        with self.cv:
            if self._cancelled_queued:
                self.stats.requests["cancelled"] += self._cancelled_queued
                self._cancelled_queued = 0
            self._admit()
            if self._stopping and self._deadline is not None and \
                    time.monotonic() > self._deadline:
                for s in self.slots:
                    if s.job is not None:
                        self._fail(s.job, APIError(503, "the server shut down before this "
                                                        "request finished", "unavailable_error",
                                                   code="shutting_down"))
                        if s.item is None:
                            s.release()
                        else:                   # released when its work item is back
                            s.job.cancelled = True
            if not self._inflight and not any(s.job is not None for s in self.slots):
                if self._stopping:
                    return False
                self.cv.wait(0.5)
                return True
        for s in self.slots:
            if s.job is not None and s.item is None and (s.job.cancelled or s.job.finished):
                if not s.job.finished:
                    self.stats.requests["cancelled"] += 1
                    s.job.finished = True
                s.release()
        self._send_work()
        if not self._inflight:
            return True
        for item in self.net.wait_any(list(self._inflight), timeout=PIPELINE_POLL_S):
            if item not in self._inflight:        # dropped after a failure
                continue
            kind, slots, info, t_sent = self._inflight.pop(item)
            for s in slots:
                s.item = None
            try:
                logits = self.net.collect(item)
                now = time.perf_counter()
                dt = now - max(t_sent, self._t_done[kind])
                self._t_done[kind] = now
                if kind == "prefill":
                    s, (a, b, echo_lp) = slots[0], info
                    self._timed_chunk(a, b, dt)
                    if s.job.cancelled:        # the cache holds the chunk; nobody waits for it
                        s.tokens, s.done = s.job.prompt[:b], b
                    else:
                        self._prefilled(s, a, b, logits, echo_lp)
                else:
                    self.stats.decode_seconds += dt
                    self.stats.decode_steps += 1
                    self.stats.batched_steps += len(slots) > 1
                    self.stats.batched_rows += len(slots)
                    self._decoded(slots, logits)
            except Exception as e:
                self._item_failed(slots, e)
        return True

    def _send_work(self) -> None:
        """Fill the pipeline: the oldest prompt's next chunk unless one is in flight, and the
        decoding slots with nothing in flight, cut into as many groups as the pipeline has room
        for (`groups` decode items in flight; each slot alone with batch="off")."""
        kinds = [v[0] for v in self._inflight.values()]
        decoding = [s for s in self.slots if s.state == "decode" and s.job is not None]
        if "prefill" not in kinds:
            prefill = [s for s in self.slots if s.state == "prefill" and s.item is None
                       and not s.job.cancelled]
            if prefill:
                s = min(prefill, key=lambda s: s.job.t_submit)
                job = s.job
                n = self.chunk_tokens(bool(decoding))
                a, b = s.done, min(len(job.prompt), s.done + n)
                echo_lp = job.echo and job.logprobs is not None
                self._send("prefill", [s], (a, b, echo_lp), job.prompt[a:b], [a], echo_lp)
        ready = [s for s in decoding if s.item is None and not s.job.cancelled]
        if not ready:
            return
        if self.batch == "off":
            size, room = 1, len(ready)
        else:   # groups of at most ceil(decoding / groups): a big group would stall the others
            size = -(-sum(not s.job.cancelled for s in decoding) // self.groups)
            room = self.groups - kinds.count("decode")
        for a in range(0, min(len(ready), max(0, room) * size), size):
            g = ready[a:a + size]
            self._send("decode", g, None, [s.next_token for s in g], [s.pos for s in g], False)

    def _send(self, kind: str, slots: list[Slot], info, ids, positions, all_logits) -> None:
        try:
            item = self.net.submit(ids, positions, [s.cache for s in slots], all_logits)
        except Exception as e:
            self._item_failed(slots, e)
            return
        self._inflight[item] = (kind, slots, info, time.perf_counter())
        for s in slots:
            s.item = item

    def _item_failed(self, slots: list[Slot], e: Exception) -> None:
        """A work item failed: its slots' jobs fail; a stage failure (caches lost) fails every
        slot's job, and the items still in flight are waited out and dropped."""
        log.error("pipeline work item failed: %s: %s", type(e).__name__, e)
        if getattr(e, "caches_lost", False):
            rest = list(self._inflight)
            self._inflight.clear()
            for s in self.slots:
                s.item = None
            self.net.discard(rest)
        self._fail_slots(slots, e)

    def _admit(self) -> None:
        """Free slots take queued jobs, oldest first (call with self.cv held)."""
        while self.queue:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self.queue.popleft()
            if job.cancelled:
                job.finished = True
                self.stats.requests["cancelled"] += 1
                continue
            if job.cache_prompt:
                lcp = {s.id: common_prefix(s.tokens, job.prompt) for s in free}
                slot = max(free, key=lambda s: (lcp[s.id], -s.last_used))
                keep = min(lcp[slot.id], len(job.prompt) - 1)
            else:
                slot, keep = min(free, key=lambda s: s.last_used), 0
            try:
                slot.begin(job, keep, self.n_vocab, self.tok)
            except Exception as e:
                self._fail(job, APIError(400, str(e)))
                slot.release()

    def chunk_tokens(self, others_waiting: bool) -> int:
        """Prompt tokens for the next chunk: all the model takes at once when nobody waits, else
        at most `chunk`, and no more than fit in chunk_ms at the last measured speed (at least
        MIN_CHUNK, so a prompt always advances; a multiple of MIN_CHUNK for the GEMM tiles)."""
        if not others_waiting:
            return self.chunk_alone
        n = self.chunk
        if self.chunk_ms is not None:
            spt = self._s_per_token
            if spt is None:                    # nothing measured yet: a small first chunk
                return min(n, 2 * MIN_CHUNK)
            fit = int(self.chunk_ms / 1000.0 / max(spt, 1e-9))
            n = min(n, max(MIN_CHUNK, fit // MIN_CHUNK * MIN_CHUNK))
        return max(1, n)

    def _prefill_chunk(self, s: Slot, others_waiting: bool) -> None:
        job = s.job
        n = self.chunk_tokens(others_waiting)
        a, b = s.done, min(len(job.prompt), s.done + n)
        echo_lp = job.echo and job.logprobs is not None
        t0 = time.perf_counter()
        logits = self.net.forward(torch.tensor(job.prompt[a:b]), a, all_logits=echo_lp,
                                  sparse=self.sparse, cache=s.cache)
        _set_spin(IDLE_SPIN_US)
        self._timed_chunk(a, b, time.perf_counter() - t0)
        self._prefilled(s, a, b, logits, echo_lp)

    def _timed_chunk(self, a: int, b: int, dt: float) -> None:
        """A prompt chunk [a, b) took dt seconds: the speed the next chunk is sized by."""
        if b - a >= MIN_CHUNK or self._s_per_token is None:   # short tails say little
            self._s_per_token = dt / (b - a)
        self.stats.prefill_seconds += dt

    def _prefilled(self, s: Slot, a: int, b: int, logits: torch.Tensor, echo_lp: bool) -> None:
        """Prompt tokens [a, b) of the slot's job are in its cache; logits their rows (all of
        them for echo with logprobs, else the last)."""
        job = s.job
        self.stats.prompt_tokens += b - a
        s.tokens = job.prompt[:b]
        s.done = b
        if echo_lp:
            self._prompt_logprobs(s, logits, a, b)
        if b < len(job.prompt):
            return
        s.t_prefilled = time.perf_counter()
        self.stats.cached_tokens += s.keep
        job.emit(PromptInfo(s.keep, s.prompt_lp))
        s.state = "decode"
        self._advance(s, logits[-1])

    def _prompt_logprobs(self, s: Slot, rows: torch.Tensor, a: int, b: int) -> None:
        """echo with logprobs: each prompt token's logprob under the rows before it."""
        job = s.job
        if s.prompt_lp is None:
            t0 = job.prompt[0]
            s.prompt_lp = [TokenLP(t0, self.tok.token_str(t0), self.tok.token_bytes(t0), None)]
        for i in range(max(a, 1), b):
            row = s.prev_row if i == a else rows[i - a - 1]
            s.prompt_lp.append(self._lp(job.prompt[i], row, job.logprobs))
        s.prev_row = rows[-1]

    def _lp(self, t: int, row: torch.Tensor, n: int) -> TokenLP:
        tok = self.tok
        top = [(i, tok.token_str(i), tok.token_bytes(i), lp) for i, lp in top_logprobs(row, n)]
        return TokenLP(t, tok.token_str(t), tok.token_bytes(t), token_logprob(row, t), top)

    def _decode(self, slots: list[Slot]) -> None:
        t0 = time.perf_counter()
        ids = [s.next_token for s in slots]
        pos = [s.pos for s in slots]
        caches = [s.cache for s in slots]
        batched = self.policy.batched(len(slots))
        if batched:
            logits = self.net.forward_batch(ids, pos, caches, self.sparse)      # [B, V]
        else:
            logits = torch.cat([self.net.forward_batch([t], [p], [c], self.sparse)
                                for t, p, c in zip(ids, pos, caches)])
        _set_spin(IDLE_SPIN_US)
        dt = time.perf_counter() - t0
        self.policy.record(len(slots), batched, dt)
        self.stats.decode_seconds += dt
        self.stats.batched_steps += batched
        self.stats.decode_steps += 1
        self.stats.batched_rows += len(slots)
        self._decoded(slots, logits)

    def _decoded(self, slots: list[Slot], logits: torch.Tensor) -> None:
        """The slots' next tokens are in their caches; logits [B, V] predict the ones after."""
        for s, row in zip(slots, logits):
            s.tokens.append(s.next_token)
            s.pos += 1
            self._advance(s, row)

    def _advance(self, s: Slot, logits: torch.Tensor) -> None:
        """Sample the token at s.pos from logits [V]; emit its text; finish or queue it."""
        job, p = s.job, s.job.params
        if job.cancelled:
            return
        if len(s.out) >= p.max_tokens or s.pos >= self.n_ctx:
            return self._finish(s, "length")
        t = s.sampler.sample(logits, s.history)
        if t in self.eog:
            return self._finish(s, "stop")
        if job.logprobs is not None:
            s.pending_lp.append(self._lp(t, logits, job.logprobs))
        if not s.out:
            self.stats.ttft_seconds.append(time.perf_counter() - job.t_submit)
        s.out.append(t)
        s.history.append(t)
        self.stats.generated_tokens += 1
        text, stopped = s.stops.feed(s.dec.add(t))
        if text:
            job.emit(Piece(text, s.pending_lp))
            s.pending_lp = []
        if stopped:
            return self._finish(s, "stop")
        if len(s.out) >= p.max_tokens or s.pos + 1 >= self.n_ctx:
            return self._finish(s, "length")
        s.next_token = t

    def _finish(self, s: Slot, reason: str) -> None:
        job = s.job
        if not s.stops.stopped:
            tail = s.stops.feed(s.dec.flush())[0]
            tail += "" if s.stops.stopped else s.stops.flush()
            if tail or s.pending_lp:
                job.emit(Piece(tail, s.pending_lp))
        now = time.perf_counter()
        job.finished = True
        job.emit(Done(reason, len(job.prompt), len(s.out), s.keep,
                      (s.t_prefilled - s.t_start) * 1000, (now - s.t_prefilled) * 1000))
        self.stats.requests[reason] += 1
        s.release()

    def _fail(self, job: Job, err: APIError) -> None:
        if job.finished:
            return
        job.finished = True
        self.stats.requests["error"] += 1
        job.emit(Failed(err))
