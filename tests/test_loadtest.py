"""`make loadtest`: short headless locust runs against the session's tritonserver, and the
timing and step-load arithmetic on their own."""

from __future__ import annotations

import collections
import csv
import json
import os
import random
import signal
import subprocess
import sys

import pytest

# Importing locust monkey-patches the whole process with gevent unless told not to; the
# flag is removed again at once so that the locust subprocesses below do patch.
os.environ["LOCUST_SKIP_MONKEY_PATCH"] = "1"
try:
    from locust.stats import RequestStats, calculate_response_time_percentile

    from loadtest.goodput import Snapshot, StepLoad, StepResult, StepSettings, step_result
finally:
    del os.environ["LOCUST_SKIP_MONKEY_PATCH"]

from client import StreamChunk
from loadtest.histogram import LogHistogram
from loadtest.timing import ITL, REQUEST_TYPE, STOPPED, STREAM, TTFT, StreamTimer
from measure.make_prompts import make_prompts
from measure.prompts import BENCH_PROMPTS, STORY_OPENINGS, load_prompts
from tests.conftest import REPO_ROOT


def _chunk(text: str, tokens: int, reason: str | None = None) -> StreamChunk:
    return StreamChunk(text=text, finish_reason=reason, num_input_tokens=5, num_output_tokens=tokens)


def test_stream_timer_ttft_then_one_itl_sample_per_token():
    timer = StreamTimer(start=10.0)
    assert timer.on_chunk(_chunk("", 0), 10.005) == []  # nothing to show yet: no TTFT
    [ttft] = timer.on_chunk(_chunk("Once", 1), 10.020)
    assert (ttft.name, round(ttft.ms, 6), ttft.tokens) == (TTFT, 20.0, 1)
    merged = timer.on_chunk(_chunk(" upon a time", 4), 10.050)  # 3 tokens merged into one chunk
    assert [(s.name, round(s.ms, 6), s.tokens) for s in merged] == [(ITL, 10.0, 1)] * 3
    assert timer.on_chunk(_chunk("", 4, "length"), 10.060) == []  # final chunk, no new token
    assert timer.tokens == 4 and round(timer.elapsed_ms(10.1), 6) == 100.0
    with pytest.raises(ValueError, match="before the stream's start"):
        timer.on_chunk(_chunk("x", 5), 9.0)


def test_the_prompt_file_is_the_shared_set_as_make_prompts_writes_it():
    """One prompt set: the load test's file is drawn from the texts the bench sends (and others)."""
    assert load_prompts() == make_prompts()
    assert BENCH_PROMPTS == STORY_OPENINGS
    assert {p.text for p in load_prompts()} & set(BENCH_PROMPTS)


def test_log_histogram_percentiles_within_one_percent():
    histogram = LogHistogram()
    assert histogram.percentile(0.5) is None
    samples = [0.37 + 0.01 * i for i in range(1000)]  # 0.37 .. 10.36 ms: below locust's 1 ms resolution
    for ms in samples:
        histogram.add(ms)
    histogram.add(0.0)
    for q in (0.5, 0.95, 0.99):
        exact = sorted([0.0, *samples])[int(1001 * q)]
        assert abs(histogram.percentile(q) - exact) <= 0.01 * exact, q
    with pytest.raises(ValueError):
        histogram.add(-1.0)


@pytest.mark.parametrize("count", [1, 2, 20, 30, 31, 100, 101])
def test_log_histogram_ranks_percentiles_as_locust_does(count):
    """On whole-ms samples (which locust keeps as they are) both pick the same sample, also where
    q*N is whole and nearest-rank would pick the one below: an even count's median, 20 samples'
    p95, 100 samples' p99."""
    samples = random.Random(count).sample(range(1, 10 * count + 1), count)  # distinct: ranks matter
    histogram = LogHistogram()
    for ms in samples:
        histogram.add(ms)
    for q in (0.5, 0.95, 0.99, 1.0):
        expected = calculate_response_time_percentile(collections.Counter(samples), count, q)
        assert abs(histogram.percentile(q) - expected) <= 0.01 * expected, (q, expected)


