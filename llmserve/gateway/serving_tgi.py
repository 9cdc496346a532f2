"""TGI's generation routes: /generate (the whole text, details on request) and /generate_stream
(one event per generated token, the last with the whole text and the details).

finish_reason: the server's "length" is "length"; its "stop" (EOS or a stop string: the server
does not say which) is "stop_sequence" when the request had stop strings, else "eos_token".
A stream holds each token back until the next one (or the end) arrives, so that the last event
carries the last token, as TGI's does.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request

from client import AsyncClient

from .generation import collect, primed, stream_choices, unless_disconnected
from .logprobs import tgi_token, tgi_top_tokens
from .protocol_tgi import Details, GenerateRequest, GenerateResponse, StreamDetails, StreamResponse, Token
from .settings import GatewaySettings
from .sse import sse_response
from .state import principal_of
from .translate import EngineRequest, tgi_request


def tgi_finish(reason: str, req: EngineRequest) -> str:
    if reason == "length":
        return "length"
    return "stop_sequence" if req.has_stop else "eos_token"


def _prefix(body: GenerateRequest) -> str:
    return body.inputs if body.parameters.return_full_text else ""


async def generate(request: Request, body: GenerateRequest, client: AsyncClient,
                   settings: GatewaySettings) -> GenerateResponse:
    req = tgi_request(body, settings, stream=False, principal=principal_of(request))
    result = (await unless_disconnected(request, collect(client, req, f"tgi-{uuid.uuid4().hex}")))[0]
    details = None
    if body.parameters.details:
        details = Details(
            finish_reason=tgi_finish(result.finish_reason, req), generated_tokens=result.num_output_tokens,
            seed=req.seed, prefill=[], tokens=[tgi_token(t) for t in result.tokens],
            top_tokens=[tgi_top_tokens(t, req.top_logprobs) for t in result.tokens] if req.top_logprobs else None)
    return GenerateResponse(generated_text=_prefix(body) + result.text, details=details)


async def generate_stream(request: Request, body: GenerateRequest, client: AsyncClient,
                          settings: GatewaySettings) -> EventSourceResponse:
    req = tgi_request(body, settings, stream=True, principal=principal_of(request))
    events = await primed(request, stream_choices(client, req, f"tgi-{uuid.uuid4().hex}"))
    return sse_response(_events(events, req, body), lambda error: error.tgi_body(), done_marker=False,
                        send_timeout=settings.stream_idle_timeout)


async def _events(events: AsyncIterator, req: EngineRequest, body: GenerateRequest) -> AsyncIterator[str]:
    held: Any = None  # the latest token, sent when the next one (or the end) arrives
    index = 0
    parts = [_prefix(body)]

    def event(token: Any, **final: Any) -> str:
        nonlocal index
        index += 1
        top = tgi_top_tokens(token, req.top_logprobs) if req.top_logprobs and token is not None else None
        tgi = tgi_token(token) if token is not None else Token(id=0, text="", logprob=None, special=True)
        return StreamResponse(index=index, token=tgi, top_tokens=top, **final).model_dump_json()

    async with aclosing(events):
        async for _, chunk in events:
            parts.append(chunk.text)
            for token in chunk.tokens:
                if held is not None:
                    yield event(held)
                held = token
            if chunk.finish_reason is not None:
                details = None
                if body.parameters.details:
                    details = StreamDetails(finish_reason=tgi_finish(chunk.finish_reason, req),
                                            generated_tokens=chunk.num_output_tokens, seed=req.seed,
                                            input_length=chunk.num_input_tokens)
                # No token at all (EOS first): an empty special token ends the stream, as TGI's EOS does.
                yield event(held, generated_text="".join(parts), details=details)
                return
