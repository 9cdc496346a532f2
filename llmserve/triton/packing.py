"""The `llm` model's response on the wire, and how postprocessing reads it back.

A response is two tensors: `token_ids`, a decode window (the tokens of the new
text, after a few context tokens), and `output_info`, the scalars below packed
into one INT64 vector: every tensor costs a shared-memory allocation and copies
on each hop, and this path runs once per streamed piece. `decode_window` turns
a window back into exactly the text the engine emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from llmserve.engine.detokenizer import decode

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
