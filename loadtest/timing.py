"""Per-stream timing: turns the chunks of one stream into TTFT and per-token ITL samples.

Kept apart from locust so that the arithmetic is testable without a load run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from client import StreamChunk

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
    per token (percentiles are then per token, as in a token-by-token stream).
    """

    start: float
    tokens: int = 0  # generated so far (the server's cumulative count)
    first_text_at: float | None = None
    _last_at: float | None = field(default=None, repr=False)

    def on_chunk(self, chunk: StreamChunk, now: float) -> list[Sample]:
        if now < self.start:
            raise ValueError(f"chunk time {now} is before the stream's start {self.start}")
        new_tokens = chunk.num_output_tokens - self.tokens
        self.tokens = max(self.tokens, chunk.num_output_tokens)
        if self.first_text_at is None:
            if not chunk.text:  # e.g. an empty final chunk: no first text yet
                return []
            self.first_text_at = self._last_at = now
            return [Sample(TTFT, (now - self.start) * 1000.0, max(new_tokens, 1))]
        if new_tokens <= 0:
            return []
        per_token_ms = (now - self._last_at) * 1000.0 / new_tokens
        self._last_at = now
        return [Sample(ITL, per_token_ms, 1)] * new_tokens

    def elapsed_ms(self, now: float) -> float:
        return (now - self.start) * 1000.0
