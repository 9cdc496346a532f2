"""The front end's WebSocket /v1/ws with a `websockets` client: requests one after another on one
socket, errors that leave it open, stop, and close (measured on the server)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx
import pytest
from websockets.asyncio.client import connect

from llmserve.triton.launcher import metric

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
LONG = {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True}


def _connect(gateway):
    # max_queue=None: a client that stops reading (as these do before closing) keeps reading the socket,
    # so that it sees the server's reply to its close (websockets pauses reading at 16 unread messages).
    return connect(gateway.url.replace("http://", "ws://") + "/v1/ws", max_queue=None)


async def _until_done(ws) -> tuple[list[str], dict]:
    texts = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if message["type"] == "token":
            texts.append(message["text"])
        else:
            return texts, message


def _cancelled(triton) -> float:
    try:
        return metric(triton.metrics_url, "llm_requests_finished_total", reason="cancelled")
    except KeyError:
        return 0.0


def test_two_requests_on_one_socket_and_errors_that_keep_it_open(gateway):
    whole = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 20}, timeout=30).json()
    chat = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 20}).json()

    async def main():
        async with _connect(gateway) as ws:
            await ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 20}))
            texts, done = await _until_done(ws)
            assert "".join(texts) == whole["choices"][0]["text"]
            assert done == {"type": "done", "finish_reason": whole["choices"][0]["finish_reason"],
                            "usage": whole["usage"]}
            await ws.send("{not json")
            _, error = await _until_done(ws)
            assert error["type"] == "error" and "JSON" in error["error"]["message"]
            await ws.send(json.dumps({"prompt": PROMPT, "temperature": -1}))
            _, error = await _until_done(ws)
            assert error["type"] == "error" and error["error"]["param"] == "temperature"
            await ws.send(json.dumps({"prompt": PROMPT, "messages": []}))
            _, error = await _until_done(ws)
            assert error["type"] == "error" and error["error"]["param"] == "messages"
            await ws.send(json.dumps({"type": "stop"}))  # nothing running: ignored
            await ws.send(json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 20}))
            texts, done = await _until_done(ws)
            assert "".join(texts) == chat["choices"][0]["message"]["content"]
            assert done["type"] == "done" and done["usage"] == chat["usage"]
            # Two requests sent at once run one after the other.
            await ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 5}))
            await ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 6}))
            assert (await _until_done(ws))[1]["usage"]["completion_tokens"] == 5
            assert (await _until_done(ws))[1]["usage"]["completion_tokens"] == 6

    asyncio.run(main())


def test_stop_ends_the_generation_on_the_server_and_the_socket_serves_on(gateway, settled_tokens):
    triton = gateway.triton

    async def main():
        async with _connect(gateway) as ws:
            before = settled_tokens(triton)
            cancelled = _cancelled(triton)
            await ws.send(json.dumps(LONG))
            for _ in range(2):
                assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "token"
            await ws.send(json.dumps({"type": "stop"}))
            _, done = await _until_done(ws)
            assert done["type"] == "done" and done["finish_reason"] == "cancelled"
            assert 0 < done["usage"]["completion_tokens"] < 900
            generated = settled_tokens(triton) - before
            assert generated < 450, f"{generated} of 900 tokens generated after a stop at the second token message"
            assert _cancelled(triton) == cancelled + 1
            await ws.send(json.dumps({"prompt": PROMPT, "max_tokens": 4}))
            _, done = await _until_done(ws)
            assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 4

    asyncio.run(main())


def test_closing_the_socket_stops_the_generation_on_the_server(gateway, settled_tokens):
    triton = gateway.triton
    before = settled_tokens(triton)
    cancelled = _cancelled(triton)

    async def main():
        async with _connect(gateway) as ws:
            await ws.send(json.dumps(LONG))
            for _ in range(2):
                assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "token"

    asyncio.run(main())
    started = time.monotonic()
    generated = settled_tokens(triton) - before
    assert time.monotonic() - started < 5
    assert generated < 450, f"{generated} of 900 tokens generated after the socket closed"
    assert _cancelled(triton) == cancelled + 1
