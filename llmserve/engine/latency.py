"""Per-request latencies from the engine's own clock (time.monotonic): arrival (when the server took
the request), admission (its first step in a slot), each token, the finish. Kept by the engine
thread and drained by whoever exports them (the Triton model's histograms), so the figures do not
depend on a client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class RequestLatency:
    """One request that ended (finished, stopped or cancelled)."""

    queue_time: float  # arrival -> first admission (the whole life, for a request never admitted)
    ttft: float | None  # arrival -> first generated token; None when it ended before one
    e2e: float  # arrival -> end
    prompt_tokens: int
    generation_tokens: int


@dataclass(slots=True)
class LatencyLog:
    """What happened since the last `drain()`: requests that ended and inter-token gaps (seconds
    between two consecutive tokens of one sequence; a preempted sequence's pause is in its gap)."""

    requests: list[RequestLatency] = field(default_factory=list)
    inter_token: list[float] = field(default_factory=list)

    def drain(self) -> tuple[list[RequestLatency], list[float]]:
        requests, inter_token = self.requests, self.inter_token
        self.requests, self.inter_token = [], []
        return requests, inter_token
