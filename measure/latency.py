"""Latency arithmetic of the bench and the load test: which percentiles they report, how a
percentile is ranked, and inter-token latency (ITL) per token.

Each tool keeps its own ranking, so that its figures keep their meaning:
- the bench (`percentile`): linear interpolation between the closest ranks (numpy's default)
  over the exact samples;
- the load test's 1%-resolution table (`locust_rank`): the sample with int(q*N) samples below
  it, as locust ranks its own whole-millisecond table, so that both tables name the same sample.
Both read the ranked value with `value_at_rank`, which walks exact samples and histogram buckets alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PERCENTILES = (50, 95, 99)  # what both tools report: p50, p95, p99


def value_at_rank(counts: Iterable[tuple[float, int]], rank: float) -> float:
    """The value at 0-based `rank` of samples given in ascending order as (value, how many) pairs;
    a fractional rank interpolates linearly between the two samples around it (past the last
    sample, the last one stands for its neighbour)."""
    low = int(rank)
    low_value = high_value = None
    seen = 0
    for value, count in counts:
        seen += count
        if low_value is None and seen > low:
            low_value = value
        if seen > low + 1:
            high_value = value
            break
    if low_value is None:
        raise ValueError(f"rank {rank} is past the last of {seen} samples")
    if high_value is None:
        high_value = low_value
    return low_value + (high_value - low_value) * (rank - low)


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (q in 0..100) of exact samples, interpolated (numpy's default); nan when empty."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return value_at_rank(((value, 1) for value in ordered), (len(ordered) - 1) * q / 100)


def locust_rank(count: int, q: float) -> int:
    """The 0-based rank of locust's q-th percentile (q in 0..1, as locust takes it) of `count` samples:
    int(q*count) samples below it, one rank above nearest-rank where q*count is whole."""
    return min(int(count * q), count - 1)


class TokenGaps:
    """Inter-token latency per token, from one stream's chunks in order of arrival.

    A chunk that brings k new tokens after a gap g (since the chunk before it) gives k samples of
    g/k: a server that merges tokens into one response under load is measured per token, as one
    that streams them one by one. `at` and `tokens`: the chunk that starts the first gap (its time,
    the stream's cumulative output tokens then).

    `count_tokenless`: what a chunk that brings no new token (held-back text released) does.
    True (the bench): it ends a gap of its own, counted as one token. False (the load test): it is
    passed over, and the next token's gap runs from the last chunk that brought one.
    `scale` multiplies each gap before it is split (1000.0: milliseconds from seconds).
    """

    def __init__(self, at: float, tokens: int, *, count_tokenless: bool, scale: float = 1.0) -> None:
        self.tokens = tokens
        self._at = at
        self._count_tokenless = count_tokenless
        self._scale = scale

    def add(self, at: float, tokens: int) -> list[float]:
        """The samples of the gap that the chunk at `at`, with `tokens` so far, ends."""
        new_tokens = tokens - self.tokens
        self.tokens = max(self.tokens, tokens)
        if new_tokens <= 0:
            if not self._count_tokenless:
                return []
            new_tokens = 1
        per_token = (at - self._at) * self._scale / new_tokens
        self._at = at
        return [per_token] * new_tokens


def itl_samples(chunks: Sequence[tuple[float, int]], *, count_tokenless: bool) -> list[float]:
    """Per-token ITL of a stream recorded as (arrival time, cumulative output tokens) chunks."""
    if not chunks:
        return []
    gaps = TokenGaps(*chunks[0], count_tokenless=count_tokenless)
    return [sample for at, tokens in chunks[1:] for sample in gaps.add(at, tokens)]
