"""The monitoring files fit together (no Docker or Grafana here): compose mounts what exists where
Prometheus and Grafana read it, the dashboard names the provisioned data source, and every metric a
dashboard query or the scrape config relies on is one the servers export (the names in their code)."""

from __future__ import annotations

import json
import re

import yaml

from llmserve.gateway.metrics import GatewayMetrics
from llmserve.paths import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llmserve.json"


def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())


def mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to docker/), read-only marks dropped."""
    result = {}
    for volume in service.get("volumes", ()):
        host, container = volume.split(":")[:2]
        result[container] = host
    return result


def test_compose_runs_prometheus_in_the_servers_network_with_the_projects_config():
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["network_mode"] == "service:triton"  # Triton's metrics are on its loopback
    config_host = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert (REPO_ROOT / "docker" / config_host).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"triton": ["localhost:8002"], "gateway": ["localhost:9000"]}
    entrypoint = (REPO_ROOT / "docker" / "entrypoint.sh").read_text()
    assert "--metrics-port 8002" in entrypoint and 'OPENAI_PORT="${OPENAI_PORT-9000}"' in entrypoint


def test_compose_provisions_grafana_with_the_dashboard():
    grafana = compose()["services"]["grafana"]
    volumes = mounts(grafana)
    provisioning = (REPO_ROOT / "docker" / volumes["/etc/grafana/provisioning"]).resolve()
    dashboards = (REPO_ROOT / "docker" / volumes["/var/lib/grafana/dashboards"]).resolve()
    assert provisioning == DEPLOY / "grafana" / "provisioning" and dashboards == DASHBOARD.parent
    provider = yaml.safe_load((provisioning / "dashboards" / "llmserve.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "${PROMETHEUS_URL}"
    assert grafana["environment"]["PROMETHEUS_URL"] == "http://triton:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"]), panel["title"]


def _engine_metric_names() -> set[str]:
    """The llm_* names the `llm` model registers (llmserve/triton/metrics.py), histograms expanded."""
    source = (REPO_ROOT / "llmserve" / "triton" / "metrics.py").read_text()
    names = set(re.findall(r'"(llm_[a-z0-9_]+)"', source))
    histograms = {n for n in names if n.endswith(("_seconds", "_tokens")) and not n.endswith("_total")}
    return names | {f"{h}_{part}" for h in histograms for part in ("bucket", "count", "sum")}


def _gateway_metric_names() -> set[str]:
    names = set()
    for family in GatewayMetrics().registry.collect():
        names |= {sample.name for sample in family.samples} | {family.name}
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names |= {f"{family.name}_{part}" for part in ("bucket", "count", "sum")}
    return names


def test_every_metric_the_dashboard_queries_is_exported():
    exported = _engine_metric_names() | _gateway_metric_names()
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            used = set(re.findall(r"\b((?:llm|gateway)_[a-z0-9_]+)\b", target["expr"]))
            assert used, target["expr"]
            assert used <= exported, f"{panel['title']}: {used - exported} not exported"
