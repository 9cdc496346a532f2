"""TGI's routes: POST /generate, POST /generate_stream, POST / (stream picks one; what
huggingface_hub's InferenceClient posts to a URL), GET /info."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from .protocol_tgi import CompatGenerateRequest, GenerateRequest, Info
from .serving_tgi import generate, generate_stream
from .state import client_of, settings_of

router = APIRouter()


@router.post("/generate")
async def generate_route(body: GenerateRequest, request: Request) -> Response:
    response = await generate(request, body, client_of(request), settings_of(request))
    return JSONResponse(response.model_dump(mode="json"))


@router.post("/generate_stream")
async def generate_stream_route(body: GenerateRequest, request: Request) -> Response:
    return await generate_stream(request, body, client_of(request), settings_of(request))


@router.post("/")
async def compat_generate_route(body: CompatGenerateRequest, request: Request) -> Response:
    if body.stream:
        return await generate_stream(request, body, client_of(request), settings_of(request))
    response = await generate(request, body, client_of(request), settings_of(request))
    return JSONResponse([response.model_dump(mode="json")])  # a list, as TGI's compat route answers


def _version() -> str:
    try:
        return version("triton-llm-stream")
    except PackageNotFoundError:
        return "0.0.0"


@router.get("/info")
async def info(request: Request) -> JSONResponse:
    settings = settings_of(request)
    body = Info(model_id=settings.served_model_name, version=_version(), triton_url=settings.triton_url,
                triton_model=settings.triton_model)
    return JSONResponse(body.model_dump(mode="json"))
