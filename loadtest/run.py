"""`make loadtest`: locust headless against a server, then a short summary.

    python -m loadtest.run --users 16 --spawn-rate 4 --duration 60s
    python -m loadtest.run --host localhost:8001 [--metrics-url http://localhost:8002/metrics]
    python -m loadtest.run --shape step --step-users 4 --step-time 15 --ttft-p95-ms 500
    python -m loadtest.run ... -- --loglevel DEBUG        # anything after -- goes to locust

Without --host it starts tritonserver on free ports (llmserve.triton.launcher) and stops
it afterwards. Writes into --out (default build/loadtest/): locust_stats.csv,
locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv,
locust_fine_percentiles.csv (TTFT/ITL/stream percentiles at 1% resolution),
report.html, summary.md, summary.json (and goodput.json for the step shape).
Exit status: locust's (1 when any request failed) for the constant load; for
the step load 0 when at least one step met the service level; 1 whenever the
server exited during the run or still had active sequences after it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from llmserve.paths import BUILD_DIR, REPO_ROOT
from llmserve.triton.launcher import TritonServer, exec_with_parent, metric, model_env
from loadtest import defaults
from loadtest.histogram import FINE_PERCENTILES, read_percentiles
from loadtest.summary import Summary, read_stats
from measure.prompts import DEFAULT_PROMPTS
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
SHAPE_FILE = Path(__file__).resolve().parent / "shape.py"
CSV_PREFIX = "locust"
IDLE_WAIT_S = 15.0  # how long the server may take to report 0 active sequences after the run


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description="Locust load test over Triton's gRPC stream.")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    parser.add_argument("--duration", default="60s", help="locust --run-time (constant shape): 60s, 5m, ...")
    parser.add_argument("--host", default=None,
                        help="gRPC host:port of a running server (default: start one on free ports)")
    parser.add_argument("--metrics-url", default=None,
                        help="its metrics URL, for the server-side checks (known when the server is ours)")
    parser.add_argument("--model-dir", default="build/models/default", help="model of the server we start")
    parser.add_argument("--runtime", default=None, help="its runtime (torch, onnxruntime, ...; default: the server's)")
    parser.add_argument("--out", type=Path, default=BUILD_DIR / "loadtest")
    parser.add_argument("--shape", choices=("constant", "step"), default="constant")
    parser.add_argument("--step-users", type=int, default=defaults.STEP_USERS)
    parser.add_argument("--step-time", type=float, default=defaults.STEP_TIME_S, help="seconds per step")
    parser.add_argument("--ttft-p95-ms", type=float, default=defaults.TTFT_P95_MS, help="step load's service level")
    parser.add_argument("--step-max-users", type=int, default=defaults.STEP_MAX_USERS)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--prompt-seed", type=int, default=defaults.PROMPT_SEED)
    parser.add_argument("--request-timeout", type=float, default=defaults.REQUEST_TIMEOUT_S)
    parser.add_argument("--think-time", default=defaults.THINK_TIME, help="MIN,MAX seconds between a user's prompts")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="answers run to the prompt file's max_tokens (min_tokens = max_tokens)")
    args = parser.parse_args(argv)
    if args.users < 1 or args.spawn_rate <= 0:
        parser.error("--users must be >= 1 and --spawn-rate > 0")
    if args.metrics_url and not args.host:
        parser.error("--metrics-url is for a server given with --host")
    return args, extra


def locust_command(args: argparse.Namespace, host: str, extra: list[str]) -> list[str]:
    out = args.out
    files = str(LOCUSTFILE) + (f",{SHAPE_FILE}" if args.shape == "step" else "")
    cmd = [sys.executable, "-m", "locust", "-f", files, "--headless", "--host", host,
           "--csv", str(out / CSV_PREFIX), "--html", str(out / "report.html"), "--only-summary",
           "--prompts", str(args.prompts), "--prompt-seed", str(args.prompt_seed),
           "--request-timeout", str(args.request_timeout), "--think-time", args.think_time,
           "--ignore-eos" if args.ignore_eos else "--no-ignore-eos"]
    if args.shape == "step":
        # Failures past the service level are expected there; the goodput is the verdict.
        cmd += ["--step-users", str(args.step_users), "--step-time", str(args.step_time),
                "--ttft-p95-ms", str(args.ttft_p95_ms), "--step-max-users", str(args.step_max_users),
                "--goodput-json", str(out / "goodput.json"), "--exit-code-on-error", "0"]
    else:
        cmd += ["--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.duration]
    return cmd + extra


def _cancelled_on_server(metrics_url: str) -> float:
    try:
        return metric(metrics_url, "llm_requests_finished_total", reason="cancelled")
    except KeyError:  # no request was cancelled yet: the labelled sample does not exist
        return 0.0


def _active_after_run(metrics_url: str) -> float:
    deadline = time.monotonic() + IDLE_WAIT_S
    while (active := metric(metrics_url, "llm_active_sequences")) != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return active


def _server_checks(metrics_url: str, cancelled_before: float) -> tuple[dict[str, str], str | None]:
    """Summary rows from the server's metrics after the run, and the problem they show, if any."""
    try:
        active = _active_after_run(metrics_url)
        cancelled = _cancelled_on_server(metrics_url) - cancelled_before
    except OSError as exc:  # URLError included: the server is gone
        return ({"server: after the run": "unreachable"},
                f"the server's metrics ({metrics_url}) did not answer after the run ({exc}): did it exit?")
    rows = {"server: active sequences after the run": f"{active:.0f}",
            "server: requests cancelled": f"{cancelled:.0f}"}
    problem = (f"the server still had {active:.0f} active sequence(s) {IDLE_WAIT_S:.0f} s after the run"
               if active else None)
    return rows, problem


