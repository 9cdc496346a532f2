"""Blocking client, built on tritonclient's gRPC bidirectional stream.

tritonclient's sync `InferenceServerClient` carries at most one stream at a
time, so every `stream()` call takes its own from a small pool of idle ones;
that makes one `Client` safe to share between threads.
"""

from __future__ import annotations

import contextlib
import queue
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
    check_timeout,
    normalize_url,
    send_stop,
)
from ._tensors import ChunkAssembler, GenerationParams, PreparedRequest, build_request
from .errors import ClientError, RequestTimeoutError, from_triton_exception
from .types import Completion, StreamChunk

if TYPE_CHECKING:
    from typing_extensions import Unpack

    _Response = tuple[grpcclient.InferResult | None, InferenceServerException | None]

__all__ = ["Client"]

# Extra wait past the deadline so that gRPC's own DEADLINE_EXCEEDED (which
# also cancels the RPC) is normally what ends a timed-out request.
_DEADLINE_GRACE_S = 0.5


def _close_quietly(triton: grpcclient.InferenceServerClient) -> None:
    with contextlib.suppress(Exception):
        triton.close()


class _Pool:
    """Idle tritonclient clients, reused so that a request skips connection setup."""

    def __init__(self, url: str, max_idle: int) -> None:
        self._url = url
        self._max_idle = max_idle
        self._idle: list[grpcclient.InferenceServerClient] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> grpcclient.InferenceServerClient:
        with self._lock:
            if self._closed:
                raise RuntimeError("Client is closed")
            if self._idle:
                return self._idle.pop()
        return grpcclient.InferenceServerClient(self._url)

    def release(self, triton: grpcclient.InferenceServerClient) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(triton)
                return
        _close_quietly(triton)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for triton in idle:
            _close_quietly(triton)


class Client:
    """Synchronous client for the streaming LLM served by Triton.

    `timeout` (seconds, None for no limit) bounds the whole request, and with
    it every wait for the next chunk. On early exit from `stream()` the request
    is cancelled on the server: the gRPC stream is cancelled and a stop request
    for the same request id is sent to `stop_model` (None disables that).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = "ensemble",
        timeout: float | None = 60.0,
        *,
        stop_model: str | None = DEFAULT_STOP_MODEL,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        max_idle_connections: int = 4,
    ) -> None:
        self.url = normalize_url(url)
        self.model = model
        self.timeout = check_timeout(timeout)
        self.stop_model = stop_model
        self.stop_timeout = stop_timeout
        self._pool = _Pool(self.url, max_idle_connections)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close idle connections; streams still running close theirs when done."""
        self._pool.close()

    def health(self) -> bool:
        """True when the server is live and the model is ready; never raises for a down server."""
        triton = self._pool.acquire()
        try:
            return bool(
                triton.is_server_live(client_timeout=self.timeout)
                and triton.is_model_ready(self.model, client_timeout=self.timeout)
            )
        except InferenceServerException:
            return False
        finally:
            self._pool.release(triton)

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

    def _stream(self, request: PreparedRequest) -> Generator[StreamChunk, None, None]:
        triton = self._pool.acquire()
        responses: queue.SimpleQueue[_Response] = queue.SimpleQueue()
        assembler = ChunkAssembler(request.max_tokens)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        request_over = False  # the server ended the request (final or error): nothing to stop
        left = False  # the caller closed the generator (break, .close()): stopped, then drained
        try:
            try:
                triton.start_stream(callback=lambda result, error: responses.put((result, error)),
                                    stream_timeout=self.timeout, headers=STREAM_HEADERS)
                triton.async_stream_infer(self.model, request.inputs, request_id=request.request_id,
                                          enable_empty_final_response=True)
            except InferenceServerException as exc:
                # The stream already failed (e.g. connection refused); the
                # real reason, if any, is on its way to the callback.
                try:
                    reason = responses.get(timeout=1.0)[1] or exc
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
            self._end_stream(triton, request, responses, assembler, stop=not request_over, drain=left)

    def _next(self, responses: queue.SimpleQueue[_Response], deadline: float | None) -> _Response:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0) + _DEADLINE_GRACE_S
        try:
            return responses.get(timeout=wait)
        except queue.Empty:
            raise RequestTimeoutError(f"no response from the server within the {self.timeout}s timeout",
                                      "DEADLINE_EXCEEDED") from None

    def _end_stream(self, triton: grpcclient.InferenceServerClient, request: PreparedRequest,
                    responses: queue.SimpleQueue[_Response], assembler: ChunkAssembler, *, stop: bool,
                    drain: bool) -> None:
        completed = assembler.done
        if not completed and stop and drain and self.stop_model:
            # Stop the request on the server, then let its stream end normally: cancelling a
            # streaming RPC while responses are in flight can crash Triton 2.51's gRPC frontend
            # (triton-inference-server/server#7840, #8034). Cancelling is the fallback.
            completed = (send_stop(self.url, request.request_id, model=self.stop_model, timeout=self.stop_timeout)
                         and _drain(responses, assembler, self.stop_timeout))
            stop = False
        try:
            if completed:
                triton.stop_stream()  # half-close: the server already sent the final response
            else:
                # Cancel the RPC for real: the server notices and stops generating.
                triton.stop_stream(cancel_requests=True)
        except Exception:
            _close_quietly(triton)
        else:
            self._pool.release(triton)
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
