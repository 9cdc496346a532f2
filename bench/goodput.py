"""Goodput: requests per second that met the service level (vLLM `bench serve`'s `--goodput`, AIPerf's
goodput): a request counts when it succeeded, its TTFT is within `ttft_ms` and its own inter-token
latency p95 within `itl_ms`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.records import RequestRecord
from measure.latency import itl_samples, percentile


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_ms: float = 200.0
    itl_ms: float = 50.0

    def __post_init__(self) -> None:
        if not (self.ttft_ms > 0 and self.itl_ms > 0):
            raise ValueError(f"SLO bounds must be > 0, got TTFT {self.ttft_ms} ms, ITL {self.itl_ms} ms")

    @classmethod
    def parse(cls, text: str) -> Slo:
        """"ttft:200,itl:50" (milliseconds; either may be left out)."""
        values = {}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition(":")
            if key not in ("ttft", "itl") or not value:
                raise ValueError(f"SLO part {part!r}: expected ttft:MS or itl:MS")
            values[f"{key}_ms"] = float(value)
        return cls(**values)

    def met_by(self, record: RequestRecord) -> bool:
        if record.error is not None or not record.chunks:
            return False
        if record.ttft * 1e3 > self.ttft_ms:
            return False
        itl = percentile([s * 1e3 for s in itl_samples(record.chunks, count_tokenless=True)], 95)
        return math.isnan(itl) or itl <= self.itl_ms  # a one-chunk answer has no gap to miss


def goodput(records: list[RequestRecord], slo: Slo) -> float:
    """Requests/s that met `slo`, over the run (first send to last end)."""
    if not records:
        return 0.0
    duration = max(r.end for r in records) - min(r.start for r in records)
    good = sum(slo.met_by(r) for r in records)
    return good / duration if duration > 0 else 0.0
