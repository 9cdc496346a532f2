"""Conversion between Python values and the ensemble's Triton tensors.

Shared by the sync and async clients: validating the caller's parameters,
building the `InferInput` list of a request, and turning the stream of
responses back into `StreamChunk` objects.
"""

from __future__ import annotations

import codecs
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import triton_to_np_dtype

from .types import StreamChunk, Token, TopLogprob

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


class GenerationParams(TypedDict, total=False):
    """Keyword arguments of `stream()` / `generate()` on both clients.

    Every parameter except `max_tokens` defaults to None, which means "not
    sent": the server's default applies. Ranges are checked by the server.
    """

    max_tokens: int  # tokens to generate at most (default 128)
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    min_tokens: int | None
    seed: int | None
    stop: str | list[str] | None  # stop strings (server input `stop_words`)
    bad_words: str | list[str] | None
    end_id: int | None
    pad_id: int | None
    exclude_input_in_output: bool | None
    return_log_probs: bool | None  # fill each chunk's `tokens` (ids, texts, log probabilities)
    top_log_probs: int | None  # that many alternatives per token, 0..20 (implies return_log_probs)
    priority: int | None  # scheduling: lower is served first (server default 0); may preempt higher numbers
    request_id: str | None  # default: a fresh uuid4 hex


DEFAULT_MAX_TOKENS = 128

# Optional scalar inputs, by tensor dtype; parameter name == input name.
_FLOAT_INPUTS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_INT32_INPUTS = ("top_k", "min_tokens", "end_id", "pad_id", "priority")


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request, ready to be sent by either client."""

    inputs: list[InferInput]
    request_id: str
    max_tokens: int


def _scalar_input(name: str, datatype: str, value: Any, dtype: Any) -> InferInput:
    # The ensemble has max_batch_size > 0, so every scalar goes as shape [1, 1].
    tensor = InferInput(name, [1, 1], datatype)
    tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
    return tensor


def _string_list_input(name: str, values: list[str]) -> InferInput:
    tensor = InferInput(name, [1, len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([[v.encode("utf-8") for v in values]], dtype=np.object_))
    return tensor


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a token count is a caller bug.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    as_int = int(value)  # type: ignore[call-overload]
    if not low <= as_int <= high:
        # Not a range policy: the value cannot be encoded in the tensor's dtype.
        raise ValueError(f"{name}={as_int} does not fit the server's {name} tensor ({low}..{high})")
    return as_int


def _check_float(name: str, value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    as_float = float(value)
    if math.isnan(as_float):
        raise ValueError(f"{name} must not be NaN")
    return as_float


def _check_words(name: str, value: object) -> list[str]:
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"{name} must be a non-empty string or a list of non-empty strings, got {value!r}")
    return list(words)


def _check_messages(messages: object) -> str:
    """Chat messages as the JSON the ensemble's `messages` input takes; the server checks roles."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    for index, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise ValueError(f"messages[{index}] must be a dict with a str 'role' and a str 'content', "
                             f"got {message!r}")
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)


