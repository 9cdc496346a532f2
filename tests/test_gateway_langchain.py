"""LangChain's ChatOpenAI against the front end, unchanged: invoke, stream and a multi-turn history."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

langchain_openai = pytest.importorskip("langchain_openai")


@pytest.fixture
def chat(gateway):
    return langchain_openai.ChatOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", model="default",
                                       temperature=0, max_tokens=40, max_retries=0, timeout=60)


def test_chat_openai_invoke_and_stream_give_the_same_answer(chat):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    history = [SystemMessage("You are a helpful assistant."), HumanMessage("Hello!")]
    answer = chat.invoke(history)
    assert isinstance(answer, AIMessage) and answer.content
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    pieces = [chunk.content for chunk in chat.stream(history)]
    assert len(pieces) > 1 and "".join(pieces) == answer.content
    follow_up = chat.invoke([*history, answer, HumanMessage("What is 2+3?")])
    assert follow_up.content and follow_up.usage_metadata["input_tokens"] > answer.usage_metadata["input_tokens"]
