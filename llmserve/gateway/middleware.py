"""Request bodies. BodyLimitMiddleware refuses one over `max_body_bytes` with a 400 naming the limit,
whether its Content-Length says so or the body streamed in turns out longer, and one that stalls
(nothing for `idle_timeout` seconds: a slowloris upload) with a 408. JsonBodyMiddleware
reads every POST body as JSON, whatever its Content-Type."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import GatewayError, error_response, invalid_parameter

_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, idle_timeout: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = idle_timeout

    def _stalled(self, scope: Scope):
        return error_response(scope.get("path", ""), GatewayError(
            408, f"The request body stalled: nothing arrived for {self.idle_timeout:g} s (stream_idle_timeout)",
            code="request_timeout"))

    def _too_large(self, scope: Scope):
        error = invalid_parameter(f"The request body is larger than the limit of {self.max_body_bytes} bytes "
                                  "(max_body_bytes)", None)
        error.code = "body_too_large"
        return error_response(scope.get("path", ""), error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_body_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await self._too_large(scope)(scope, receive, send)
                    return
        # Read the whole body (at most the limit) before the app sees it, then hand it over in one piece.
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    message = await receive()
            except TimeoutError:
                await self._stalled(scope)(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await self._too_large(scope)(scope, receive, send)
                return
            parts.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # then: the disconnect, when it comes

        await self.app(scope, replay, send)


class JsonBodyMiddleware:
    """Every POST body here is JSON: one sent with another Content-Type (curl -d sends
    application/x-www-form-urlencoded) is read as JSON too, instead of failing as "not an object"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in _WITH_BODY:
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            content_type = next((v for k, v in scope.get("headers", ()) if k == b"content-type"), b"")
            if b"json" not in content_type.lower():
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
