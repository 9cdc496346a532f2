"""The public front end: OpenAI-, TGI- and WebSocket-compatible APIs over Triton (docs/gateway.md).

It reaches Triton only through `client.AsyncClient` over gRPC and holds no model state.
`python -m llmserve.gateway --triton-url HOST:PORT --port N` runs it; `create_app(settings)` builds
the ASGI app.
"""

from .app import create_app
from .settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]
