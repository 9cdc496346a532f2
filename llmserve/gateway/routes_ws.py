"""The WebSocket /v1/ws: requests one after another on one socket (protocol_ws.py).

Two tasks per socket: one reads it (requests are queued, a ``{"type": "stop"}`` stops the current
generation at once), one generates. A stopped generation ends with ``{"type": "done",
"finish_reason": "cancelled", "usage": ...}`` (the tokens generated until then); a stop with nothing
running is ignored. An error is ``{"type": "error", "error": {...}}`` and the socket stays open.
Closing the socket stops the current generation on the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ValidationError

from client import AsyncClient

from .errors import GatewayError, from_client_error, invalid_parameter, validation_error
from .generation import stream_choice
from .openai_common import openai_finish, usage
from .protocol_ws import DoneMessage, ErrorMessage, TokenMessage, WsRequest
from .settings import GatewaySettings
from .state import client_of, settings_of
from .translate import EngineRequest, ws_request

log = logging.getLogger("llmserve.gateway")
router = APIRouter()

_CLOSED = object()


@dataclass
class _Progress:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done_sent: bool = False

    def usage(self):
        return usage(self.prompt_tokens, [self.completion_tokens])


class _Session:
    def __init__(self, websocket: WebSocket, client: AsyncClient, settings: GatewaySettings) -> None:
        self.websocket = websocket
        self.client = client
        self.settings = settings
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.current: asyncio.Task | None = None
        self.stopped = False
        self.closed = False
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            while True:
                message = await self.queue.get()
                if message is _CLOSED or self.closed:
                    return
                await self._serve(message)
        finally:
            reader.cancel()
            if self.current is not None:
                self.current.cancel()

    async def send(self, message: BaseModel) -> None:
        if self.closed:
            return
        try:
            async with self._send_lock:
                await self.websocket.send_text(message.model_dump_json())
        except Exception:  # noqa: BLE001 (the client went away)
            self._closed()

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
                    self.queue.put_nowait(data)
        except Exception:  # noqa: BLE001 (a dropped connection)
            pass
        finally:
            self._closed()

    def _stop(self) -> None:
        if self.current is not None and not self.current.done():
            self.stopped = True
            self.current.cancel()

    async def _serve(self, data: Any) -> None:
        try:
            if not isinstance(data, dict):
                raise invalid_parameter("A request must be a JSON object", None)
            req = ws_request(WsRequest.model_validate(data), self.settings)
        except ValidationError as exc:
            await self.send_error(validation_error(list(exc.errors())))
            return
        except GatewayError as exc:
            await self.send_error(exc)
            return
        progress = _Progress()
        self.stopped = False
        self.current = task = asyncio.create_task(self._generate(req, progress))
        try:
            await asyncio.wait({task})
        finally:
            self.current = None
        if task.cancelled():
            if self.stopped and not self.closed and not progress.done_sent:
                await self.send(DoneMessage(finish_reason="cancelled", usage=progress.usage()))
        elif (exc := task.exception()) is not None:
            await self.send_error(from_client_error(exc))

    async def _generate(self, req: EngineRequest, progress: _Progress) -> None:
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


@router.websocket("/v1/ws")
async def websocket_route(websocket: WebSocket) -> None:
    await websocket.accept()
    await _Session(websocket, client_of(websocket), settings_of(websocket)).run()
