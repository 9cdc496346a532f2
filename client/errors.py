"""Typed exceptions, and the one mapping from tritonclient errors to them.

An error that ends the RPC (connection refused, deadline, a server that ends
failed streams with Triton's ``triton_grpc_error`` mode) carries a real gRPC
status (INVALID_ARGUMENT, UNAVAILABLE, NOT_FOUND, ...) that maps directly. The
clients do not ask for that mode (see `_common.STREAM_HEADERS`), so a request
the server rejects arrives as an error message on the stream; then the status
comes from a ``[StatusCode.X]`` marker in the text when there is one, else the
type from well-known wording (the server's messages name the problem).
"""

from __future__ import annotations

import re

from tritonclient.utils import InferenceServerException

__all__ = [
    "ClientError",
    "BadRequestError",
    "OverloadedError",
    "ModelNotFoundError",
    "ServerUnavailableError",
    "RequestTimeoutError",
    "GenerationCancelledError",
    "from_triton_exception",
]


class ClientError(Exception):
    """Base class of every error raised by this client.

    `message` is the server's (or gRPC's) text; `status` is the gRPC status
    name such as ``"INVALID_ARGUMENT"`` when one is known, else None.
    """

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class BadRequestError(ClientError):
    """The server rejected the request's inputs (INVALID_ARGUMENT)."""


class OverloadedError(ClientError):
    """The server is at capacity (queue full / resource exhausted); retry later."""


class ModelNotFoundError(ClientError):
    """The requested model is not loaded on the server."""


class ServerUnavailableError(ClientError):
    """The server could not be reached (refused connection, reset, shutting down)."""

    def __init__(self, message: str, status: str | None = "UNAVAILABLE", url: str | None = None) -> None:
        super().__init__(message, status)
        self.url = url


class RequestTimeoutError(ClientError):
    """The request did not finish, or the next chunk did not arrive, in time."""

    @classmethod
    def after(cls, timeout: float | None) -> RequestTimeoutError:
        """The client's own timeout ran out (a gRPC deadline would have said DEADLINE_EXCEEDED)."""
        return cls(f"the request did not finish within the client's timeout of {timeout:g} s", "DEADLINE_EXCEEDED")


class GenerationCancelledError(ClientError):
    """The request was cancelled before it produced its final response."""


_STATUS_IN_TEXT = re.compile(r"\[?StatusCode\.([A-Z_]+)\]?\s*")

_BY_STATUS: dict[str, type[ClientError]] = {
    "INVALID_ARGUMENT": BadRequestError,
    "OUT_OF_RANGE": BadRequestError,
    "FAILED_PRECONDITION": BadRequestError,
    "RESOURCE_EXHAUSTED": OverloadedError,
    "NOT_FOUND": ModelNotFoundError,
    "DEADLINE_EXCEEDED": RequestTimeoutError,
    "CANCELLED": GenerationCancelledError,
}

# Wording Triton uses for errors that reach the client without a status.
_OVERLOAD_TEXT = ("exceeds maximum queue size", "resource exhausted", "overloaded", "too many requests")
_NOT_FOUND_TEXT = ("unknown model", "is not found", "no model named", "model is not ready")
_CANCELLED_TEXT = ("cancelled", "canceled")
_BAD_INPUT_TEXT = (
    "invalid", "must be", "must not", "out of range", "exceeds", "expected", "expecting", "unexpected",
    "not supported", "unsupported", "should be", "missing", "is required", "is empty",
)
# A server-side crash reported as "SomeError: ...": not the caller's fault,
# whatever words the text contains.
_INTERNAL_TEXT = re.compile(r"\b\w+(?:Error|Exception):")
# gRPC transport wording for a peer that cannot be reached or went away.
_UNREACHABLE_TEXT = (
    "failed to connect", "connect failed", "connection", "dns resolution", "socket closed",
    "broken pipe", "unreachable", "shutting down", "goaway", "keepalive",
)


def _server_unavailable(detail: str, url: str | None) -> ServerUnavailableError:
    where = f"Triton at {url}" if url else "the Triton server"
    return ServerUnavailableError(
        f"could not reach {where} over gRPC ({detail.strip() or 'unavailable'}). "
        "Check that tritonserver is running (start it with `make serve`) and that the URL "
        "names its gRPC port (default 8001; 8000 is HTTP, 8002 is metrics).",
        url=url,
    )


def _classify_text(text: str) -> type[ClientError]:
    lowered = text.lower()
    if any(s in lowered for s in _OVERLOAD_TEXT):
        return OverloadedError
    if any(s in lowered for s in _NOT_FOUND_TEXT):
        return ModelNotFoundError
    if _INTERNAL_TEXT.search(text):
        return ClientError
    if any(s in lowered for s in _CANCELLED_TEXT):
        return GenerationCancelledError
    if any(s in lowered for s in _BAD_INPUT_TEXT):
        return BadRequestError
    return ClientError


def from_triton_exception(exc: InferenceServerException, *, url: str | None = None) -> ClientError:
    """Map a tritonclient `InferenceServerException` to the matching `ClientError`.

    `url` is only used to make connection errors say where the client tried.
    """
    message = exc.message() if exc.message() is not None else str(exc)
    status = exc.status()
    if status:
        status = status.rsplit(".", 1)[-1].upper()  # "StatusCode.UNAVAILABLE" -> "UNAVAILABLE"
    match = _STATUS_IN_TEXT.search(message)
    if match:
        status = status or match.group(1)
        # The marker is routing information, not part of what the server said.
        message = (message[: match.start()] + message[match.end():]).strip()

    lowered = message.lower()
    if status == "UNAVAILABLE":
        # Both a dead connection and a live server shedding load say
        # UNAVAILABLE; only the text tells them apart.
        if any(s in lowered for s in _OVERLOAD_TEXT):
            return OverloadedError(message, status)
        if any(s in lowered for s in _UNREACHABLE_TEXT):
            return _server_unavailable(message, url)
        return OverloadedError(message, status)
    if status in _BY_STATUS:
        return _BY_STATUS[status](message, status)
    if status not in (None, "UNKNOWN"):  # e.g. INTERNAL: the status says enough
        return ClientError(message, status)
    if any(s in lowered for s in _UNREACHABLE_TEXT):
        return _server_unavailable(message, url)
    return _classify_text(message)(message, status)
