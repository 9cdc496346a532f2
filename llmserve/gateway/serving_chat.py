"""POST /v1/chat/completions: the messages go to the server, which renders the model's chat template
(`AsyncClient.stream_chat`); the answer whole, or as `chat.completion.chunk` events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from client import AsyncClient

from .generation import ChoiceResult, collect, primed, stream_choices, unless_disconnected
from .logprobs import chat_logprobs
from .openai_common import ResponseMeta, new_meta, openai_finish, usage
from .protocol_openai import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
)
from .settings import GatewaySettings
from .sse import sse_response
from .state import principal_of
from .translate import EngineRequest, chat_request


async def create_chat_completion(request: Request, body: ChatCompletionRequest, client: AsyncClient,
                                 settings: GatewaySettings) -> Response:
    req = chat_request(body, settings, principal_of(request))
    meta = new_meta("chatcmpl", settings)
    if body.stream:
        events = await primed(request, stream_choices(client, req, meta.id))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and body.stream_options.continuous_usage_stats
        return sse_response(_chunks(events, req, meta, include_usage, continuous), lambda error: error.openai_body(),
                            done_marker=True, send_timeout=settings.stream_idle_timeout)
    results = await unless_disconnected(request, collect(client, req, meta.id))
    return JSONResponse(_response(results, req, meta).model_dump(mode="json"))


def _response(results: list[ChoiceResult], req: EngineRequest, meta: ResponseMeta) -> ChatCompletionResponse:
    choices = [
        ChatChoice(index=result.index, message=ChatResponseMessage(content=result.text),
                   logprobs=ChatLogprobs(content=chat_logprobs(result.tokens, req.top_logprobs)) if req.logprobs
                   else None,
                   finish_reason=openai_finish(result.finish_reason))
        for result in results
    ]
    return ChatCompletionResponse(id=meta.id, created=meta.created, model=meta.model,
                                  system_fingerprint=meta.system_fingerprint, choices=choices,
                                  usage=usage(results[0].num_input_tokens, (r.num_output_tokens for r in results)))


async def _chunks(events: AsyncIterator, req: EngineRequest, meta: ResponseMeta,
                  include_usage: bool, continuous_usage: bool = False) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}
    prompt_tokens = 0
    output_tokens = [0] * req.n

    def chunk_json(choices: list[ChatStreamChoice]) -> str:
        return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model,
                                   system_fingerprint=meta.system_fingerprint, choices=choices,
                                   usage=usage(prompt_tokens, output_tokens) if continuous_usage else None,
                                   ).model_dump_json(exclude=exclude)

    async with aclosing(events):
        for index in range(req.n):  # OpenAI's first chunk of each choice: the role, empty content
            yield chunk_json([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        async for index, chunk in events:
            prompt_tokens = chunk.num_input_tokens
            output_tokens[index] = chunk.num_output_tokens
            tokens = chunk.tokens if req.logprobs else ()
            if not chunk.text and not tokens and chunk.finish_reason is None:
                continue
            logprobs = ChatLogprobs(content=chat_logprobs(tokens, req.top_logprobs)) if req.logprobs else None
            delta = DeltaMessage(content=chunk.text) if chunk.text or tokens else DeltaMessage()
            yield chunk_json([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                               finish_reason=openai_finish(chunk.finish_reason))])
    if include_usage:
        yield ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model,
                                  system_fingerprint=meta.system_fingerprint, choices=[],
                                  usage=usage(prompt_tokens, output_tokens)).model_dump_json()
