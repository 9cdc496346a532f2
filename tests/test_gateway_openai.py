"""The front end's OpenAI API through the real `openai` SDK (sync and async), against the `gateway`
fixture: the front end before a real tritonserver."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from llmserve.triton.launcher import metric

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me a story."}]
SAMPLINGS = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.9, "top_p": 0.95, "seed": 7}}


def cancelled_requests(triton) -> float:
    try:
        return metric(triton.metrics_url, "llm_requests_finished_total", reason="cancelled")
    except KeyError:  # none yet
        return 0.0


@pytest.fixture(scope="module")
def openai_client(gateway):
    with OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def _complete(client: OpenAI, stream: bool, sampling: dict, **extra):
    return client.completions.create(model="default", prompt=PROMPT, max_tokens=24, stream=stream,
                                     **sampling, **extra)


def _chat(client: OpenAI, stream: bool, sampling: dict, **extra):
    return client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=24, stream=stream,
                                          **sampling, **extra)


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_completion_stream_pieces_concatenate_to_the_non_streamed_text(openai_client, sampling):
    whole = _complete(openai_client, False, sampling)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.model == "default"
    assert whole.system_fingerprint and whole.created > 0
    choice = whole.choices[0]
    assert choice.index == 0 and choice.text.strip() and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(_complete(openai_client, True, sampling, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # the usage chunk comes last
    pieces = [c.choices[0] for c in chunks[:-1]]
    assert len(pieces) > 1 and all(c.usage is None for c in chunks[:-1])
    assert "".join(p.text for p in pieces) == choice.text
    assert [p.finish_reason for p in pieces][-1] == choice.finish_reason
    assert all(p.finish_reason is None for p in pieces[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_chat_stream_pieces_concatenate_to_the_non_streamed_message(openai_client, sampling):
    whole = _chat(openai_client, False, sampling)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content.strip()
    assert whole.choices[0].finish_reason in ("stop", "length")

    chunks = list(_chat(openai_client, True, sampling))
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content == ""
    deltas = [c.choices[0] for c in chunks]
    assert "".join(d.delta.content or "" for d in deltas) == message.content
    assert deltas[-1].finish_reason == whole.choices[0].finish_reason


def test_n_choices_each_with_its_own_index_and_seed(openai_client):
    sampling = {"temperature": 1.0, "seed": 100}
    whole = _complete(openai_client, False, sampling, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    # Choice i is the request with seed + i.
    alone = [_complete(openai_client, False, {"temperature": 1.0, "seed": 100 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in whole.choices] == alone
    assert len(set(alone)) > 1
    assert whole.usage.completion_tokens == sum(
        _complete(openai_client, False, {"temperature": 1.0, "seed": 100 + i}).usage.completion_tokens
        for i in range(3))

    streamed: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in _chat(openai_client, True, sampling, n=3):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    chat = _chat(openai_client, False, sampling, n=3)
    assert finished == {0, 1, 2}
    assert [streamed[i] for i in range(3)] == [c.message.content for c in chat.choices]


def test_completion_logprobs(openai_client):
    whole = _complete(openai_client, False, SAMPLINGS["greedy"], logprobs=3)
    choice = whole.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == whole.usage.completion_tokens or choice.finish_reason == "stop"
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 4 and top[token] == value  # the 3 likeliest and the chosen token
        assert max(top.values()) == value  # greedy: the chosen token is the likeliest
    streamed = list(_complete(openai_client, True, SAMPLINGS["greedy"], logprobs=3))
    assert sum((c.choices[0].logprobs.tokens for c in streamed), []) == logprobs.tokens
    assert sum((c.choices[0].logprobs.text_offset for c in streamed), []) == logprobs.text_offset
    echoed = _complete(openai_client, False, SAMPLINGS["greedy"], logprobs=1, echo=True).choices[0]
    assert echoed.text == PROMPT + choice.text
    assert echoed.logprobs.text_offset[0] == len(PROMPT)


def test_chat_logprobs(openai_client):
    # ignore_eos: the answer ends by length (see the next test for one ending by EOS).
    extra = {"extra_body": {"ignore_eos": True}}
    whole = _chat(openai_client, False, SAMPLINGS["greedy"], logprobs=True, top_logprobs=2, **extra)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 24
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
    plain = _chat(openai_client, False, SAMPLINGS["greedy"])
    assert plain.choices[0].logprobs is None
    streamed = list(_chat(openai_client, True, SAMPLINGS["greedy"], logprobs=True, top_logprobs=2, **extra))
    tokens = [t.token for c in streamed[1:] for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]
    alone = _chat(openai_client, False, SAMPLINGS["greedy"], logprobs=True, **extra)  # no alternatives
    assert [t.token for t in alone.choices[0].logprobs.content] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in alone.choices[0].logprobs.content)


@pytest.mark.parametrize("top", [0, 2])
def test_chat_logprobs_of_an_answer_ending_by_eos(openai_client, top):
    whole = openai_client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello!"}],
                                                  max_tokens=24, temperature=0, logprobs=True, top_logprobs=top)
    assert whole.choices[0].finish_reason == "stop"  # the model's <|im_end|>
    assert "".join(t.token for t in whole.choices[0].logprobs.content) == whole.choices[0].message.content


def test_stop_strings_defaults_and_extras(openai_client):
    free = _complete(openai_client, False, SAMPLINGS["greedy"]).choices[0].text
    word = free.split()[len(free.split()) // 2]
    cut = _complete(openai_client, False, SAMPLINGS["greedy"], stop=[word, "\n\n\n"]).choices[0]
    assert cut.finish_reason == "stop" and word not in cut.text and free.startswith(cut.text)
    default = openai_client.completions.create(model="default", prompt=PROMPT)  # OpenAI's default: 16
    assert default.usage.completion_tokens <= 16
    long = openai_client.completions.create(model="default", prompt=PROMPT, max_tokens=20,
                                            extra_body={"ignore_eos": True, "top_k": 5, "repetition_penalty": 1.1,
                                                        "min_tokens": 2}, user="someone")
    assert long.usage.completion_tokens == 20 and long.choices[0].finish_reason == "length"


def test_chat_default_max_tokens_is_lowered_to_fit_the_context(openai_client):
    # ~900 prompt tokens: the chat default (256) does not fit the 1024-token context; the room left is used.
    messages = [{"role": "user", "content": "word " * 440}]
    answer = openai_client.chat.completions.create(model="default", messages=messages)
    assert answer.usage.total_tokens <= 1024
    assert answer.usage.completion_tokens < 256


def test_async_client_stream_and_models(gateway):
    async def main():
        async with AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as client:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["default"]
            whole, stream = await asyncio.gather(
                client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=16, seed=3,
                                               temperature=0.8),
                client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=16, seed=3,
                                               temperature=0.8, stream=True, stream_options={"include_usage": True}))
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].usage == whole.usage and chunks[-1].choices == []
            assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
            completion = await client.completions.create(model="default", prompt=PROMPT, max_tokens=8)
            assert completion.usage.completion_tokens <= 8

    asyncio.run(main())


def test_health_and_the_page(gateway):
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    page = httpx.get(f"{gateway.url}/")
    assert page.status_code == 200 and "html" in page.headers["content-type"]


def test_disconnecting_from_an_sse_stream_stops_the_generation_on_the_server(gateway, settled_tokens):
    triton = gateway.triton
    before = settled_tokens(triton)
    cancelled = cancelled_requests(triton)
    body = {"model": "default", "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{gateway.url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            data = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                    data += 1
                    if data == 2:
                        break
    started = time.monotonic()  # the connection is closed here
    after = settled_tokens(triton)
    assert time.monotonic() - started < 5
    generated = after - before
    assert generated < 450, f"{generated} of 900 tokens generated after a disconnect at the second chunk"
    assert cancelled_requests(triton) == cancelled + 1
