"""Plumbing shared by the sync and async clients: URL and timeout checks, stream headers, the explicit stop."""

from __future__ import annotations

import collections
import contextlib
import logging
import queue

import tritonclient.grpc as grpcclient

from ._tensors import build_stop_inputs

log = logging.getLogger("client")

DEFAULT_URL = "localhost:8001"
DEFAULT_STOP_MODEL = "llm"
DEFAULT_STOP_TIMEOUT = 1.0

# Headers of every stream. Not Triton's `triton_grpc_error: true`, which ends a failed
# request's stream with its real gRPC status: on Triton 2.51 a stream ended that way races
# the frontend's done-notification ("HandleCancellation called even when the context was not
# cancelled ... step COMPLETE" in the server log), which can crash tritonserver (Signal 11;
# upstream fix triton-inference-server/server#8078). So an error arrives as a message on the
# stream and is typed from its text (errors.py).
STREAM_HEADERS: dict[str, str] = {}


class ClientSettings:
    """What `Client` and `AsyncClient` are made with, checked the same way for both."""

    def __init__(self, url: str, model: str, timeout: float | None, stop_model: str | None,
                 stop_timeout: float) -> None:
        self.url = normalize_url(url)
        self.model = model
        self.timeout = check_timeout(timeout)
        self.stop_model = stop_model
        self.stop_timeout = stop_timeout


# Clients the garbage collector found open, closed at the next safe point (see TritonClient.__del__).
# A deque: appending and popping are atomic, so `__del__` takes no lock.
_abandoned: collections.deque[TritonClient] = collections.deque()


def close_abandoned_clients() -> None:
    """Close the clients that were dropped without `close()`; called where no grpc lock is held."""
    while True:
        try:
            client = _abandoned.popleft()
        except IndexError:
            return
        with contextlib.suppress(Exception):
            client.close()


class TritonClient(grpcclient.InferenceServerClient):
    """tritonclient's sync client, closed at most once, and never by the garbage collector.

    tritonclient's `__del__` closes the client (a second time after `close()`: under grpc's
    gevent integration each close also lowers a count of open channels, and closing one twice hung
    a gevent process at exit, 1 run in 4; grpc 1.85). And a close from the garbage collector, which
    runs wherever an allocation triggers it, deadlocked a locust process in `tests/test_loadtest.py`
    on a grpc mutex (py-spy: `gc_collect_main` -> `__del__` -> `Channel._close` ->
    `pthread_mutex_lock`). grpc's own `Channel.__del__` does not
    close for this reason. So a client dropped while open is kept and closed by the next client
    created, or by `Client.close()`.
    """

    _closed = False

    def __init__(self, *args, **kwargs) -> None:
        close_abandoned_clients()
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            super().close()

    def __del__(self) -> None:
        if not self._closed and hasattr(self, "_channel"):  # _channel: __init__ got that far
            _abandoned.append(self)  # resurrected until then; its __del__ does not run again


def normalize_url(url: str) -> str:
    """Accept ``host:port`` or ``grpc://host:port``; gRPC wants the bare form."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"url must be a non-empty 'host:port' string, got {url!r}")
    if url.startswith("grpc://"):
        url = url[len("grpc://"):]
    if "://" in url:
        raise ValueError(f"url must be the gRPC 'host:port' (e.g. {DEFAULT_URL}), got {url!r}")
    return url.rstrip("/")


def check_timeout(timeout: float | None) -> float | None:
    """Validate a timeout in seconds; None means no limit."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def send_stop(url: str, request_id: str, *, model: str = DEFAULT_STOP_MODEL,
              timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
    """Ask the server to end `request_id` now (TensorRT-LLM style stop request).

    Needed on top of cancelling the gRPC stream: Triton checks an ensemble
    request for cancellation only between steps and does not pass it on to
    the composing `llm` request that is generating (seen with Triton 2.51:
    a cancelled stream alone ran on to max_tokens). Best effort and bounded
    by `timeout`: it opens its own short-lived stream, waits for the first
    answer, and never raises. Returns True when the server acknowledged it.
    """
    answers: queue.SimpleQueue[grpcclient.InferenceServerException | None] = queue.SimpleQueue()
    triton: TritonClient | None = None
    answered = False
    try:
        triton = TritonClient(url)
        triton.start_stream(callback=lambda result, error: answers.put(error), stream_timeout=timeout)
        triton.async_stream_infer(model, build_stop_inputs(), request_id=request_id,
                                  enable_empty_final_response=True)
        error = answers.get(timeout=timeout)
        answered = True
        if error is not None:
            log.debug("stop request for %s answered with an error: %s", request_id, error)
        return error is None
    except queue.Empty:
        log.debug("stop request for %s not answered within %.1fs", request_id, timeout)
        return False
    except Exception as exc:  # best effort: the RPC cancellation already happened
        log.debug("stop request for %s failed: %s", request_id, exc)
        return False
    finally:
        if triton is not None:
            try:
                # Answered: end the stream normally (cancelling a streaming RPC around its final
                # response can crash Triton 2.51's gRPC frontend); not answered: cancel it.
                triton.stop_stream(cancel_requests=not answered)
                triton.close()
            except Exception:
                pass
