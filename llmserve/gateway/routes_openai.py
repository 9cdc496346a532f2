"""OpenAI's routes: /v1/completions, /v1/chat/completions, /v1/models; and /health."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from .errors import GatewayError, error_response, model_not_found
from .protocol_openai import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving_chat import create_chat_completion
from .serving_completion import create_completion
from .state import client_of, settings_of, started_at

router = APIRouter()

HEALTH_TIMEOUT_S = 5.0


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await create_completion(request, body, client_of(request), settings_of(request))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await create_chat_completion(request, body, client_of(request), settings_of(request))


def _model_card(request: Request) -> ModelCard:
    return ModelCard(id=settings_of(request).served_model_name, created=started_at(request))


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse(ModelList(data=[_model_card(request)]).model_dump(mode="json"))


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request) -> JSONResponse:
    if model != settings_of(request).served_model_name:
        raise model_not_found(model, settings_of(request).served_model_name)
    return JSONResponse(_model_card(request).model_dump(mode="json"))


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when Triton is live and its model (the ensemble) is ready; 503 otherwise (or after 5 s)."""
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            ready = await client_of(request).health()
    except TimeoutError:
        ready = False
    if ready:
        return JSONResponse({"status": "ok"})
    settings = settings_of(request)
    return error_response(request.url.path, GatewayError(
        503, f"The inference server at {settings.triton_url} is not ready (model '{settings.triton_model}')",
        code="server_unavailable"))
