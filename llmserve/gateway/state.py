"""What the routes share, kept on `app.state`: the settings and the one AsyncClient (made in the
lifespan); and the caller's API key principal, on the request's state."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from client import AsyncClient

from .keys import KeyStore, Principal
from .metrics import GatewayMetrics
from .ratelimit import RateLimiter
from .settings import GatewaySettings


def settings_of(connection: HTTPConnection) -> GatewaySettings:
    return connection.app.state.settings


def client_of(connection: HTTPConnection) -> AsyncClient:
    return connection.app.state.client


def started_at(connection: HTTPConnection) -> int:
    return connection.app.state.started_at


def principal_of(connection: HTTPConnection) -> Principal | None:
    """The API key's principal AccessMiddleware set (None: the server has no keys)."""
    return getattr(connection.state, "principal", None)


def keys_of(connection: HTTPConnection) -> KeyStore | None:
    return connection.app.state.keys


def limiter_of(connection: HTTPConnection) -> RateLimiter:
    return connection.app.state.limiter


def metrics_of(connection: HTTPConnection) -> GatewayMetrics:
    return connection.app.state.metrics
