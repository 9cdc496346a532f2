"""Through a real tritonserver: the optional `priority` input (INT32, lower is served first) on the
ensemble, from both Python clients; a bad one is a clear error. Preemption itself is tested on the
engine (tests/test_priority_scheduling.py) and measured by `make bench-priority`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from client import AsyncClient, Client
from llmserve.triton.launcher import metric
from tests.ensemble_requests import run_stream

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me about a dog."}]


def test_priority_reaches_the_engine_and_leaves_the_greedy_text_alone(triton_server):
    with Client(triton_server.grpc_url) as client:
        plain = client.generate(PROMPT, max_tokens=16)
        assert client.generate(PROMPT, max_tokens=16, priority=-3).text == plain.text
        streamed = list(client.stream(PROMPT, max_tokens=16, priority=7))
        chat = client.chat(MESSAGES, max_tokens=12)
        assert client.chat(MESSAGES, max_tokens=12, priority=1).text == chat.text
    assert "".join(c.text for c in streamed) == plain.text and streamed[-1].num_output_tokens == 16

    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            text = "".join([c.text async for c in aclient.stream(PROMPT, max_tokens=16, priority=2)])
            chat_text = "".join([c.text async for c in aclient.stream_chat(MESSAGES, max_tokens=12, priority=-1)])
            return text, chat_text, (await aclient.generate(PROMPT, max_tokens=16, priority=0)).text

    assert asyncio.run(run()) == (plain.text, chat.text, plain.text)
    assert metric(triton_server.metrics_url, "llm_preemptions_total") == 0  # slots to spare: none


@pytest.mark.parametrize("priority", [np.array([[1.0]], dtype=np.float32), np.array([[1]], dtype=np.int64)],
                         ids=["FP32", "INT64"])
def test_a_priority_of_the_wrong_type_is_a_clear_error(triton_server, priority):
    result = run_stream(triton_server.grpc_url, text_input="Hi", max_tokens=3, stream=True, priority=priority,
                        timeout=30)
    assert result.error is not None and "priority" in result.error.message(), result.error
    assert result.seconds < 10
    ok = run_stream(triton_server.grpc_url, text_input="Hi", max_tokens=3, stream=True,
                    priority=np.array([[0]], dtype=np.int32))
    assert ok.error is None and ok.finish_reason


@pytest.mark.parametrize("priority", ["high", 1.5, True, 2**31, -2**31 - 1])
def test_the_clients_refuse_a_priority_the_tensor_cannot_hold(priority):
    with Client("localhost:1") as client, pytest.raises(ValueError, match="priority"):
        client.generate(PROMPT, max_tokens=4, priority=priority)

    async def run():
        async with AsyncClient("localhost:1") as aclient:
            await aclient.generate(PROMPT, max_tokens=4, priority=priority)

    with pytest.raises(ValueError, match="priority"):
        asyncio.run(run())
