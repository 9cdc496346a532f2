"""A second server beside the first, from the same checkout: another model family via MODEL_DIR,
a tiny engine, and overload answered with a clear rejection."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.ensemble_requests import run_stream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gpt2_model_dir(default_model_dir, tmp_path_factory):
    """A small random GPT-2 model folder carrying the default model's tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmserve.engine.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("gpt2")
    tokenizer = load_tokenizer(default_model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def second_server(triton_server, gpt2_model_dir, tmp_path_factory):
    from llmserve.triton.launcher import TritonServer, model_env

    # The torch runtime end to end (the first server runs the default, onnxruntime).
    env = model_env(str(gpt2_model_dir), "torch", max_num_seqs=1, max_queued_requests=1, latency_histograms="false")
    with TritonServer(env=env, log_path=tmp_path_factory.mktemp("triton2") / "server.log") as server:
        yield server


def test_two_servers_side_by_side_with_different_models(triton_server, second_server):
    assert triton_server.grpc_port != second_server.grpc_port
    first = run_stream(triton_server.grpc_url, text_input="Once upon a time", max_tokens=10, stream=False)
    second = run_stream(second_server.grpc_url, text_input="Once upon a time", max_tokens=10, stream=False,
                        min_tokens=10)
    assert first.error is None and second.error is None
    assert second.num_output_tokens == 10 and second.finish_reason == "length"
    assert first.text != second.text  # a random GPT-2 is not the trained model
    # The GPT-2 context (256) is enforced.
    too_long = run_stream(second_server.grpc_url, text_input="Hi", max_tokens=300, stream=False)
    assert "256" in too_long.error.message()


def test_overload_is_answered_with_a_clear_rejection(second_server):
    # One slot, one queue place: of several concurrent long requests, some must be refused.
    def request(_):
        return run_stream(second_server.grpc_url, text_input="Once upon a time", max_tokens=200,
                          min_tokens=200, stream=True)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(request, range(6)))
    refused = [r for r in results if r.error is not None]
    served = [r for r in results if r.error is None]
    assert refused and served
    assert all("overloaded" in r.error.message() for r in refused)
    assert all(r.num_output_tokens == 200 for r in served)
    assert run_stream(second_server.grpc_url, text_input="Hi", max_tokens=3, stream=False).error is None


def test_latency_histograms_off_leave_the_counters(second_server):
    from llmserve.triton.launcher import metric
    from tests.test_e2e_metrics import HISTOGRAMS

    assert run_stream(second_server.grpc_url, text_input="Hi", max_tokens=3, stream=False).error is None
    assert metric(second_server.metrics_url, "llm_generated_tokens_total") > 0
    for name in HISTOGRAMS:
        with pytest.raises(KeyError):
            metric(second_server.metrics_url, f"{name}_count")
