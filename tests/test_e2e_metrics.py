"""The `llm` model's latency and token histograms on a real tritonserver's metrics endpoint."""

from __future__ import annotations

import time

import pytest

from llmserve.triton.launcher import metric
from tests.ensemble_requests import run_stream

pytestmark = pytest.mark.e2e

HISTOGRAMS = ["llm_time_to_first_token_seconds", "llm_inter_token_latency_seconds",
              "llm_e2e_request_latency_seconds", "llm_request_queue_time_seconds", "llm_request_prompt_tokens",
              "llm_request_generation_tokens"]


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _value(url: str, name: str) -> float:
    try:
        return metric(url, name)
    except KeyError:  # no sample yet
        return 0.0


def test_histograms_count_every_request_and_token(triton_server):
    url = triton_server.metrics_url
    assert _wait_for(lambda: _value(url, "llm_active_sequences") == _value(url, "llm_waiting_sequences") == 0, 10)
    before = {f"{name}_{part}": _value(url, f"{name}_{part}") for name in HISTOGRAMS for part in ("count", "sum")}
    finished_before = _value(url, "llm_requests_finished_total")
    lengths = [3, 7, 12]
    start = time.monotonic()
    for n in lengths:
        result = run_stream(triton_server.grpc_url, text_input="Once upon a time", max_tokens=n, min_tokens=n,
                            stream=True)
        assert result.error is None
    client_seconds = time.monotonic() - start
    # Histograms are sent before the finished counter: once it counts all three, they do too.
    assert _wait_for(lambda: _value(url, "llm_requests_finished_total") >= finished_before + 3, 5)

    def delta(name: str) -> float:
        return _value(url, name) - before[name]

    for name in ("llm_time_to_first_token_seconds", "llm_e2e_request_latency_seconds",
                 "llm_request_queue_time_seconds", "llm_request_prompt_tokens", "llm_request_generation_tokens"):
        assert delta(f"{name}_count") == 3, name
    assert delta("llm_request_generation_tokens_sum") == sum(lengths)
    assert delta("llm_request_prompt_tokens_sum") > 0
    assert delta("llm_inter_token_latency_seconds_count") == sum(n - 1 for n in lengths)
    # The server's own clock: inside what the client saw, and ordered queue <= TTFT <= e2e.
    e2e = delta("llm_e2e_request_latency_seconds_sum")
    assert 0 < delta("llm_request_queue_time_seconds_sum") <= delta("llm_time_to_first_token_seconds_sum") <= e2e
    assert e2e < client_seconds
    # Cumulative buckets: +Inf holds them all, a bucket never more than the next; token buckets end
    # at the context (1-2-5 steps).
    inf = metric(url, "llm_request_generation_tokens_bucket", le="+Inf")
    assert inf == _value(url, "llm_request_generation_tokens_count")
    assert metric(url, "llm_request_generation_tokens_bucket", le="5") <= metric(
        url, "llm_request_generation_tokens_bucket", le="10") <= inf




def test_token_buckets_step_1_2_5_up_to_the_context(triton_server, default_model_dir):
    import json
    import re
    import urllib.request

    context = json.loads((default_model_dir / "config.json").read_text())["max_position_embeddings"]
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as response:
        body = response.read().decode()
    bounds = re.findall(r'^llm_request_prompt_tokens_bucket\{[^}]*le="([^"]+)"', body, re.MULTILINE)
    expected = [m * 10 ** e for e in range(8) for m in (1, 2, 5) if m * 10 ** e <= context]
    assert [float(b) for b in bounds] == [*map(float, expected), float("inf")]
