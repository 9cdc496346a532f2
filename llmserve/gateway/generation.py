"""Running an `EngineRequest` on the `client.AsyncClient`: one choice's stream, n choices at once, and
waiting for them while watching the HTTP client for a disconnect.

Every stream is iterated inside `contextlib.aclosing`: leaving it (the caller's break, an error,
the task cancelled because the HTTP client went away) closes the AsyncClient's generator at once,
which stops the request on the server. Cleanup never awaits, so it also runs inside a cancelled
anyio scope (sse-starlette cancels its task group on a disconnect).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from client import AsyncClient, StreamChunk
from client.errors import BadRequestError, ClientError

from .access import current_admission
from .errors import cancelled_by_server, from_client_error, invalid_parameter
from .metrics import current_timing
from .translate import EngineRequest

T = TypeVar("T")

# The server's answer to max_tokens + prompt > context: "... use max_tokens <= N".
_ROOM_LEFT = re.compile(r"use max_tokens <= (\d+)")


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready: its generation was stopped."""


def open_stream(client: AsyncClient, req: EngineRequest, params: dict[str, Any],
                request_id: str) -> AsyncIterator[StreamChunk]:
    """The AsyncClient's stream for one engine request; the client's argument errors as 400s."""
    try:
        if req.messages is not None:
            return client.stream_chat([dict(m) for m in req.messages], request_id=request_id, **params)
        return client.stream(req.prompt, request_id=request_id, **params)
    except (ValueError, TypeError) as exc:  # the client's own checks, before anything was sent
        raise from_client_error(BadRequestError(str(exc)), req.param_names) from exc


def _room_left(exc: ClientError) -> int | None:
    match = _ROOM_LEFT.search(str(exc)) if isinstance(exc, BadRequestError) else None
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


def _check_prompt_tokens(req: EngineRequest, chunk: StreamChunk) -> None:
    cap = req.max_prompt_tokens
    if cap is not None and chunk.num_input_tokens > cap:
        raise invalid_parameter(f"The prompt has {chunk.num_input_tokens} tokens, more than this server's limit of "
                                f"{cap} (max_prompt_tokens)", req.param_names.get("prompt", "prompt"))


async def stream_choice(client: AsyncClient, req: EngineRequest, index: int,
                        request_id: str) -> AsyncIterator[StreamChunk]:
    """Choice `index`'s chunks. A defaulted max_tokens that does not fit the context is lowered once
    to what fits (the room the server's error names); errors are raised as GatewayError. The tokens
    are charged to the caller's API key as they come (the prompt once, with choice 0); the first
    token of any choice is the request's time to first token at the front end."""
    admission = current_admission.get()
    timing = current_timing.get()
    max_tokens: int | None = None
    while True:
        started = False
        charged = 0
        stream = open_stream(client, req, req.choice_params(index, max_tokens), f"{request_id}-{index}")
        try:
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    if admission is not None:  # before the prompt cap: an oversized prompt was prefilled
                        total = chunk.num_output_tokens + (chunk.num_input_tokens if index == 0 else 0)
                        admission.charge(total - charged)
                        charged = total
                    if not started:
                        _check_prompt_tokens(req, chunk)
                    started = True
                    if timing is not None and chunk.num_output_tokens:
                        timing.first_token()
                    if chunk.finish_reason == "cancelled":  # not by this caller, who is still listening
                        raise cancelled_by_server()
                    yield chunk
            return
        except ClientError as exc:
            room = _room_left(exc) if not started and req.max_tokens_defaulted and max_tokens is None else None
            if room is None:
                raise from_client_error(exc, req.param_names) from exc
            max_tokens = room


async def stream_choices(client: AsyncClient, req: EngineRequest,
                         request_id: str) -> AsyncIterator[tuple[int, StreamChunk]]:
    """(choice index, chunk) of all `req.n` choices as they come; the n engine requests run at once.
    The first error ends the whole stream (and stops the other choices)."""
    if req.n == 1:
        async with aclosing(stream_choice(client, req, 0, request_id)) as chunks:
            async for chunk in chunks:
                yield 0, chunk
        return

    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    finished = object()

    async def run(index: int) -> None:
        try:
            async with aclosing(stream_choice(client, req, index, request_id)) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((index, chunk))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer)
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, finished))

    tasks = [asyncio.create_task(run(index)) for index in range(req.n)]
    try:
        running = req.n
        while running:
            index, item = await queue.get()
            if item is finished:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:  # no await: this may run in a cancelled scope
            task.cancel()


@dataclass
class ChoiceResult:
    """One choice, collected: its whole text, its tokens (when logprobs were asked for), its end."""

    index: int
    parts: list[str] = field(default_factory=list)
    tokens: list[Any] = field(default_factory=list)
    finish_reason: str = "stop"
    num_input_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, chunk: StreamChunk, with_tokens: bool) -> None:
        self.parts.append(chunk.text)
        if with_tokens:
            self.tokens.extend(chunk.tokens)
        self.num_input_tokens = chunk.num_input_tokens
        self.num_output_tokens = chunk.num_output_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason


async def collect(client: AsyncClient, req: EngineRequest, request_id: str) -> list[ChoiceResult]:
    """All choices, whole (a non-streamed response)."""
    results = [ChoiceResult(index) for index in range(req.n)]
    async with aclosing(stream_choices(client, req, request_id)) as events:
        async for index, chunk in events:
            results[index].add(chunk, req.logprobs)
    return results


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, or cancel it (stopping its generations) when the HTTP client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work not in done:
        raise ClientDisconnected()
    return work.result()


async def primed(request: Request, events: AsyncIterator[T]) -> AsyncIterator[T]:
    """`events` with its first item already awaited: an error before anything was produced (a bad
    parameter, an overloaded server) is raised here, while an HTTP status can still say it."""
    async def first_item() -> T:
        return await events.__anext__()

    try:
        first = await unless_disconnected(request, first_item())
    except BaseException:
        await events.aclose()
        raise

    async def rest() -> AsyncIterator[T]:
        async with aclosing(events):
            yield first
            async for item in events:
                yield item

    return rest()