def _clean(out: Path) -> None:
    """Old result files would pass for this run's when locust fails early."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*out.glob(f"{CSV_PREFIX}_*.csv"), out / "report.html", out / "goodput.json",
                 out / "summary.md", out / "summary.json"):
        Path(name).unlink(missing_ok=True)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    _clean(args.out)
    with contextlib.ExitStack() as stack:
        host, metrics_url = args.host, args.metrics_url
        if host is None:
            print("starting tritonserver on free ports ...", flush=True)
            server = stack.enter_context(TritonServer(env=model_env(args.model_dir, args.runtime),
                                                      log_path=args.out / "server.log"))
            host, metrics_url = server.grpc_url, server.metrics_url
        cancelled_before = _cancelled_on_server(metrics_url) if metrics_url else None
        started = datetime.datetime.now(datetime.timezone.utc)
        cmd = locust_command(args, host, extra)
        print("$ " + " ".join(cmd[1:]), flush=True)
        # locust ends with this process, even when this one is killed.
        rc = subprocess.run(exec_with_parent(cmd), cwd=REPO_ROOT).returncode
        server_checks, problem = _server_checks(metrics_url, cancelled_before) if metrics_url else ({}, None)
        if args.host is None and server.process.poll() is not None:
            problem = (f"tritonserver exited during the run (code {server.process.returncode}); "
                       f"its log ({args.out / 'server.log'}) ends with:\n{server.log_tail(3000)}")

    stats_csv = args.out / f"{CSV_PREFIX}_stats.csv"
    if not stats_csv.exists():
        print(f"locust wrote no {stats_csv} (exit code {rc}); see its output above", file=sys.stderr)
        return rc or 1
    fine_csv = args.out / f"{CSV_PREFIX}_{FINE_PERCENTILES}"
    summary = Summary.from_rows(read_stats(stats_csv), read_percentiles(fine_csv) if fine_csv.exists() else None)
    load = (f"{args.users} users, spawn rate {args.spawn_rate:g}/s, {args.duration}" if args.shape == "constant"
            else f"step: +{args.step_users} users every {args.step_time:g} s")
    context = {"date (UTC)": started.strftime("%Y-%m-%d %H:%M"), "load": load,
               "server": (f"started here: {args.model_dir}, runtime {args.runtime or 'default'}"
                          if args.host is None else host), **server_checks}
    goodput = None
    if args.shape == "step":
        goodput_path = args.out / "goodput.json"
        goodput = json.loads(goodput_path.read_text()) if goodput_path.exists() else None
        context["goodput"] = (f"{goodput['goodput_users']} users ({goodput['goodput_streams_in_flight']:g} streams "
                              f"in flight) within TTFT p95 <= {args.ttft_p95_ms:g} ms ({goodput['stopped_because']})"
                              if goodput else "no step finished")
    table = summary.markdown(context)
    (args.out / "summary.md").write_text(table + "\n")
    (args.out / "summary.json").write_text(json.dumps(
        {"context": context, **summary.to_json(), "goodput": goodput}, indent=2) + "\n")
    print(f"\n{table}\n\nreport: {args.out / 'report.html'}; CSVs: {args.out / CSV_PREFIX}_*.csv")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    if args.shape == "step":
        return 0 if goodput and goodput["goodput_users"] > 0 else 1
    return rc


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    return run(args, extra)


if __name__ == "__main__":
    sys.exit(main())
