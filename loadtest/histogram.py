"""Latency percentiles at 1% resolution.

locust keeps response times in whole milliseconds (and 2 significant digits above
100 ms), too coarse for inter-token latencies of 1-5 ms. This log-bucketed
histogram keeps 1% relative resolution in constant memory, however long the run.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

from measure.latency import PERCENTILES, locust_rank, value_at_rank

GROWTH = 1.01  # each bucket is 1% wider than the one before
FLOOR_MS = 0.001  # everything below 1 us lands in one bucket
PERCENTILE_COLUMNS = tuple(f"{q}%" for q in PERCENTILES)  # as locust's CSVs name them: "50%", ...
COLUMNS = ("Name", "Count", *PERCENTILE_COLUMNS)
FINE_PERCENTILES = "fine_percentiles.csv"  # written next to locust's CSVs: <prefix>_fine_percentiles.csv


class LogHistogram:
    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0

    def add(self, ms: float, count: int = 1) -> None:
        if not ms >= 0:  # also rejects NaN
            raise ValueError(f"a latency must be >= 0 ms, got {ms!r}")
        key = math.floor(math.log(ms / FLOOR_MS, GROWTH)) if ms > FLOOR_MS else -1
        self._buckets[key] += count
        self.count += count

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (q in 0..1) as its bucket's geometric middle; None when empty.

        Ranked as locust ranks its percentiles (`measure.latency.locust_rank`: the sample with
        int(q*N) samples below it, one rank above nearest-rank when q*N is whole), so this table
        and locust's whole-ms table name the same sample."""
        if not 0 < q <= 1:
            raise ValueError(f"percentile must be in (0, 1], got {q}")
        if not self.count:
            return None
        buckets = ((self._middle(key), self._buckets[key]) for key in sorted(self._buckets))
        return value_at_rank(buckets, locust_rank(self.count, q))

    @staticmethod
    def _middle(key: int) -> float:
        return FLOOR_MS if key < 0 else FLOOR_MS * GROWTH ** (key + 0.5)

    def clear(self) -> None:
        self._buckets.clear()
        self.count = 0


def write_percentiles(path: str | Path, histograms: dict[str, LogHistogram]) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for name, histogram in histograms.items():
            if histogram.count:
                writer.writerow([name, histogram.count,
                                 *(f"{histogram.percentile(q / 100):.2f}" for q in PERCENTILES)])


def read_percentiles(path: str | Path) -> dict[str, dict[str, float]]:
    """{name: {"50%": ms, "95%": ms, "99%": ms}} from a file written by `write_percentiles`."""
    with Path(path).open(newline="") as f:
        return {r["Name"]: {c: float(r[c]) for c in PERCENTILE_COLUMNS} for r in csv.DictReader(f)}
