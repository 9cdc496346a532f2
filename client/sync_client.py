"""Blocking client, built on tritonclient's gRPC bidirectional stream.

tritonclient's sync `InferenceServerClient` carries at most one stream at a
time, so every `stream()` call takes its own connection from a small pool of
idle ones; that makes one `Client` safe to share between threads.

A request's stream stays open after its final response and carries the
connection's next request, as in `AsyncClient` (one request at a time per
stream): opening a stream per request put its set-up between every request and
the server. An idle stream is ended after IDLE_STREAM_TIMEOUT_S (its connection
stays pooled), and by `close()`. Under gevent's monkey-patching every request
opens its own stream instead (see `_reuses_streams_by_default`).
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ._common import (
    DEFAULT_STOP_MODEL,
    DEFAULT_STOP_TIMEOUT,
    DEFAULT_URL,
    STREAM_HEADERS,
    ClientSettings,
    TritonClient,
    close_abandoned_clients,
    send_stop,
)
from ._tensors import ChunkAssembler, GenerationParams, PreparedRequest, build_request
from .errors import ClientError, RequestTimeoutError, from_triton_exception
from .types import Completion, StreamChunk

if TYPE_CHECKING:
    from typing_extensions import Unpack

    _Response = tuple[grpcclient.InferResult | None, InferenceServerException | None]

__all__ = ["Client"]

# An idle stream is ended after this long unused: an open stream holds up tritonserver's graceful
# shutdown (it waits for every open stream, past its exit timeout).
IDLE_STREAM_TIMEOUT_S = 1.0


def _reuses_streams_by_default() -> bool:
    """False under gevent's monkey-patching (locust, gevent servers): grpc's gevent integration
    waits on each channel in a thread of gevent's native pool, so every idle open stream holds one
    and starves the other streams (docs/notes/engine-and-triton.md)."""
    monkey = sys.modules.get("gevent.monkey")
    return not (monkey is not None and monkey.is_module_patched("threading"))


class _Connection:
    """A tritonclient client (one gRPC channel) and its stream, which may stay open between requests.

    tritonclient calls one callback for a stream's whole life, on the stream's reader thread; it
    hands each response to the queue of the request now on the stream.
    """

    def __init__(self, url: str) -> None:
        self.triton = TritonClient(url)
        self.responses: queue.SimpleQueue[_Response] = queue.SimpleQueue()
        self.idle_since = 0.0

    def _deliver(self, result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
        self.responses.put((result, error))

    def has_stream(self) -> bool:
        return self.triton._stream is not None

    def stream_is_open(self) -> bool:
        """False without a stream, and once its RPC ended (a restarted server, a dropped
        connection): tritonclient's reader thread ends with it (tritonclient 2.x's `_InferStream`)."""
        stream = self.triton._stream
        handler = getattr(stream, "_handler", None)
        return bool(getattr(stream, "_active", False)) and handler is not None and handler.is_alive()

    def send(self, model: str, request: PreparedRequest) -> queue.SimpleQueue[_Response]:
        """Send a request on the open stream, or on a new one; its responses arrive on the returned queue."""
        # A new queue: the last request on the stream ended with its final response, and a failure
        # to connect is reported to this one (set before the stream starts).
        self.responses = queue.SimpleQueue()
        if not self.stream_is_open():
            self.end_stream(cancel=True)  # one that ended while idle
            # No gRPC deadline: the stream may outlive its request; each request's timeout is the client's own.
            self.triton.start_stream(callback=self._deliver, headers=STREAM_HEADERS)
        self.triton.async_stream_infer(model, request.inputs, request_id=request.request_id,
                                       enable_empty_final_response=True)
        return self.responses

    def end_stream(self, *, cancel: bool) -> None:
        """Half-close the stream and wait for the server to end it, or cancel it."""
        with contextlib.suppress(Exception):
            self.triton.stop_stream(cancel_requests=cancel)

    def close(self) -> None:
        self.end_stream(cancel=False)
        with contextlib.suppress(Exception):
            self.triton.close()


class _ConnectionPool:
    """Idle connections, newest last. A janitor thread, running only while some idle connection
    has a stream open, ends streams unused for IDLE_STREAM_TIMEOUT_S."""

    def __init__(self, url: str, max_idle: int, reuse_streams: bool) -> None:
        self._url = url
        self._max_idle = max_idle
        self._reuse_streams = reuse_streams
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._janitor: threading.Thread | None = None
        self._closed = False

    def acquire(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise RuntimeError("Client is closed")
            if self._idle:
                return self._idle.pop()
        return _Connection(self._url)

    def release(self, connection: _Connection, *, cancel_stream: bool = False) -> None:
        """Take back a connection whose request ended (its stream kept open for the next request, if
        streams are reused); `cancel_stream` when the request may still run on its stream."""
        if cancel_stream or not self._reuse_streams:
            connection.end_stream(cancel=cancel_stream)
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
                if connection.has_stream() and self._janitor is None:
                    self._janitor = threading.Thread(target=self._end_idle_streams, name="client-idle-streams",
                                                     daemon=True)
                    self._janitor.start()
                return
        connection.close()

    def _end_idle_streams(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                streaming = [c for c in self._idle if c.has_stream()]
                expired = [c for c in streaming if now - c.idle_since >= IDLE_STREAM_TIMEOUT_S]
                self._idle = [c for c in self._idle if c not in expired]  # out while their streams end
                oldest = min((c.idle_since for c in streaming if c not in expired), default=None)
                if oldest is None:
                    self._janitor = None
            for connection in expired:
                connection.end_stream(cancel=False)
            if expired:
                with self._lock:
                    room = 0 if self._closed else max(self._max_idle - len(self._idle), 0)
                    self._idle[:0] = expired[:room]  # back as the oldest, without a stream
                for connection in expired[room:]:
                    connection.close()
            if oldest is None:
                return
            time.sleep(max(oldest + IDLE_STREAM_TIMEOUT_S - time.monotonic(), 0.01))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class Client(ClientSettings):
    """Synchronous client for the streaming LLM served by Triton.

    `timeout` (seconds, None for no limit) bounds the whole request, and with
    it every wait for the next chunk. On early exit from `stream()` the request
    is cancelled on the server: a stop request for the same request id is sent
    to `stop_model` (None disables that), and the gRPC stream is cancelled if the
    request does not end. Up to `max_idle_connections` connections are kept for
    the next requests, with their streams open when `reuse_streams` (default:
    True, except under gevent's monkey-patching).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = "ensemble",
        timeout: float | None = 60.0,
        *,
        stop_model: str | None = DEFAULT_STOP_MODEL,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        max_idle_connections: int = 32,
        reuse_streams: bool | None = None,
    ) -> None:
        ClientSettings.__init__(self, url, model, timeout, stop_model, stop_timeout)
        if isinstance(max_idle_connections, bool) or not isinstance(max_idle_connections, int) \
                or max_idle_connections < 0:
            raise ValueError(f"max_idle_connections must be a non-negative integer, got {max_idle_connections!r}")
        if reuse_streams is None:
            reuse_streams = _reuses_streams_by_default()
        self._pool = _ConnectionPool(self.url, max_idle_connections, reuse_streams)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections; requests still running close theirs when done."""
        self._pool.close()
        close_abandoned_clients()

    def health(self) -> bool:
        """True when the server is live and the model is ready; never raises for a down server."""
        connection = self._pool.acquire()
        try:
            return bool(
                connection.triton.is_server_live(client_timeout=self.timeout)
                and connection.triton.is_model_ready(self.model, client_timeout=self.timeout)
            )
        except InferenceServerException:
            return False
        finally:
            self._pool.release(connection)

    def generate(self, prompt: str, **params: Unpack[GenerationParams]) -> Completion:
        """Generate and return the whole text (streams internally, see `stream()`)."""
        with contextlib.closing(self.stream(prompt, **params)) as chunks:
            return Completion.from_chunks(chunks)

    def stream(self, prompt: str, **params: Unpack[GenerationParams]) -> Generator[StreamChunk, None, None]:
        """Yield `StreamChunk`s as the server produces them.

        Arguments are validated here, before any network traffic. Leaving the
        loop early (break, exception, `.close()`) cancels the request on the
        server. Raises `ClientError` subclasses for server-side failures.
        """
        request = build_request(prompt, params)
        return self._stream(request)

    def chat(self, messages: list[dict[str, str]], **params: Unpack[GenerationParams]) -> Completion:
        """Like `generate()`, for chat messages ({"role", "content"} dicts) that the server renders with
        the model's chat template (a model without one: BadRequestError)."""
        with contextlib.closing(self.stream_chat(messages, **params)) as chunks:
            return Completion.from_chunks(chunks)

    def stream_chat(self, messages: list[dict[str, str]],
                    **params: Unpack[GenerationParams]) -> Generator[StreamChunk, None, None]:
        """Like `stream()`, for chat messages (see `chat()`)."""
        return self._stream(build_request(None, params, messages=messages))

    def _stream(self, request: PreparedRequest) -> Generator[StreamChunk, None, None]:
        connection = self._pool.acquire()
        assembler = ChunkAssembler(request.max_tokens)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        request_over = False  # the server ended the request (final or error): nothing to stop
        left = False  # the caller closed the generator (break, .close()): stopped, then drained
        try:
            try:
                responses = connection.send(self.model, request)
            except InferenceServerException as exc:
                # The stream already failed (e.g. connection refused); the
                # real reason, if any, is on its way to the callback.
                try:
                    reason = connection.responses.get(timeout=1.0)[1] or exc
                except queue.Empty:
                    reason = exc
                raise from_triton_exception(reason, url=self.url) from reason
            while True:
                result, error = self._next(responses, deadline)
                if error is not None:
                    raise from_triton_exception(error, url=self.url) from error
                if result is None:  # tritonclient passes a result or an error, never neither
                    raise ClientError("tritonclient returned neither a result nor an error")
                chunk = assembler.feed(result)
                request_over = assembler.done
                if chunk is not None:
                    yield chunk
                if assembler.done:
                    return
        except GeneratorExit:
            left = True
            raise
        except ClientError as exc:
            # The server or transport ended the request, except on a timeout,
            # which leaves it running on the server: that one is stopped too.
            request_over = not isinstance(exc, RequestTimeoutError)
            raise
        finally:
            # Anything else thrown in (a timeout, Ctrl-C, a killed greenlet) cancels at once.
            self._end_request(connection, request, assembler, stop=not request_over, drain=left)

    def _next(self, responses: queue.SimpleQueue[_Response], deadline: float | None) -> _Response:
        try:
            return responses.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise RequestTimeoutError.after(self.timeout) from None

    def _end_request(self, connection: _Connection, request: PreparedRequest, assembler: ChunkAssembler, *,
                     stop: bool, drain: bool) -> None:
        completed = assembler.done
        try:
            if not completed and stop and drain and self.stop_model:
                # Stop the request on the server, then let it end normally: cancelling a streaming RPC
                # while responses are in flight can crash Triton 2.51's gRPC frontend
                # (triton-inference-server/server#7840, #8034). Cancelling is the fallback.
                completed = (send_stop(self.url, request.request_id, model=self.stop_model,
                                       timeout=self.stop_timeout)
                             and _drain(connection.responses, assembler, self.stop_timeout))
                stop = False
        finally:
            # Not completed (a killed greenlet or Ctrl-C in the stop included): cancel the RPC for
            # real, the server notices and stops generating. Always given back: never left open.
            self._pool.release(connection, cancel_stream=not completed)
        if stop and self.stop_model:
            send_stop(self.url, request.request_id, model=self.stop_model, timeout=self.stop_timeout)


def _drain(responses: queue.SimpleQueue[_Response], assembler: ChunkAssembler, timeout: float) -> bool:
    """Read a stopped request's last responses until its final one; False on an error or timeout."""
    deadline = time.monotonic() + timeout
    while not assembler.done:
        try:
            result, error = responses.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            return False
        if error is not None or result is None:
            return False
        assembler.feed(result)
    return True
