"""GET /metrics (with --metrics): Prometheus text, read from the engine's counters at scrape
time (the engine thread only adds to them; a scrape reads plain ints and floats)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "hetero_moe"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


class _Collector:
    def __init__(self, engine):
        self.engine = engine
        self._ttft_counts = [0] * len(TTFT_BUCKETS)
        self._ttft_sum = 0.0

    def collect(self):
        e, s = self.engine, self.engine.stats
        req = CounterMetricFamily(f"{PREFIX}_requests", "Finished requests by outcome "
                                  "(stop, length, cancelled, error)", labels=["outcome"])
        for outcome in ("stop", "length", "cancelled", "error"):
            req.add_metric([outcome], s.requests.get(outcome, 0))
        yield req
        yield CounterMetricFamily(f"{PREFIX}_prompt_tokens", "Prompt tokens evaluated (not "
                                  "counting cached ones)", value=s.prompt_tokens)
        yield CounterMetricFamily(f"{PREFIX}_prompt_tokens_cached", "Prompt tokens reused from "
                                  "a slot's cache", value=s.cached_tokens)
        yield CounterMetricFamily(f"{PREFIX}_generated_tokens", "Tokens generated",
                                  value=s.generated_tokens)
        yield CounterMetricFamily(f"{PREFIX}_prefill_seconds", "Time spent evaluating prompts",
                                  value=s.prefill_seconds)
        yield CounterMetricFamily(f"{PREFIX}_decode_seconds", "Time spent in decode steps",
                                  value=s.decode_seconds)
        yield CounterMetricFamily(f"{PREFIX}_decode_steps", "Decode steps (one forward pass "
                                  "for every generating slot)", value=s.decode_steps)
        yield GaugeMetricFamily(f"{PREFIX}_prefill_tokens_per_second", "Prompt tokens per "
                                "second of prefill time, since start",
                                value=s.prompt_tokens / s.prefill_seconds
                                if s.prefill_seconds else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_decode_tokens_per_second", "Tokens generated per "
                                "second of decode time, all slots together, since start",
                                value=s.generated_tokens / s.decode_seconds
                                if s.decode_seconds else 0.0)
        yield CounterMetricFamily(f"{PREFIX}_decode_batched_steps", "Decode steps that ran "
                                  "their slots in one batched forward (the rest: one after "
                                  "another)", value=s.batched_steps)
        yield GaugeMetricFamily(f"{PREFIX}_decode_batch_size", "Mean slots per decode step",
                                value=s.batched_rows / s.decode_steps if s.decode_steps else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a slot",
                                value=e.queued())
        yield GaugeMetricFamily(f"{PREFIX}_slots_busy", "Slots running a request",
                                value=e.busy())
        yield GaugeMetricFamily(f"{PREFIX}_slots", "Slots (--parallel)", value=len(e.slots))
        # time to first token: the engine appends, the scrape drains into the histogram
        while s.ttft_seconds:
            v = s.ttft_seconds.popleft()
            self._ttft_sum += v
            for i, b in enumerate(TTFT_BUCKETS):
                if v <= b:
                    self._ttft_counts[i] += 1
        h = HistogramMetricFamily(f"{PREFIX}_time_to_first_token_seconds", "From request "
                                  "arrival to its first generated token")
        h.add_metric([], [(_le(b), c) for b, c in zip(TTFT_BUCKETS, self._ttft_counts)],
                     self._ttft_sum)
        yield h


def _le(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(b)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
