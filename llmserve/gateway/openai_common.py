"""What the OpenAI responses share: their id/created/model/fingerprint, usage, finish reasons."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from .protocol_openai import UsageInfo
from .settings import GatewaySettings


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    id: str
    created: int
    model: str
    system_fingerprint: str


def system_fingerprint(settings: GatewaySettings) -> str:
    """Stable for one configuration (model name, Triton model and URL), as OpenAI's is for a backend."""
    key = f"{settings.served_model_name}|{settings.triton_model}|{settings.triton_url}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]


def new_meta(prefix: str, settings: GatewaySettings) -> ResponseMeta:
    return ResponseMeta(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()),
                        model=settings.served_model_name, system_fingerprint=system_fingerprint(settings))


def openai_finish(reason: str | None) -> str | None:
    """The server's reason as OpenAI's: "length" or "stop" ("cancelled" never gets here: generation.py)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: Iterable[int]) -> UsageInfo:
    """All choices share the prompt: it is counted once; their completion tokens add up."""
    completion = sum(completion_tokens)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)
