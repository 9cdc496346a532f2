"""The front end's /metrics (prometheus_client) on a real gateway before the session's tritonserver:
requests by route, status and key, refusals, open streams and WebSockets, TTFT at the front end."""

from __future__ import annotations

import threading
import urllib.request

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

pytestmark = pytest.mark.e2e

KEY = "sk-metrics-1a2b3c"
KEY_RPM = "sk-metrics-rpm-4d5e"  # one request per minute


@pytest.fixture(scope="module")
def keyed(triton_server, gateway_process, tmp_path_factory):
    keys = tmp_path_factory.mktemp("metrics-keys") / "keys.toml"
    keys.write_text(f'[keys.team-a]\nkey = "{KEY}"\n\n[keys.team-b]\nkey = "{KEY_RPM}"\nrequests_per_minute = 1\n')
    log = tmp_path_factory.mktemp("gateway-metrics") / "gateway.log"
    with gateway_process(triton_server.grpc_url, triton_server, extra_args=["--api-keys-file", str(keys)],
                         log_path=log) as server:
        yield server


def samples(gateway) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(gateway, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples(gateway).items() if n == name and set(labels.items()) <= ls)


def test_requests_are_counted_by_route_status_and_key(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    ok = dict(name="gateway_requests_total", route="/v1/completions", method="POST", status="200", key="team-a")
    before = value(keyed, **ok)
    ttft_before = value(keyed, "gateway_time_to_first_token_seconds_count", route="/v1/completions")
    unauthorized_before = value(keyed, "gateway_refusals_total", reason="invalid_api_key")
    limited_before = value(keyed, "gateway_refusals_total", reason="rate_limit_requests", key="team-b")
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 4, "min_tokens": 4}
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for stream in (False, True):
            assert client.post("/v1/completions", json={**body, "stream": stream}, headers=headers).status_code == 200
        assert client.post("/v1/completions", json=body).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
        b = {"Authorization": f"Bearer {KEY_RPM}"}
        statuses = [client.post("/v1/completions", json=body, headers=b).status_code for _ in range(2)]
        assert statuses == [200, 429]
        assert client.get("/no/such/path").status_code == 404
    assert value(keyed, **ok) - before == 2
    assert value(keyed, "gateway_time_to_first_token_seconds_count", route="/v1/completions") - ttft_before == 3
    assert value(keyed, "gateway_refusals_total", reason="invalid_api_key") - unauthorized_before == 2
    assert value(keyed, "gateway_refusals_total", reason="rate_limit_requests", key="team-b") - limited_before == 1
    assert value(keyed, "gateway_requests_total", route="/v1/completions", status="401", key="") >= 1
    assert value(keyed, "gateway_requests_total", route="/v1/models", status="401") >= 1
    assert value(keyed, "gateway_requests_total", route="/v1/completions", status="429", key="team-b") >= 1
    # An unknown path (answered by the page's static files) is one label, not a series per path asked.
    assert value(keyed, "gateway_requests_total", route="static", status="404") >= 1
    assert not any(ls and dict(ls).get("route") == "/no/such/path" for _, ls in samples(keyed))


def test_open_streams_and_websockets_are_gauged(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert value(keyed, "gateway_open_streams", route="/v1/completions") == 0
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 400, "min_tokens": 400, "stream": True}
    with httpx.Client(base_url=keyed.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()  # kept: a generator dropped would close the response
        next(lines)
        assert value(keyed, "gateway_open_streams", route="/v1/completions") == 1
        assert value(keyed, "gateway_requests_in_progress") >= 1
    with connect(f"{keyed.url.replace('http', 'ws', 1)}/v1/ws?token={KEY}") as ws:
        ws.send('{"prompt": "Once upon a time", "max_tokens": 3, "min_tokens": 3}')
        while '"done"' not in ws.recv(timeout=60):
            pass
        assert value(keyed, "gateway_open_websockets") == 1
        assert value(keyed, "gateway_time_to_first_token_seconds_count", route="/v1/ws") >= 1
    # The stream was closed by its client and the socket by its own: both gauges go back to zero.
    done = threading.Event()
    for _ in range(100):
        if (value(keyed, "gateway_open_streams", route="/v1/completions") == 0
                and value(keyed, "gateway_open_websockets") == 0):
            done.set()
            break
        done.wait(0.05)
    assert done.is_set()


def test_metrics_need_no_key_and_are_not_counted(keyed):
    before = value(keyed, "gateway_requests_total")  # over every label: a scrape is counted nowhere
    with urllib.request.urlopen(f"{keyed.url}/metrics", timeout=5) as response:
        assert response.status == 200
    assert value(keyed, "gateway_requests_total") == before
