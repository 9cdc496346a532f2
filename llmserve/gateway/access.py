"""Who may call what: API keys and per-key limits at the door (docs/security.md).

`AccessMiddleware` (outermost) checks `Authorization: Bearer KEY` on every API route; `/health` and
the chat page's static files stay open. A generation (every POST) is admitted by the `RateLimiter`
or refused with 429 and `Retry-After`; every response of a keyed request carries OpenAI's
`x-ratelimit-*` headers. The admitted request's `Admission` is `current_admission` while it runs
(generation.py charges its tokens), its key's `Principal` is `request.state.principal`. A WebSocket's
key (`websocket_key`) is checked at connect and again for each generation (a key revoked in the file
ends the socket), and each generation is admitted like a request.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from .errors import GatewayError, error_response
from .keys import KeyStore
from .metrics import GatewayMetrics
from .ratelimit import Admission, RateLimited, RateLimiter

# The admitted request running in this context (None: no keys, or not a generation).
current_admission: ContextVar[Admission | None] = ContextVar("current_admission", default=None)

_OPEN_PATHS = frozenset({"/health"})
_API_PATHS = frozenset({"/generate", "/generate_stream", "/info"})


def is_protected(scope: Scope) -> bool:
    path = scope.get("path", "")
    if path in _OPEN_PATHS:
        return False
    if path.startswith("/v1/") or path == "/v1" or path in _API_PATHS:
        return True
    return path == "/" and scope.get("method") == "POST"  # TGI's compat route; GET / is the page


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def bearer_token(scope: Scope) -> str | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def unauthorized(presented: str | None) -> GatewayError:
    if presented is None:
        message = ("Missing API key: send it as 'Authorization: Bearer KEY' (the WebSocket also takes "
                   "a 'token' query parameter)")
    else:
        message = "Incorrect API key provided"
    return GatewayError(401, message, code="invalid_api_key")


def rate_limited(exc: RateLimited) -> GatewayError:
    return GatewayError(429, exc.message, code=exc.code, type="rate_limit_exceeded")


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class AccessMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyStore | None, limiter: RateLimiter, metrics: GatewayMetrics) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.keys is None or not is_protected(scope):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        presented = bearer_token(scope)
        principal = self.keys.authenticate(presented)
        if principal is None:
            self.metrics.refused("invalid_api_key")
            response = error_response(path, unauthorized(presented))
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        admission = None
        if scope.get("method") == "POST":
            try:
                admission = self.limiter.admit(principal)
            except RateLimited as exc:
                self.metrics.refused(exc.code, principal.name)
                response = error_response(path, rate_limited(exc))
                response.headers.update(self.limiter.state(principal).headers())
                response.headers["Retry-After"] = retry_after(exc.retry_after)
                await response(scope, receive, send)
                return
        state = admission.state if admission is not None else self.limiter.state(principal)

        async def send_with_limits(message) -> None:
            if message["type"] == "http.response.start":
                state.refill()
                extra = [(k.encode(), v.encode()) for k, v in state.headers().items()]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        token = current_admission.set(admission)
        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            current_admission.reset(token)
            if admission is not None:
                admission.release()


def websocket_key(websocket: WebSocket) -> str | None:
    """The key a WebSocket presented: its Authorization header, else its `token` query parameter."""
    presented = bearer_token(websocket.scope)
    if presented is None:
        tokens = parse_qs(websocket.scope.get("query_string", b"").decode("latin-1")).get("token")
        presented = tokens[0] if tokens else None
    return presented


async def refuse_websocket(websocket: WebSocket, presented: str | None, *, accepted: bool) -> None:
    """Tell the client why in an error message, then close with 1008 (a browser sees no HTTP status
    of a refused upgrade, so the socket is accepted first)."""
    if not accepted:
        await websocket.accept()
    error = unauthorized(presented)
    await websocket.send_json({"type": "error", "error": error.openai_body()["error"]})
    await websocket.close(code=1008, reason="invalid API key" if presented else "missing API key")
