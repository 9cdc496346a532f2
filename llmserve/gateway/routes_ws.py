"""The WebSocket /v1/ws: requests one after another on one socket (protocol_ws.py).

Two tasks per socket: one reads it (requests are queued, a ``{"type": "stop"}`` stops the current
generation at once), one generates. A stopped generation ends with ``{"type": "done",
"finish_reason": "cancelled", "usage": ...}`` (the tokens generated until then); a stop with nothing
running is ignored. An error is ``{"type": "error", "error": {...}}`` and the socket stays open.
Closing the socket stops the current generation on the server.

With API keys the socket is authenticated once, at connect (the `Authorization` header or a `token`
query parameter), and each generation is admitted against the key's limits (a refusal is an error
message; the socket stays open). A socket without a request for `stream_idle_timeout` seconds, or
whose client stops reading that long, is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ValidationError

from client import AsyncClient

from .access import current_admission, rate_limited, refuse_websocket, retry_after, websocket_key
from .errors import GatewayError, from_client_error, invalid_parameter, validation_error
from .generation import stream_choice
from .keys import KeyStore
from .metrics import GatewayMetrics, RequestTiming, current_timing
from .openai_common import openai_finish, usage
from .protocol_ws import DoneMessage, ErrorMessage, TokenMessage, WsRequest
from .ratelimit import Admission, RateLimited, RateLimiter
from .settings import GatewaySettings
from .state import client_of, keys_of, limiter_of, metrics_of, settings_of
from .translate import EngineRequest, ws_request

log = logging.getLogger("llmserve.gateway")
router = APIRouter()

WS_ROUTE = "/v1/ws"
_CLOSED = object()


@dataclass
class _Progress:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done_sent: bool = False

    def usage(self):
        return usage(self.prompt_tokens, [self.completion_tokens])


class _Session:
    def __init__(self, websocket: WebSocket, client: AsyncClient, settings: GatewaySettings,
                 keys: KeyStore | None, limiter: RateLimiter, metrics: GatewayMetrics) -> None:
        self.websocket = websocket
        self.client = client
        self.settings = settings
        self.keys = keys
        self.presented_key = websocket_key(websocket) if keys is not None else None
        self.limiter = limiter
        self.metrics = metrics
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.current: asyncio.Task | None = None
        self.stopped = False
        self.closed = False
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        idle = self.settings.stream_idle_timeout
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.queue.get(), idle)
                except TimeoutError:
                    await self._close_idle(f"no request for {idle:g} s (stream_idle_timeout)")
                    return
                if message is _CLOSED or self.closed:
                    return
                await self._serve(*message)
        finally:
            reader.cancel()
            if self.current is not None:
                self.current.cancel()

    async def send(self, message: BaseModel) -> None:
        if self.closed:
            return
        try:
            async with self._send_lock, asyncio.timeout(self.settings.stream_idle_timeout):
                await self.websocket.send_text(message.model_dump_json())
        except Exception:  # noqa: BLE001 (the client went away, or stopped reading)
            self._closed()

    async def _close_idle(self, reason: str) -> None:
        self._closed()
        try:
            await self.websocket.close(code=1000, reason=reason)
        except Exception:  # noqa: BLE001 (already gone)
            pass

    def _closed(self) -> None:
        if not self.closed:
            self.closed = True
            if self.current is not None:
                self.current.cancel()  # stops the generation on the server
            self.queue.put_nowait(_CLOSED)

    async def send_error(self, error: GatewayError) -> None:
        await self.send(ErrorMessage(error=error.openai_body()["error"]))

    async def _read(self) -> None:
        try:
            while not self.closed:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    text = (message.get("bytes") or b"").decode("utf-8", "replace")
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    await self.send_error(invalid_parameter(f"The message is not valid JSON: {exc}", None))
                    continue
                if isinstance(data, dict) and data.get("type") == "stop":
                    self._stop()
                else:
                    self.queue.put_nowait((time.monotonic(), data))  # its arrival: the TTFT starts here
        except Exception:  # noqa: BLE001 (a dropped connection)
            pass
        finally:
            self._closed()

    def _stop(self) -> None:
        if self.current is not None and not self.current.done():
            self.stopped = True
            self.current.cancel()

    async def _serve(self, arrived: float, data: Any) -> None:
        timing = RequestTiming(self.metrics, WS_ROUTE, start=arrived)
        try:
            if not isinstance(data, dict):
                raise invalid_parameter("A request must be a JSON object", None)
            principal = None
            if self.keys is not None:  # again for each generation: the key file may have changed
                principal = self.keys.authenticate(self.presented_key)
                if principal is None:
                    self.metrics.refused("invalid_api_key")
                    self._closed()
                    await refuse_websocket(self.websocket, self.presented_key, accepted=True)
                    return
            req = ws_request(WsRequest.model_validate(data), self.settings, principal)
            admission = self.limiter.admit(principal) if principal is not None else None
        except ValidationError as exc:
            await self.send_error(validation_error(list(exc.errors())))
            return
        except GatewayError as exc:
            await self.send_error(exc)
            return
        except RateLimited as exc:
            self.metrics.refused(exc.code, principal.name)
            error = rate_limited(exc)
            await self.send(ErrorMessage(error={**error.openai_body()["error"],
                                                "retry_after": int(retry_after(exc.retry_after))}))
            return
        progress = _Progress()
        self.stopped = False
        self.current = task = asyncio.create_task(self._generate(req, progress, admission, timing))
        try:
            await asyncio.wait({task})
        finally:
            self.current = None
            task.cancel()  # a no-op once done; stops the generation when the socket handler is cancelled (shutdown)
            if admission is not None:
                admission.release()
        if task.cancelled():
            if self.stopped and not self.closed and not progress.done_sent:
                await self.send(DoneMessage(finish_reason="cancelled", usage=progress.usage()))
        elif (exc := task.exception()) is not None:
            await self.send_error(from_client_error(exc))

    async def _generate(self, req: EngineRequest, progress: _Progress, admission: Admission | None,
                        timing: RequestTiming) -> None:
        current_admission.set(admission)  # this task's own context: stream_choice charges its tokens
        current_timing.set(timing)  # and times its first token
        async with aclosing(stream_choice(self.client, req, 0, f"ws-{uuid.uuid4().hex}")) as chunks:
            async for chunk in chunks:
                progress.prompt_tokens = chunk.num_input_tokens
                progress.completion_tokens = chunk.num_output_tokens
                if chunk.text:
                    await self.send(TokenMessage(text=chunk.text))
                if chunk.finish_reason is not None:
                    progress.done_sent = True
                    await self.send(DoneMessage(finish_reason=openai_finish(chunk.finish_reason),
                                                usage=progress.usage()))
                if self.closed:
                    return


@router.websocket(WS_ROUTE)
async def websocket_route(websocket: WebSocket) -> None:
    keys = keys_of(websocket)
    if keys is not None and keys.authenticate(presented := websocket_key(websocket)) is None:
        metrics_of(websocket).refused("invalid_api_key")
        await refuse_websocket(websocket, presented, accepted=False)
        return
    await websocket.accept()
    await _Session(websocket, client_of(websocket), settings_of(websocket), keys, limiter_of(websocket),
                   metrics_of(websocket)).run()
