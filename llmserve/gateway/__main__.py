"""`python -m llmserve.gateway --triton-url HOST:PORT --port N`: the front end, in the foreground (uvicorn)."""

from __future__ import annotations

import argparse
import dataclasses

import uvicorn

from .app import create_app
from .settings import GatewaySettings


def parse_args(argv: list[str] | None = None) -> tuple[GatewaySettings, str]:
    defaults = GatewaySettings()
    parser = argparse.ArgumentParser(prog="python -m llmserve.gateway",
                                     description="OpenAI-, TGI- and WebSocket-compatible front end on Triton.")
    parser.add_argument("--triton-url", default=defaults.triton_url, help="Triton's gRPC host:port")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--served-model-name", default=defaults.served_model_name,
                        help="the model name clients send and /v1/models lists")
    parser.add_argument("--triton-model", default=defaults.triton_model, help="the Triton model to call")
    parser.add_argument("--max-n", type=int, default=defaults.max_n, help="choices per request at most")
    parser.add_argument("--max-top-logprobs", type=int, default=defaults.max_top_logprobs)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                        help="seconds one generation may take")
    parser.add_argument("--default-max-tokens-chat", type=int, default=defaults.default_max_tokens_chat)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = vars(parser.parse_args(argv))
    log_level = args.pop("log_level")
    fields = {f.name for f in dataclasses.fields(GatewaySettings)}
    try:
        settings = GatewaySettings(**{k: v for k, v in args.items() if k in fields})
    except ValueError as exc:
        parser.error(str(exc))
    return settings, log_level


def main(argv: list[str] | None = None) -> None:
    settings, log_level = parse_args(argv)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                timeout_graceful_shutdown=5, ws="websockets-sansio")


if __name__ == "__main__":
    main()
