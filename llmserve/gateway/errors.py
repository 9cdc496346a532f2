"""Errors: the one mapping from the client's errors to HTTP statuses, the two error bodies (OpenAI's
and TGI's), and the exception handlers that write them.

OpenAI's body is ``{"error": {"message", "type", "param", "code"}}``; TGI's is ``{"error": str,
"error_type": str}``, with 422 for a bad request. Which one a response gets depends on its path
(`TGI_PATHS`); the WebSocket sends OpenAI's ``error`` object inside its own message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import client.errors as client_errors

log = logging.getLogger("llmserve.gateway")

# The routes answering in TGI's error shape; every other path answers in OpenAI's.
TGI_PATHS = frozenset({"/", "/generate", "/generate_stream", "/info"})

_OPENAI_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                 405: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable",
                 504: "timeout"}
_TGI_TYPES = {400: "validation", 404: "not_found", 413: "validation", 422: "validation", 429: "overloaded",
              503: "unavailable", 504: "timeout"}


class GatewayError(Exception):
    """An error answered to the caller: HTTP status, message, and OpenAI's type/param/code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def __str__(self) -> str:
        return self.message

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def tgi_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": _TGI_TYPES.get(self.tgi_status, "generation")}

    @property
    def tgi_status(self) -> int:
        return 422 if self.status == 400 else self.status


def invalid_parameter(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_parameter")


def model_not_found(model: str, served: str) -> GatewayError:
    return GatewayError(404, f"The model '{model}' does not exist: this server serves '{served}'.",
                        param="model", code="model_not_found")


# Parameter names as the server's (and the client's) messages spell them -> the engine parameter they
# are; the translation layer maps those to the field names of each API (`param_names`).
_PARAM_IN_MESSAGE = [
    ("max_tokens", r"\bmax_tokens\b"), ("min_tokens", r"\bmin_tokens\b"), ("temperature", r"\btemperature\b"),
    ("top_p", r"\btop_p\b"), ("top_k", r"\btop_k\b"), ("repetition_penalty", r"\brepetition_penalty\b"),
    ("presence_penalty", r"\bpresence_penalty\b"), ("frequency_penalty", r"\bfrequency_penalty\b"),
    ("seed", r"\bseed\b"), ("stop", r"\bstop(?:_words)?\b"), ("bad_words", r"\bbad_words\b"),
    ("end_id", r"\bend_id\b"), ("top_logprobs", r"\b(?:num_)?top_log_?probs\b"),
    ("logprobs", r"\breturn_log_probs\b"), ("messages", r"\bchat template\b|\bmessages\b"),
    ("prompt", r"\bprompt\b|\btext_input\b"),
]


# Where a request's field is the engine parameter under another name, the message says the field's name.
_RENAMES = {("max_tokens", "max_new_tokens"), ("max_tokens", "max_completion_tokens"), ("top_logprobs", "logprobs"),
            ("top_logprobs", "top_n_tokens")}
# Triton's wrapping of a composing model's error: "in ensemble 'ensemble', ..."
_TRITON_PREFIX = re.compile(r"^in ensemble '[^']*', ")


def param_in_message(message: str) -> str | None:
    """The engine parameter a server message is about: the one it names first."""
    found = [(m.start(), name) for name, pattern in _PARAM_IN_MESSAGE if (m := re.search(pattern, message))]
    return min(found)[1] if found else None


def from_client_error(exc: BaseException, param_names: Mapping[str, str] | None = None) -> GatewayError:
    """THE mapping from what `client.AsyncClient` raises to the caller's error.

    The client's own argument checks (its ValueError / TypeError) reach here as BadRequestError
    (generation.open_stream). `param_names` maps engine parameters to the request's own field names (e.g. max_tokens ->
    max_new_tokens for TGI), so that the error names what the caller sent.
    """
    if isinstance(exc, GatewayError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, client_errors.BadRequestError):
        message = _TRITON_PREFIX.sub("", message)
        engine_param = param_in_message(message)
        param = (param_names or {}).get(engine_param, engine_param) if engine_param else None
        if param and param != engine_param and (engine_param, param) in _RENAMES:
            message = re.sub(dict(_PARAM_IN_MESSAGE)[engine_param], param, message)
        elif param and not re.search(rf"\b{re.escape(param)}\b", message):
            message = f"{message} (parameter '{param}')"
        return invalid_parameter(message, param)
    if isinstance(exc, client_errors.OverloadedError):
        return GatewayError(429, f"The server is overloaded, retry later: {message}", code="server_overloaded")
    if isinstance(exc, client_errors.ServerUnavailableError):
        return GatewayError(503, f"The inference server is unavailable: {message}", code="server_unavailable")
    if isinstance(exc, client_errors.ModelNotFoundError):
        # The gateway checked `model` itself: Triton lacking its model is the server's state, not the caller's.
        return GatewayError(503, f"The inference server's model is not available: {message}", code="model_not_ready")
    if isinstance(exc, client_errors.RequestTimeoutError):
        return GatewayError(504, f"The generation went past this server's deadline (request_timeout): {message}",
                            code="timeout")
    if isinstance(exc, client_errors.GenerationCancelledError):
        return GatewayError(503, f"The generation was cancelled by the server: {message}", code="cancelled")
    if isinstance(exc, client_errors.ClientError):
        return GatewayError(500, f"The inference server failed: {message}", code="server_error")
    log.exception("unexpected error", exc_info=exc)
    return GatewayError(500, f"Internal error: {type(exc).__name__}: {message}", code="internal_error")


def cancelled_by_server() -> GatewayError:
    """A generation the server ended as "cancelled" while its caller was still listening."""
    return GatewayError(503, "The generation was cancelled by the server before it finished", code="cancelled")


def is_tgi_path(path: str) -> bool:
    return path in TGI_PATHS


def error_response(path: str, error: GatewayError) -> JSONResponse:
    if is_tgi_path(path):
        return JSONResponse(error.tgi_body(), status_code=error.tgi_status)
    return JSONResponse(error.openai_body(), status_code=error.status)


def _field_path(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    parts = [p for p in loc if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def validation_error(errors: list[dict[str, Any]]) -> GatewayError:
    """Pydantic's errors (FastAPI's body validation: malformed JSON, wrong types, our validators; or a
    WebSocket message's) as a 400 naming the field: the first error only."""
    if not errors:
        return invalid_parameter("The request is invalid", None)
    first = errors[0]
    kind = first.get("type", "")
    msg = str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", msg)
        return invalid_parameter(f"The request body is not valid JSON: {detail}", None)
    param = _field_path(tuple(first.get("loc", ())))
    if param is None:
        if kind == "missing":
            return invalid_parameter("The request body is required: a JSON object", None)
        if kind == "value_error":
            return invalid_parameter(msg, None)
        return invalid_parameter(f"The request must be a JSON object: {msg}", None)
    if kind == "missing":
        return invalid_parameter(f"Missing required parameter: '{param}'", param)
    return invalid_parameter(f"Invalid value for '{param}': {msg}", param)


def install_exception_handlers(app: FastAPI) -> None:
    async def on_gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(request.url.path, exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, validation_error(list(exc.errors())))

    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400:  # e.g. FastAPI's "There was an error parsing the body"
            return error_response(request.url.path, invalid_parameter(detail, None))
        return error_response(request.url.path, GatewayError(exc.status_code, detail))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, from_client_error(exc))

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(client_errors.ClientError, on_unexpected)
    app.add_exception_handler(Exception, on_unexpected)
