"""Text Generation Inference's bodies (/generate, /generate_stream, the compat route /, /info), as
pydantic v2 models, following TGI's router OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_serializer

from .protocol_openai import normalize_stop

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateParameters(_Body):
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    do_sample: bool = False
    seed: int | None = None
    stop: list[str] = []
    details: bool = False
    decoder_input_details: bool = False  # accepted: the prompt's tokens are not reported (prefill is [])
    return_full_text: bool | None = None  # None: False (the generated text only)
    top_n_tokens: int | None = None  # alternatives per generated token, in `top_tokens`
    watermark: bool = False  # accepted, not applied
    # Not supported; refused when set to anything but their "off" value (translate.py).
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    grammar: Any = None
    adapter_id: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        return normalize_stop(value) or []


class GenerateRequest(_Body):
    inputs: str
    parameters: GenerateParameters = GenerateParameters()

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: str) -> str:
        if not value:
            raise ValueError("inputs must not be empty")
        return value

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, value: Any) -> Any:
        return {} if value is None else value


class CompatGenerateRequest(GenerateRequest):
    """The body of `POST /` (what huggingface_hub's InferenceClient sends to a URL): stream picks the route."""

    stream: bool = False


# ---------------------------------------------------------------------------- responses


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[Token] = []
    tokens: list[Token] = []
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None

    @model_serializer(mode="wrap")
    def _details_only_when_asked(self, handler) -> dict[str, Any]:
        body = handler(self)
        if body.get("details") is None:
            body.pop("details", None)
        return body


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class Info(BaseModel):
    """TGI's Info, filled with what the gateway knows; the model's limits are the Triton server's."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str | None = None
    model_device_type: str | None = None
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int | None = None
    max_best_of: int = 1
    max_stop_sequences: int | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_client_batch_size: int = 1
    router: str = "llmserve-gateway"
    version: str
    sha: str | None = None
    docker_label: str | None = None
    triton_url: str
    triton_model: str
