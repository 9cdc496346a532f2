"""The one translation layer: a request body (OpenAI, TGI, WebSocket) -> an `EngineRequest`, the
keyword parameters of `client.AsyncClient.stream()` / `stream_chat()` plus what the response needs.

Rules (docs/gateway.md):
- max_tokens: `max_completion_tokens`, else `max_tokens`, else the endpoint's default (16 for
  completions, 256 for chat and the WebSocket, 100 for TGI). Only a defaulted value is lowered to
  fit the context (generation.py); one the caller set is refused by the server, naming max_tokens.
- seed: a 64-bit integer; a negative one is taken modulo 2**64 (the engine's seed is unsigned).
- ignore_eos: min_tokens = max_tokens. top_k -1 (vLLM's "off") is 0.
- n choices: n engine requests; with a seed, choice i uses seed + i.
- logprobs: completions' `logprobs: k` and chat's `logprobs: true, top_logprobs: k` ask the server for
  return_log_probs and top_log_probs=k; TGI streams always ask for the tokens (their ids).
- caps (settings): max_tokens above `max_tokens_limit`, more than `max_stop_sequences` stop strings or
  one longer than `max_stop_length` are refused, naming the cap; a default max_tokens is lowered to it.
- priority (lower is served first): the request's, else its key's; a request may not ask for a better
  priority than its key's.
- TGI: do_sample false and no temperature/top_p/top_k is greedy (temperature 0); sampling without a
  seed gets a random one, reported in details.seed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmserve.engine.config import INT32_MAX, INT32_MIN

from .errors import GatewayError, invalid_parameter, model_not_found
from .keys import Principal
from .protocol_openai import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingRequest
from .protocol_tgi import GenerateRequest
from .protocol_ws import WsRequest
from .settings import GatewaySettings


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One API request as engine requests: `n` of them, on a prompt or on chat messages."""

    prompt: str | None  # the text to continue (completions, TGI, a WebSocket prompt) ...
    messages: tuple[dict[str, str], ...] | None  # ... or chat messages, rendered by the server's template
    params: Mapping[str, Any]  # AsyncClient keyword parameters, the same for every choice but the seed
    n: int = 1
    max_tokens_defaulted: bool = False  # may be lowered to fit the context
    ignore_eos: bool = False  # min_tokens follows max_tokens
    logprobs: bool = False  # the response reports logprobs
    top_logprobs: int = 0  # alternatives per token in the response
    # engine parameter -> the request's field name, so that errors name what the caller sent
    param_names: Mapping[str, str] = field(default_factory=dict)
    max_prompt_tokens: int | None = None  # the server's cap (settings), checked on the first response

    @property
    def max_tokens(self) -> int:
        return int(self.params["max_tokens"])

    @property
    def seed(self) -> int | None:
        return self.params.get("seed")

    @property
    def has_stop(self) -> bool:
        return bool(self.params.get("stop"))

    def choice_params(self, index: int, max_tokens: int | None = None) -> dict[str, Any]:
        """The keyword parameters of choice `index` (its seed: seed + index), at `max_tokens` if given."""
        params = dict(self.params)
        if params.get("seed") is not None:
            params["seed"] = (params["seed"] + index) % 2**64
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
            if self.ignore_eos:
                params["min_tokens"] = max_tokens
        return params


def check_model(model: str | None, settings: GatewaySettings) -> None:
    if model is not None and model != settings.served_model_name:
        raise model_not_found(model, settings.served_model_name)


def _check_n(n: int | None, settings: GatewaySettings) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= settings.max_n:
        raise invalid_parameter(f"n must be between 1 and {settings.max_n}, got {n}", "n")
    return n


def _check_top(value: int, param: str, settings: GatewaySettings) -> int:
    if not 0 <= value <= settings.max_top_logprobs:
        raise invalid_parameter(f"{param} must be between 0 and {settings.max_top_logprobs}, got {value}", param)
    return value


