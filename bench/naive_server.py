"""The naive streaming server that users build first: the benchmark's baseline.

FastAPI + a WebSocket + Hugging Face `model.generate` with a `TextIteratorStreamer`,
one generation thread per request and no batching across requests. It follows the
tutorial pattern on purpose and is not optimised; it exists only for `make bench`.

Protocol on `ws://HOST:PORT/generate`: the client sends one JSON message
`{"prompt": str, "max_tokens": int, "min_tokens": int}`; the server answers
`{"text": delta, "num_output_tokens": n}` per streamed piece, then
`{"done": true, "num_output_tokens": n}` and closes (`{"error": "..."}` on failure).

`python -m bench.naive_server --model-dir DIR --port P` runs it in the foreground;
`NaiveServer` starts one on a free port for the bench runner and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from llmserve.paths import REPO_ROOT
from llmserve.triton.launcher import ServerProcess, free_port


class CountingStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also counts generated tokens.

    Each queued piece carries the count at the moment it was decoded, so the count sent with a
    piece matches its text even when generation runs ahead of the reader.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_tokens = 0
        self._prompt_pending = self.skip_prompt

    def put(self, value: torch.Tensor) -> None:
        # The first call is the prompt; the base class skips it the same way.
        if self._prompt_pending:
            self._prompt_pending = False
        else:
            self.num_tokens += value.numel()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put((text, self.num_tokens), timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)


def create_app(model_dir: str | os.PathLike) -> FastAPI:
    """The FastAPI app; the model and tokenizer load once, at startup."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    app = FastAPI(title="naive streaming server")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/generate")
    async def generate(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            request = await websocket.receive_json()
            prompt, max_tokens = str(request["prompt"]), int(request["max_tokens"])
            min_tokens = int(request.get("min_tokens", 0))
            inputs = tokenizer(prompt, return_tensors="pt")
            streamer = CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            failure: list[Exception] = []

            def run() -> None:
                try:
                    with torch.inference_mode():
                        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                       max_new_tokens=max_tokens, min_new_tokens=min_tokens, do_sample=False,
                                       streamer=streamer)
                except Exception as exc:  # noqa: BLE001 - reported to the client below
                    failure.append(exc)
                    streamer.end()  # unblocks the reader, which would otherwise wait forever

            threading.Thread(target=run, daemon=True).start()
            iterator = iter(streamer)
            while (piece := await asyncio.to_thread(next, iterator, None)) is not None:
                text, count = piece
                if text:  # most tokens end mid-word and decode to no new printable text
                    await websocket.send_json({"text": text, "num_output_tokens": count})
            if failure:
                raise failure[0]
            await websocket.send_json({"done": True, "num_output_tokens": streamer.num_tokens})
        except WebSocketDisconnect:
            return
        except Exception as exc:  # noqa: BLE001 - the client gets the error, the server stays up
            try:
                await websocket.send_json({"error": f"{type(exc).__name__}: {exc}"})
            except Exception:  # noqa: BLE001 - the client may already be gone
                return
        await websocket.close()

    return app


class NaiveServer(ServerProcess):
    """The naive server as a subprocess on a free port."""

    name = "naive server"
    stop_timeout = 10.0  # generation threads ignore uvicorn's shutdown: SIGKILL after this

    def __init__(self, model_dir: str | os.PathLike, *, host: str = "127.0.0.1",
                 log_path: str | os.PathLike | None = None) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        # cwd: `bench` is not an installed package.
        super().__init__(env=env, log_path=log_path, cwd=REPO_ROOT)
        self.model_dir = Path(model_dir).resolve()
        self.host, self.port = host, free_port()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.naive_server", "--model-dir", str(self.model_dir),
                "--host", self.host, "--port", str(self.port)]

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/generate"

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.port}/health"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the naive FastAPI + HF generate streaming server.")
    parser.add_argument("--model-dir", required=True, help="Hugging Face model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    uvicorn.run(create_app(args.model_dir), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
