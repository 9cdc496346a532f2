"""The WebSocket's messages (/v1/ws).

Client -> server: a request ``{"prompt": str}`` or ``{"messages": [...]}`` with the OpenAI sampling
fields (max_tokens, temperature, top_p, stop, seed, ...; "type": "generate" optional), or
``{"type": "stop"}``. Server -> client: ``{"type": "token", "text"}`` per streamed piece, then
``{"type": "done", "finish_reason", "usage"}``; ``{"type": "error", "error": {...}}`` on an error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, field_validator, model_validator

from .protocol_openai import ChatMessage, SamplingRequest, UsageInfo


class WsRequest(SamplingRequest):
    type: Literal["generate"] = "generate"
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if value is not None and not value:
            raise ValueError("messages must not be empty: send at least one message")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> WsRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' (a string) or 'messages' (a list of messages)")
        return self


class TokenMessage(BaseModel):
    type: Literal["token"] = "token"
    text: str


class DoneMessage(BaseModel):
    type: Literal["done"] = "done"
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: UsageInfo


class ErrorMessage(BaseModel):
    type: Literal["error"] = "error"
    error: dict[str, Any]
