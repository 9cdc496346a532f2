"""Load against the front end: `/v1/completions` streamed over SSE, as benchmark tools drive vLLM.

`min_tokens` (vLLM's extra field) fixes every output's length, and vLLM's
`stream_options.continuous_usage_stats` puts the running token count on every
chunk, so each chunk is recorded with its cumulative output tokens like the
other systems' pieces. Peers that count otherwise are read as they are:
llama-server's `timings.predicted_n` (with `timings_per_token`), and a server that
gives usage only at the end (transformers serve) has each text chunk counted as a
token until then. A stream may end without `data: [DONE]` once a choice has
finished (transformers serve does so).
"""

from __future__ import annotations

import json
import time

import aiohttp

from bench.records import RequestRecord

# Idle connections are dropped after this long, before the servers drop them (uvicorn after 5 s): a
# connection a server has closed fails the next request written to it (seen with vLLM after its
# turn's idle gap). Back-to-back requests still reuse their connections.
KEEPALIVE_S = 1.0


def new_session(reuses_connections: bool = True) -> aiohttp.ClientSession:
    """A session for one system's requests (made inside the loop it belongs to), no limit on open
    connections; `reuses_connections` False opens one per request (llama-server needs it)."""
    connector = (aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S) if reuses_connections
                 else aiohttp.TCPConnector(limit=0, force_close=True))
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))


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


async def fixed_length_request(session: aiohttp.ClientSession, system, prompt: str, n: int, *,
                               text_parts: list[str] | None = None) -> RequestRecord:
    """`openai_sse_request` to `system` (.url, .model, .fixed_length_fields(n): what makes the output
    exactly n greedy tokens on that server)."""
    fields = system.fixed_length_fields(n)
    return await openai_sse_request(session, system.url, system.model, prompt, fields.pop("max_tokens"),
                                    fields.pop("min_tokens", None), text_parts=text_parts, extra=fields)


def _tokens_so_far(event: dict) -> int | None:
    """The output tokens the server says it has sent, counting this event's; None if it does not say."""
    usage = event.get("usage")
    if usage:
        return int(usage["completion_tokens"])
    timings = event.get("timings")  # llama-server with "timings_per_token": true
    if timings and "predicted_n" in timings:
        return int(timings["predicted_n"])
    return None


async def _read_events(response: aiohttp.ClientResponse, record: RequestRecord, text_parts: list[str] | None) -> None:
    finished = False
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
        choices = event.get("choices") or ()
        text = choices[0].get("text") if choices else None
        finished = finished or bool(choices and choices[0].get("finish_reason"))
        counted = _tokens_so_far(event)
        if counted is not None:
            record.num_output_tokens = counted
        elif text:  # no count on this chunk: one more token
            record.num_output_tokens += 1
        if text:
            record.chunks.append((time.perf_counter(), record.num_output_tokens))
            if text_parts is not None:
                text_parts.append(text)
    if not finished:
        record.error = "the stream ended before a choice finished and without data: [DONE]"
