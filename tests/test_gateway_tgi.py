"""The front end's TGI routes through huggingface_hub's InferenceClient (which posts to the URL
itself: TGI's compat route `/`), and /generate, /generate_stream, /info directly."""

from __future__ import annotations

import json
import time

import httpx2 as httpx
import pytest
from huggingface_hub import InferenceClient

from llmserve.triton.launcher import metric

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"


@pytest.fixture(autouse=True)
def _local_requests_allowed(monkeypatch):
    """huggingface_hub refuses every request under HF_HUB_OFFLINE=1 (conftest), even to localhost:
    lifted for these tests only, which reach nothing but the gateway."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)


@pytest.fixture(scope="module")
def tgi(gateway):
    return InferenceClient(base_url=gateway.url, timeout=60)


def test_text_generation_with_and_without_details(tgi):
    text = tgi.text_generation(PROMPT, max_new_tokens=12)
    assert isinstance(text, str) and text.strip()
    detailed = tgi.text_generation(PROMPT, max_new_tokens=12, details=True)
    assert detailed.generated_text == text
    details = detailed.details
    assert details.finish_reason in ("length", "eos_token") and details.generated_tokens <= 12
    assert "".join(t.text for t in details.tokens) == text
    assert all(isinstance(t.id, int) and t.logprob <= 0 and t.special is False for t in details.tokens)
    assert details.prefill == [] and details.seed is None  # greedy
    full = tgi.text_generation(PROMPT, max_new_tokens=12, return_full_text=True)
    assert full == PROMPT + text


def test_streams_one_event_per_token_concatenating_to_the_whole_text(tgi):
    text = tgi.text_generation(PROMPT, max_new_tokens=16)
    pieces = list(tgi.text_generation(PROMPT, max_new_tokens=16, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == text
    events = list(tgi.text_generation(PROMPT, max_new_tokens=16, stream=True, details=True))
    assert "".join(e.token.text for e in events) == text
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == text
    assert last.details.generated_tokens == len(events) or last.details.finish_reason == "eos_token"
    assert last.details.finish_reason in ("length", "eos_token") and last.details.input_length > 0
    assert [e.index for e in events] == list(range(1, len(events) + 1))


def test_seeded_sampling_reports_its_seed_and_repeats(tgi):
    values = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=11)
    first = tgi.text_generation(PROMPT, details=True, **values)
    again = "".join(tgi.text_generation(PROMPT, stream=True, **values))
    assert first.details.seed == 11 and first.generated_text == again
    unseeded = tgi.text_generation(PROMPT, details=True, max_new_tokens=2, do_sample=True)
    assert unseeded.details.seed is not None  # a random one, reported


def test_finish_reasons(tgi):
    free = tgi.text_generation(PROMPT, max_new_tokens=40, details=True)
    words = free.generated_text.split()
    stop = words[len(words) // 2]
    cut = tgi.text_generation(PROMPT, max_new_tokens=40, details=True, stop=[stop])
    assert cut.details.finish_reason == "stop_sequence" and stop not in cut.generated_text
    assert tgi.text_generation(PROMPT, max_new_tokens=3, details=True).details.finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_the_models_eos_is_eos_token(tgi, stream):
    if stream:
        last = list(tgi.text_generation(PROMPT, max_new_tokens=300, details=True, stream=True))[-1]
    else:
        last = tgi.text_generation(PROMPT, max_new_tokens=300, details=True)  # no stop strings
    assert last.details.finish_reason == "eos_token" and last.details.generated_tokens < 300


def test_generate_routes_and_info(gateway):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True, "top_n_tokens": 2}}
    whole = httpx.post(f"{gateway.url}/generate", json=body, timeout=30).json()
    assert set(whole) == {"generated_text", "details"}
    assert all(len(top) == 2 for top in whole["details"]["top_tokens"])
    plain = httpx.post(f"{gateway.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}).json()
    assert plain == {"generated_text": whole["generated_text"]}
    with httpx.stream("POST", f"{gateway.url}/generate_stream", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"]
    assert all(len(e["top_tokens"]) == 2 for e in events)
    info = httpx.get(f"{gateway.url}/info").json()
    assert info["model_id"] == "default" and info["max_best_of"] == 1 and info["version"]


def test_tgi_errors_are_422_in_tgi_shape(gateway):
    too_long = httpx.post(f"{gateway.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5000}})
    assert too_long.status_code == 422
    body = too_long.json()
    assert body["error_type"] == "validation" and "max_new_tokens" in body["error"]
    typed = httpx.post(f"{gateway.url}/generate_stream", json={"inputs": PROMPT, "parameters": {"top_p": "x"}})
    assert typed.status_code == 422 and "parameters.top_p" in typed.json()["error"]
    assert httpx.post(f"{gateway.url}/generate", json={"parameters": {}}).status_code == 422
    unsupported = httpx.post(f"{gateway.url}/generate", json={"inputs": PROMPT, "parameters": {"best_of": 2}})
    assert unsupported.status_code == 422 and "best_of" in unsupported.json()["error"]


def test_disconnecting_from_a_tgi_stream_stops_the_generation_on_the_server(gateway, settled_tokens):
    triton = gateway.triton
    before = settled_tokens(triton)
    cancelled = _cancelled(triton)
    # TGI has no min_tokens: this seed's sampled text runs to the 900 tokens (no EOS; checked once).
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 900, "do_sample": True, "temperature": 3.0, "seed": 2}}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{gateway.url}/generate_stream", json=body) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events += 1
                    if events == 2:
                        break
    started = time.monotonic()
    generated = settled_tokens(triton) - before
    assert time.monotonic() - started < 5
    assert generated < 450, f"{generated} of 900 tokens generated after a disconnect at the second event"
    assert _cancelled(triton) == cancelled + 1


def _cancelled(triton) -> float:
    try:
        return metric(triton.metrics_url, "llm_requests_finished_total", reason="cancelled")
    except KeyError:
        return 0.0
