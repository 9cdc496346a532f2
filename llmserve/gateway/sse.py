"""Server-sent events: `data: {...}` lines (sse-starlette, which also notices a client that went away
and cancels the stream, stopping its generations), an error after the first event sent as an event
of its own, and OpenAI's closing `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from sse_starlette.sse import EventSourceResponse

from .errors import GatewayError, from_client_error

log = logging.getLogger("llmserve.gateway")

DONE = "[DONE]"


def sse_response(events: AsyncIterator[str], error_body: Callable[[GatewayError], dict[str, Any]], *,
                 done_marker: bool, send_timeout: float) -> EventSourceResponse:
    """Stream `events` (JSON texts) as SSE. An error while streaming becomes one last event with
    `error_body(error)`; then `data: [DONE]` when `done_marker`. A client that stops reading for
    `send_timeout` seconds is dropped (its generations stopped), as one that disconnected."""

    async def body() -> AsyncIterator[dict[str, str]]:
        try:
            async with aclosing(events):
                async for data in events:
                    yield {"data": data}
        except Exception as exc:  # noqa: BLE001 (the response has started: the error goes in the stream)
            error = exc if isinstance(exc, GatewayError) else from_client_error(exc)
            if error.status >= 500:
                log.warning("stream ended with an error: %s", error)
            yield {"data": json.dumps(error_body(error))}
        if done_marker:
            yield {"data": DONE}

    return EventSourceResponse(body(), sep="\n", send_timeout=send_timeout)
