"""create_app(settings): the gateway's ASGI app.

One `client.AsyncClient` per app, made in the lifespan and closed at shutdown; the routes reach
Triton only through it. The page in static/ is served at /.
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
from .errors import install_exception_handlers
from .generation import ClientDisconnected
from .middleware import BodyLimitMiddleware, JsonBodyMiddleware
from .settings import GatewaySettings

STATIC_DIR = Path(__file__).parent / "static"


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

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
    app.state.started_at = int(time.time())
    install_exception_handlers(app)

    async def on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # never read: the client has gone

    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)  # outermost
    app.include_router(routes_openai.router)
    app.include_router(routes_tgi.router)
    app.include_router(routes_ws.router)
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app
