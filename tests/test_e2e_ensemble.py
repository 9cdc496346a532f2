"""End to end through a real tritonserver: the ensemble's TensorRT-LLM interface over gRPC and HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llmserve.triton.launcher import metric
from tests.ensemble_requests import run_stream

pytestmark = pytest.mark.e2e

PROMPTS = ["Once upon a time", "The little dog", "One day, Lily went to the park", "Tom and his friend",
           "In the morning", "The sun was", "She looked at the", "A big red ball", "The cat said",
           "After school, Ben", "There was a small house", "Mia liked to", "The bird flew",
           "It was a rainy day", "Grandma made a cake", "The boy and the girl"]


def test_stream_pieces_concatenate_to_the_non_streamed_text(triton_server):
    streamed = run_stream(triton_server.grpc_url, text_input="Once upon a time", max_tokens=40, stream=True)
    whole = run_stream(triton_server.grpc_url, text_input="Once upon a time", max_tokens=40, stream=False)
    assert streamed.error is None and whole.error is None
    assert len([p for p in streamed.pieces if p]) > 5  # really streamed, piece by piece
    assert len(whole.pieces) == 1
    assert streamed.text == whole.text and whole.text.strip()
    assert streamed.finish_reason == whole.finish_reason and whole.finish_reason in ("length", "stop")
    assert whole.num_output_tokens <= 40 and whole.num_input_tokens > 0


def test_seeded_sampling_streams_equal_non_streamed(triton_server):
    values = dict(text_input="The little dog", max_tokens=30, temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    streamed = run_stream(triton_server.grpc_url, stream=True, **values)
    whole = run_stream(triton_server.grpc_url, stream=False, **values)
    assert streamed.text == whole.text


def test_exclude_input_in_output_false_echoes_the_prompt(triton_server):
    for stream in (True, False):
        result = run_stream(triton_server.grpc_url, text_input="Once upon a time", max_tokens=8,
                            stream=stream, exclude_input_in_output=False)
        assert result.text.startswith("Once upon a time")


def test_greedy_output_is_the_same_alone_or_in_a_batch_of_16(triton_server):
    alone = [run_stream(triton_server.grpc_url, text_input=p, max_tokens=24, stream=True).text for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(lambda p: run_stream(triton_server.grpc_url, text_input=p, max_tokens=24,
                                                     stream=True).text, PROMPTS))
    assert batched == alone


def test_a_repeated_prompt_comes_from_the_prefix_cache(triton_server):
    prompt = "A prompt seen twice: the little bird sang a song to the moon every night before"
    first = run_stream(triton_server.grpc_url, text_input=prompt, max_tokens=12, stream=True)
    time.sleep(0.3)  # counters are flushed at most every 50 ms
    before = metric(triton_server.metrics_url, "llm_prefix_cache_hit_tokens_total")
    again = run_stream(triton_server.grpc_url, text_input=prompt, max_tokens=12, stream=True)
    assert again.text == first.text and again.error is None
    assert _wait_for(lambda: metric(triton_server.metrics_url, "llm_prefix_cache_hit_tokens_total") > before, 5)


def test_stop_word_ends_generation_and_is_not_in_the_output(triton_server):
    free = run_stream(triton_server.grpc_url, text_input="Once upon a time", max_tokens=60, stream=False)
    words = free.text.split()
    stop = words[len(words) // 2]  # a word the model will produce
    cut = run_stream(triton_server.grpc_url, text_input="Once upon a time", max_tokens=60, stream=True,
                     stop_words=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert free.text.startswith(cut.text)
    assert cut.num_output_tokens < free.num_output_tokens


def test_http_generate_and_generate_stream(triton_server):
    # 60 tokens: pieces due within one streaming interval (max_stream_responses_per_s) go out as one
    # event, and a cached prompt's 20 tokens took only ~6 ms.
    body = {"text_input": "Once upon a time", "max_tokens": 60, "min_tokens": 60}
    request = urllib.request.Request(f"{triton_server.http_url}/v2/models/ensemble/generate",
                                     data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        whole = json.loads(response.read())
    request = urllib.request.Request(f"{triton_server.http_url}/v2/models/ensemble/generate_stream",
                                     data=json.dumps({**body, "stream": True}).encode())
    events = []
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response:
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: "):]))
    assert len(events) > 3
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert events[-1]["finish_reason"] in ("length", "stop")


BAD_REQUESTS = [
    ("empty text_input", dict(text_input="", max_tokens=5), "text_input"),
    ("missing text_input", dict(max_tokens=5), "text_input"),
    ("invalid UTF-8", dict(text_input=np.array([[b"\xff\xfe bad"]], dtype=object), max_tokens=5), "UTF-8"),
    ("prompt too long", dict(text_input="word " * 3000, max_tokens=5), "context"),
    ("max_tokens zero", dict(text_input="Hi", max_tokens=0), "max_tokens"),
    ("max_tokens negative", dict(text_input="Hi", max_tokens=-4), "max_tokens"),
    ("max_tokens beyond context", dict(text_input="Hi", max_tokens=100000), "max_tokens"),
    ("negative temperature", dict(text_input="Hi", max_tokens=5, temperature=-1.0), "temperature"),
    ("top_p zero", dict(text_input="Hi", max_tokens=5, top_p=0.0), "top_p"),
    ("top_p above one", dict(text_input="Hi", max_tokens=5, top_p=1.5), "top_p"),
    ("negative top_k", dict(text_input="Hi", max_tokens=5, top_k=-2), "top_k"),
    ("max_tokens as FP32", dict(text_input="Hi", max_tokens=np.array([[5.0]], dtype=np.float32)), "max_tokens"),
    ("stop_words as token ids", dict(text_input="Hi", max_tokens=5,
                                     stop_words=np.array([[1, 2]], dtype=np.int32)), "stop_words"),
]


@pytest.mark.parametrize("name, values, mentions", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(triton_server, name, values, mentions):
    result = run_stream(triton_server.grpc_url, stream=True, timeout=30, **values)
    assert result.error is not None, f"{name}: no error"
    assert mentions in result.error.message(), result.error.message()
    assert result.seconds < 10
    ok = run_stream(triton_server.grpc_url, text_input="Hi", max_tokens=3, stream=True)
    assert ok.error is None and ok.finish_reason


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _idle(triton_server) -> bool:
    return metric(triton_server.metrics_url, "llm_active_sequences") == 0


def test_cancelled_ensemble_stream_stops_generation_on_the_server(triton_server):
    import queue

    import tritonclient.grpc as grpcclient

    from tests.ensemble_requests import make_inputs

    assert _wait_for(lambda: _idle(triton_server), 10)
    before = metric(triton_server.metrics_url, "llm_generated_tokens_total")
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put(result))
    client.async_stream_infer("ensemble", make_inputs(text_input="Once upon a time", max_tokens=900,
                                                      min_tokens=900, stream=True))
    for _ in range(5):
        responses.get(timeout=30)
    client.stop_stream(cancel_requests=True)  # what a closed connection looks like to the server
    client.close()
    assert _wait_for(lambda: _idle(triton_server), 10), "the sequence kept running after the cancel"
    time.sleep(0.3)  # counters are flushed at most every 50 ms
    generated = metric(triton_server.metrics_url, "llm_generated_tokens_total") - before
    # Out of 900: the cancel is seen within tens of ms (one sequence decodes ~3000 tokens/s; more on a busy machine).
    assert generated < 300, f"{generated} tokens generated for a stream cancelled after 5"
    assert metric(triton_server.metrics_url, "llm_kv_cache_usage_ratio") == 0


def test_explicit_stop_by_request_id(triton_server):
    """TensorRT-LLM's stop: a request to `llm` with stop=true and the request id of the running one."""
    import threading

    result = {}
    worker = threading.Thread(target=lambda: result.update(r=run_stream(
        triton_server.grpc_url, request_id="stop-me-1", text_input="Once upon a time", max_tokens=900,
        min_tokens=900, stream=True)))
    worker.start()
    assert _wait_for(lambda: metric(triton_server.metrics_url, "llm_active_sequences") >= 1, 20)
    stop = run_stream(triton_server.grpc_url, model="llm", request_id="stop-me-1", stop=True)
    assert stop.error is None
    worker.join(30)
    assert result["r"].finish_reason == "cancelled"
    assert result["r"].num_output_tokens < 900
    assert _wait_for(lambda: _idle(triton_server), 5)


