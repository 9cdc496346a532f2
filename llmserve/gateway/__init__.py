"""The public front end (OpenAI-, TGI- and WebSocket-compatible HTTP APIs, a chat page).

It reaches Triton only through `client.AsyncClient` over gRPC and holds no model state. Empty
until the front-end issue fills it.
"""
