"""asyncio client, built on tritonclient's `grpc.aio` client.

One `grpc.aio` channel carries any number of concurrent streams, so an
`AsyncClient` holds a single tritonclient aio client.

tritonclient 2.73's `aio.InferenceServerClient.stream_infer()` cannot ask for
the empty final response: its request dicts have no
`enable_empty_final_response` key and its `parameters` refuse the reserved
`triton_` prefix. Without that flag the end of a request is invisible when the
model sends its final flag on its own. So `_request_message` builds the request
with tritonclient's own request builder and sets the flag the way the sync
client's `async_stream_infer(enable_empty_final_response=True)` does;
`_open_stream` calls the same gRPC stub that `stream_infer()` calls, and
`AsyncClient._write` writes the request on it.

A request's stream stays open after its final response and carries the next
request (one request at a time per stream; Triton answers each request on the
stream it came in on, error responses included, each ending with its final
flag). A new stream per request put the stream's set-up (and its close)
between a request and the server, under load too (docs/notes/engine-and-triton.md).
Idle streams are ended after IDLE_STREAM_TIMEOUT_S, and by `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import grpc
import tritonclient.grpc.aio as aio
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.grpc._utils import _get_inference_request, get_error_grpc
from tritonclient.utils import InferenceServerException

from ._common import (
    DEFAULT_STOP_MODEL,
    DEFAULT_STOP_TIMEOUT,
    DEFAULT_URL,
    STREAM_HEADERS,
    ClientSettings,
    send_stop,
)
from ._tensors import ChunkAssembler, GenerationParams, PreparedRequest, build_request, is_final_response
from .errors import ClientError, GenerationCancelledError, RequestTimeoutError, from_triton_exception
from .types import Completion, StreamChunk

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncClient"]


# Open streams kept for the next request, at most: more only ever come from a burst of concurrency.
MAX_IDLE_STREAMS = 256
# An idle stream is ended after this long unused: an open stream holds up tritonserver's graceful
# shutdown (it waits for every open stream, past its exit timeout).
IDLE_STREAM_TIMEOUT_S = 1.0


def _request_message(model: str, request: PreparedRequest) -> service_pb2.ModelInferRequest:
    message = _get_inference_request(
        model_name=model, inputs=request.inputs, model_version="", request_id=request.request_id,
        outputs=None, sequence_id=0, sequence_start=False, sequence_end=False, priority=0,
        timeout=None, parameters=None,
    )
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    return message


def _open_stream(triton: aio.InferenceServerClient) -> grpc.aio.StreamStreamCall:
    # No gRPC deadline: the stream outlives its request; each request's timeout is the client's own.
    return triton._client_stub.ModelStreamInfer(metadata=triton._get_metadata(STREAM_HEADERS))


async def _end_stream(call: grpc.aio.StreamStreamCall, timeout: float) -> None:
    """Half-close an idle stream, which Triton treats as "no more requests" (not a cancellation), and
    wait for the server to end it; cancel it only if that fails."""
    if call.done():
        return
    try:
        async with asyncio.timeout(timeout):
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
    except (TimeoutError, grpc.RpcError, asyncio.InvalidStateError):
        pass
    finally:
        if not call.done():
            call.cancel()


def _caller_is_cancelling() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else True


class AsyncClient(ClientSettings):
    """asyncio twin of `Client`: same methods, awaited.

    Leaving `stream()` early cancels the request on the server, including
    when the consuming task is cancelled. For a deterministic cleanup after
    `break`, iterate inside ``contextlib.aclosing(client.stream(...))``;
    otherwise the generator is closed when it is garbage collected.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = "ensemble",
        timeout: float | None = 60.0,
        *,
        stop_model: str | None = DEFAULT_STOP_MODEL,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        ClientSettings.__init__(self, url, model, timeout, stop_model, stop_timeout)
        self._triton: aio.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Open streams between requests, each with the timer that ends it unused; newest last.
        self._idle_streams: dict[grpc.aio.StreamStreamCall, asyncio.TimerHandle] = {}
        self._stop_tasks: set[asyncio.Future] = set()  # stop requests and stopped streams being drained
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _client(self) -> aio.InferenceServerClient:
        if self._closed:
            raise RuntimeError("AsyncClient is closed")
        loop = asyncio.get_running_loop()
        # Created lazily: a grpc.aio channel belongs to the loop it was made in.
        if self._triton is None or self._loop is not loop:
            self._triton = aio.InferenceServerClient(self.url)
            self._loop = loop
            self._idle_streams = {}  # they belonged to the other loop's channel
        return self._triton

    async def close(self) -> None:
        """Wait (bounded) for pending stop requests, end the idle streams, then close the channel."""
        self._closed = True
        if self._stop_tasks:
            await asyncio.wait(set(self._stop_tasks), timeout=2 * self.stop_timeout + 1.0)
        idle, self._idle_streams = self._idle_streams, {}
        for timer in idle.values():
            timer.cancel()
        if idle and self._loop is asyncio.get_running_loop():
            await asyncio.gather(*(_end_stream(call, self.stop_timeout) for call in idle))
        triton, self._triton = self._triton, None
        if triton is not None:
            await triton.close()

    async def health(self) -> bool:
        """True when the server is live and the model is ready; never raises for a down server."""
        triton = self._client()
        try:
            return bool(
                await triton.is_server_live(client_timeout=self.timeout)
                and await triton.is_model_ready(self.model, client_timeout=self.timeout)
            )
        except InferenceServerException:
            return False

    async def generate(self, prompt: str, **params: Unpack[GenerationParams]) -> Completion:
        """Generate and return the whole text (streams internally, see `stream()`)."""
        async with contextlib.aclosing(self.stream(prompt, **params)) as chunks:
            return Completion.from_chunks([chunk async for chunk in chunks])

    def stream(self, prompt: str, **params: Unpack[GenerationParams]) -> AsyncGenerator[StreamChunk, None]:
        """Async-iterate `StreamChunk`s as the server produces them.

        A plain method returning an async generator, so that argument errors
        raise here rather than at the first iteration.
        """
        request = build_request(prompt, params)
        return self._stream(request)

    async def chat(self, messages: list[dict[str, str]], **params: Unpack[GenerationParams]) -> Completion:
        """Like `generate()`, for chat messages ({"role", "content"} dicts) that the server renders with
        the model's chat template (a model without one: BadRequestError)."""
        async with contextlib.aclosing(self.stream_chat(messages, **params)) as chunks:
            return Completion.from_chunks([chunk async for chunk in chunks])

    def stream_chat(self, messages: list[dict[str, str]],
                    **params: Unpack[GenerationParams]) -> AsyncGenerator[StreamChunk, None]:
        """Like `stream()`, for chat messages (see `chat()`)."""
        return self._stream(build_request(None, params, messages=messages))

    async def _stream(self, request: PreparedRequest) -> AsyncGenerator[StreamChunk, None]:
        triton = self._client()
        message = _request_message(self.model, request)
        call, reused = self._take_stream(triton)
        deadline = None if self.timeout is None else asyncio.get_running_loop().time() + self.timeout
        assembler = ChunkAssembler(request.max_tokens)
        request_over = False  # the server ended the request (final or error): nothing to stop
        released = False  # the stream is no longer this request's: kept for the next one, or being ended
        # Awaiting the call (the write, then each response): a cancellation now also cancels the RPC.
        reading = True
        try:
            if not await self._write(call, message, reused=reused):  # the idle stream had ended meanwhile
                call = _open_stream(triton)
                await self._write(call, message, reused=False)
            while True:
                reading = True
                response = await self._read(call, deadline)
                reading = False
                if response is grpc.aio.EOF:
                    raise ClientError("the server closed the stream before the request's final response")
                if response.error_message:
                    if is_final_response(InferResult(response.infer_response)):
                        self._retire(call)  # the request ended; not worth keeping after an error
                        released = True
                    error = InferenceServerException(msg=response.error_message)
                    raise from_triton_exception(error, url=self.url) from error
                chunk = assembler.feed(InferResult(response.infer_response))
                request_over = assembler.done
                if assembler.done:
                    self._keep(call)  # before the last yield: the caller may stop there
                    released = True
                if chunk is not None:
                    yield chunk
                if assembler.done:
                    return
        except ClientError as exc:
            # The server or transport ended the request, except on a timeout,
            # which leaves it running on the server: that one is stopped too.
            request_over = not isinstance(exc, RequestTimeoutError)
            raise
        finally:
            # No await in here: this also runs while the task is being cancelled.
            if not released:
                # The caller left between chunks (break, aclose): stop it, then drain the stream.
                graceful = (not request_over and not reading and self.stop_model is not None
                            and self._finish_in_background(call, request, assembler))
                if not graceful:
                    call.cancel()
                    if not request_over and self.stop_model:
                        self._stop_in_background(request.request_id)

    def _take_stream(self, triton: aio.InferenceServerClient) -> tuple[grpc.aio.StreamStreamCall, bool]:
        """An idle stream that is still open, else a new one; and whether it was reused."""
        while self._idle_streams:
            call, timer = self._idle_streams.popitem()
            timer.cancel()
            if not call.done():  # else it ended while idle: a restarted server, a dropped connection
                return call, True
        return _open_stream(triton), False

    def _keep(self, call: grpc.aio.StreamStreamCall) -> None:
        """Keep a stream whose request ended for the next request; end it if there is no use for it."""
        if self._closed or call.done() or len(self._idle_streams) >= MAX_IDLE_STREAMS:
            self._retire(call)
            return
        timer = asyncio.get_running_loop().call_later(IDLE_STREAM_TIMEOUT_S, self._expire, call)
        self._idle_streams[call] = timer

    def _expire(self, call: grpc.aio.StreamStreamCall) -> None:
        if self._idle_streams.pop(call, None) is not None:
            self._retire(call)

    def _retire(self, call: grpc.aio.StreamStreamCall) -> None:
        """End a stream whose request ended, in the background."""
        task = asyncio.get_running_loop().create_task(_end_stream(call, self.stop_timeout))
        self._stop_tasks.add(task)
        task.add_done_callback(self._stop_tasks.discard)

    async def _write(self, call: grpc.aio.StreamStreamCall, message: service_pb2.ModelInferRequest, *,
                     reused: bool) -> bool:
        """Write the request, in the caller's task: handing grpc.aio a request iterator instead
        leaves the write to a task of its own, which under load runs milliseconds later
        (docs/notes/engine-and-triton.md). False when a reused stream turns out to have ended since it was taken:
        nothing was sent, the caller opens a new one."""
        try:
            await call.write(message)
            return True
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            if reused:
                call.cancel()
                return False
            if isinstance(exc, grpc.RpcError):
                raise from_triton_exception(get_error_grpc(exc), url=self.url) from exc
            await self._read(call)  # the RPC ended before the write: its status says why, raised here
            raise ClientError("the server closed the stream before the request was sent") from None

    async def _read(self, call: grpc.aio.StreamStreamCall,
                    deadline: float | None = None) -> service_pb2.ModelStreamInferResponse:
        try:
            if deadline is None:
                return await call.read()
            # Expiry cancels the read, and grpc.aio then cancels the RPC, as a gRPC deadline would.
            async with asyncio.timeout_at(deadline):
                return await call.read()
        except TimeoutError:
            raise RequestTimeoutError.after(self.timeout) from None
        except grpc.RpcError as exc:
            raise from_triton_exception(get_error_grpc(exc), url=self.url) from exc
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError into a reader whose RPC was
            # cancelled locally; when close() did that, the caller's task was
            # not cancelled, so report it as an error instead.
            if self._closed and not _caller_is_cancelling():
                raise GenerationCancelledError("AsyncClient was closed during the request", "CANCELLED") from None
            raise

    def _finish_in_background(self, call: grpc.aio.StreamStreamCall, request: PreparedRequest,
                              assembler: ChunkAssembler) -> bool:
        """Stop the request on the server, then read its stream to the final response; cancel the
        RPC only if that fails. Cancelling a streaming RPC while responses are in flight can crash
        Triton 2.51's gRPC frontend (triton-inference-server/server#7840, #8034). False when no
        event loop runs (the caller then cancels)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False

        async def finish() -> None:
            try:
                stopped = await loop.run_in_executor(None, lambda: send_stop(
                    self.url, request.request_id, model=self.stop_model, timeout=self.stop_timeout))
                if stopped:
                    async with asyncio.timeout(self.stop_timeout):
                        while not assembler.done:
                            response = await call.read()
                            if response is grpc.aio.EOF or response.error_message:
                                break
                            assembler.feed(InferResult(response.infer_response))
            except (TimeoutError, grpc.RpcError):
                pass
            finally:
                if assembler.done:
                    self._keep(call)
                else:
                    call.cancel()

        task = loop.create_task(finish())
        self._stop_tasks.add(task)
        task.add_done_callback(self._stop_tasks.discard)
        return True

    def _stop_in_background(self, request_id: str) -> None:
        """Send the explicit stop without delaying the caller (or its cancellation)."""
        args = (self.url, request_id)
        kwargs = {"model": self.stop_model or DEFAULT_STOP_MODEL, "timeout": self.stop_timeout}
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # finalised outside a loop
            threading.Thread(target=send_stop, args=args, kwargs=kwargs, daemon=True).start()
            return
        task = loop.run_in_executor(None, lambda: send_stop(*args, **kwargs))
        self._stop_tasks.add(task)
        task.add_done_callback(self._stop_tasks.discard)
