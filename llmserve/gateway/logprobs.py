"""The client's `Token`s as OpenAI's two logprobs formats (completions' and chat's) and TGI's tokens.

A token's text is what it added to the output (`client.types.Token`): "" for a token inside a
multi-byte character or after a stop-string cut, so text offsets add up to the output exactly.
`bytes` is the UTF-8 of that text. A log probability of -inf (a token the sampler ruled out) is
reported as -9999.0, as OpenAI does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from .protocol_openai import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from .protocol_tgi import Token as TgiToken

UNLIKELY = -9999.0


def finite(logprob: float | None) -> float | None:
    if logprob is None:
        return None
    return logprob if math.isfinite(logprob) else UNLIKELY


def completion_logprobs(tokens: Sequence[Any], top: int, offset: int) -> tuple[CompletionLogprobs, int]:
    """Completions' logprobs of `tokens`, their text offsets counted from `offset` (characters of the
    choice's text before them, the echoed prompt included); and the offset after them.

    `top_logprobs[i]` holds the `top` most likely tokens at position i and the chosen one (OpenAI: up
    to logprobs + 1 entries), keyed by text (alternatives with the same text keep the likeliest).
    """
    texts, values, tops, offsets = [], [], [], []
    for token in tokens:
        texts.append(token.text)
        values.append(finite(token.logprob))
        offsets.append(offset)
        offset += len(token.text)
        alternatives: dict[str, float] = {}
        for alt in list(token.top_logprobs)[:top]:
            alternatives.setdefault(alt.text, finite(alt.logprob))
        if token.logprob is not None:
            alternatives.setdefault(token.text, finite(token.logprob))
        tops.append(alternatives)
    return CompletionLogprobs(tokens=texts, token_logprobs=values, top_logprobs=tops, text_offset=offsets), offset


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: Iterable[Any], top: int) -> list[ChatTokenLogprob]:
    return [
        ChatTokenLogprob(
            token=token.text, logprob=finite(token.logprob) if token.logprob is not None else UNLIKELY,
            bytes=_utf8(token.text),
            top_logprobs=[TopLogprob(token=alt.text, logprob=finite(alt.logprob), bytes=_utf8(alt.text))
                          for alt in list(token.top_logprobs)[:top]],
        )
        for token in tokens
    ]


def tgi_token(token: Any) -> TgiToken:
    return TgiToken(id=token.id, text=token.text, logprob=finite(token.logprob), special=False)


def tgi_top_tokens(token: Any, top: int) -> list[TgiToken]:
    return [TgiToken(id=alt.id, text=alt.text, logprob=finite(alt.logprob), special=False)
            for alt in list(token.top_logprobs)[:top]]
