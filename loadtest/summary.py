"""The run's summary, read back from locust's `<prefix>_stats.csv`.

tokens/s = the sum over the stream rows of Requests/s x Average Content Size
(response_length is the tokens a stream delivered, a failed one's included);
streams/s counts the streams that did not fail; streams in flight is Little's
law over the stream rows (Requests/s x mean seconds per stream).
Percentiles come from <prefix>_fine_percentiles.csv (1% resolution, written by
the locustfile) when it exists, else from locust's CSV (whole milliseconds).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.histogram import PERCENTILE_COLUMNS
from loadtest.timing import ITL, REQUEST_TYPE, STOPPED, STREAM, TTFT


def _ms(value: float | None) -> str:
    """About 3 significant digits: 1.23, 45.6, 789."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    count: int
    failures: int
    avg_ms: float
    avg_tokens: float
    per_s: float
    percentiles_ms: dict[str, int]

    @classmethod
    def parse(cls, record: dict[str, str]) -> Row:
        return cls(name=record["Name"], count=int(record["Request Count"]), failures=int(record["Failure Count"]),
                   avg_ms=float(record["Average Response Time"]), avg_tokens=float(record["Average Content Size"]),
                   per_s=float(record["Requests/s"]),
                   percentiles_ms={p: _int_or_zero(record[p]) for p in PERCENTILE_COLUMNS})


def _int_or_zero(text: str) -> int:
    return int(text) if text not in ("", "N/A") else 0


def read_stats(csv_path: str | Path) -> dict[str, Row]:
    """Rows of the stats CSV by name (this locustfile's request type only)."""
    with Path(csv_path).open(newline="") as f:
        return {r["Name"]: Row.parse(r) for r in csv.DictReader(f) if r["Type"] == REQUEST_TYPE}


@dataclass(frozen=True, slots=True)
class Summary:
    streams: int
    stopped_by_user: int
    failures: int
    streams_per_s: float
    tokens_per_s: float
    streams_in_flight: float
    ttft_ms: dict[str, float | None]  # None: no such sample in the run
    itl_ms: dict[str, float | None]
    stream_ms: dict[str, float | None]

    @classmethod
    def from_rows(cls, rows: dict[str, Row], fine: dict[str, dict[str, float]] | None = None) -> Summary:
        """`fine`: the 1%-resolution percentiles (histogram.read_percentiles), preferred when present."""
        if STREAM not in rows and STOPPED not in rows:
            raise ValueError("the stats CSV has no stream rows: no request finished during the run")
        streams = [r for r in (rows.get(STREAM), rows.get(STOPPED)) if r is not None]

        def pcts(name: str) -> dict[str, float | None]:
            if fine and name in fine:
                return fine[name]
            row = rows.get(name)
            return dict(row.percentiles_ms) if row and row.count > row.failures else dict.fromkeys(PERCENTILE_COLUMNS)

        return cls(
            streams=rows[STREAM].count - rows[STREAM].failures if STREAM in rows else 0,
            stopped_by_user=rows[STOPPED].count if STOPPED in rows else 0,
            failures=sum(r.failures for r in rows.values()),
            streams_per_s=round(sum(r.per_s * (r.count - r.failures) / r.count for r in streams if r.count), 2),
            tokens_per_s=round(sum(r.per_s * r.avg_tokens for r in streams), 1),
            streams_in_flight=round(sum(r.per_s * r.avg_ms / 1000.0 for r in streams), 2),
            ttft_ms=pcts(TTFT), itl_ms=pcts(ITL), stream_ms=pcts(STREAM))

    def to_json(self) -> dict:
        return asdict(self)

    def markdown(self, context: dict[str, str]) -> str:
        """A two-column table: `context` rows (run settings, server checks) first."""
        def pcts(values: dict[str, float | None]) -> str:
            return " / ".join(_ms(values[p]) for p in PERCENTILE_COLUMNS)

        rows = [*context.items(),
                ("streams completed / stopped by user", f"{self.streams} / {self.stopped_by_user}"),
                ("failures", str(self.failures)),
                ("streams/s", f"{self.streams_per_s:.2f}"),
                ("generated tokens/s", f"{self.tokens_per_s:.1f}"),
                ("streams in flight (mean)", f"{self.streams_in_flight:.2f}"),
                ("TTFT p50 / p95 / p99 (ms)", pcts(self.ttft_ms)),
                ("ITL p50 / p95 / p99 (ms per token)", pcts(self.itl_ms)),
                ("stream p50 / p95 / p99 (ms)", pcts(self.stream_ms))]
        return "\n".join(["| metric | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