def test_cancelling_a_direct_llm_stream_frees_the_sequence(triton_server):
    """Clients of the `llm` model itself (token ids in, decode windows out) are cancelled too."""
    import queue

    import tritonclient.grpc as grpcclient

    from tests.ensemble_requests import make_inputs

    assert _wait_for(lambda: _idle(triton_server), 10)
    before = metric(triton_server.metrics_url, "llm_generated_tokens_total")
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = make_inputs(max_tokens=900, min_tokens=900, stream=True)
    ids = grpcclient.InferInput("input_ids", [1, 3], "INT32")
    ids.set_data_from_numpy(np.array([[5, 6, 7]], dtype=np.int32))
    client.async_stream_infer("llm", [ids, *inputs])
    result, error = responses.get(timeout=30)
    assert error is None and result.as_numpy("token_ids").shape[0] == 1
    client.stop_stream(cancel_requests=True)
    client.close()
    assert _wait_for(lambda: _idle(triton_server), 10)
    time.sleep(0.3)
    assert metric(triton_server.metrics_url, "llm_generated_tokens_total") - before < 300


def test_disconnecting_from_generate_stream_frees_the_sequence(triton_server):
    assert _wait_for(lambda: _idle(triton_server), 10)
    before = metric(triton_server.metrics_url, "llm_generated_tokens_total")
    body = {"text_input": "Once upon a time", "max_tokens": 900, "min_tokens": 900, "stream": True}
    request = urllib.request.Request(f"{triton_server.http_url}/v2/models/ensemble/generate_stream",
                                     data=json.dumps(body).encode())
    response = urllib.request.urlopen(request, timeout=60)
    assert response.readline().startswith(b"data: ")
    response.close()  # the client goes away mid-stream
    assert _wait_for(lambda: _idle(triton_server), 10)
    time.sleep(0.3)
    assert metric(triton_server.metrics_url, "llm_generated_tokens_total") - before < 300
