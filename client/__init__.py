"""Python client for the streaming LLM served by Triton Inference Server.

Modelled on TGI's `text_generation` client: `Client` and `AsyncClient` mirror
each other method for method, return typed objects, and raise typed errors::

    from client import Client

    with Client("localhost:8001") as c:
        for chunk in c.stream("Once upon a time", max_tokens=64):
            print(chunk.text, end="", flush=True)
"""

from . import errors
from ._tensors import GenerationParams
from .async_client import AsyncClient
from .errors import (
    BadRequestError,
    ClientError,
    GenerationCancelledError,
    ModelNotFoundError,
    OverloadedError,
    RequestTimeoutError,
    ServerUnavailableError,
)
from .sync_client import Client
from .types import Completion, FinishReason, StreamChunk, Token, TopLogprob

__all__ = [
    "AsyncClient",
    "BadRequestError",
    "Client",
    "ClientError",
    "Completion",
    "FinishReason",
    "GenerationCancelledError",
    "GenerationParams",
    "ModelNotFoundError",
    "OverloadedError",
    "RequestTimeoutError",
    "ServerUnavailableError",
    "StreamChunk",
    "Token",
    "TopLogprob",
    "errors",
]
