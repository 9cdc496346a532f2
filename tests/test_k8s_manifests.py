"""deploy/k8s: the kustomizations rendered here (no kustomize binary: resources and RFC 6902 patches,
the only features they use), every object validated against Kubernetes' schemas (kubernetes-validate),
and the wiring checked: probes, GPU resources, selectors, graceful shutdown, the HPA's metrics against
the prometheus-adapter rules and the metrics the server exports. Offline, well under a second."""

from __future__ import annotations

import copy
import http.server
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"  # the oldest release these manifests are checked against
# Custom resources kubernetes-validate has no schema for: checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
KUSTOMIZATIONS = ["", "overlays/mig", "monitoring"]
LABELS = {"app.kubernetes.io/name": "llmserve", "app.kubernetes.io/component": "server"}


# --- rendering ---------------------------------------------------------------------------------------

def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _json_patch(obj: dict, ops: list[dict]) -> dict:
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = [_unescape(t) for t in op["path"].lstrip("/").split("/")]
        node = obj
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        key = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "test":
            assert node[key] == op["value"], f"patch test failed at {op['path']}: {node[key]!r}"
        elif op["op"] == "remove":
            del node[key]
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace":
                node[key]  # noqa: B018 (must exist)
            if isinstance(node, list):
                node.insert(len(node) if key == "-" else key, op["value"])
            else:
                node[key] = op["value"]
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")
    return obj


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(want[key] == value for key, value in target.items())


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{directory}: this test renders no {sorted(unsupported)}: extend render()"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            # kustomize refuses a base that contains the overlay using it (a cycle)
            assert not directory.resolve().is_relative_to(path), f"{directory} is inside its base {path}"
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), "only RFC 6902 (JSON) patches are rendered here"
        hits = [i for i, obj in enumerate(objects) if _matches(obj, patch["target"])]
        assert hits, f"patch {patch['path']} matches no object"
        for i in hits:
            objects[i] = _json_patch(objects[i], ops)
    return objects


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S)


@pytest.fixture(scope="module")
def adapter_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]


