"""The `llm` model's response on the wire, and how postprocessing reads it back.

A response is two tensors: `token_ids`, a decode window (the tokens of the new
text, after a few context tokens), and `output_info`, the scalars below packed
into one INT64 vector: every tensor costs a shared-memory allocation and copies
on each hop, and this path runs once per streamed piece. `decode_window` turns
a window back into exactly the text the engine emitted. A request that asked
for log probabilities gets four more tensors (`log_prob_arrays`), which
postprocessing turns into per-token outputs (`token_pieces`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from llmserve.engine.detokenizer import REPLACEMENT_CHAR, decode

if TYPE_CHECKING:
    from llmserve.engine.llm_engine import RequestOutput

OUTPUT_INFO_FIELDS = ("prefix_length", "text_length", "num_input_tokens", "num_output_tokens",
                      "sequence_id", "finish_reason")
FINISH_REASONS = ("", "stop", "length", "cancelled")  # finish_reason's code is its index here


@dataclass(slots=True, frozen=True)
class OutputInfo:
    prefix_length: int
    text_length: int
    num_input_tokens: int
    num_output_tokens: int
    sequence_id: int
    finish_reason: str  # "" until the last response

    @classmethod
    def of(cls, out: RequestOutput) -> OutputInfo:
        return cls(out.prefix_length, out.text_length, out.num_input_tokens, out.num_output_tokens, out.seq_id,
                   out.finish_reason or "")

    def pack(self) -> np.ndarray:
        return np.array([[self.prefix_length, self.text_length, self.num_input_tokens, self.num_output_tokens,
                          self.sequence_id, FINISH_REASONS.index(self.finish_reason)]], dtype=np.int64)

    @classmethod
    def unpack(cls, array: np.ndarray) -> OutputInfo:
        *values, finish = array.reshape(-1).tolist()
        return cls(*values, FINISH_REASONS[finish])


def decode_window(tokenizer: Tokenizer, token_ids: Sequence[int], prefix_length: int,
                  text_length: int = -1) -> str:
    """Text of `token_ids` past its first `prefix_length` tokens, cut to `text_length` chars if >= 0."""
    text = decode(tokenizer, token_ids)
    if prefix_length > 0:
        text = text[len(decode(tokenizer, token_ids[:prefix_length])):]
    return text if text_length < 0 else text[:text_length]


# The log-probability tensors `llm` adds to a response whose request asked for them (return_log_probs).
LOG_PROB_TENSORS = ("log_probs", "top_ids", "top_log_probs", "cum_log_prob")


def log_prob_arrays(out: RequestOutput) -> dict[str, np.ndarray]:
    """One value per new token of the window ([1, n]; NaN for an echoed prompt token), its top
    alternatives ([1, n, k]; id -1 pads a row with fewer), and the running sum ([1, 1])."""
    n = len(out.log_probs)
    k = max((len(row) for row in out.top_ids), default=0)
    top_ids = np.full((1, n, k), -1, dtype=np.int32)
    top_values = np.full((1, n, k), np.nan, dtype=np.float32)
    for i, (ids, values) in enumerate(zip(out.top_ids, out.top_log_probs)):
        top_ids[0, i, :len(ids)] = ids
        top_values[0, i, :len(values)] = values
    return {"log_probs": np.array([out.log_probs], dtype=np.float32).reshape(1, n), "top_ids": top_ids,
            "top_log_probs": top_values, "cum_log_prob": np.array([[out.cum_log_prob]], dtype=np.float32)}


def token_pieces(tokenizer: Tokenizer, token_ids: Sequence[int], prefix_length: int, text: str) -> list[str]:
    """The share of `text` (the window's text) each new token brought, so that the pieces join to
    exactly `text`: a token that ends inside a multi-byte character brings "" (the character goes to
    the token that completes it), and a token past a stop-string cut brings ""."""
    new = len(token_ids) - prefix_length
    prefix_text = decode(tokenizer, token_ids[:prefix_length]) if prefix_length > 0 else ""
    pieces: list[str] = []
    cursor = 0
    for i in range(new):
        if i == new - 1:
            end = len(text)
        else:
            decoded = decode(tokenizer, token_ids[:prefix_length + i + 1])
            incomplete = decoded.endswith(REPLACEMENT_CHAR)
            end = cursor if incomplete else min(max(len(decoded) - len(prefix_text), cursor), len(text))
        pieces.append(text[cursor:end])
        cursor = end
    return pieces