def _ttft_stats(*times_ms: float) -> RequestStats:
    stats = RequestStats()
    for ms in times_ms:
        stats.log_request(REQUEST_TYPE, TTFT, ms, 1)
    return stats


def test_step_result_judges_only_the_steps_own_first_tokens():
    stats = _ttft_stats(*[900.0] * 50)  # an earlier, slow step
    before = Snapshot.take(stats, at=0.0)
    for _ in range(100):
        stats.log_request(REQUEST_TYPE, TTFT, 40.0, 1)
        stats.log_request(REQUEST_TYPE, ITL, 5.0, 1)
    for _ in range(20):
        stats.log_request(REQUEST_TYPE, STREAM, 2000.0, 10)  # 40 s of streams in 10 s: 4 in flight
    result = step_result(8, before, Snapshot.take(stats, at=10.0), threshold_ms=500)
    assert (result.ttft_count, result.ttft_p95_ms, result.tokens_per_s, result.streams_in_flight, result.within) \
        == (100, 40.0, 20.0, 4.0, True)
    stats.log_error(REQUEST_TYPE, STREAM, "timeout")
    assert not step_result(8, before, Snapshot.take(stats, at=10.0), threshold_ms=500).within


def test_step_load_stops_at_the_first_step_over_the_threshold():
    load = StepLoad(StepSettings(step_users=4, step_time_s=10, ttft_p95_ms=500, max_users=100))
    assert load.users == 4
    for users, p95 in ((4, 100.0), (8, 300.0)):
        assert load.finish_step(StepResult(users, 10, 50, p95, 1000.0, users / 2, 0, within=True))
    assert load.users == 12
    assert not load.finish_step(StepResult(12, 10, 50, 700.0, 1000.0, 6.0, 0, within=False))
    assert load.goodput_users == 8 and load.to_json()["goodput_streams_in_flight"] == 4.0
    assert load.stopped_because == "TTFT p95 700 ms > 500 ms at 12 users"
    assert json.loads(json.dumps(load.to_json()))["steps"][2]["within"] is False

    capped = StepLoad(StepSettings(step_users=4, step_time_s=10, ttft_p95_ms=500, max_users=4))
    assert not capped.finish_step(StepResult(4, 10, 50, 100.0, 1000.0, 2.0, 0, within=True))
    assert capped.goodput_users == 4 and "max users" in capped.stopped_because
    with pytest.raises(ValueError, match="max users"):
        StepSettings(step_users=4, step_time_s=10, ttft_p95_ms=500, max_users=2)


def test_locustfile_gives_grpc_a_native_thread_per_stream():
    """grpc's gevent integration waits on each channel in a thread of gevent's native pool; with
    gevent's default of 10, streams past the tenth stalled (docs/notes/bench-and-loadtest.md). The
    locustfile must leave room for every user's stream and stop request at the step load's most
    users. Imported in a subprocess: locust monkey-patches."""
    script = ("import gevent, loadtest.locustfile; from loadtest import defaults; "
              "print(gevent.get_hub().threadpool.maxsize, defaults.STEP_MAX_USERS)")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    threads, max_users = map(int, run.stdout.split())
    assert threads >= 2 * max_users


def _run_loadtest(triton_server, out, *args: str) -> subprocess.CompletedProcess:
    """Run `loadtest.run` in a process group of its own; on a timeout the whole group (its locust
    included) is killed, and the test fails with what it printed."""
    cmd = [sys.executable, "-m", "loadtest.run", "--host", triton_server.grpc_url,
           "--metrics-url", triton_server.metrics_url, "--out", str(out), *args]
    with subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"loadtest.run did not end within 240 s:\n{stdout[-3000:]}{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _locust_rounding_ms(ms: int) -> float:
    """How far locust's bucket_response_time may have moved a sample that it reports as `ms`."""
    return 0.5 if ms <= 100 else 0.5 * 10 ** (len(str(ms)) - 2)


