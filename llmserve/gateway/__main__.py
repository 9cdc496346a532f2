"""`python -m llmserve.gateway --triton-url HOST:PORT --port N`: the front end, in the foreground (uvicorn)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from urllib.parse import unquote_plus

import uvicorn

from .app import create_app
from .keys import KeysFileError
from .settings import GatewaySettings

# Read when --api-key is not given: a key in the environment stays out of process listings.
API_KEY_ENV = "LLMSERVE_API_KEY"
_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"]+)=([^&\s\"]*)")


def _mask_token(match: re.Match) -> str:
    if unquote_plus(match.group(2)).lower() != "token":  # as the WebSocket route decodes the name
        return match.group(0)
    return f"{match.group(1)}{match.group(2)}=***"


def redact(text: str) -> str:
    return _QUERY_PARAM.sub(_mask_token, text) if "=" in text else text


class RedactTokens(logging.Filter):
    """uvicorn logs each request line, query string included: a WebSocket's `token=KEY` is masked
    in the record's arguments (uvicorn's formatters read them one by one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def parse_args(argv: list[str] | None = None) -> tuple[GatewaySettings, dict]:
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
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit,
                        help="max_tokens a request may ask for at most")
    parser.add_argument("--max-stop-sequences", type=int, default=defaults.max_stop_sequences)
    parser.add_argument("--max-stop-length", type=int, default=defaults.max_stop_length)
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                        help="seconds one generation may take, queued to last token")
    parser.add_argument("--stream-idle-timeout", type=float, default=defaults.stream_idle_timeout,
                        help="seconds a stream may not send (a client not reading), a WebSocket may go "
                             "without a request, a request body may stall")
    parser.add_argument("--default-max-tokens-chat", type=int, default=defaults.default_max_tokens_chat)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--api-keys-file", default=None, help="a TOML file of named keys and their limits")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", default=None, help="... and this private key (PEM)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = vars(parser.parse_args(argv))
    if args["api_keys_file"] is not None and args["api_key"] is not None and os.environ.get(API_KEY_ENV):
        args["api_key"] = None  # the file wins over a key in the environment
    server = {"log_level": args.pop("log_level"), "ssl_certfile": args.pop("ssl_certfile"),
              "ssl_keyfile": args.pop("ssl_keyfile")}
    if (server["ssl_certfile"] is None) != (server["ssl_keyfile"] is None):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    fields = {f.name for f in dataclasses.fields(GatewaySettings)}
    try:
        settings = GatewaySettings(**{k: v for k, v in args.items() if k in fields})
    except ValueError as exc:
        parser.error(str(exc))
    return settings, server


def main(argv: list[str] | None = None) -> None:
    settings, server = parse_args(argv)
    try:
        app = create_app(settings)
    except KeysFileError as exc:
        raise SystemExit(f"python -m llmserve.gateway: error: {exc}") from None
    config = uvicorn.Config(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=5,
                            ws="websockets-sansio", **server)
    for name in ("uvicorn.access", "uvicorn.error"):  # configured by uvicorn.Config
        logging.getLogger(name).addFilter(RedactTokens())
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
