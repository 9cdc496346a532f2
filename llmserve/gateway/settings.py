"""GatewaySettings: everything the front end is configured with (flags of `python -m llmserve.gateway`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmserve.engine.config import MAX_TOP_LOGPROBS


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """The gateway's configuration. It holds no model state: the model's limits (its context, its
    chat template) are the Triton server's, and their errors come back from there."""

    triton_url: str = "localhost:8001"  # Triton's gRPC host:port
    host: str = "127.0.0.1"
    port: int = 9000  # the port Triton's own OpenAI frontend uses; `make serve`'s OPENAI_PORT
    served_model_name: str = "default"  # the only `model` the OpenAI routes accept, and /v1/models lists
    triton_model: str = "ensemble"  # the Triton model every request goes to
    max_n: int = 8  # choices per OpenAI request at most (each an engine request of its own)
    max_top_logprobs: int = MAX_TOP_LOGPROBS  # top_logprobs (chat) / logprobs (completions) at most
    # Caps that hold for every caller; each refusal names its cap.
    max_body_bytes: int = 1 << 20  # request bodies larger than this are refused (400)
    max_prompt_tokens: int | None = None  # None: the model's context is the only limit
    max_tokens_limit: int = 4096  # max_tokens (max_new_tokens) at most
    max_stop_sequences: int = 4  # stop strings per request at most (OpenAI's limit)
    max_stop_length: int = 256  # characters per stop string at most
    request_timeout: float = 300.0  # seconds one engine request may take, queued to last token
    # Seconds a stream may go without being able to send (a client that stops reading), a WebSocket
    # without a request, a request body between two of its parts.
    stream_idle_timeout: float = 60.0
    # Keys (docs/security.md): one key, or a TOML file of named keys with limits. Neither: open.
    api_key: str | None = field(default=None, repr=False)
    api_keys_file: str | None = None
    default_max_tokens_completion: int = 16  # OpenAI's default for /v1/completions
    default_max_tokens_chat: int = 256  # chat and WebSocket requests; lowered to fit the context
    default_max_new_tokens_tgi: int = 100  # TGI's default max_new_tokens; lowered to fit the context

    def __post_init__(self) -> None:
        for name in ("max_n", "max_body_bytes", "default_max_tokens_completion", "default_max_tokens_chat",
                     "default_max_new_tokens_tgi", "max_tokens_limit", "max_stop_sequences", "max_stop_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if not self.stream_idle_timeout > 0:
            raise ValueError(f"stream_idle_timeout must be > 0 seconds, got {self.stream_idle_timeout}")
        if self.api_key is not None and self.api_keys_file is not None:
            raise ValueError("give an API key or an API key file, not both")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty")
        if not 0 <= self.max_top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"max_top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (the server's limit), "
                             f"got {self.max_top_logprobs}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
