"""The front end's Prometheus metrics at `/metrics` on the API's port (prometheus_client, one registry
per app).

`MetricsMiddleware` (outermost, so refusals at the door count too) counts every HTTP response by
route template, method, status and API key name, times it, and gauges the SSE streams and
WebSockets open. The time to first token is measured here as a client sees it: from the request's arrival to
the first generated token the front end has from Triton (`first_token`, called by the generation
code through `current_timing`; for a WebSocket, from each generation's request message).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.histogram_buckets import REQUEST_TIME_BUCKETS, TTFT_BUCKETS

METRICS_PATH = "/metrics"
_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})  # any other: "other"
STATIC_ROUTE = "static"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gateway_requests", "HTTP requests answered, by route, method, status and API key "
                                "name (empty: no key)", ["route", "method", "status", "key"], registry=r)
        self.refusals = Counter("gateway_refusals", "Requests refused at the door, by reason: invalid_api_key (401) "
                                "or the rate limit hit (429)", ["reason", "key"], registry=r)
        self.request_duration = Histogram("gateway_request_duration_seconds", "Arrival to the end of the response",
                                          ["route"], buckets=REQUEST_TIME_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("gateway_time_to_first_token_seconds",
                                             "Arrival at the front end to the first generated token it has",
                                             ["route"], buckets=TTFT_BUCKETS, registry=r)
        self.open_streams = Gauge("gateway_open_streams", "Server-sent event streams open", ["route"], registry=r)
        self.open_websockets = Gauge("gateway_open_websockets", "WebSockets open", registry=r)
        self.requests_in_progress = Gauge("gateway_requests_in_progress", "HTTP requests being answered",
                                          registry=r)

    def refused(self, reason: str, key: str = "") -> None:
        self.refusals.labels(reason, key).inc()

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


@dataclass(slots=True)
class RequestTiming:
    """One generation's clock at the front end: `first_token()` observes the TTFT once. `route`: the
    route's label, or a function giving it (an HTTP request's is known once routed, before its first token)."""

    metrics: GatewayMetrics
    route: str | Callable[[], str]
    start: float = field(default_factory=time.monotonic)
    first_token_seen: bool = False

    def first_token(self) -> None:
        if not self.first_token_seen:
            self.first_token_seen = True
            route = self.route if isinstance(self.route, str) else self.route()
            self.metrics.time_to_first_token.labels(route).observe(time.monotonic() - self.start)


# The request or WebSocket generation running in this context (None: outside one).
current_timing: ContextVar[RequestTiming | None] = ContextVar("current_timing", default=None)


class RouteLabels:
    """A request's route label: its route's path template (`/v1/completions`, never a raw path, so the
    label stays bounded), matched against `paths` for requests refused before routing; `static` for
    the page's files (and any other path, which they answer with 404)."""

    def __init__(self, paths: list[str]) -> None:
        self._patterns = [(path, compile_path(path)[0]) for path in paths]

    def __call__(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        path = scope.get("path", "")
        for template, pattern in self._patterns:
            if pattern.match(path):
                return template
        return STATIC_ROUTE


def key_label(scope: Scope) -> str:
    principal = scope.get("state", {}).get("principal")
    return principal.name if principal is not None else ""


def _is_event_stream(message: Message) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", ()))


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, route_paths: list[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.route_label = RouteLabels(route_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            self.metrics.open_websockets.inc()
            try:
                await self.app(scope, receive, send)
            finally:
                self.metrics.open_websockets.dec()
            return
        if scope["type"] != "http" or scope.get("path") == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        m = self.metrics
        timing = RequestTiming(m, lambda: self.route_label(scope))
        token = current_timing.set(timing)
        status, stream_route = 0, None  # 0: ended before any response (cancelled, or the client left)

        async def send_counted(message: Message) -> None:
            nonlocal status, stream_route
            if message["type"] == "http.response.start":
                status = message["status"]
                if _is_event_stream(message):
                    stream_route = self.route_label(scope)
                    m.open_streams.labels(stream_route).inc()
            await send(message)

        m.requests_in_progress.inc()
        try:
            await self.app(scope, receive, send_counted)
        finally:
            current_timing.reset(token)
            m.requests_in_progress.dec()
            if stream_route is not None:
                m.open_streams.labels(stream_route).dec()
            route = self.route_label(scope)
            method = scope.get("method", "")
            m.requests.labels(route, method if method in _METHODS else "other", str(status), key_label(scope)).inc()
            m.request_duration.labels(route).observe(time.monotonic() - timing.start)


async def metrics_endpoint(request: Request) -> Response:
    return request.app.state.metrics.response()
