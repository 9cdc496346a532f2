"""Locust users that stream through the ensemble over Triton's gRPC stream.

    locust -f loadtest/locustfile.py --host localhost:8001          # web UI
    locust -f loadtest/locustfile.py --host localhost:8001 --headless -u 16 -r 4 -t 60s
    (add `,loadtest/shape.py` to -f for the step load; `make loadtest` does all of it)

Request events (request_type "grpc"): `TTFT` (time to the first text), `ITL` (one
per generated token after the first chunk: each gap between chunks divided by
the tokens it brought), `stream` (end to end; response_length = generated
tokens) and `stream (stopped by user)` for the streams a StoppingUser cancels on
purpose. Failures: error responses (the client's typed errors), timeouts, and
streams cancelled without the user asking for it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import itertools
import sys
import time

import gevent
import grpc.experimental.gevent as grpc_gevent
import locust.stats
from locust import User, events, task

# Native threads gevent may run for grpc: two per user (its stream, a stop request) at the
# step load's most users (defaults.STEP_MAX_USERS, 256), with room to spare; raised at start
# for runs of more users (`_check_options`). Started on demand.
GEVENT_THREADS = 1024

# locust has monkey-patched the standard library (import above); grpc's C core must also do
# its I/O through gevent, before any channel exists, or the first stream blocks the gevent hub
# (docs/notes/bench-and-loadtest.md).
grpc_gevent.init_gevent()
# That integration waits on each channel in a thread of gevent's native pool, one per stream in
# progress: gevent's default of 10 stalls the streams past the tenth (docs/notes/bench-and-loadtest.md).
gevent.get_hub().threadpool.maxsize = GEVENT_THREADS

from llmserve.paths import REPO_ROOT  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))  # `loadtest` and `measure` from any working directory

from client import Client  # noqa: E402
from loadtest import defaults  # noqa: E402
from loadtest.histogram import FINE_PERCENTILES, LogHistogram, write_percentiles  # noqa: E402
from loadtest.timing import REQUEST_TYPE, STOPPED, STREAM, StreamTimer  # noqa: E402
from measure.prompts import DEFAULT_PROMPTS, Prompt, PromptSampler, load_prompts  # noqa: E402

# A StoppingUser reads this share of max_tokens (drawn uniformly) before pressing stop.
STOP_AFTER_SHARE = (0.1, 0.5)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("LLM stream users (loadtest/locustfile.py)")
    group.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                       help="JSONL prompt file: {\"prompt\": str, \"max_tokens\": int} per line")
    group.add_argument("--prompt-seed", type=int, default=defaults.PROMPT_SEED,
                       help="seed of the prompt draws: user N asks the same prompts on every run")
    group.add_argument("--request-timeout", type=float, default=defaults.REQUEST_TIMEOUT_S,
                       help="seconds a stream may take end to end before it fails as a timeout")
    group.add_argument("--think-time", default=defaults.THINK_TIME,
                       help="MIN,MAX seconds a user waits between two prompts (uniform)")
    group.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="send min_tokens = max_tokens, so that every answer is as long as the prompt "
                            "file's max_tokens (the default model ends most stories early)")


def _think_time(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--think-time must be MIN,MAX seconds, got {text!r}") from None
    if not 0 <= low <= high:
        raise ValueError(f"--think-time needs 0 <= MIN <= MAX, got {text!r}")
    return low, high


@events.init.add_listener
def _check_options(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None:  # locust used as a library: defaults apply
        return
    _think_time(options.think_time)
    if not options.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0, got {options.request_timeout}")
    _prompt_set(options.prompts)  # a bad file fails before any user starts
    most_users = max(options.num_users or 0, getattr(options, "step_max_users", 0) or 0)
    gevent.get_hub().threadpool.maxsize = max(GEVENT_THREADS, 2 * most_users)


# Successful samples by event name, at 1% resolution (locust keeps whole milliseconds).
_histograms: collections.defaultdict[str, LogHistogram] = collections.defaultdict(LogHistogram)


@events.request.add_listener
def _record(request_type, name, response_time, exception, **_kwargs) -> None:
    if request_type == REQUEST_TYPE and exception is None:
        _histograms[name].add(response_time)


@events.test_start.add_listener
def _reset(**_kwargs) -> None:
    _histograms.clear()


@events.test_stop.add_listener
def _write_results(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or not options.csv_prefix:
        return
    write_percentiles(f"{options.csv_prefix}_{FINE_PERCENTILES}", dict(sorted(_histograms.items())))
    # locust rewrites its CSV files once a second and not again at exit, so they
    # miss the last second (locust issues #1806, #2299). Every user has stopped
    # by now: one more write gives the CSVs the same numbers as the HTML report.
    gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


@functools.cache
def _prompt_set(path: str) -> list[Prompt]:
    return load_prompts(path)


_user_numbers = itertools.count()


class StreamingUser(User):
    """Sends a prompt, reads the streamed answer, thinks, sends the next one."""

    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        if not self.host:
            raise ValueError("no server: pass --host HOST:PORT (Triton's gRPC port, e.g. localhost:8001)")
        self.client = Client(self.host, timeout=options.request_timeout)
        self.prompts = PromptSampler(_prompt_set(options.prompts),
                                     seed=f"{options.prompt_seed}:{next(_user_numbers)}")
        self._think = _think_time(options.think_time)
        self._ignore_eos = options.ignore_eos

    def on_stop(self) -> None:
        self.client.close()

    def wait_time(self) -> float:
        return self.prompts.uniform(*self._think)

    def stream(self, prompt: Prompt, stop_after: int | None = None) -> None:
        """Stream one answer and fire its events; `stop_after` tokens: press stop then.

        The stream is always closed here: on stop, error, or locust stopping the
        user mid-stream (GreenletExit, recorded as nothing), closing the client's
        generator ends the request on the server (a stop press: the explicit stop, then the
        stream ends normally; a killed user: the RPC is cancelled too).
        """
        fire = self.environment.events.request.fire
        timer = StreamTimer(time.perf_counter())
        stopped = False
        try:
            min_tokens = prompt.max_tokens if self._ignore_eos else None
            request = self.client.stream(prompt.text, max_tokens=prompt.max_tokens, min_tokens=min_tokens)
            with contextlib.closing(request) as chunks:
                for chunk in chunks:
                    for sample in timer.on_chunk(chunk, time.perf_counter()):
                        fire(request_type=REQUEST_TYPE, name=sample.name, response_time=sample.ms,
                             response_length=sample.tokens, exception=None, context={})
                    if chunk.finish_reason == "cancelled":
                        raise StreamCancelled("the server cancelled the stream (finish_reason 'cancelled')")
                    if stop_after is not None and chunk.finish_reason is None and timer.tokens >= stop_after:
                        stopped = True
                        break  # closing the generator is the stop button: the client stops the request
        except Exception as exc:  # typed client errors, timeouts, unexpected cancels: a failed stream
            fire(request_type=REQUEST_TYPE, name=STREAM, response_time=timer.elapsed_ms(time.perf_counter()),
                 response_length=timer.tokens, exception=exc, context={})
            return
        fire(request_type=REQUEST_TYPE, name=STOPPED if stopped else STREAM,
             response_time=timer.elapsed_ms(time.perf_counter()), response_length=timer.tokens,
             exception=None, context={})


class StreamCancelled(Exception):
    """A stream ended as cancelled although this user did not press stop."""


class ChatUser(StreamingUser):
    """Reads every answer to the end (4 of 5 users)."""

    weight = 4

    @task
    def chat(self) -> None:
        self.stream(self.prompts.next())


class StoppingUser(StreamingUser):
    """Presses stop part way through every answer (1 of 5 users): after 10-50% of max_tokens.

    Its streams are recorded as successes named "stream (stopped by user)": the
    cancel is what the user asked for, and the server honouring it is checked on
    the server's side (`make loadtest` reports llm_active_sequences and the
    server's cancelled count after the run).
    """

    weight = 1

    @task
    def chat_then_stop(self) -> None:
        prompt = self.prompts.next()
        share = self.prompts.uniform(*STOP_AFTER_SHARE)
        self.stream(prompt, stop_after=max(1, round(prompt.max_tokens * share)))
