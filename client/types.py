"""Typed response objects returned by `Client` and `AsyncClient`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

# The server reports one of these on the last chunk; typed as `str` on the
# objects so that a newer server reason never breaks an older client.
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the most likely tokens at a position (`top_log_probs=k`)."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True, slots=True)
class Token:
    """A generated token (with `return_log_probs=True`).

    `text` is the share of the chunk's text this token brought: the texts of a
    chunk's tokens join to exactly `chunk.text` (a token that ends inside a
    multi-byte character, or lies past a stop string's cut, has text "").
    `logprob` is None for an echoed prompt token.
    """

    id: int
    text: str
    logprob: float | None
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One streamed piece of a generation.

    `text` is only the text that is new since the previous chunk.
    `finish_reason` is None on every chunk except the last one.
    `num_output_tokens` is cumulative (tokens generated so far).
    `tokens`: the chunk's new tokens, only with `return_log_probs=True`.
    """

    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    tokens: tuple[Token, ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished generation: the joined text of all its chunks."""

    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    tokens: tuple[Token, ...] = ()  # only with return_log_probs=True

    @classmethod
    def from_chunks(cls, chunks: Iterable[StreamChunk]) -> Completion:
        """Join a complete chunk sequence (the last chunk carries the totals)."""
        parts: list[str] = []
        tokens: list[Token] = []
        last: StreamChunk | None = None
        for chunk in chunks:
            parts.append(chunk.text)
            tokens.extend(chunk.tokens)
            last = chunk
        if last is None or last.finish_reason is None:
            raise ValueError("chunk sequence has no final chunk (finish_reason unset)")
        return cls(
            text="".join(parts),
            finish_reason=last.finish_reason,
            num_input_tokens=last.num_input_tokens,
            num_output_tokens=last.num_output_tokens,
            tokens=tuple(tokens),
        )
