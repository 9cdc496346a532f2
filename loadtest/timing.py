"""Per-stream timing: turns the chunks of one stream into TTFT and per-token ITL samples.

Kept apart from locust so that the arithmetic is testable without a load run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from client import StreamChunk
from measure.latency import TokenGaps

TTFT, ITL, STREAM, STOPPED = "TTFT", "ITL", "stream", "stream (stopped by user)"
REQUEST_TYPE = "grpc"


@dataclass(frozen=True, slots=True)
class Sample:
    """One locust request event: `name`, its time in ms and its response_length in tokens."""

    name: str
    ms: float
    tokens: int


@dataclass(slots=True)
class StreamTimer:
    """Timing of one stream, started when the request is sent (`start`, perf_counter seconds).

    TTFT is the time to the first chunk that carries text. After it, every chunk that
    brings new tokens is one gap; under load the server merges several tokens into
    one chunk, so the gap is split evenly over its tokens and yields one ITL sample
    per token (`measure.latency.TokenGaps`: percentiles are then per token, as in a
    token-by-token stream). A chunk that brings no new token is no gap.
    """

    start: float
    tokens: int = 0  # generated so far (the server's cumulative count)
    first_text_at: float | None = None
    _gaps: TokenGaps | None = field(default=None, repr=False)

    def on_chunk(self, chunk: StreamChunk, now: float) -> list[Sample]:
        if now < self.start:
            raise ValueError(f"chunk time {now} is before the stream's start {self.start}")
        new_tokens = chunk.num_output_tokens - self.tokens
        self.tokens = max(self.tokens, chunk.num_output_tokens)
        if self._gaps is None:
            if not chunk.text:  # e.g. an empty final chunk: no first text yet
                return []
            self.first_text_at = now
            self._gaps = TokenGaps(now, self.tokens, count_tokenless=False, scale=1000.0)
            return [Sample(TTFT, (now - self.start) * 1000.0, max(new_tokens, 1))]
        return [Sample(ITL, ms, 1) for ms in self._gaps.add(now, chunk.num_output_tokens)]

    def elapsed_ms(self, now: float) -> float:
        return (now - self.start) * 1000.0