def _max_tokens(requested: int | None, param: str, default: int, settings: GatewaySettings) -> tuple[int, bool]:
    limit = settings.max_tokens_limit
    if requested is None:
        return min(default, limit), True
    if requested < 1:
        raise invalid_parameter(f"{param} must be at least 1, got {requested}", param)
    if requested > limit:
        raise invalid_parameter(f"{param} must be at most {limit} on this server (max_tokens_limit), got {requested}",
                                param)
    return requested, False


def _check_stop(stop: list[str] | None, param: str, settings: GatewaySettings) -> list[str] | None:
    if not stop:
        return None
    if len(stop) > settings.max_stop_sequences:
        raise invalid_parameter(f"{param} may have at most {settings.max_stop_sequences} strings on this server "
                                f"(max_stop_sequences), got {len(stop)}", param)
    for text in stop:
        if len(text) > settings.max_stop_length:
            raise invalid_parameter(f"each {param} string may have at most {settings.max_stop_length} characters on "
                                    f"this server (max_stop_length), got one of {len(text)}", param)
    return list(stop)


def _priority(requested: int | None, principal: Principal | None) -> int | None:
    """The engine priority to send (None: the engine's default, 0)."""
    floor = principal.priority if principal is not None else None
    if requested is None:
        return floor or None
    if not INT32_MIN <= requested <= INT32_MAX:
        raise invalid_parameter(f"priority must be a 32-bit integer, got {requested}", "priority")
    if floor is not None and requested < floor:
        raise invalid_parameter(f"priority {requested} is more urgent than this API key allows: its priority is "
                                f"{floor} (lower is served first)", "priority")
    return requested


def _sampling(req: SamplingRequest, default_max_tokens: int, settings: GatewaySettings,
              principal: Principal | None) -> tuple[dict[str, Any], bool, dict[str, str]]:
    """The sampling fields shared by the OpenAI requests and the WebSocket's."""
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens, defaulted = _max_tokens(requested, max_param, default_max_tokens, settings)
    params: dict[str, Any] = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "min_tokens"):
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        raise invalid_parameter(f"seed must be a 64-bit integer, got {req.seed}", "seed")
    if req.seed is not None:
        params["seed"] = req.seed % 2**64
    if req.top_k is not None:
        params["top_k"] = 0 if req.top_k == -1 else req.top_k
    if stop := _check_stop(req.stop, "stop", settings):
        params["stop"] = stop
    if (priority := _priority(req.priority, principal)) is not None:
        params["priority"] = priority
    if req.ignore_eos:
        params["min_tokens"] = max_tokens
    names = {"max_tokens": max_param}
    if req.ignore_eos and req.min_tokens is None:
        names["min_tokens"] = "ignore_eos"
    return params, defaulted, names


def _messages(messages: list[ChatMessage]) -> tuple[dict[str, str], ...]:
    return tuple({"role": m.role, "content": m.content} for m in messages)


