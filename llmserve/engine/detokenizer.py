"""Incremental detokenization at O(1) work per token (vLLM's prefix/read offsets).

Decoding one token at a time loses leading spaces (SentencePiece strips the
first piece's space) and splits multi-byte UTF-8 characters across tokens. So
each step decodes a short window: a few already-decoded context tokens (the
prefix) plus the new ones, and keeps only the text past the prefix's text. A
window whose text ends in U+FFFD is an incomplete character: wait for more
tokens.

A run of units is one decode window (context tokens, then new ones): the Triton
side sends windows and reads them back with `llmserve.triton.packing.decode_window`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

# Context tokens kept before the first generated one (vLLM uses the same 5).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


def decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True) if ids else ""


@dataclass(slots=True, frozen=True)
class TextUnit:
    """Text produced by tokens[read_offset:end_offset], decoded after context tokens[prefix_offset:read_offset].

    Consecutive units are contiguous (the next unit's read_offset is this one's
    end_offset), so any run of them decodes as one window.
    """

    prefix_offset: int
    read_offset: int
    end_offset: int
    text: str


class IncrementalDetokenizer:
    """Turns a growing token list into text units, one decode window per new token."""

    __slots__ = ("_tokenizer", "_ids", "_prefix_offset", "_read_offset", "_prefix_text")

    def __init__(self, tokenizer: Tokenizer, ids: list[int], num_prompt_tokens: int) -> None:
        self._tokenizer = tokenizer
        self._ids = ids  # the sequence's own list: prompt + output, appended by the engine
        self._prefix_offset = max(num_prompt_tokens - PROMPT_CONTEXT_TOKENS, 0)
        self._read_offset = num_prompt_tokens
        self._prefix_text: str | None = None

    def step(self) -> TextUnit | None:
        """Text completed by the tokens appended since the last unit, or None while incomplete."""
        return self._advance(allow_incomplete=False)

    def flush(self) -> TextUnit | None:
        """At the end of generation: whatever is left, even an incomplete character."""
        return self._advance(allow_incomplete=True)

    def _advance(self, allow_incomplete: bool) -> TextUnit | None:
        end = len(self._ids)
        if end <= self._read_offset:
            return None
        if self._prefix_text is None:  # cached while the offsets do not move
            self._prefix_text = decode(self._tokenizer, self._ids[self._prefix_offset:self._read_offset])
        text = decode(self._tokenizer, self._ids[self._prefix_offset:end])
        if len(text) <= len(self._prefix_text) or (text.endswith(REPLACEMENT_CHAR) and not allow_incomplete):
            return None
        unit = TextUnit(self._prefix_offset, self._read_offset, end, text[len(self._prefix_text):])
        self._prefix_offset, self._read_offset, self._prefix_text = self._read_offset, end, None
        return unit