def build_request(prompt: str | None, params: GenerationParams, *,
                  messages: list[dict[str, str]] | None = None) -> PreparedRequest:
    """Validate the caller's arguments and build the ensemble's inputs (a prompt, or chat messages
    that the server renders with the model's chat template).

    Raises ValueError for mistakes that are certain on the client side (wrong
    types, max_tokens < 1, values the tensor dtype cannot hold) and TypeError
    for unknown keyword arguments; value ranges are left to the server.
    """
    unknown = set(params) - set(GenerationParams.__annotations__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    if messages is not None:
        prompt_input = _string_list_input("messages", [_check_messages(messages)])
    elif not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    elif not prompt:
        raise ValueError("prompt must not be empty")
    else:
        prompt_input = _string_list_input("text_input", [prompt])

    max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not _is_int(max_tokens) or max_tokens < 1:  # type: ignore[operator]
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    max_tokens = _check_int("max_tokens", max_tokens, 1, INT32_MAX)

    request_id = params.get("request_id") or uuid.uuid4().hex
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a str, got {request_id!r}")

    inputs = [
        prompt_input,
        _scalar_input("max_tokens", "INT32", max_tokens, np.int32),
        # Always stream: generate() joins the chunks, so that leaving early
        # cancels on the server in both cases.
        _scalar_input("stream", "BOOL", True, np.bool_),
    ]
    for name in _FLOAT_INPUTS:
        value = params.get(name)
        if value is not None:
            inputs.append(_scalar_input(name, "FP32", _check_float(name, value), np.float32))
    for name in _INT32_INPUTS:
        value = params.get(name)
        if value is not None:
            inputs.append(_scalar_input(name, "INT32", _check_int(name, value, -INT32_MAX - 1, INT32_MAX), np.int32))
    seed = params.get("seed")
    if seed is not None:
        inputs.append(_scalar_input("seed", "UINT64", _check_int("seed", seed, 0, UINT64_MAX), np.uint64))
    for param, input_name in (("stop", "stop_words"), ("bad_words", "bad_words")):
        value = params.get(param)
        if value is not None:
            words = _check_words(param, value)
            if words:  # an empty list means "none": send nothing
                inputs.append(_string_list_input(input_name, words))
    exclude = params.get("exclude_input_in_output")
    if exclude is not None:
        if not isinstance(exclude, (bool, np.bool_)):
            raise ValueError(f"exclude_input_in_output must be a bool, got {exclude!r}")
        inputs.append(_scalar_input("exclude_input_in_output", "BOOL", bool(exclude), np.bool_))
    log_probs, top = params.get("return_log_probs"), params.get("top_log_probs")
    if log_probs is not None and not isinstance(log_probs, (bool, np.bool_)):
        raise ValueError(f"return_log_probs must be a bool, got {log_probs!r}")
    if top is not None:
        inputs.append(_scalar_input("num_top_log_probs", "INT32", _check_int("top_log_probs", top, 0, INT32_MAX),
                                    np.int32))
    if log_probs or top:
        inputs.append(_scalar_input("return_log_probs", "BOOL", True, np.bool_))
    return PreparedRequest(inputs=inputs, request_id=request_id, max_tokens=max_tokens)


def build_stop_inputs() -> list[InferInput]:
    """Inputs of the explicit stop request sent to the `llm` model."""
    return [_scalar_input("stop", "BOOL", True, np.bool_)]


def _first_values(result: InferResult) -> dict[str, Any]:
    """The first element of each output, by name, in one pass over the response. Triton sends
    outputs as raw little-endian bytes (BYTES elements with a 4-byte length prefix), read here
    directly: `as_numpy` looks each output up by name and builds an array for it (4 outputs: 10 us
    per response, against 4 us)."""
    response = result.get_response()
    raw = response.raw_output_contents
    values: dict[str, Any] = {}
    for index, output in enumerate(response.outputs):
        if index >= len(raw):  # sent as typed `contents` instead: the general path
            array = result.as_numpy(output.name)
            values[output.name] = array.reshape(-1)[0] if array is not None and array.size else None
            continue
        data = raw[index]
        if output.datatype == "BYTES":
            length = int.from_bytes(data[:4], "little") if len(data) >= 4 else -1
            values[output.name] = data[4:4 + length] if 0 <= length <= len(data) - 4 else None
        else:
            dtype = np.dtype(triton_to_np_dtype(output.datatype))
            values[output.name] = np.frombuffer(data, dtype=dtype, count=1)[0] if len(data) >= dtype.itemsize else None
    return values


def is_final_response(result: InferResult) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


class ChunkAssembler:
    """Turns the responses of one request into `StreamChunk` objects.

    Handles the three shapes the final response can take: data plus the final
    flag, an empty final response after the last data, or a finish_reason on a
    non-final response followed by an empty final one.
    """

    def __init__(self, max_tokens: int) -> None:
        self._max_tokens = max_tokens
        # Incremental decoding keeps a multi-byte character that the server
        # split across two responses intact.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held_text = ""
        self._finish_reason: str | None = None
        self.num_input_tokens = 0
        self.num_output_tokens = 0
        self._held_tokens: tuple[Token, ...] = ()
        self.done = False

    def feed(self, result: InferResult) -> StreamChunk | None:
        """Consume one response; return the chunk to yield, or None to skip it."""
        final = is_final_response(result)
        values = _first_values(result)
        raw_text = values.get("text_output")
        text = self._decoder.decode(raw_text if raw_text is not None else b"", final=final)
        reason = values.get("finish_reason")
        if reason is not None:
            reason = reason.decode("utf-8") if isinstance(reason, bytes) else str(reason)
            self._finish_reason = reason or self._finish_reason
        n_in = values.get("num_input_tokens")
        n_out = values.get("num_output_tokens")
        if n_in is not None:
            self.num_input_tokens = int(n_in)
        if n_out is not None:
            self.num_output_tokens = int(n_out)
        tokens = _tokens(result) if "output_ids" in values else ()

        if not final:
            if self._finish_reason is None:
                return self._chunk(text, None, tokens) if text or tokens else None
            # A reason before the final flag: hold the text so that exactly
            # one chunk, the last, carries the finish_reason.
            self._held_text += text
            self._held_tokens += tokens
            return None

        self.done = True
        reason = self._finish_reason
        if reason is None:  # the server never said why; infer it from the counts
            reason = "length" if self.num_output_tokens >= self._max_tokens else "stop"
        return self._chunk(self._held_text + text, reason, self._held_tokens + tokens)

    def _chunk(self, text: str, finish_reason: str | None, tokens: tuple[Token, ...]) -> StreamChunk:
        return StreamChunk(
            text=text,
            finish_reason=finish_reason,
            num_input_tokens=self.num_input_tokens,
            num_output_tokens=self.num_output_tokens,
            tokens=tokens,
        )


def _tokens(result: InferResult) -> tuple[Token, ...]:
    """The response's new tokens with their log probabilities (sent when return_log_probs was set)."""
    ids = result.as_numpy("output_ids").reshape(-1).tolist()
    if not ids:  # e.g. the final response of a generation that ended on EOS
        return ()
    log_probs = result.as_numpy("output_log_probs").reshape(-1).tolist()
    texts = result.as_numpy("output_token_texts").reshape(-1)
    top_ids = result.as_numpy("top_token_ids").reshape(len(ids), -1).tolist()
    top_values = result.as_numpy("top_log_probs").reshape(len(ids), -1).tolist()
    top_texts = result.as_numpy("top_token_texts").reshape(len(ids), -1)
    return tuple(
        Token(id=token_id, text=texts[i].decode("utf-8", errors="replace"),
              logprob=None if math.isnan(log_probs[i]) else log_probs[i],
              top_logprobs=tuple(TopLogprob(id=alt, text=top_texts[i][j].decode("utf-8", errors="replace"),
                                            logprob=top_values[i][j])
                                 for j, alt in enumerate(top_ids[i]) if alt >= 0))
        for i, token_id in enumerate(ids))
