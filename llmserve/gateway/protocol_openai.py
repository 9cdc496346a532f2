"""OpenAI's request and response bodies (/v1/completions, /v1/chat/completions, /v1/models), as pydantic v2
models, with vLLM's extra sampling fields (top_k, min_tokens, ignore_eos, repetition_penalty).

Unknown request fields are ignored, as OpenAI does. The validators here check only the shape of a
request; limits that depend on the settings (n, top_logprobs) are checked in `translate`, and value
ranges are the server's to check (its messages name the parameter).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

# OpenAI's roles; "developer" is OpenAI's newer name for "system".
ROLES = ("system", "user", "assistant", "developer")


def normalize_stop(value: Any) -> list[str] | None:
    """`stop`: a string or a list of strings; empty strings are dropped (they match nothing)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise ValueError("stop must be a string or a list of strings")


def flatten_content(value: Any, role: str | None = None) -> str:
    """A message's content: a string, or a list of text parts ``{"type": "text", "text": ...}`` joined
    with newlines (as vLLM does). An assistant message may have none (null): it counts as ""."""
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content part {index} is not a text part ({kind!r}): only "
                                 "{\"type\": \"text\", \"text\": ...} parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"content must be a string or a list of text parts, got {type(value).__name__}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    # vLLM's: usage (so far) on every chunk too, with include_usage; benchmark tools count tokens by it
    continuous_usage_stats: bool = False


class SamplingRequest(_Body):
    """The sampling fields shared by completions, chat completions and the WebSocket's requests."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None  # accepted, not used
    # vLLM's extras
    top_k: int | None = None  # -1 (vLLM's "off") is taken as 0
    min_tokens: int | None = None
    ignore_eos: bool = False  # generate max_tokens tokens: min_tokens = max_tokens
    repetition_penalty: float | None = None
    priority: int | None = None  # vLLM's: lower is served first; default: the API key's (else 0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str] | None:
        return normalize_stop(value)


class _OpenAIRequest(SamplingRequest):
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_OpenAIRequest):
    prompt: Any
    echo: bool = False
    logprobs: int | None = None  # k: the k most likely tokens at each position (0: only the chosen one)
    suffix: str | None = None  # not supported: refused when set
    best_of: int | None = None  # not supported beyond n: refused when > n

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
            return value
        if isinstance(value, list) and value and all(isinstance(v, int) or (isinstance(v, list) and all(
                isinstance(t, int) for t in v)) for v in value):
            raise ValueError("token-id prompts are not supported: send the prompt as a string")
        if isinstance(value, list) and len(value) > 1 and all(isinstance(v, str) for v in value):
            raise ValueError(f"one prompt per request: got a list of {len(value)} prompts")
        raise ValueError("prompt must be a string (or a list of one string)")


class ChatMessage(_Body):
    role: str
    content: Any = Field(default=None, validate_default=True)
    name: str | None = None  # accepted, not used

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"unknown role {value!r}: use one of {', '.join(ROLES)}")
        return "system" if value == "developer" else value

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any, info) -> str:
        return flatten_content(value, info.data.get("role"))


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty: send at least one message")
        return value


# ---------------------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and each streamed chunk (OpenAI uses the same shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
