"""Engine metrics on Triton's Prometheus endpoint (custom metrics API of the Python backend).

Every metric update is an IPC to the server process, so the engine thread only takes a snapshot
(at most every `interval` seconds while busy, at once when idle) and drains its latency log; the
`llm-metrics` thread sends the changes. Histograms (vLLM's names; buckets in
`llmserve.histogram_buckets`) are observed from the engine's own timestamps (`LLMEngine.latency`),
so they do not depend on a client.

Each observation is an IPC that holds the GIL. Every request is observed (five per request: a few
hundred per second at most on a CPU); of the inter-token gaps, one per token, each is observed with
probability `inter_token_sample_fraction`, the same at any load, so the ITL histogram's quantiles and
mean stay unbiased while its `_count` is a sample count (token totals are the counters').
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


class EngineMetrics:
    """`update` from the engine thread after each step; `close` at finalize. `histograms=False`: the
    gauges and counters only (the engine keeps no latency log)."""

    def __init__(self, labels: dict[str, str], *, max_model_len: int, histograms: bool = True,
                 inter_token_sample_fraction: float = 1.0, interval: float = 0.05) -> None:
        if not 0 < inter_token_sample_fraction <= 1:
            raise ValueError(f"inter_token_sample_fraction must be in (0, 1], got {inter_token_sample_fraction}")
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
        self._itl_fraction = inter_token_sample_fraction
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

    def close(self, engine: LLMEngine, timeout: float = 5.0) -> None:
        """Hand over the engine's last state (requests ended at shutdown), send it, stop the thread."""
        self._next_flush = 0.0
        self.update(engine)
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)

    def _export_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            closed = self._closed  # read before taking the buffers: what was handed over before close goes too
            with self._lock:
                snapshot, self._snapshot = self._snapshot, None
                requests, self._requests = self._requests, []
                inter_token, self._inter_token = self._inter_token, []
            # Apart: a failing histogram must not stop the gauges and counters (the autoscaler's).
            try:
                self._observe(requests, inter_token)
            except Exception:
                log.exception("observing the latency histograms failed")
            try:
                if snapshot is not None:
                    self._export(snapshot)
            except Exception:
                log.exception("exporting the engine metrics failed")
            if closed:
                return

    def _observe(self, requests: list[RequestLatency], inter_token: list[float]) -> None:
        if not self._histograms:
            return
        h = self._histograms
        for request in requests:
            if request.ttft is not None:
                h["llm_time_to_first_token_seconds"].observe(request.ttft)
            h["llm_e2e_request_latency_seconds"].observe(request.e2e)
            h["llm_request_queue_time_seconds"].observe(request.queue_time)
            h["llm_request_prompt_tokens"].observe(request.prompt_tokens)
            h["llm_request_generation_tokens"].observe(request.generation_tokens)
        itl = h["llm_inter_token_latency_seconds"]
        fraction = self._itl_fraction
        for gap in inter_token:
            if fraction == 1.0 or random.random() < fraction:
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
