"""The front end's API keys, per-key limits, caps and TLS, against real gateways before the session's
tritonserver, through the real `openai` SDK, httpx and a WebSocket client."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from llmserve.triton.launcher import GatewayServer

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
C = "/v1/completions"
KEY_OPEN = "sk-open-8f1c2d"  # no limits
KEY_RPM = "sk-rpm-77ab01"  # 2 requests per minute
KEY_TPM = "sk-tpm-5e5e5e"  # 30 tokens per minute
KEY_ONE = "sk-one-c0ffee"  # one stream at once
KEY_LOW = "sk-low-123abc"  # priority 5
WRONG = "sk-wrong-000000"
ALL_KEYS = (KEY_OPEN, KEY_RPM, KEY_TPM, KEY_ONE, KEY_LOW, WRONG)


def keys_toml(extra: str = "") -> str:
    return f"""
[keys.open]
key = "{KEY_OPEN}"

[keys.rpm]
key_sha256 = "{hashlib.sha256(KEY_RPM.encode()).hexdigest()}"
requests_per_minute = 2

[keys.tpm]
key = "{KEY_TPM}"
tokens_per_minute = 30

[keys.one]
key = "{KEY_ONE}"
max_concurrent = 1

[keys.low]
key = "{KEY_LOW}"
priority = 5
{extra}"""


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(keys_toml())
    return path


@pytest.fixture(scope="module")
def keyed(triton_server, gateway_process, keys_file, tmp_path_factory):
    """A gateway requiring the keys of `keys_file`, with low caps; info-level logs (request lines)."""
    log = tmp_path_factory.mktemp("gateway-keyed") / "gateway.log"
    args = ["--api-keys-file", str(keys_file), "--max-tokens-limit", "1000", "--max-prompt-tokens", "40",
            "--max-stop-sequences", "2", "--max-stop-length", "8", "--stream-idle-timeout", "2",
            "--log-level", "info"]
    with gateway_process(triton_server.grpc_url, triton_server, extra_args=args, log_path=log) as server:
        server.log = log
        yield server


def sdk(gateway, key: str) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_no_key_or_a_wrong_key_is_a_401_in_openais_shape(keyed):
    for key in ("unused", WRONG):  # what clients of an open server send, and a wrong key
        with sdk(keyed, key) as client, pytest.raises(openai.AuthenticationError) as raised:
            client.completions.create(model="default", prompt=PROMPT, max_tokens=4)
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    response = httpx.post(f"{keyed.url}{C}", json={"prompt": PROMPT})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["error"]["message"]
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/generate"),
                         ("POST", "/generate_stream"), ("POST", "/"), ("GET", "/info")):
        response = httpx.request(method, f"{keyed.url}{path}", json={"inputs": PROMPT}, headers=auth(WRONG))
        assert response.status_code == 401, (path, response.text)
    tgi = httpx.post(f"{keyed.url}/generate", json={"inputs": PROMPT})
    assert tgi.json()["error_type"] and "API key" in tgi.json()["error"]  # TGI's shape on TGI's routes
    assert httpx.get(f"{keyed.url}/health").status_code == 200  # open
    assert "<html" in httpx.get(f"{keyed.url}/").text.lower()  # the page itself is open; it asks for the key


def test_a_right_key_is_served_with_rate_limit_headers_on_every_response(keyed):
    with sdk(keyed, KEY_OPEN) as client:
        assert client.models.list().data[0].id == "default"
        completion = client.completions.create(model="default", prompt=PROMPT, max_tokens=4)
        assert completion.usage.completion_tokens <= 4
    response = httpx.post(f"{keyed.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}},
                          headers=auth(KEY_OPEN))
    assert response.status_code == 200 and response.json()["generated_text"]
    assert "x-ratelimit-limit-requests" not in response.headers  # this key has no limits
    before = None
    for _ in range(2):
        with httpx.stream("POST", f"{keyed.url}{C}", headers=auth(KEY_RPM),
                          json={"prompt": PROMPT, "max_tokens": 3, "stream": True}) as stream:
            assert stream.status_code == 200
            remaining = int(stream.headers["x-ratelimit-remaining-requests"])
            assert stream.headers["x-ratelimit-limit-requests"] == "2"
            assert stream.headers["x-ratelimit-reset-requests"].endswith("s")
            assert "[DONE]" in stream.read().decode()
        assert before is None or remaining == before - 1
        before = remaining


def test_over_the_requests_per_minute_is_a_429_with_retry_after(keyed):
    with sdk(keyed, KEY_RPM) as client:
        for _ in range(3):  # the key's 2 (or what the previous test left) run out
            try:
                client.completions.create(model="default", prompt=PROMPT, max_tokens=2)
            except openai.RateLimitError as exc:
                refused = exc
                break
        else:
            pytest.fail("the third request within a minute was served")
    assert refused.code == "rate_limit_requests" and "requests_per_minute" in refused.message
    response = refused.response
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert response.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_stream_over_the_token_limit_finishes_and_the_next_request_waits(keyed):
    with sdk(keyed, KEY_TPM) as client:
        # 30 tokens a minute: this request's prompt and 40 tokens go over, and it still gets all 40.
        first = client.completions.create(model="default", prompt=PROMPT, max_tokens=40, extra_body={"ignore_eos": True})
        assert first.usage.completion_tokens == 40 and first.choices[0].finish_reason == "length"
        with pytest.raises(openai.RateLimitError) as raised:
            client.completions.create(model="default", prompt=PROMPT, max_tokens=2)
    assert raised.value.code == "rate_limit_tokens" and "tokens_per_minute" in raised.value.message
    headers = raised.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "30" and headers["x-ratelimit-remaining-tokens"] == "0"
    # The prompt and the 40 tokens took the bucket ~15 below zero: back above it in ~30 s (0.5 a second).
    assert 20 <= int(headers["retry-after"]) <= 40


def test_a_key_holds_at_most_max_concurrent_streams(keyed):
    with sdk(keyed, KEY_ONE) as client:
        with client.completions.create(model="default", prompt=PROMPT, max_tokens=900, stream=True,
                                       extra_body={"ignore_eos": True}) as stream:
            next(iter(stream))
            with pytest.raises(openai.RateLimitError) as raised:
                client.completions.create(model="default", prompt=PROMPT, max_tokens=2)
            assert raised.value.code == "concurrency_limit" and "max_concurrent" in raised.value.message
        deadline = time.monotonic() + 15  # the closed stream's place comes back once the server notices
        while True:
            try:
                assert client.completions.create(model="default", prompt=PROMPT, max_tokens=2).choices
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the closed stream still counts"
                time.sleep(0.2)


def test_a_keys_priority_is_the_default_and_the_most_urgent_it_may_ask(keyed):
    with sdk(keyed, KEY_LOW) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="default", prompt=PROMPT, max_tokens=2, extra_body={"priority": 1})
        assert raised.value.param == "priority" and "its priority is 5" in raised.value.message
        assert client.completions.create(model="default", prompt=PROMPT, max_tokens=2,
                                         extra_body={"priority": 9}).choices[0].text is not None
        assert client.completions.create(model="default", prompt=PROMPT, max_tokens=2).choices
    with sdk(keyed, KEY_OPEN) as client:
        with pytest.raises(openai.BadRequestError, match="32-bit"):
            client.completions.create(model="default", prompt=PROMPT, max_tokens=2, extra_body={"priority": 2**40})


@pytest.mark.parametrize("body, param, cap", [
    ({"max_tokens": 1001}, "max_tokens", "max_tokens_limit"),
    ({"max_tokens": 4, "stop": ["a", "b", "c"]}, "stop", "max_stop_sequences"),
    ({"max_tokens": 4, "stop": ["123456789"]}, "stop", "max_stop_length"),
    ({"max_tokens": 4, "prompt": "word " * 60}, "prompt", "max_prompt_tokens"),
], ids=["max_tokens", "stop-count", "stop-length", "prompt-tokens"])
def test_caps_refuse_with_a_400_naming_the_cap(keyed, body, param, cap):
    for stream in (False, True):
        response = httpx.post(f"{keyed.url}{C}", json={"prompt": PROMPT, **body, "stream": stream},
                              headers=auth(KEY_OPEN), timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and cap in error["message"]
    tgi = httpx.post(f"{keyed.url}/generate", headers=auth(KEY_OPEN),
                     json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1001}})
    assert tgi.status_code == 422 and "max_tokens_limit" in tgi.json()["error"]


def test_a_stalled_request_body_is_a_408(keyed):
    host, port = keyed.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {C} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_OPEN}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ".encode())
        answer = sock.recv(65536).decode()  # after the 2 s idle timeout
    assert answer.startswith("HTTP/1.1 408") and "stream_idle_timeout" in answer


def ws_url(gateway, token: str | None = None) -> str:
    url = gateway.url.replace("http://", "ws://") + "/v1/ws"
    return url if token is None else f"{url}?token={token}"


def test_the_websocket_takes_the_key_in_a_header_or_a_token_parameter(keyed):
    for url, headers in ((ws_url(keyed), None), (ws_url(keyed, WRONG), None)):
        with connect(url, additional_headers=headers) as ws:
            message = json.loads(ws.recv(timeout=10))
            assert message["type"] == "error" and message["error"]["code"] == "invalid_api_key"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1008
    for url, headers in ((ws_url(keyed, KEY_OPEN), None), (ws_url(keyed), auth(KEY_OPEN))):
        with connect(url, additional_headers=headers) as ws:
            ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 4}))
            while (message := json.loads(ws.recv(timeout=30)))["type"] == "token":
                pass
            assert message["type"] == "done", message


def test_a_websocket_generation_is_admitted_against_the_keys_limits(keyed):
    with connect(ws_url(keyed, KEY_ONE)) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 4}))
        while json.loads(ws.recv(timeout=30))["type"] == "token":
            pass
        # The socket's own stream has ended: a request over HTTP from the same key is served meanwhile.
        assert httpx.post(f"{keyed.url}{C}", json={"prompt": PROMPT, "max_tokens": 2},
                          headers=auth(KEY_ONE), timeout=30).status_code == 200
    with connect(ws_url(keyed, KEY_RPM)) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 2}))
        messages = [json.loads(ws.recv(timeout=30))]
        while messages[-1]["type"] == "token":
            messages.append(json.loads(ws.recv(timeout=30)))
        if messages[-1]["type"] != "error":  # the key had a request left: the next one has none
            ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 2}))
            messages = [json.loads(ws.recv(timeout=30))]
        error = messages[-1]["error"]
        assert error["code"] == "rate_limit_requests" and error["retry_after"] >= 1


def test_an_idle_websocket_is_closed(keyed):
    with connect(ws_url(keyed, KEY_OPEN)) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=15)
    assert closed.value.rcvd.code == 1000 and "stream_idle_timeout" in closed.value.rcvd.reason


def test_the_key_file_is_reloaded_and_a_malformed_one_rejected(keyed, keys_file):
    new_key = "sk-new-424242"
    with sdk(keyed, new_key) as client, pytest.raises(openai.AuthenticationError):
        client.models.list()
    keys_file.write_text(keys_toml(f'\n[keys.new]\nkey = "{new_key}"\n'))

    def served(key: str) -> bool:
        return httpx.get(f"{keyed.url}/v1/models", headers=auth(key)).status_code == 200

    deadline = time.monotonic() + 10
    while not served(new_key):
        assert time.monotonic() < deadline, "the new key was not picked up"
        time.sleep(0.3)
    keys_file.write_text(keys_toml('\n[keys.broken]\nkey = "sk-broken"\nrequests_per_minute = -1\n'))
    time.sleep(2.5)  # looked at once a second
    assert served(new_key) and served(KEY_OPEN)  # the keys loaded before stay in force
    assert not served("sk-broken")
    log = keyed.log.read_text()
    assert "keys.broken.requests_per_minute" in log and "stay in force" in log
    with connect(ws_url(keyed, new_key)) as ws:  # a socket opened with a key that is then revoked
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 2}))
        while json.loads(ws.recv(timeout=30))["type"] == "token":
            pass
        keys_file.write_text(keys_toml())
        deadline = time.monotonic() + 10
        while served(new_key):
            assert time.monotonic() < deadline, "the revoked key is still served"
            time.sleep(0.3)
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 2}))
        message = json.loads(ws.recv(timeout=30))
        assert message["type"] == "error" and message["error"]["code"] == "invalid_api_key"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1008


def test_a_malformed_key_file_stops_the_gateway_at_start_with_the_reason(tmp_path):
    cases = {
        "both.toml": '[keys.a]\nkey = "x"\nkey_sha256 = "' + "0" * 64 + '"\n',
        "bad-toml.toml": "[keys.a\n",
        "bad-hash.toml": '[keys.a]\nkey_sha256 = "abc"\n',
        "unknown.toml": '[keys.a]\nkey = "x"\nrequests_per_hour = 3\n',
    }
    expected = {"both.toml": "exactly one of key or key_sha256", "bad-toml.toml": "not valid TOML",
                "bad-hash.toml": "keys.a.key_sha256", "unknown.toml": "keys.a.requests_per_hour"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        run = subprocess.run([sys.executable, "-m", "llmserve.gateway", "--api-keys-file", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and expected[name] in run.stderr and str(path) in run.stderr, run.stderr


def test_the_log_never_prints_a_key(keyed):
    for key in ALL_KEYS:  # each key (and a wrong one) in a header and in query strings
        httpx.get(f"{keyed.url}/v1/models", headers=auth(key))
        httpx.get(f"{keyed.url}/health?token={key}&max_token=1")
        for url in (ws_url(keyed, key), ws_url(keyed).replace("/v1/ws", f"/v1/ws?tok%65n={key}")):
            with connect(url) as ws:  # %65 is "e": the route decodes the name, so the log masks it too
                ws.close()
    time.sleep(0.5)
    log = keyed.log.read_text()
    assert "token=***" in log and "tok%65n=***" in log  # the request lines are logged, masked
    assert "Logging error" not in log
    for key in ALL_KEYS:
        assert key not in log


class TlsGateway(GatewayServer):
    def __init__(self, *args, ca_file: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.context = ssl.create_default_context(cafile=ca_file)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2, context=self.context) as response:
                return response.status == 200
        except OSError:
            return False


def test_tls_with_a_self_signed_certificate(triton_server, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    args = ["--log-level", "warning", "--ssl-certfile", str(cert_file), "--ssl-keyfile", str(key_file),
            "--api-key", KEY_OPEN]
    with TlsGateway(triton_server.grpc_url, extra_args=args, ca_file=str(ca_file),
                    log_path=tmp_path / "gateway.log") as server:
        with OpenAI(base_url=f"{server.url}/v1", api_key=KEY_OPEN, max_retries=0,
                    http_client=httpx.Client(verify=server.context)) as client:
            assert client.completions.create(model="default", prompt=PROMPT, max_tokens=3).choices[0].text
        with pytest.raises(httpx.ConnectError):  # not trusted without the CA
            httpx.get(f"{server.url}/health")
        with pytest.raises(httpx.HTTPError):  # and no plain HTTP on that port
            httpx.get(server.url.replace("https://", "http://") + "/health", timeout=5)


def test_a_client_that_stops_reading_has_its_generation_stopped(keyed, settled_tokens):
    """Slowloris on the way out: responses pile up in the socket buffers until a send blocks; after
    --stream-idle-timeout (2 s here) the stream is dropped and its generations stopped. Three such
    clients, so that the generations would run well past the timeout."""
    from llmserve.triton.launcher import metric

    def cancelled() -> float:
        try:
            return metric(keyed.triton.metrics_url, "llm_requests_finished_total", reason="cancelled")
        except KeyError:  # none yet
            return 0.0

    clients, n, max_tokens = 3, 8, 900
    before, cancelled_before = settled_tokens(keyed.triton), cancelled()
    host, port = keyed.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "n": n, "logprobs": 20,
                       "stream": True}).encode()
    sockets = []
    try:
        for _ in range(clients):
            sock = socket.socket()
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            sock.connect((host, int(port)))
            sock.sendall(f"POST {C} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_OPEN}\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        for sock in sockets:
            assert sock.recv(64).startswith(b"HTTP/1.1 200")  # then nothing more is read
        deadline = time.monotonic() + 60
        while metric(keyed.triton.metrics_url, "llm_active_sequences") > 0:
            assert time.monotonic() < deadline, "the generations went on for clients that stopped reading"
            time.sleep(0.2)
        generated = settled_tokens(keyed.triton) - before  # while the sockets are still open
    finally:
        for sock in sockets:
            sock.close()
    assert generated < clients * n * max_tokens and cancelled() > cancelled_before, generated
