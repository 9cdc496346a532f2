"""Load against the front end: `/v1/completions` streamed over SSE, as benchmark tools drive vLLM.

`min_tokens` (vLLM's extra field) fixes every output's length, and vLLM's
`stream_options.continuous_usage_stats` puts the running token count on every
chunk, so each chunk is recorded with its cumulative output tokens like the
other systems' pieces.
"""

from __future__ import annotations

import json
import time

import aiohttp

from bench.records import RequestRecord


async def openai_sse_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int,
                             min_tokens: int | None, *, text_parts: list[str] | None = None,
                             extra: dict | None = None) -> RequestRecord:
    """Stream one completion from `url` (http://HOST:PORT); failures land in `record.error`. `extra`:
    more body fields (what fixes the output's length on a server without `min_tokens`)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **(extra or {})}
    if min_tokens is not None:
        body["min_tokens"] = min_tokens
    record = RequestRecord(start=time.perf_counter())
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:300]}"
            else:
                await _read_events(response, record, text_parts)
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the load generator
        record.error = f"{type(exc).__name__}: {exc}"
    record.end = time.perf_counter()
    return record


async def _read_events(response: aiohttp.ClientResponse, record: RequestRecord, text_parts: list[str] | None) -> None:
    async for line in response.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            record.error = str(event["error"].get("message"))
            return
        usage = event.get("usage")
        if usage:
            record.num_output_tokens = int(usage["completion_tokens"])
        choices = event.get("choices") or ()
        text = choices[0].get("text") if choices else None
        if text:
            record.chunks.append((time.perf_counter(), record.num_output_tokens))
            if text_parts is not None:
                text_parts.append(text)
    record.error = "the stream ended without data: [DONE]"
