"""The front end's errors: 400s naming the parameter (in OpenAI's shape), 404 for an unknown model,
malformed and oversized bodies, 503 with Triton unreachable, 429 from a real engine's full queue;
and the gateway serving on after each."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

from llmserve.triton.launcher import free_port

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
USER = [{"role": "user", "content": "Hi"}]
C, CHAT = "/v1/completions", "/v1/chat/completions"

BAD = [
    ("n zero", C, {"prompt": PROMPT, "n": 0}, "n", "n must be between 1 and 8"),
    ("n above max_n", C, {"prompt": PROMPT, "n": 9}, "n", "8"),
    ("logprobs above the cap", C, {"prompt": PROMPT, "logprobs": 21}, "logprobs", "20"),
    ("token-id prompt", C, {"prompt": [1, 2, 3]}, "prompt", "token-id"),
    ("token-id prompts", C, {"prompt": [[1, 2], [3]]}, "prompt", "token-id"),
    ("two prompts", C, {"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ("empty prompt", C, {"prompt": ""}, "prompt", "empty"),
    ("no prompt", C, {"max_tokens": 3}, "prompt", "Missing"),
    ("temperature not a number", C, {"prompt": PROMPT, "temperature": "hot"}, "temperature", "number"),
    ("negative temperature", C, {"prompt": PROMPT, "temperature": -1}, "temperature", "temperature"),
    ("top_p zero", C, {"prompt": PROMPT, "top_p": 0}, "top_p", "top_p"),
    ("max_tokens zero", C, {"prompt": PROMPT, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("max_tokens beyond the context", C, {"prompt": PROMPT, "max_tokens": 2000}, "max_tokens", "context"),
    ("streamed max_tokens beyond the context", C, {"prompt": PROMPT, "max_tokens": 2000, "stream": True},
     "max_tokens", "context"),
    ("seed beyond 64 bits", C, {"prompt": PROMPT, "seed": 2**70}, "seed", "64-bit"),
    ("stop not strings", C, {"prompt": PROMPT, "stop": [1]}, "stop", "string"),
    ("suffix", C, {"prompt": PROMPT, "suffix": "end"}, "suffix", "not supported"),
    ("min_tokens above max_tokens", C, {"prompt": PROMPT, "max_tokens": 3, "min_tokens": 5}, "min_tokens",
     "min_tokens"),
    ("empty messages", CHAT, {"messages": []}, "messages", "empty"),
    ("no messages", CHAT, {"max_tokens": 3}, "messages", "Missing"),
    ("unknown role", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unknown role"),
    ("content not a string", CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "content"),
    ("no content", CHAT, {"messages": [{"role": "user"}]}, "messages[0].content", "content"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", "text part"),
    ("top_logprobs above the cap", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "20"),
    ("top_logprobs without logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ("max_completion_tokens beyond the context", CHAT, {"messages": USER, "max_completion_tokens": 2000},
     "max_completion_tokens", "max_completion_tokens"),
    ("messages longer than the context", CHAT, {"messages": [{"role": "user", "content": "word " * 1100}]},
     "messages", "context"),
    ("chat n above max_n", CHAT, {"messages": USER, "n": 9, "stream": True}, "n", "8"),
]


def _serves(gateway) -> None:
    ok = httpx.post(f"{gateway.url}{C}", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def _openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("name, path, body, param, mention", BAD, ids=[b[0] for b in BAD])
def test_a_bad_parameter_is_a_400_naming_it(gateway, name, path, body, param, mention):
    error = _openai_error(httpx.post(f"{gateway.url}{path}", json=body, timeout=30), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert mention in error["message"] and param.split("[")[0] in error["message"], error["message"]
    _serves(gateway)


def test_the_openai_sdk_raises_the_error_with_its_message(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="default", prompt=PROMPT, max_tokens=2000)
    assert raised.value.body["param"] == "max_tokens" and "context" in raised.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER)


def test_an_unknown_model_is_a_404(gateway):
    for path, body in ((C, {"prompt": PROMPT}), (CHAT, {"messages": USER})):
        error = _openai_error(httpx.post(f"{gateway.url}{path}", json={**body, "model": "gpt-4"}), 404)
        assert error["param"] == "model" and error["code"] == "model_not_found" and "gpt-4" in error["message"]
    assert httpx.get(f"{gateway.url}/v1/models/gpt-4").status_code == 404
    assert httpx.get(f"{gateway.url}/v1/models/default").json()["id"] == "default"
    _serves(gateway)


def test_malformed_bodies_are_400s(gateway):
    for content in (b'{"prompt": "Once', b"[1, 2]", b"", b"not json at all"):
        error = _openai_error(httpx.post(f"{gateway.url}{C}", content=content,
                                         headers={"content-type": "application/json"}), 400)
        assert error["message"]
    error = _openai_error(httpx.post(f"{gateway.url}{C}", content=b'{"prompt": "Once'), 400)
    assert "JSON" in error["message"]
    # curl -d's form content type: read as JSON all the same.
    form = httpx.post(f"{gateway.url}{C}", content=json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode(),
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200
    _serves(gateway)


def test_a_body_over_the_limit_is_a_400_naming_it(gateway):
    big = json.dumps({"prompt": "word " * 250_000}).encode()  # 1.25 MB > 1 MiB
    error = _openai_error(httpx.post(f"{gateway.url}{C}", content=big), 400)
    assert "1048576" in error["message"] and error["code"] == "body_too_large"

    def chunks():  # no Content-Length: chunked, measured as it streams in
        for _ in range(20):
            yield b" " * 65536
        yield b'{"prompt": "x"}'

    error = _openai_error(httpx.post(f"{gateway.url}{C}", content=chunks()), 400)
    assert "1048576" in error["message"]
    tgi = httpx.post(f"{gateway.url}/generate", content=big)
    assert tgi.status_code == 422 and "1048576" in tgi.json()["error"]
    _serves(gateway)


@pytest.fixture(scope="module")
def unreachable_gateway(gateway_process, tmp_path_factory):
    """A gateway pointed at a port where nothing listens (ready once it answers /v1/models)."""
    log = tmp_path_factory.mktemp("gateway-unreachable") / "gateway.log"
    with gateway_process(f"localhost:{free_port()}", ready_path="/v1/models", log_path=log,
                        extra_args=["--request-timeout", "10"]) as server:
        yield server


def test_triton_unreachable_is_a_503(unreachable_gateway):
    url = unreachable_gateway.url
    error = _openai_error(httpx.get(f"{url}/health"), 503)
    assert error["type"] == "service_unavailable"
    for body in ({"prompt": PROMPT}, {"prompt": PROMPT, "stream": True}):
        error = _openai_error(httpx.post(f"{url}{C}", json=body, timeout=30), 503)
        assert error["code"] == "server_unavailable" and "could not reach" in error["message"]
    _openai_error(httpx.post(f"{url}{CHAT}", json={"messages": USER}, timeout=30), 503)
    tgi = httpx.post(f"{url}/generate", json={"inputs": PROMPT}, timeout=30)
    assert tgi.status_code == 503 and tgi.json()["error_type"] == "unavailable"


@pytest.fixture(scope="module")
def overloaded_gateway(default_model_dir, gateway_process, tmp_path_factory):
    """A tritonserver with one sequence slot and one queue place, and a gateway before it."""
    from llmserve.triton.launcher import TritonServer, model_env

    logs = tmp_path_factory.mktemp("gateway-overload")
    env = model_env(str(default_model_dir), max_num_seqs=1, max_queued_requests=1)
    with TritonServer(env=env, log_path=logs / "triton.log") as triton:
        with gateway_process(triton.grpc_url, triton, log_path=logs / "gateway.log") as server:
            yield server


def test_a_full_engine_queue_is_a_429(overloaded_gateway):
    url = overloaded_gateway.url
    body = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}

    def request(_):
        return httpx.post(f"{url}{C}", json=body, timeout=60)

    with ThreadPoolExecutor(6) as pool:  # one runs, one waits, the others are refused
        responses = list(pool.map(request, range(6)))
    refused = [r for r in responses if r.status_code != 200]
    served = [r for r in responses if r.status_code == 200]
    assert refused and served
    for response in refused:
        error = _openai_error(response, 429)
        assert error["code"] == "server_overloaded" and "overloaded" in error["message"]
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in served)
    tgi = httpx.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}, timeout=30)
    assert tgi.status_code == 200  # and it serves on


@pytest.fixture(scope="module")
def impatient_gateway(triton_server, gateway_process, tmp_path_factory):
    """A second gateway before the session's tritonserver, whose generations may take 0.2 s at most."""
    log = tmp_path_factory.mktemp("gateway-timeout") / "gateway.log"
    with gateway_process(triton_server.grpc_url, triton_server, log_path=log,
                         extra_args=["--request-timeout", "0.2"]) as server:
        yield server


