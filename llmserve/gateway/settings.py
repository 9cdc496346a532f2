"""GatewaySettings: everything the front end is configured with (flags of `python -m llmserve.gateway`)."""

from __future__ import annotations

from dataclasses import dataclass

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
    max_body_bytes: int = 1 << 20  # request bodies larger than this are refused (400)
    request_timeout: float = 300.0  # seconds one engine request may take, first to last token
    default_max_tokens_completion: int = 16  # OpenAI's default for /v1/completions
    default_max_tokens_chat: int = 256  # chat and WebSocket requests; lowered to fit the context
    default_max_new_tokens_tgi: int = 100  # TGI's default max_new_tokens; lowered to fit the context

    def __post_init__(self) -> None:
        for name in ("max_n", "max_body_bytes", "default_max_tokens_completion", "default_max_tokens_chat",
                     "default_max_new_tokens_tgi"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"max_top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (the server's limit), "
                             f"got {self.max_top_logprobs}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
