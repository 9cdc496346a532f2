"""Streaming metrics from request records, with genai-perf's and vLLM `bench serve`'s definitions.

- TTFT: request sent -> first chunk with non-empty text (client side).
- ITL: the gap between consecutive chunks, per generated token: a chunk that
  carries k tokens after a gap g contributes k samples of g/k (vLLM's chunk gaps,
  made per token so servers that send several tokens per chunk compare fairly;
  `measure.latency.itl_samples`, as the load test splits them). A chunk of text that
  brings no new token counts as a gap of one token.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request
  (genai-perf's "inter token latency").
- Latency: request sent -> last response.
- Percentiles: p50, p95, p99, interpolated between the closest ranks (numpy's default).
- Output tokens/s: all output tokens / (last end - first start) at that concurrency; over
  repeated runs of a level, all their tokens / the sum of their durations.
"""

from __future__ import annotations

import statistics

from bench.records import RequestRecord
from measure.latency import PERCENTILES, itl_samples, percentile


def summarize(runs: list[list[RequestRecord]]) -> dict:
    """Metrics of one or more runs of a level: latencies pooled over all their requests."""
    records = [r for run in runs for r in run]
    ok = [r for r in records if r.error is None and r.chunks]
    result: dict = {"requests": len(records), "errors": len(records) - len(ok), "runs": len(runs)}
    if not ok:
        return result
    ok_runs = [[r for r in run if r.error is None and r.chunks] for run in runs]
    duration = sum(max(r.end for r in run) - min(r.start for r in run) for run in ok_runs if run)
    tokens = sum(r.num_output_tokens for r in ok)
    result.update(output_tokens=tokens, duration_s=duration, output_tokens_per_s=tokens / duration)
    series = {
        "ttft_ms": [r.ttft * 1e3 for r in ok],
        "itl_ms": [s * 1e3 for r in ok for s in itl_samples(r.chunks, count_tokenless=True)],
        "tpot_ms": [(r.latency - r.ttft) / (r.num_output_tokens - 1) * 1e3 for r in ok if r.num_output_tokens > 1],
        "latency_ms": [r.latency * 1e3 for r in ok],
    }
    for name, values in series.items():
        for q in PERCENTILES:
            result[f"{name}_p{q}"] = percentile(values, q)
        result[f"{name}_mean"] = statistics.fmean(values) if values else float("nan")
    return result
