"""Step-load bookkeeping: per-step TTFT p95 from locust's stats, the stop rule, goodput.

The step shape (shape.py) calls `StepLoad` once a second; everything here reads
locust's `RequestStats` but holds no locust state of its own, so it is testable
with a plain `RequestStats`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from locust.stats import RequestStats, calculate_response_time_percentile, diff_response_time_dicts

from loadtest.timing import ITL, REQUEST_TYPE, STOPPED, STREAM, TTFT


@dataclass(frozen=True, slots=True)
class StepSettings:
    step_users: int  # users added per step
    step_time_s: float  # how long each step holds its user count
    ttft_p95_ms: float  # the service level: a step passes while its TTFT p95 stays at or under this
    max_users: int  # stop here even when every step passes

    def __post_init__(self) -> None:
        if self.step_users < 1:
            raise ValueError(f"step users must be >= 1, got {self.step_users}")
        if not self.step_time_s > 0:
            raise ValueError(f"step time must be > 0 s, got {self.step_time_s}")
        if not self.ttft_p95_ms > 0:
            raise ValueError(f"TTFT p95 threshold must be > 0 ms, got {self.ttft_p95_ms}")
        if self.max_users < self.step_users:
            raise ValueError(f"max users ({self.max_users}) must be >= step users ({self.step_users})")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Cumulative counters at one moment; two of them delimit a step."""

    at: float
    ttft_times: dict[int, int]
    ttft_count: int
    tokens: int
    stream_ms: float  # summed durations of the streams finished so far
    failures: int

    @classmethod
    def take(cls, stats: RequestStats, at: float | None = None) -> Snapshot:
        # entries.get, not stats.get: a snapshot must not create empty rows in the report
        ttft = stats.entries.get((TTFT, REQUEST_TYPE))
        itl = stats.entries.get((ITL, REQUEST_TYPE))
        return cls(at=time.monotonic() if at is None else at,
                   ttft_times=dict(ttft.response_times) if ttft else {},
                   ttft_count=ttft.num_requests if ttft else 0,
                   tokens=sum(e.total_content_length for e in (ttft, itl) if e),
                   stream_ms=sum(e.total_response_time for key in ((STREAM, REQUEST_TYPE), (STOPPED, REQUEST_TYPE))
                                 if (e := stats.entries.get(key))),
                   failures=stats.total.num_failures)


@dataclass(frozen=True, slots=True)
class StepResult:
    users: int
    seconds: float
    ttft_count: int
    ttft_p95_ms: float | None  # None: no first token arrived during the step
    tokens_per_s: float
    streams_in_flight: float  # mean concurrent streams (Little's law over the streams that finished)
    failures: int
    within: bool  # the step met the service level


def step_result(users: int, before: Snapshot, after: Snapshot, threshold_ms: float) -> StepResult:
    times = diff_response_time_dicts(after.ttft_times, before.ttft_times)
    count = after.ttft_count - before.ttft_count
    p95 = float(calculate_response_time_percentile(times, count, 0.95)) if count else None
    seconds = after.at - before.at
    failures = after.failures - before.failures
    return StepResult(users=users, seconds=round(seconds, 2), ttft_count=count, ttft_p95_ms=p95,
                      tokens_per_s=round((after.tokens - before.tokens) / seconds, 1) if seconds > 0 else 0.0,
                      streams_in_flight=round((after.stream_ms - before.stream_ms) / 1000 / seconds, 2)
                      if seconds > 0 else 0.0,
                      failures=failures, within=p95 is not None and p95 <= threshold_ms and failures == 0)


@dataclass(slots=True)
class StepLoad:
    """+step_users every step_time_s until a step misses the service level or max_users is reached."""

    settings: StepSettings
    steps: list[StepResult] = field(default_factory=list)
    stopped_because: str | None = None

    @property
    def users(self) -> int:
        """User count of the step now running."""
        return self.settings.step_users * (len(self.steps) + 1)

    def finish_step(self, result: StepResult) -> bool:
        """Record a finished step; True to go on with the next one."""
        self.steps.append(result)
        if not result.within:
            if result.ttft_p95_ms is None:
                self.stopped_because = f"no first token in the step at {result.users} users"
            elif result.failures:
                self.stopped_because = f"{result.failures} failure(s) in the step at {result.users} users"
            else:
                self.stopped_because = (f"TTFT p95 {result.ttft_p95_ms:.0f} ms > {self.settings.ttft_p95_ms:.0f} ms "
                                        f"at {result.users} users")
            return False
        if self.users > self.settings.max_users:
            self.stopped_because = f"max users ({self.settings.max_users}) reached within the service level"
            return False
        return True

    @property
    def goodput_users(self) -> int:
        """The most users of a step that met the service level (steps only go on while they do)."""
        return max((s.users for s in self.steps if s.within), default=0)

    def to_json(self) -> dict:
        return {"ttft_p95_threshold_ms": self.settings.ttft_p95_ms, "step_users": self.settings.step_users,
                "step_time_s": self.settings.step_time_s, "max_users": self.settings.max_users,
                "goodput_users": self.goodput_users,
                "goodput_streams_in_flight": max((s.streams_in_flight for s in self.steps if s.within), default=0.0),
                "stopped_because": self.stopped_because,
                "steps": [asdict(s) for s in self.steps]}

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
