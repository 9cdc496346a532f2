"""Through a real tritonserver: log probabilities (TensorRT-LLM's return_log_probs) and chat messages."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import AsyncClient, BadRequestError, Client

pytestmark = pytest.mark.e2e


def test_log_probs_and_alternatives_arrive_with_the_tokens(triton_server):
    with Client(triton_server.grpc_url) as client:
        plain = client.generate("Once upon a time", max_tokens=16)
        chunks = list(client.stream("Once upon a time", max_tokens=16, top_log_probs=3))
    assert plain.tokens == ()
    tokens = [t for c in chunks for t in c.tokens]
    assert len(tokens) == chunks[-1].num_output_tokens == 16
    for chunk in chunks:  # each chunk's token texts join to its text
        assert "".join(t.text for t in chunk.tokens) == chunk.text
    assert "".join(c.text for c in chunks) == plain.text  # asking changes nothing else
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one, with the same log probability.
        assert token.top_logprobs[0].id == token.id
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-5)
        assert [a.logprob for a in token.top_logprobs] == sorted((a.logprob for a in token.top_logprobs),
                                                                 reverse=True)


def test_tensorrt_llm_clients_get_output_log_probs_and_cum_log_probs(triton_server):
    """A raw tritonclient request, non-streaming: one response with all the tokens."""
    import queue

    from tests.ensemble_requests import make_inputs

    inputs = make_inputs(text_input="Once upon a time", max_tokens=8)
    for name, value, dtype, triton_type in (("return_log_probs", True, np.bool_, "BOOL"),
                                            ("num_top_log_probs", 2, np.int32, "INT32")):
        tensor = grpcclient.InferInput(name, [1, 1], triton_type)
        tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
        inputs.append(tensor)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("ensemble", inputs)
        result, error = responses.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert error is None, error
    log_probs = result.as_numpy("output_log_probs").reshape(-1)
    assert log_probs.shape == (8,) and (log_probs <= 0).all()
    assert result.as_numpy("cum_log_probs").reshape(-1)[0] == pytest.approx(log_probs.sum(), abs=1e-3)
    ids = result.as_numpy("output_ids").reshape(-1)
    assert ids.shape == (8,)
    texts = [t.decode() for t in result.as_numpy("output_token_texts").reshape(-1)]
    assert "".join(texts) == result.as_numpy("text_output").reshape(-1)[0].decode()
    assert result.as_numpy("top_token_ids").shape == (1, 8, 2)
    assert (result.as_numpy("top_token_ids")[0, :, 0] == ids).all()
    assert result.as_numpy("top_token_texts").shape == result.as_numpy("top_log_probs").shape == (1, 8, 2)


def test_chat_messages_are_rendered_with_the_models_template(triton_server):
    messages = [{"role": "user", "content": "Hello!"}]
    with Client(triton_server.grpc_url) as client:
        chat = client.chat(messages, max_tokens=40)
        rendered = client.generate("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n", max_tokens=40)
        with pytest.raises(BadRequestError, match=r"messages\[0\].role"):
            client.chat([{"role": "narrator", "content": "x"}], max_tokens=4)
        assert client.generate("Once upon a time", max_tokens=4).num_output_tokens == 4  # still serving
    assert chat.text == rendered.text and chat.num_input_tokens == rendered.num_input_tokens
    assert chat.finish_reason == "stop" and chat.num_output_tokens < 40  # <|im_end|> ends the turn


def test_async_client_chat_and_log_probs(triton_server):
    async def main():
        async with AsyncClient(triton_server.grpc_url) as client:
            chunks = [c async for c in client.stream_chat([{"role": "user", "content": "Hello!"}], max_tokens=20,
                                                          return_log_probs=True)]
            whole = await client.chat([{"role": "user", "content": "Hello!"}], max_tokens=20)
        return chunks, whole

    chunks, whole = asyncio.run(main())
    assert "".join(c.text for c in chunks) == whole.text
    assert all(t.logprob is not None and t.top_logprobs == () for c in chunks for t in c.tokens)


def test_a_generation_ending_on_eos_has_log_probs_too(triton_server):
    """Its final response carries no token (EOS is not output): the chunks still assemble."""
    with Client(triton_server.grpc_url) as client:
        completion = client.chat([{"role": "user", "content": "Hello!"}], max_tokens=60, top_log_probs=2)
    assert completion.finish_reason == "stop" and completion.num_output_tokens < 60
    assert len(completion.tokens) == completion.num_output_tokens
    assert "".join(t.text for t in completion.tokens) == completion.text
