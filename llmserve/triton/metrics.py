"""Engine metrics on Triton's Prometheus endpoint (custom metrics API of the Python backend).

Every metric update is an IPC to the server process, so the engine thread only takes a snapshot
(at most every `interval` seconds while busy, at once when idle) and drains its latency log; the
`llm-metrics` thread sends the changes. Histograms (vLLM's names; buckets in
`llmserve.histogram_buckets`) are observed from the engine's own timestamps (`LLMEngine.latency`),
so they do not depend on a client.

Each observation is an IPC that holds the GIL, so histograms get at most `max_observations_per_s`
(a bucket of one second's worth): below it every request and every inter-token gap is observed;
above it a uniform random sample is, which leaves quantiles and means unbiased but makes a
histogram's `_count` a sample count (request and token totals are the counters'). A request's
observations are taken together, and before any gap.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import triton_python_backend_utils as pb_utils

from llmserve.engine.latency import LatencyLog, RequestLatency
from llmserve.engine.llm_engine import EngineSnapshot, LLMEngine
from llmserve.histogram_buckets import ITL_BUCKETS, REQUEST_TIME_BUCKETS, TTFT_BUCKETS, token_buckets

log = logging.getLogger(__name__)

HISTOGRAMS = {  # name: (help, buckets; None = token counts up to the context)
    "llm_time_to_first_token_seconds": ("Arrival to the first generated token", TTFT_BUCKETS),
    "llm_inter_token_latency_seconds": ("Time between two consecutive tokens of a sequence", ITL_BUCKETS),
    "llm_e2e_request_latency_seconds": ("Arrival to the end of a request", REQUEST_TIME_BUCKETS),
    "llm_request_queue_time_seconds": ("Arrival to the first admission to a KV-cache slot", REQUEST_TIME_BUCKETS),
    "llm_request_prompt_tokens": ("Prompt tokens per request", None),
    "llm_request_generation_tokens": ("Generated tokens per request", None),
}


class ObservationBudget:
    """Observations allowed: up to one second's worth at once, refilled at `per_s`."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self.level = per_s
        self.updated = time.monotonic()

    def take(self, wanted: int, cost: int = 1) -> int:
        """How many of `wanted` items, `cost` observations each, may be observed now."""
        now = time.monotonic()
        self.level = min(self.per_s, self.level + (now - self.updated) * self.per_s)
        self.updated = now
        granted = max(0, min(wanted, int(self.level // cost)))
        self.level -= granted * cost
        return granted


def sample(items: list, k: int) -> list:
    return items if k >= len(items) else random.sample(items, k)


class EngineMetrics:
    """`update` from the engine thread after each step; `close` at finalize. `histograms=False`: the
    gauges and counters only (the engine keeps no latency log)."""

    def __init__(self, labels: dict[str, str], *, max_model_len: int, histograms: bool = True,
                 max_observations_per_s: float = 500.0, interval: float = 0.05) -> None:
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        # The families are kept: a Metric whose MetricFamily was freed fails every call.
        self._families = {
            "running": pb_utils.MetricFamily("llm_active_sequences", "Sequences generating now", gauge),
            "waiting": pb_utils.MetricFamily("llm_waiting_sequences", "Requests waiting for a slot", gauge),
            "kv": pb_utils.MetricFamily("llm_kv_cache_usage_ratio", "Share of KV-cache slots in use", gauge),
            "generated": pb_utils.MetricFamily("llm_generated_tokens_total", "Tokens generated", counter),
            "prompt": pb_utils.MetricFamily("llm_prompt_tokens_total", "Prompt tokens admitted", counter),
            "prefix_cached": pb_utils.MetricFamily("llm_prefix_cache_hit_tokens_total",
                                                   "Prompt tokens whose K/V came from the prefix cache", counter),
            "steps": pb_utils.MetricFamily("llm_engine_steps_total", "Engine steps (forward passes)", counter),
            "preemptions": pb_utils.MetricFamily("llm_preemptions_total",
                                                 "Running sequences preempted for a request of better priority",
                                                 counter),
            "refused": pb_utils.MetricFamily("llm_requests_refused_total",
                                             "Requests refused because the waiting queue was full "
                                             "(max_queued_requests)", counter),
        }
        self._finished = pb_utils.MetricFamily("llm_requests_finished_total", "Requests finished, by reason",
                                               counter)
        self._labels = labels
        self._metrics = {k: f.Metric(labels=labels) for k, f in self._families.items()}
        self._histograms = {}
        if histograms:
            tokens = token_buckets(max_model_len)
            for name, (description, buckets) in HISTOGRAMS.items():
                family = self._families[name] = pb_utils.MetricFamily(name, description,
                                                                       pb_utils.MetricFamily.HISTOGRAM)
                self._histograms[name] = family.Metric(labels=labels, buckets=buckets or tokens)
        self._budget = ObservationBudget(max_observations_per_s)
        self._last: dict[str, float] = {}
        self._interval = interval
        self._next_flush = 0.0
        # What the engine thread handed over and the export thread has not sent yet.
        self._lock = threading.Lock()
        self._snapshot: EngineSnapshot | None = None
        self._requests: list[RequestLatency] = []
        self._inter_token: list[float] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._export_loop, name="llm-metrics", daemon=True)
        self._thread.start()

    def update(self, engine: LLMEngine) -> None:
        if self._histograms and engine.latency is None:
            engine.latency = LatencyLog()  # the engine keeps latencies from now on
        now = time.monotonic()
        if now < self._next_flush and engine.has_unfinished():
            return
        self._next_flush = now + self._interval
        snapshot = engine.snapshot()
        requests, inter_token = engine.latency.drain() if engine.latency is not None else ([], [])
        with self._lock:
            self._snapshot = snapshot
            self._requests.extend(requests)
            self._inter_token.extend(inter_token)
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is left, then stop the export thread."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)

    def _export_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                snapshot, self._snapshot = self._snapshot, None
                requests, self._requests = self._requests, []
                inter_token, self._inter_token = self._inter_token, []
            try:
                self._observe(requests, inter_token)
                if snapshot is not None:
                    self._export(snapshot)
            except Exception:  # a metric that fails must not stop the others (nor the engine)
                log.exception("exporting metrics failed")
            if self._closed:
                return

    def _observe(self, requests: list[RequestLatency], inter_token: list[float]) -> None:
        if not self._histograms:
            return
        h = self._histograms
        per_request = len(HISTOGRAMS) - 1  # all but the inter-token one
        for request in sample(requests, self._budget.take(len(requests), per_request)):
            if request.ttft is not None:
                h["llm_time_to_first_token_seconds"].observe(request.ttft)
            h["llm_e2e_request_latency_seconds"].observe(request.e2e)
            h["llm_request_queue_time_seconds"].observe(request.queue_time)
            h["llm_request_prompt_tokens"].observe(request.prompt_tokens)
            h["llm_request_generation_tokens"].observe(request.generation_tokens)
        itl = h["llm_inter_token_latency_seconds"]
        for gap in sample(inter_token, self._budget.take(len(inter_token))):
            itl.observe(gap)

    def _export(self, snapshot: EngineSnapshot) -> None:
        self._set("running", snapshot.num_running)
        self._set("waiting", snapshot.num_waiting)
        self._set("kv", snapshot.slot_usage)
        self._add("generated", snapshot.generated_tokens)
        self._add("prompt", snapshot.prompt_tokens)
        self._add("prefix_cached", snapshot.prefix_cached_tokens)
        self._add("steps", snapshot.steps)
        self._add("preemptions", snapshot.preemptions)
        self._add("refused", snapshot.refused)
        # Finished requests last: a reader that sees a request counted sees its tokens and latencies
        # too (the bench waits on it).
        for reason, count in snapshot.finished.items():
            key = f"finished:{reason}"
            if key not in self._metrics:
                self._metrics[key] = self._finished.Metric(labels={**self._labels, "reason": reason})
            self._add(key, count)

    def _set(self, key: str, value: float) -> None:
        if self._last.get(key) != value:
            self._metrics[key].set(value)
            self._last[key] = value

    def _add(self, key: str, total: int) -> None:
        delta = total - self._last.get(key, 0)
        if delta:
            self._metrics[key].increment(delta)
            self._last[key] = total
