"""POST /v1/completions: the whole completion, or its chunks as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from client import AsyncClient

from .generation import ChoiceResult, collect, primed, stream_choices, unless_disconnected
from .logprobs import completion_logprobs
from .openai_common import ResponseMeta, new_meta, openai_finish, usage
from .protocol_openai import CompletionChoice, CompletionRequest, CompletionResponse
from .settings import GatewaySettings
from .sse import sse_response
from .state import principal_of
from .translate import EngineRequest, completion_request


async def create_completion(request: Request, body: CompletionRequest, client: AsyncClient,
                            settings: GatewaySettings) -> Response:
    req = completion_request(body, settings, principal_of(request))
    meta = new_meta("cmpl", settings)
    echo = body.prompt if body.echo else ""
    if body.stream:
        events = await primed(request, stream_choices(client, req, meta.id))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and body.stream_options.continuous_usage_stats
        return sse_response(_chunks(events, req, meta, echo, include_usage, continuous),
                            lambda error: error.openai_body(), done_marker=True,
                            send_timeout=settings.stream_idle_timeout)
    results = await unless_disconnected(request, collect(client, req, meta.id))
    return JSONResponse(_response(results, req, meta, echo).model_dump(mode="json"))


def _response(results: list[ChoiceResult], req: EngineRequest, meta: ResponseMeta, echo: str) -> CompletionResponse:
    choices = []
    for result in results:
        logprobs = completion_logprobs(result.tokens, req.top_logprobs, len(echo))[0] if req.logprobs else None
        choices.append(CompletionChoice(index=result.index, text=echo + result.text, logprobs=logprobs,
                                        finish_reason=openai_finish(result.finish_reason)))
    return CompletionResponse(id=meta.id, created=meta.created, model=meta.model,
                              system_fingerprint=meta.system_fingerprint, choices=choices,
                              usage=usage(results[0].num_input_tokens, (r.num_output_tokens for r in results)))


async def _chunks(events: AsyncIterator, req: EngineRequest, meta: ResponseMeta, echo: str,
                  include_usage: bool, continuous_usage: bool = False) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}
    offsets = [0] * req.n  # characters sent so far, per choice
    started = [False] * req.n
    prompt_tokens = 0
    output_tokens = [0] * req.n
    async with aclosing(events):
        async for index, chunk in events:
            text = chunk.text
            if not started[index]:
                started[index] = True
                text = echo + text
                offsets[index] = len(echo)
            prompt_tokens = chunk.num_input_tokens
            output_tokens[index] = chunk.num_output_tokens
            logprobs = None
            if req.logprobs:
                logprobs, offsets[index] = completion_logprobs(chunk.tokens, req.top_logprobs, offsets[index])
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                      finish_reason=openai_finish(chunk.finish_reason))
            yield CompletionResponse(id=meta.id, created=meta.created, model=meta.model,
                                     system_fingerprint=meta.system_fingerprint, choices=[choice],
                                     usage=usage(prompt_tokens, output_tokens) if continuous_usage else None,
                                     ).model_dump_json(exclude=exclude)
    if include_usage:
        yield CompletionResponse(id=meta.id, created=meta.created, model=meta.model,
                                 system_fingerprint=meta.system_fingerprint, choices=[],
                                 usage=usage(prompt_tokens, output_tokens)).model_dump_json()
