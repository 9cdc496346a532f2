"""Request tensors -> engine parameters, for the Triton adapters (numpy in, no pb_utils).

Inputs arrive batched ([1, ...]: the models have max_batch_size > 0) and
Triton has already checked their dtypes and ranks against config.pbtxt. What is
left to check is here, with messages that name the offending input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from llmserve.engine.chat_template import check_messages
from llmserve.engine.config import SamplingParams
from llmserve.errors import InvalidRequestError

Inputs = Mapping[str, np.ndarray]

def _one_request(inputs: Inputs) -> None:
    for name, array in inputs.items():
        if array.ndim == 0 or array.shape[0] != 1:
            raise InvalidRequestError(f"input '{name}' has shape {list(array.shape)}: send one prompt per "
                                      f"request, batch dimension 1 (shape [1, ...])")


def _scalar(inputs: Inputs, name: str):
    array = inputs.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequestError(f"input '{name}' must hold one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _utf8(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes):
        raise InvalidRequestError(f"input '{name}' must be UTF-8 text, got {type(value).__name__}")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"input '{name}' is not valid UTF-8: byte {value[exc.start]:#04x} at "
                                  f"position {exc.start}") from None


def _strings(inputs: Inputs, name: str) -> tuple[str, ...]:
    array = inputs.get(name)
    if array is None:
        return ()
    if array.dtype != np.object_:
        raise InvalidRequestError(f"input '{name}' must be a list of strings (TYPE_STRING, shape [1, N])")
    return tuple(s for s in (_utf8(v, name) for v in array.reshape(-1)) if s)


@dataclass(slots=True, frozen=True)
class Prompt:
    """A `preprocessing` request's prompt: its text, or chat messages to render with the chat template."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None


def parse_prompt(inputs: Inputs) -> Prompt:
    _one_request(inputs)
    value, messages = _scalar(inputs, "text_input"), _scalar(inputs, "messages")
    if value is not None and messages is not None:
        raise InvalidRequestError("send either input 'text_input' or input 'messages', not both")
    if messages is not None:
        try:
            decoded = json.loads(_utf8(messages, "messages"))
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"input 'messages' must be a JSON list of messages: {exc}") from None
        return Prompt(messages=check_messages(decoded))
    if value is None:
        raise InvalidRequestError("input 'text_input' is required (or 'messages', a JSON list of chat messages)")
    text = _utf8(value, "text_input")
    if not text:
        raise InvalidRequestError("input 'text_input' is empty: send a non-empty prompt")
    return Prompt(text=text)


@dataclass(slots=True, frozen=True, kw_only=True)
class LLMRequest:
    prompt_ids: list[int] | None = None  # None for a stop request
    params: SamplingParams | None = None
    stream: bool = False
    echo_prompt: bool = False
    stop: bool = False  # TensorRT-LLM's `stop`: end the running request(s) with this request id
    sequence_id: int | None = None  # with stop: end this engine sequence (postprocessing's cancel path)
    # False: don't poll Triton's is_cancelled() for it (an IPC per check); its caller sends a stop
    # instead. The ensemble says so: its cancellation never reaches `llm`, postprocessing stops it.
    poll_cancellation: bool = True


def parse_generation(inputs: Inputs) -> tuple[SamplingParams, bool, bool]:
    """(sampling params, stream, echo_prompt) of a generation request."""
    max_tokens = _scalar(inputs, "max_tokens")
    if max_tokens is None:
        raise InvalidRequestError("input 'max_tokens' is required")
    params = SamplingParams(
        max_tokens=int(max_tokens),
        **{name: kind(value) for name, kind in _SAMPLING_INPUTS.items()
           if (value := _scalar(inputs, name)) is not None},
        stop=_strings(inputs, "stop_words"),
        bad_words=_strings(inputs, "bad_words"),
        logprobs=bool(_scalar(inputs, "return_log_probs") or False),
        top_logprobs=int(_scalar(inputs, "num_top_log_probs") or 0),
    )
    exclude_input = _scalar(inputs, "exclude_input_in_output")
    return params, bool(_scalar(inputs, "stream") or False), exclude_input is not None and not exclude_input


def parse_prompt_request(inputs: Inputs) -> Prompt:
    """Validate a whole ensemble request in `preprocessing` (the first step: errors come back fastest)
    and return its prompt."""
    prompt = parse_prompt(inputs)
    parse_generation(inputs)
    return prompt


def parse_llm_request(inputs: Inputs) -> LLMRequest:
    _one_request(inputs)
    if _scalar(inputs, "stop"):
        seq_id = _scalar(inputs, "sequence_id")
        return LLMRequest(stop=True, sequence_id=None if seq_id is None else int(seq_id), poll_cancellation=False)
    ids = inputs.get("input_ids")
    if ids is None or ids.size == 0:
        raise InvalidRequestError("input 'input_ids' is required and must not be empty")
    params, stream, echo_prompt = parse_generation(inputs)
    poll = _scalar(inputs, "poll_cancellation")
    return LLMRequest(prompt_ids=ids.reshape(-1).astype(np.int64).tolist(), params=params, stream=stream,
                      echo_prompt=echo_prompt, poll_cancellation=poll is None or bool(poll))


_SAMPLING_INPUTS = {
    "temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "min_tokens": int, "seed": int, "end_id": int,
    "priority": int,  # the scheduler's, not the sampler's: lower is served first (SamplingParams.priority)
}
