"""Load-generator side of the naive baseline: one WebSocket request to `bench.naive_server`."""

from __future__ import annotations

import json
import time

from websockets.asyncio.client import connect

from bench.records import RequestRecord


async def naive_request(url: str, prompt: str, max_tokens: int, min_tokens: int, *,
                        text_parts: list[str] | None = None) -> RequestRecord:
    """Stream one generation from `url` (ws://HOST:PORT/generate); failures land in `record.error`.

    `text_parts`, when given, collects the streamed text pieces (tests compare the text).
    """
    record = RequestRecord(start=time.perf_counter())  # the connection is part of the request
    try:
        # No keepalive pings: a stream lasts seconds; open_timeout bounds a stuck handshake under load.
        async with connect(url, max_size=None, ping_interval=None, open_timeout=60) as ws:
            await ws.send(json.dumps({"prompt": prompt, "max_tokens": max_tokens, "min_tokens": min_tokens}))
            async for raw in ws:
                message = json.loads(raw)
                if "error" in message:
                    record.error = str(message["error"])
                    break
                if message.get("done"):
                    record.end = time.perf_counter()
                    record.num_output_tokens = int(message["num_output_tokens"])
                    break
                if text := message.get("text"):
                    record.chunks.append((time.perf_counter(), int(message["num_output_tokens"])))
                    if text_parts is not None:
                        text_parts.append(text)
            else:
                record.error = "connection closed before the response was done"
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the load generator
        record.error = f"{type(exc).__name__}: {exc}"
    if record.error is not None and not record.end:
        record.end = time.perf_counter()
    return record