# --- schemas -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_objects_validate_against_kubernetes_schema(where):
    objects = render(K8S / where)
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kv.validate(obj, KUBERNETES_VERSION, strict=True)
        except kv.VersionNotSupportedError:
            pytest.skip(f"kubernetes-validate has no schemas for Kubernetes {KUBERNETES_VERSION}")
        except kv.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{where or '.'}: {obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")


def test_service_monitor_selects_the_metrics_service(base):
    monitor = find(render(K8S / "monitoring"), "ServiceMonitor")
    service = find(base, "Service", "llmserve-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]} == {
        ("triton-metrics", "/metrics"), ("http", "/metrics")}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names


# --- the pod -----------------------------------------------------------------------------------------

def test_probes(base):
    deployment = find(base, "Deployment", "llmserve")
    triton, gateway = container(deployment, "triton"), container(deployment, "gateway")
    for probe in ("startupProbe", "readinessProbe"):
        assert triton[probe]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
        assert gateway[probe]["httpGet"] == {"path": "/health", "port": 9000}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8000}
    assert gateway["livenessProbe"]["httpGet"]["port"] == 9000
    # the first start builds the TensorRT plan: at least 15 minutes, as docker/compose.yaml allows
    for c in (triton, gateway):
        start = c["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 15 * 60
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    assert [p["containerPort"] for p in gateway["ports"]] == [9000]


def test_gpu_resources_and_shared_memory(base):
    deployment = find(base, "Deployment", "llmserve")
    triton = container(deployment, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not any(k.startswith("nvidia.com/") for k in container(deployment, "gateway")["resources"]
                   .get("limits", {}))
    mig = container(find(render(K8S / "overlays" / "mig"), "Deployment", "llmserve"), "triton")
    assert mig["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == 1
    assert "nvidia.com/gpu" not in mig["resources"]["limits"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    shm = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    size = volumes[shm["name"]]["emptyDir"]["sizeLimit"]
    assert re.fullmatch(r"\d+Gi", size) or int(size.removesuffix("Mi")) > 64


def test_triton_alone_beside_the_front_end(base):
    deployment = find(base, "Deployment", "llmserve")
    env = {e["name"]: e for e in container(deployment, "triton")["env"]}
    # entrypoint.sh: an empty OPENAI_PORT (set, not unset) runs tritonserver without the front end
    assert env["OPENAI_PORT"]["value"] == ""
    assert 'OPENAI_PORT="${OPENAI_PORT-9000}"' in (REPO / "docker" / "entrypoint.sh").read_text()
    script = container(deployment, "gateway")["command"][-1]
    assert "--triton-url 127.0.0.1:8001" in script and "--port 9000" in script


def test_selectors_match_the_pods(base):
    deployment = find(base, "Deployment", "llmserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == LABELS
    assert LABELS.items() <= pod_labels.items()
    assert find(base, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert find(base, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
                       for p in c["ports"]}
    for service in (o for o in base if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert container_ports[port["targetPort"]] == port["port"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"


def test_network_policy_keeps_triton_inside_the_pod(base):
    rules = find(base, "NetworkPolicy")["spec"]["ingress"]
    open_ports = {p["port"] for rule in rules if "from" not in rule for p in rule["ports"]}
    assert open_ports == {9000}
    reachable = {p["port"] for rule in rules for p in rule["ports"]}
    assert not reachable & {8000, 8001}, "Triton's HTTP and gRPC (admin protocols open) must stay in the pod"


def test_graceful_shutdown_outlasts_the_longest_stream(base):
    spec = find(base, "Deployment", "llmserve")["spec"]["template"]["spec"]
    gateway = container({"spec": {"template": {"spec": spec}}}, "gateway")
    timeout = float(re.search(r"--request-timeout (\d+)", gateway["command"][-1]).group(1))
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > timeout
    for c in spec["containers"]:
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        delay, limit = float(command[-2]), float(command[-1])
        assert timeout <= limit < grace, "the drain waits out a stream and ends before SIGKILL"
        assert delay < 30


def test_api_key_secrets_are_optional(base):
    deployment = find(base, "Deployment", "llmserve")
    gateway = container(deployment, "gateway")
    env = {e["name"]: e for e in gateway["env"]}
    ref = env["LLMSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "api-keys")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["optional"] is True and mount["readOnly"] is True
    assert f"--api-keys-file {mount['mountPath']}/keys.toml" in gateway["command"][-1]


class _Metrics(http.server.BaseHTTPRequestHandler):
    bodies: list[str] = []

    def do_GET(self):  # noqa: N802
        body = (self.bodies.pop(0) if len(self.bodies) > 1 else self.bodies[0]).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_prestop_drain_waits_for_streams(base):
    """The preStop script, run here against a fake metrics port: busy twice, then idle."""
    command = container(find(base, "Deployment", "llmserve"), "triton")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[-3] == "http://127.0.0.1:8002/metrics"
    busy = ('# TYPE llm_active_sequences gauge\nllm_active_sequences{model="llm",version="1"} 3\n'
            'llm_waiting_sequences{model="llm",version="1"} 1\n')
    idle = busy.replace("} 3", "} 0").replace("} 1\n", "} 0\n")
    _Metrics.bodies = [busy, busy, idle]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        subprocess.run([sys.executable, *command[1:-3], f"http://127.0.0.1:{server.server_port}/metrics", "0", "20"],
                       check=True, timeout=20)
        assert 1.5 < time.monotonic() - start < 10  # two busy reads a second apart, then done
    finally:
        server.shutdown()


# --- autoscaling -------------------------------------------------------------------------------------

def _rule_output_name(rule: dict) -> str:
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    name = rule.get("name", {})
    if not name:
        return series
    match = re.search(name.get("matches", "^(.*)$"), series)
    assert match, f"name.matches {name['matches']!r} does not match {series}"
    return match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", name["as"])) if "as" in name else series


def _exported_metrics() -> set[str]:
    source = (REPO / "llmserve" / "triton" / "metrics.py").read_text()
    return set(re.findall(r'MetricFamily\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', source))


def test_hpa_metrics_come_from_adapter_rules_on_exported_series(base, adapter_rules):
    hpa = find(base, "HorizontalPodAutoscaler")
    deployment = find(base, "Deployment", "llmserve")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2, "one replica and maxUnavailable 1 would let a drain take it"
    rules = {_rule_output_name(rule): rule for rule in adapter_rules}
    exported = _exported_metrics()
    assert "llm_waiting_sequences" in exported
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert "llm_waiting_sequences" in names
    for name in names:
        rule = rules[name]
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        assert series in exported, f"{series} is not a metric llmserve/triton/metrics.py exports"
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        assert "<<.GroupBy>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
