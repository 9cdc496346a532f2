"""create_app(settings): the gateway's ASGI app.

One `client.AsyncClient` per app, made in the lifespan and closed at shutdown; the routes reach
Triton only through it. The page in static/ is served at /, Prometheus metrics at /metrics. With
keys (settings.api_key or api_keys_file) AccessMiddleware is the outermost layer but for
MetricsMiddleware, which only counts: nothing is read from an unknown caller.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from client import AsyncClient

from . import routes_openai, routes_tgi, routes_ws
from .access import AccessMiddleware
from .errors import install_exception_handlers
from .generation import ClientDisconnected
from .keys import KeyStore
from .metrics import METRICS_PATH, GatewayMetrics, MetricsMiddleware, metrics_endpoint
from .middleware import BodyLimitMiddleware, JsonBodyMiddleware
from .ratelimit import RateLimiter
from .settings import GatewaySettings

STATIC_DIR = Path(__file__).parent / "static"


def key_store(settings: GatewaySettings) -> KeyStore | None:
    """The keys the settings name (KeysFileError for a key file that cannot be used), or None: open."""
    if settings.api_keys_file is not None:
        return KeyStore.from_file(settings.api_keys_file)
    if settings.api_key is not None:
        return KeyStore.single(settings.api_key)
    return None


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    keys = key_store(settings)
    limiter = RateLimiter()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = AsyncClient(settings.triton_url, model=settings.triton_model,
                                       timeout=settings.request_timeout)
        try:
            yield
        finally:
            await app.state.client.close()

    app = FastAPI(title="llmserve gateway", summary="OpenAI-, TGI- and WebSocket-compatible front end on Triton",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.keys = keys
    app.state.limiter = limiter
    app.state.metrics = metrics
    app.state.started_at = int(time.time())
    install_exception_handlers(app)

    async def on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # never read: the client has gone

    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       idle_timeout=settings.stream_idle_timeout)
    app.add_middleware(AccessMiddleware, keys=keys, limiter=limiter, metrics=metrics)
    routers = (routes_openai.router, routes_tgi.router, routes_ws.router)
    app.add_middleware(MetricsMiddleware, metrics=metrics,  # outermost: refusals at the door count too
                       route_paths=[route.path for router in routers for route in router.routes])
    app.add_route(METRICS_PATH, metrics_endpoint, methods=["GET"], include_in_schema=False)
    for router in routers:
        app.include_router(router)
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app
