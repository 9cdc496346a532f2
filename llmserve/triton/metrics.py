"""Engine metrics on Triton's Prometheus endpoint (custom metrics API of the Python backend).

Each update is an IPC to the server process, so metrics are refreshed at most
every `interval` seconds while busy (and at once when idle), and only those that changed.
"""

from __future__ import annotations

import time

import triton_python_backend_utils as pb_utils

from llmserve.engine.llm_engine import LLMEngine


class EngineMetrics:
    def __init__(self, labels: dict[str, str], interval: float = 0.05) -> None:
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self._gauges = {
            "running": pb_utils.MetricFamily("llm_active_sequences", "Sequences generating now", gauge),
            "waiting": pb_utils.MetricFamily("llm_waiting_sequences", "Requests waiting for a slot", gauge),
            "kv": pb_utils.MetricFamily("llm_kv_cache_usage_ratio", "Share of KV-cache slots in use", gauge),
        }
        self._counters = {
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
        self._metrics = {k: f.Metric(labels=labels) for k, f in {**self._gauges, **self._counters}.items()}
        self._finished_metrics: dict[str, object] = {}
        self._last: dict[str, float] = {}
        self._interval = interval
        self._next_flush = 0.0

    def update(self, engine: LLMEngine) -> None:
        now = time.monotonic()
        if now < self._next_flush and engine.has_unfinished():
            return
        self._next_flush = now + self._interval
        snapshot = engine.snapshot()
        self._set("running", snapshot.num_running)
        self._set("waiting", snapshot.num_waiting)
        self._set("kv", snapshot.slot_usage)
        self._add("generated", snapshot.generated_tokens)
        self._add("prompt", snapshot.prompt_tokens)
        self._add("prefix_cached", snapshot.prefix_cached_tokens)
        self._add("steps", snapshot.steps)
        self._add("preemptions", snapshot.preemptions)
        self._add("refused", snapshot.refused)
        # Finished requests last: a reader that sees a request counted sees its tokens too (the bench).
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
