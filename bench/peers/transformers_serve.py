"""Hugging Face `transformers serve --continuous-batching` as a benchmark peer.

Installed from PyPI into its own venv (build/peers/transformers/venv) with the project's transformers
and its `serving` extra, pinned in transformers_serve.requirements.txt beside this file; served with
the model preloaded (`transformers serve MODEL_DIR`), so requests name the model by that path.

Its `/v1/completions` refuses fields it does not know (`min_tokens`, `ignore_eos`: HTTP 422), ignores
`stream_options` and streams no running usage: one `data:` event per decoded text piece, `usage` only
on the last one (with `finish_reason`), and no `data: [DONE]` before it closes the stream. A fixed length takes a per-request `generation_config` (a JSON string,
`fixed_length_fields`): EOS id -1 stops on `max_new_tokens` only, and `suppress_tokens` bans the
model's EOS ids, as `min_tokens` does here, so greedy texts match this project's engine. Continuous
batching takes `max_new_tokens` and `eos_token_id` per request but its logits processors
(`suppress_tokens`, `do_sample`) from the first request it serves: every request sends the same.

`python -m bench.peers.transformers_serve` installs it; `--check` also starts it and streams a few requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.peers import PEERS_DIR, run_logged
from llmserve.paths import DEFAULT_MODEL_DIR, REPO_ROOT
from llmserve.triton.launcher import ServerProcess, free_port

PEER_DIR = PEERS_DIR / "transformers"
VENV = PEER_DIR / "venv"
REQUIREMENTS = Path(__file__).with_name("transformers_serve.requirements.txt")
# Holds the requirements the venv was installed from: a changed pin reinstalls.
MARKER = VENV / "llmserve-requirements.txt"
SETUP_LOG = PEER_DIR / "setup.log"
# KV cache blocks of 256 tokens (the default page size): 32 streams of the model's whole context
# (1024 tokens), 64 of half of it. Unset, it sizes the cache from free memory and is killed under load.
DEFAULT_NUM_BLOCKS = 128
# Tokens per forward step (its default: 8192). Its attention mask is preallocated as this many rows
# by every cached token plus these (fp32 with sdpa): 8192 rows by 128 blocks would be 1.3 GB.
DEFAULT_MAX_BATCH_TOKENS = 1024
# An EOS id no token has: continuous batching then stops on max_new_tokens only.
NO_EOS = -1


def eos_token_ids(model_dir: Path) -> list[int]:
    """The model's EOS ids: its generation_config.json's, else its config.json's."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def transformers_cli() -> Path:
    return VENV / "bin" / "transformers"


def setup(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR) -> str | None:
    """Install the venv unless it holds the pinned requirements already; why the peer cannot run, or None."""
    if not (Path(model_dir) / "config.json").is_file():
        return f"no Hugging Face model at {model_dir}"
    pins = REQUIREMENTS.read_text()
    if MARKER.is_file() and MARKER.read_text() == pins and transformers_cli().is_file():
        return None
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(VENV)],
             [str(VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
              "-r", str(REQUIREMENTS)]]
    failed = run_logged(steps, SETUP_LOG, "installing transformers serve")
    if failed:
        return failed
    MARKER.write_text(pins)
    return None


class TransformersServer(ServerProcess):
    """`transformers serve` with continuous batching, the model preloaded, on a free loopback port."""

    name = "transformers serve"
    stop_timeout = 10.0

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, host: str = "127.0.0.1",
                 num_blocks: int = DEFAULT_NUM_BLOCKS, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 log_path: str | os.PathLike | None = None) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        super().__init__(env=env, log_path=log_path, cwd=REPO_ROOT)
        self.model_dir = Path(model_dir).resolve()
        self.host, self.port = host, free_port()
        self.num_blocks, self.max_batch_tokens = num_blocks, max_batch_tokens
        self.eos_ids = eos_token_ids(self.model_dir)

    def command(self) -> list[str]:
        return [str(transformers_cli()), "serve", str(self.model_dir), "--continuous-batching",
                "--cb-num-blocks", str(self.num_blocks), "--cb-max-batch-tokens", str(self.max_batch_tokens),
                "--host", self.host, "--port", str(self.port), "--log-level", "warning"]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def model(self) -> str:
        # The server is pinned to the preloaded model: another name is HTTP 400.
        return str(self.model_dir)

    @property
    def health_url(self) -> str:
        return f"{self.url}/health"

    def fixed_length_fields(self, n: int) -> dict[str, Any]:
        """Greedy, exactly `n` tokens, none of them EOS: like `min_tokens=n`, which it refuses."""
        config = {"max_new_tokens": n, "do_sample": False, "eos_token_id": NO_EOS, "suppress_tokens": self.eos_ids}
        return {"max_tokens": n, "generation_config": json.dumps(config)}


def _rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its children, MiB."""
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)], capture_output=True, text=True)
    return sum(int(v) for v in out.stdout.split()) / 1024


async def _check(server: TransformersServer, prompt: str, n: int, concurrency: int) -> int:
    """One streamed request, then `concurrency` at once; the exit status."""
    import aiohttp

    from bench.openai_driver import openai_sse_request

    async def stream(parts: list[str]):
        return await openai_sse_request(session, server.url, server.model, prompt, n, None, text_parts=parts,
                                        extra=server.fixed_length_fields(n))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        parts: list[str] = []
        one = await stream(parts)
        print(f"text: {''.join(parts)!r}")
        print(f"{one.error or 'ok'}: tokens {one.num_output_tokens}, chunks {len(one.chunks)}, TTFT "
              f"{one.ttft * 1e3 if one.chunks else float('nan'):.1f} ms, {one.num_output_tokens / one.latency:.1f} "
              f"tok/s, server RSS {_rss_mib(server.process.pid):.0f} MiB")
        texts = [[] for _ in range(concurrency)]
        start = time.perf_counter()
        many = await asyncio.gather(*(stream(t) for t in texts))
        seconds = time.perf_counter() - start
    tokens = [r.num_output_tokens for r in many]
    same = all("".join(t) == "".join(parts) for t in texts)
    print(f"{concurrency} at once: tokens {tokens}  same text: {same}  "
          f"{sum(tokens) / seconds:.1f} tok/s in all  server RSS {_rss_mib(server.process.pid):.0f} MiB")
    return 0 if set(tokens) == {n} == {one.num_output_tokens} else 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The transformers serve peer: install and check it.")
    parser.add_argument("--check", action="store_true", help="also start it, stream a few requests, stop it")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    if reason := setup(args.model_dir):
        sys.exit(f"transformers serve peer unavailable: {reason}")
    if not args.check:
        print(f"ready: {transformers_cli()}")
        return
    log = PEER_DIR / "check.log"
    with TransformersServer(args.model_dir, log_path=log) as server:
        print(f"serving {server.model} at {server.url} (log {log})")
        status = asyncio.run(_check(server, args.prompt, args.max_tokens, args.concurrency))
    sys.exit(status)


if __name__ == "__main__":
    main()