def test_an_error_after_the_first_event_ends_the_stream_with_an_error_event(impatient_gateway, settled_tokens):
    url = impatient_gateway.url
    long = {"max_tokens": 900, "ignore_eos": True}
    before = settled_tokens(impatient_gateway.triton)
    with httpx.stream("POST", f"{url}{C}", json={"prompt": PROMPT, "n": 3, "stream": True, **long},
                      timeout=30) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) > 2
    assert json.loads(data[0])["choices"][0]["text"] is not None
    error = json.loads(data[-2])["error"]
    assert error["code"] == "timeout" and "0.2" in error["message"]
    # The timed-out generations are stopped on the server too.
    assert settled_tokens(impatient_gateway.triton) - before < 3 * 900
    # TGI has no ignore_eos: a sampled stream may end early, so four run at once (each slower) and
    # every one ends with its last token or, once past the deadline, with the error event.
    def tgi_stream(seed: int) -> list[dict]:
        with httpx.stream("POST", f"{url}/generate_stream", timeout=30, json={
                "inputs": PROMPT, "parameters": {"max_new_tokens": 900, "do_sample": True, "temperature": 3.0,
                                                 "seed": seed}}) as response:
            return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]

    with ThreadPoolExecutor(4) as pool:
        streams = list(pool.map(tgi_stream, range(1, 5)))
    assert all("token" in events[0] for events in streams)
    assert all(events[-1].get("error_type") == "timeout" or events[-1].get("generated_text") is not None
               for events in streams)
    assert any(events[-1].get("error_type") == "timeout" for events in streams)
    whole = httpx.post(f"{url}{C}", json={"prompt": PROMPT, **long}, timeout=30)
    error = _openai_error(whole, 504)
    assert error["code"] == "timeout" and "request_timeout" in error["message"]
