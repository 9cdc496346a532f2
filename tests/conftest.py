"""Shared fixtures: the default model (built once), a real tritonserver, test tokenizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmserve.paths import DEFAULT_MODEL_DIR, REPO_ROOT  # noqa: E402 (after the offline settings)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The built default model (built here if `make model` has not run)."""
    model_dir = Path(os.environ.get("LLMSERVE_MODEL_DIR", DEFAULT_MODEL_DIR))
    if not (model_dir / ".complete").exists() and model_dir == DEFAULT_MODEL_DIR:
        subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "build_default_model.py"), "--out",
                        str(model_dir)], check=True)
    return model_dir


@pytest.fixture(scope="session")
def engine_factory(default_model_dir):
    """Build in-process engines on the default model: engine_factory(max_num_seqs=..., ...); the
    torch runner unless `runtime` says otherwise (the server's default needs an ONNX export)."""
    from llmserve.engine.config import EngineConfig
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)

    def make(pacer=None, **overrides):
        config = EngineConfig(model_dir=str(default_model_dir), **{"runtime": "torch", **overrides})
        return LLMEngine(config, tokenizer=tokenizer, pacer=pacer)

    return make


@pytest.fixture(scope="session")
def onnx_compiled_dir(default_model_dir, tmp_path_factory) -> Path:
    """The default model exported for ONNX Runtime, once per session (into a temporary folder: the
    build/compiled engine of `make engine` is left alone)."""
    from llmserve.export.onnx_export import export_onnx

    return export_onnx(default_model_dir, out_dir=tmp_path_factory.mktemp("compiled") / "onnx-default")


@pytest.fixture(scope="session")
def triton_server(default_model_dir, tmp_path_factory):
    """A real tritonserver on free ports serving model_repository/, stopped at the end."""
    from llmserve.triton.launcher import TritonServer, model_env

    log = tmp_path_factory.mktemp("triton") / "server.log"
    # Every inter-token gap observed (the default is a sample): tests/test_e2e_metrics.py counts them.
    with TritonServer(env=model_env(str(default_model_dir), inter_token_sample_fraction=1), log_path=log) as server:
        yield server


_CORPUS = [
    "Once upon a time there was a little cat named Tom.",
    "The café in Zürich served crème brûlée to naïve tourists.",
    "日本語のテキストと中文文本 mixed with English words.",
    "Emoji too: 🙂 🌟 🚀 and flags 🇫🇷 with spaces   and\ttabs.",
    "  Leading spaces, trailing spaces  ",
    "Numbers 12345 and punctuation!? (yes) \"quoted\" 'single'.",
] * 20


@pytest.fixture(scope="session")
def bytelevel_tokenizer():
    """A small GPT-2-style byte-level BPE tokenizer, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    """A Llama-style tokenizer: Metaspace pieces with byte fallback, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  limit_alphabet=60)
    tok.train_from_iterator(_CORPUS, trainer)
    # Byte tokens are ordinary vocabulary in Llama tokenizers (decode keeps them): rebuild with
    # only the three control tokens special.
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    llama = Tokenizer(models.BPE(vocab=tok.get_vocab(), merges=merges, byte_fallback=True, unk_token="<unk>"))
    llama.pre_tokenizer, llama.decoder = tok.pre_tokenizer, tok.decoder
    llama.add_special_tokens(["<unk>", "<s>", "</s>"])
    return llama


def GatewayProcess(triton_url: str, triton=None, *, extra_args: list[str] | None = None,
                   ready_path: str = "/health", log_path=None):
    """The launcher's GatewayServer (`python -m llmserve.gateway` on a free port, always stopped) with
    `.triton`, the TritonServer behind it (None for a URL alone); ready when `ready_path` answers 200."""
    from llmserve.triton.launcher import GatewayServer

    server = GatewayServer(triton_url, extra_args=["--log-level", "warning", *(extra_args or [])],
                           ready_path=ready_path, log_path=log_path)
    server.triton = triton
    return server


@pytest.fixture(scope="session")
def gateway(triton_server, tmp_path_factory):
    """The front end (llmserve.gateway) before the session's tritonserver, stopped at the end."""
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with GatewayProcess(triton_server.grpc_url, triton_server, log_path=log) as server:
        yield server


@pytest.fixture
def settled_tokens():
    """settled_tokens(triton) -> the server's generated-token counter once nothing runs and it has
    stopped growing (raises after `timeout` s): measured before and after a cancelled request, the
    difference is what the cancelled request generated on the server."""
    import time

    from llmserve.triton.launcher import metric

    def settle(triton, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            active = metric(triton.metrics_url, "llm_active_sequences")
            count = metric(triton.metrics_url, "llm_generated_tokens_total")
            if active == 0 and count == last:
                return count
            last = count
            time.sleep(0.15)  # the counters are flushed at most every 50 ms
        raise AssertionError(f"the server was still generating after {timeout} s")

    return settle


@pytest.fixture(scope="session")
def gateway_process():
    """GatewayProcess, for a test's own gateway (another Triton, or an unreachable one)."""
    return GatewayProcess