def completion_request(req: CompletionRequest, settings: GatewaySettings,
                       principal: Principal | None = None) -> EngineRequest:
    check_model(req.model, settings)
    n = _check_n(req.n, settings)
    if req.suffix:
        raise invalid_parameter("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of > n:
        raise invalid_parameter(f"best_of > n is not supported (best_of={req.best_of}, n={n})", "best_of")
    params, defaulted, names = _sampling(req, settings.default_max_tokens_completion, settings, principal)
    logprobs = req.logprobs is not None
    top = _check_top(req.logprobs, "logprobs", settings) if logprobs else 0
    if logprobs:
        params.update(return_log_probs=True, top_log_probs=top)
    names.update(prompt="prompt", messages="prompt", top_logprobs="logprobs", logprobs="logprobs")
    return EngineRequest(max_prompt_tokens=settings.max_prompt_tokens, prompt=req.prompt, messages=None, params=params, n=n, max_tokens_defaulted=defaulted,
                         ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top, param_names=names)


def chat_request(req: ChatCompletionRequest, settings: GatewaySettings,
                 principal: Principal | None = None) -> EngineRequest:
    check_model(req.model, settings)
    n = _check_n(req.n, settings)
    params, defaulted, names = _sampling(req, settings.default_max_tokens_chat, settings, principal)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid_parameter("top_logprobs requires logprobs to be true", "top_logprobs")
    top = _check_top(req.top_logprobs or 0, "top_logprobs", settings)
    if req.logprobs:
        params.update(return_log_probs=True, top_log_probs=top)
    names.update(prompt="messages", messages="messages", top_logprobs="top_logprobs", logprobs="logprobs")
    return EngineRequest(max_prompt_tokens=settings.max_prompt_tokens, prompt=None, messages=_messages(req.messages), params=params, n=n,
                         max_tokens_defaulted=defaulted, ignore_eos=req.ignore_eos, logprobs=req.logprobs,
                         top_logprobs=top, param_names=names)


def ws_request(req: WsRequest, settings: GatewaySettings, principal: Principal | None = None) -> EngineRequest:
    check_model(req.model, settings)
    params, defaulted, names = _sampling(req, settings.default_max_tokens_chat, settings, principal)
    names.update(prompt="prompt" if req.prompt is not None else "messages", messages="messages")
    return EngineRequest(max_prompt_tokens=settings.max_prompt_tokens, prompt=req.prompt, messages=_messages(req.messages) if req.messages else None,
                         params=params, max_tokens_defaulted=defaulted, ignore_eos=req.ignore_eos, param_names=names)


def _tgi_unsupported(message: str) -> GatewayError:
    return GatewayError(400, message, code="not_supported")


def tgi_request(req: GenerateRequest, settings: GatewaySettings, *, stream: bool,
                principal: Principal | None = None) -> EngineRequest:
    p = req.parameters
    if p.truncate is not None:
        raise _tgi_unsupported("truncate is not supported: send a prompt that fits the context")
    if p.typical_p is not None and p.typical_p != 1.0:
        raise _tgi_unsupported("typical_p is not supported")
    if p.best_of is not None and p.best_of > 1:
        raise _tgi_unsupported("best_of > 1 is not supported")
    if p.grammar is not None:
        raise _tgi_unsupported("grammar is not supported")
    if p.adapter_id:
        raise _tgi_unsupported("adapter_id is not supported")
    max_tokens, defaulted = _max_tokens(p.max_new_tokens, "max_new_tokens", settings.default_max_new_tokens_tgi,
                                        settings)
    params: dict[str, Any] = {"max_tokens": max_tokens}
    sampling = p.do_sample or (p.temperature not in (None, 1.0)) or (p.top_p not in (None, 1.0)) or (
        p.top_k not in (None, 0))
    if sampling:
        params["temperature"] = 1.0 if p.temperature is None else p.temperature
        if p.top_p is not None:
            params["top_p"] = p.top_p
        if p.top_k is not None:
            params["top_k"] = p.top_k
        params["seed"] = p.seed if p.seed is not None else random.getrandbits(63)
    else:
        params["temperature"] = 0.0
        if p.seed is not None:
            params["seed"] = p.seed
    for name in ("repetition_penalty", "frequency_penalty"):
        if getattr(p, name) is not None:
            params[name] = getattr(p, name)
    if stop := _check_stop(p.stop, "stop", settings):
        params["stop"] = stop
    if (priority := _priority(None, principal)) is not None:
        params["priority"] = priority
    top = _check_top(p.top_n_tokens, "top_n_tokens", settings) if p.top_n_tokens else 0
    # A stream sends one event per token (ids needed); details list the tokens.
    logprobs = stream or p.details or bool(top)
    if logprobs:
        params.update(return_log_probs=True, top_log_probs=top)
    names = {"max_tokens": "max_new_tokens", "prompt": "inputs", "messages": "inputs", "top_logprobs": "top_n_tokens",
             "logprobs": "details", "presence_penalty": "frequency_penalty"}
    return EngineRequest(max_prompt_tokens=settings.max_prompt_tokens, prompt=req.inputs, messages=None, params=params, max_tokens_defaulted=defaulted,
                         logprobs=logprobs, top_logprobs=top, param_names=names)