def _rows(path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["Name"]: r for r in csv.DictReader(f)}


@pytest.mark.e2e
def test_short_locust_run_records_ttft_itl_and_streams_without_failures(triton_server, tmp_path):
    # 4 users: locust's weights (4:1) give 3 ChatUsers and 1 StoppingUser.
    run = _run_loadtest(triton_server, tmp_path, "--users", "4", "--spawn-rate", "4", "--duration", "8s")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _rows(tmp_path / "locust_stats.csv")
    for name in (TTFT, ITL, STREAM, STOPPED):
        assert int(rows[name]["Request Count"]) > 0, name
    assert all(r["Failure Count"] == "0" for r in rows.values()), rows
    with (tmp_path / "locust_failures.csv").open() as f:
        assert len(f.readlines()) == 1  # the header only
    # Every token after a stream's first chunk is one ITL sample.
    assert int(rows[ITL]["Request Count"]) > int(rows[STREAM]["Request Count"])
    assert float(rows[STREAM]["Average Content Size"]) >= 16  # min_tokens = max_tokens >= 16

    # The summary's percentiles (1% resolution) agree with locust's whole milliseconds.
    fine = _rows(tmp_path / "locust_fine_percentiles.csv")
    for name in (TTFT, ITL):
        assert int(fine[name]["Count"]) == int(rows[name]["Request Count"])
        for q in ("50%", "95%", "99%"):  # the same sample, rounded by locust, 1% buckets here
            coarse = int(rows[name][q])
            assert abs(float(fine[name][q]) - coarse) <= _locust_rounding_ms(coarse) + 0.01 * coarse, (name, q)
    assert "| TTFT p50 / p95 / p99 (ms) |" in run.stdout and "| generated tokens/s |" in run.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["tokens_per_s"] > 0 and summary["ttft_ms"]["95%"] > 0
    # The stop button really stops on the server: nothing left running, cancellations counted there.
    assert summary["context"]["server: active sequences after the run"] == "0"
    assert int(summary["context"]["server: requests cancelled"]) >= 1
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.e2e
def test_step_shape_writes_the_goodput(triton_server, tmp_path):
    run = _run_loadtest(triton_server, tmp_path, "--shape", "step", "--step-users", "2", "--step-time", "2",
                        "--step-max-users", "4", "--ttft-p95-ms", "60000")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    goodput = json.loads((tmp_path / "goodput.json").read_text())
    assert [s["users"] for s in goodput["steps"]] == [2, 4]
    assert all(s["within"] and s["ttft_count"] > 0 and s["tokens_per_s"] > 0 for s in goodput["steps"])
    assert goodput["goodput_users"] == 4 and "max users" in goodput["stopped_because"]
    assert "| goodput | 4 users (" in run.stdout and "within TTFT p95 <= 60000 ms" in run.stdout


@pytest.mark.e2e
def test_error_responses_count_as_failed_streams(triton_server, tmp_path):
    prompts = tmp_path / "too_long.jsonl"
    prompts.write_text(json.dumps({"prompt": "Once upon a time", "max_tokens": 5000}) + "\n")  # > context
    run = _run_loadtest(triton_server, tmp_path, "--users", "1", "--spawn-rate", "1", "--duration", "3s",
                        "--prompts", str(prompts), "--think-time", "0.2,0.2")
    assert run.returncode == 1  # locust's exit code when requests failed
    failures = _rows(tmp_path / "locust_failures.csv")
    assert list(failures) == [STREAM] and "BadRequestError" in failures[STREAM]["Error"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"] >= 1 and summary["streams"] == 0 and summary["ttft_ms"]["50%"] is None
