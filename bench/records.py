"""What the load generator records per request, the same for every system under test."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """Times are time.perf_counter() seconds; chunks are (arrival time, cumulative output tokens)
    for every streamed piece that carried non-empty text."""

    start: float
    end: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)
    num_output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunks[0][0] - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start
