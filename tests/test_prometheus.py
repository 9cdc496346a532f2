"""A real Prometheus (Debian's `prometheus`) scraping a real tritonserver and two front ends with the
project's scrape config (deploy/prometheus/prometheus.yml): after traffic that ends every way a
request can (finished, preempted, refused as overload, 401, 429, 400, 503), the histograms and
counters are checked through Prometheus's HTTP API, and every query of the Grafana dashboard
(deploy/grafana/dashboards/llmserve.json) must return data.

Skips with the reason where /usr/bin/prometheus is missing (`make system-packages` installs it).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml
from websockets.sync.client import connect

from llmserve.paths import REPO_ROOT
from llmserve.triton.launcher import ServerProcess, TritonServer, free_port, metric, model_env

PROMETHEUS = Path("/usr/bin/prometheus")
SCRAPE_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "llmserve.json"
RATE_INTERVAL = "1m"  # Grafana's $__rate_interval: the traffic fits in it

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not PROMETHEUS.exists(), reason=f"{PROMETHEUS} not found: run make system-packages (as root, with apt-get)")]

KEY = "sk-prom-team-a-51c2"
KEY_RPM = "sk-prom-team-b-88d0"  # one request per minute
HISTOGRAMS = ["llm_time_to_first_token_seconds", "llm_inter_token_latency_seconds",
              "llm_e2e_request_latency_seconds", "llm_request_queue_time_seconds", "llm_request_prompt_tokens",
              "llm_request_generation_tokens"]


class PrometheusServer(ServerProcess):
    name = "prometheus"
    stop_timeout = 10.0

    def __init__(self, config: Path, data_dir: Path, log_path: Path) -> None:
        super().__init__(log_path=log_path)
        self.config, self.data_dir, self.port = config, data_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(PROMETHEUS), f"--config.file={self.config}", f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    @property
    def health_url(self) -> str:
        return f"{self.url}/-/ready"

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": at} if at is not None else {})}
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])


def scrape_config(triton_metrics: str, gateways: list[str]) -> dict:
    """The project's config, scraping these servers every second (the rest kept as shipped)."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    targets = {"triton": [triton_metrics], "gateway": gateways}
    assert sorted(job["job_name"] for job in config["scrape_configs"]) == sorted(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@pytest.fixture(scope="module")
def stack(default_model_dir, gateway_process, tmp_path_factory):
    """tritonserver (2 slots, 2 queue places: overload and preemption are easy to reach), a keyed front
    end before it, a front end whose Triton is unreachable (503s), and Prometheus scraping all three."""
    tmp = tmp_path_factory.mktemp("prometheus-stack")
    # Every inter-token gap observed (the default is a sample), so the counts can be checked exactly.
    env = model_env(str(default_model_dir), max_num_seqs=2, max_queued_requests=2, inter_token_sample_fraction=1)
    keys = tmp / "keys.toml"
    keys.write_text(f'[keys.team-a]\nkey = "{KEY}"\n\n[keys.team-b]\nkey = "{KEY_RPM}"\nrequests_per_minute = 1\n')
    with TritonServer(env=env, log_path=tmp / "triton.log") as triton, \
            gateway_process(triton.grpc_url, triton, extra_args=["--api-keys-file", str(keys)],
                            log_path=tmp / "gateway.log") as gateway, \
            gateway_process(f"localhost:{free_port()}", ready_path="/v1/models",
                            log_path=tmp / "gateway-unreachable.log") as unreachable:
        config = tmp / "prometheus.yml"
        hostport = [urllib.parse.urlsplit(u).netloc for u in (triton.metrics_url, gateway.url, unreachable.url)]
        config.write_text(yaml.safe_dump(scrape_config(hostport[0], hostport[1:])))
        with PrometheusServer(config, tmp / "data", tmp / "prometheus.log") as prometheus:
            # Ready is not scraping: its first scrapes come seconds later (target discovery is batched).
            deadline = time.monotonic() + 30
            while len(prometheus.query("up == 1")) < 3:
                assert time.monotonic() < deadline, f"targets not up:\n{prometheus.log_tail()}"
                time.sleep(0.25)
            yield prometheus, triton, gateway, unreachable


def _complete(gateway, key: str | None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        return client.post("/v1/completions", json={"model": "default", "prompt": "Once upon a time", **body},
                           headers=headers)


@pytest.fixture(scope="module")
def traffic(stack):
    """Send the traffic; the time by which Prometheus has scraped everything after it."""
    prometheus, triton, gateway, unreachable = stack
    statuses: list[int] = []
    for n in (3, 8, 16, 24):
        statuses.append(_complete(gateway, KEY, max_tokens=n, min_tokens=n, stream=True).status_code)
    with connect(f"{gateway.url.replace('http', 'ws', 1)}/v1/ws?token={KEY}") as ws:
        ws.send('{"prompt": "The little dog", "max_tokens": 5, "min_tokens": 5}')
        while '"done"' not in ws.recv(timeout=60):
            pass
    # Overload and preemption: 2 slots and 2 queue places for 8 long low-priority requests, then an
    # urgent one, which takes a queue place and then a running one's slot.
    with ThreadPoolExecutor(9) as pool:
        low = [pool.submit(_complete, gateway, KEY, max_tokens=600, min_tokens=600, priority=10) for _ in range(8)]
        deadline = time.monotonic() + 30
        while metric(triton.metrics_url, "llm_active_sequences") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        urgent = pool.submit(_complete, gateway, KEY, max_tokens=4, min_tokens=4, priority=0)
        statuses += [f.result().status_code for f in [*low, urgent]]
    statuses.append(_complete(gateway, None, max_tokens=2).status_code)  # no key
    statuses += [_complete(gateway, KEY_RPM, max_tokens=2).status_code for _ in range(2)]  # the second: 429
    statuses.append(_complete(gateway, KEY, max_tokens=-1).status_code)  # invalid
    statuses.append(_complete(unreachable, None, max_tokens=2).status_code)  # Triton unreachable
    assert {200, 400, 401, 429, 503} <= set(statuses), statuses
    ended = time.time()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every target scraped after the traffic (and its last flush)
        scraped = [float(s["value"][1]) for s in prometheus.query("timestamp(up)")]
        if len(scraped) == 3 and min(scraped) > ended + 1.0:
            return time.time()
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not scrape every target after the traffic:\n{prometheus.log_tail()}")


def test_every_target_is_scraped(stack, traffic):
    prometheus = stack[0]
    up = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in prometheus.query("up", traffic)}
    assert len(up) == 3 and set(up.values()) == {"1"}, up


def test_histograms_and_counters_arrived(stack, traffic):
    prometheus = stack[0]

    def value(expr: str) -> float:
        return prometheus.value(expr, traffic)

    finished = value("sum(llm_requests_finished_total)")
    assert finished >= 10
    for name in HISTOGRAMS:
        count = value(f"sum({name}_count)")
        assert count > 0, name
        assert value(f'sum({name}_bucket{{le="+Inf"}})') == count, name
    # One observation per request that ended in the engine, one per token after each first.
    assert value("sum(llm_request_generation_tokens_count)") == finished
    assert value("sum(llm_e2e_request_latency_seconds_count)") == finished
    assert value("sum(llm_request_generation_tokens_sum)") == value("sum(llm_generated_tokens_total)")
    assert value("sum(llm_inter_token_latency_seconds_count)") == (
        value("sum(llm_generated_tokens_total)") - value("sum(llm_time_to_first_token_seconds_count)"))
    assert value("sum(llm_preemptions_total)") >= 1
    assert value("sum(llm_requests_refused_total)") >= 1
    # The front ends: statuses, refusals, TTFT as they saw it.
    for status in ("200", "400", "401", "429", "503"):
        assert value(f'sum(gateway_requests_total{{status="{status}"}})') >= 1, status
    assert value('sum(gateway_requests_total{job="gateway", status="200", key="team-a", '
                 'route="/v1/completions"})') >= 5
    assert value('sum(gateway_refusals_total{reason="invalid_api_key"})') == 1
    assert value('sum(gateway_refusals_total{reason="rate_limit_requests", key="team-b"})') == 1
    assert value("sum(gateway_time_to_first_token_seconds_count)") >= 6  # 4 streams, the socket, the urgent one


def test_every_dashboard_query_returns_data(stack, traffic):
    prometheus = stack[0]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    empty = []
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            values = [float(s["value"][1]) for s in prometheus.query(expr, traffic)]
            if not any(math.isfinite(v) for v in values):  # no series, or only NaN (a quantile of nothing)
                empty.append(f"{panel['title']}: {expr} -> {values}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_every_prometheus_adapter_rule_returns_data(stack, traffic):
    """The HPA's metrics queries (deploy/k8s/prometheus-adapter), as the adapter renders them for one
    pod: here the series carry `job` and `instance` where Kubernetes' carry `namespace` and `pod`."""
    prometheus = stack[0]
    values = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    rules = values["rules"]["custom"]
    assert len(rules) >= 3
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'job="triton"').replace("<<.GroupBy>>", "instance"))
        result = prometheus.query(query, traffic)
        assert len(result) == 1 and math.isfinite(float(result[0]["value"][1])), f"{query}: {result}"


def test_the_dashboard_plot_draws_every_panel(stack, traffic, tmp_path):
    prometheus = stack[0]
    out = tmp_path / "dashboard.png"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "plot_dashboard.py"), "--prometheus",
                             prometheus.url, "--minutes", "3", "--rate-interval", RATE_INTERVAL, "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    panels = sum(p["type"] != "row" for p in json.loads(DASHBOARD.read_text())["panels"])
    assert f"{panels} panels with data" in result.stdout
    assert out.stat().st_size > 20_000
