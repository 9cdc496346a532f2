"""The bench's OpenAI SSE reader on the stream shapes the peers send, served by a real HTTP server:
running usage on every chunk (this front end, vLLM), llama-server's per-token timings, usage on the
last chunk only and no `data: [DONE]` (transformers serve)."""

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from bench.openai_driver import openai_sse_request


def _chunk(text: str, finish: str | None = None, **more) -> bytes:
    event = {"choices": [{"index": 0, "text": text, "finish_reason": finish}], **more}
    return f"data: {json.dumps(event)}\n\n".encode()


STREAMS = {
    "usage": [_chunk("a", usage={"completion_tokens": 1}), _chunk("bc", usage={"completion_tokens": 3}),
              _chunk("", "length", usage={"completion_tokens": 3}), b"data: [DONE]\n\n"],
    "timings": [_chunk("a", timings={"predicted_n": 1}), _chunk("b", timings={"predicted_n": 2}),
                _chunk("c", "length", timings={"predicted_n": 3}), b"data: [DONE]\n\n"],
    "last-usage-no-done": [_chunk("a"), _chunk("b"), _chunk("c", "length", usage={"completion_tokens": 3})],
    "cut-off": [_chunk("a"), _chunk("b")],
}


async def _serve_and_read(shape: str):
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["max_tokens"] == 3 and body["stream"] is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in STREAMS[shape]:
            await response.write(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            parts: list[str] = []
            record = await openai_sse_request(session, f"http://127.0.0.1:{port}", "m", "p", 3, None,
                                              text_parts=parts)
    finally:
        await runner.cleanup()
    return record, "".join(parts)


@pytest.mark.parametrize("shape", ["usage", "timings", "last-usage-no-done"])
def test_each_peer_stream_shape_gives_three_tokens_one_per_gap(shape):
    record, text = asyncio.run(_serve_and_read(shape))
    assert record.error is None and text == "abc" and record.num_output_tokens == 3
    counts = [tokens for _, tokens in record.chunks]
    assert counts == ([1, 3] if shape == "usage" else [1, 2, 3])


def test_a_stream_cut_off_before_a_choice_finished_is_an_error():
    record, _ = asyncio.run(_serve_and_read("cut-off"))
    assert "ended before a choice finished" in record.error
