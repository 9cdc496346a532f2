"""Step load: +STEP users every STEP_TIME s until a step's TTFT p95 passes the threshold.

    locust -f loadtest/locustfile.py,loadtest/shape.py --headless --host localhost:8001 \\
        --step-users 4 --step-time 15 --ttft-p95-ms 500

Each step is judged on its own requests: TTFT p95 of the first tokens that
arrived during the step, and no failures. The load stops at the first step that
misses, and the goodput (the most users of a step that stayed within the
service level) goes to --goodput-json after every step.
"""

from __future__ import annotations

import sys

from locust import LoadTestShape, events

from llmserve.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # `loadtest` from any working directory

from loadtest import defaults  # noqa: E402
from loadtest.goodput import Snapshot, StepLoad, StepSettings, step_result  # noqa: E402


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("Step load (loadtest/shape.py)")
    group.add_argument("--step-users", type=int, default=defaults.STEP_USERS, help="users added per step")
    group.add_argument("--step-time", type=float, default=defaults.STEP_TIME_S, help="seconds per step")
    group.add_argument("--ttft-p95-ms", type=float, default=defaults.TTFT_P95_MS,
                       help="service level: a step passes while its TTFT p95 is at or under this")
    group.add_argument("--step-max-users", type=int, default=defaults.STEP_MAX_USERS,
                       help="stop here even when every step passes")
    group.add_argument("--goodput-json", default="build/loadtest/goodput.json",
                       help="where the steps and the goodput are written")


class StepLoadShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.load: StepLoad | None = None
        self._step_start: Snapshot | None = None

    def _settings(self) -> StepSettings:
        options = self.runner.environment.parsed_options
        return StepSettings(step_users=options.step_users, step_time_s=options.step_time,
                            ttft_p95_ms=options.ttft_p95_ms, max_users=options.step_max_users)

    def tick(self) -> tuple[int, float] | None:
        stats = self.runner.environment.stats
        if self.load is None:  # first tick: the runner and its options exist now
            self.load = StepLoad(self._settings())
            self._step_start = Snapshot.take(stats)
        now = Snapshot.take(stats)
        if now.at - self._step_start.at >= self.load.settings.step_time_s:
            users = self.load.users
            go_on = self.load.finish_step(step_result(users, self._step_start, now, self.load.settings.ttft_p95_ms))
            self.load.write(self.runner.environment.parsed_options.goodput_json)
            step = self.load.steps[-1]
            print(f"step {len(self.load.steps)}: {users} users, TTFT p95 {step.ttft_p95_ms} ms over "
                  f"{step.ttft_count} first tokens, {step.tokens_per_s} tokens/s, {step.streams_in_flight} streams in "
                  f"flight, {step.failures} failures"
                  f" -> {'within' if step.within else 'missed'}", file=sys.stderr, flush=True)
            if not go_on:
                return None
            self._step_start = now
        # All of a step's new users start within a second.
        return self.load.users, float(self.load.settings.step_users)
