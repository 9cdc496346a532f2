"""What the routes share, kept on `app.state`: the settings and the one AsyncClient (made in the lifespan)."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from client import AsyncClient

from .settings import GatewaySettings


def settings_of(connection: HTTPConnection) -> GatewaySettings:
    return connection.app.state.settings


def client_of(connection: HTTPConnection) -> AsyncClient:
    return connection.app.state.client


def started_at(connection: HTTPConnection) -> int:
    return connection.app.state.started_at
