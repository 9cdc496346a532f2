"""Streaming metrics from request records, with genai-perf's and vLLM `bench serve`'s definitions.

- TTFT: request sent -> first chunk with non-empty text (client side).
- ITL: the gap between consecutive chunks, per generated token: a chunk that
  carries k tokens after a gap g contributes k samples of g/k (vLLM's chunk gaps,
  made per token so servers that send several tokens per chunk compare fairly).
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request
  (genai-perf's "inter token latency").
- Latency: request sent -> last response.
- Output tokens/s: all output tokens / (last end - first start) at that concurrency; over
  repeated runs of a level, all their tokens / the sum of their durations.
"""

from __future__ import annotations

import statistics

from bench.records import RequestRecord

PERCENTILES = (50, 95, 99)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def itl_samples(record: RequestRecord) -> list[float]:
    samples = []
    for (t0, n0), (t1, n1) in zip(record.chunks, record.chunks[1:]):
        tokens = max(n1 - n0, 1)
        samples.extend([(t1 - t0) / tokens] * tokens)
    return samples


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
        "itl_ms": [s * 1e3 for r in ok for s in itl_samples(r)],
        "tpot_ms": [(r.latency - r.ttft) / (r.num_output_tokens - 1) * 1e3 for r in ok if r.num_output_tokens > 1],
        "latency_ms": [r.latency * 1e3 for r in ok],
    }
    for name, values in series.items():
        for q in PERCENTILES:
            result[f"{name}_p{q}"] = percentile(values, q)
        result[f"{name}_mean"] = statistics.fmean(values) if values else float("nan")
    return result
