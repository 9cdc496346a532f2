"""Chat turns on the default model: ChatML prompts get short, right greedy answers ending at <|im_end|>.

tools/build_default_model.py mixes templated ChatML dialogues (greetings, small sums, a few
facts, repeat-after-me, short instructions, story requests) into its story corpus, and makes
<|im_end|> an EOS id beside <|endoftext|>. These tests render prompts with the saved chat
template, as a chat client would, and run them through the in-process engine.
"""

from __future__ import annotations

import re

import pytest

from llmserve.engine.config import SamplingParams

MAX_TOKENS = 64
# A word, optionally wrapped in quotes/brackets and followed by punctuation: `"Yes!`, `Lily's`.
WORD = re.compile(r"""^["'(]*[A-Za-z]+(?:['’-][A-Za-z]+)*[.,!?;:"')]*$""")


@pytest.fixture(scope="module")
def engine(engine_factory):
    return engine_factory(max_num_seqs=8)


def chat_prompt(tokenizer, *turns: str, system: str | None = None) -> str:
    """The generation prompt for alternating user/assistant turns (the last one the user's)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def answer(engine, *turns: str, system: str | None = None, max_tokens: int = MAX_TOKENS):
    """(answer text, finished sequence) for one greedy chat turn. Only <|im_end|> ends it (end_id), so
    a turn that stops ended there; that the server's own EOS ids include it: test_im_end_is_an_eos_id."""
    prompt = chat_prompt(engine.tokenizer, *turns, system=system)
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    seq = engine.add_request("chat", engine.encode(prompt), SamplingParams(max_tokens=max_tokens, end_id=im_end),
                             stream=False)
    text = ""
    while engine.has_unfinished():
        text += "".join(out.text for out in engine.step())
    return text, seq


def assert_ended_turn(engine, seq, max_tokens: int = 24) -> None:
    """Stopped by the model's own <|im_end|> (the only end_id `answer` allows), after a short answer;
    the engine does not append the token that ends a sequence."""
    assert seq.finish_reason == "stop"
    assert seq.num_output_tokens <= max_tokens


def test_prompt_is_rendered_in_chatml(engine) -> None:
    assert chat_prompt(engine.tokenizer, "Hi", system="You are a helpful assistant.") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_im_end_is_an_eos_id(engine) -> None:
    tokenizer = engine.tokenizer
    assert tokenizer.eos_token == "<|endoftext|>"
    expected = {tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert set(engine.runner.eos_token_ids) == expected
    assert engine.eos_ids == expected


@pytest.mark.parametrize(("question", "expected"), [
    ("What is 2+2?", "4"),
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What does a cow say?", "moo"),
    ("What day comes after Monday?", "Tuesday"),
])
def test_answers_contain_the_right_fact(engine, question: str, expected: str) -> None:
    text, seq = answer(engine, question)
    assert re.search(rf"\b{expected}\b", text), (question, text)
    assert_ended_turn(engine, seq)


@pytest.mark.parametrize(("question", "expected"), [
    ("Repeat after me: red apple", "red apple"),
    ("Repeat after me: blue sky", "blue sky"),
    ("Say yes.", "Yes."),
])
def test_exact_answers(engine, question: str, expected: str) -> None:
    text, seq = answer(engine, question)
    assert text == expected, question
    assert_ended_turn(engine, seq)


@pytest.mark.parametrize("greeting", ["Hello!", "Hi", "Good morning!"])
def test_greeting_gets_a_greeting(engine, greeting: str) -> None:
    text, seq = answer(engine, greeting)
    assert re.match(r"(Hello|Hi|Hey|Good morning)\b", text), text
    assert "help" in text, text
    assert_ended_turn(engine, seq)


def test_system_turn_and_second_turn(engine) -> None:
    text, seq = answer(engine, "What is 2+2?", system="You are a helpful assistant.")
    assert "4" in text
    assert_ended_turn(engine, seq)
    hello, _ = answer(engine, "Hello!")
    text, seq = answer(engine, "Hello!", hello, "What is the capital of Italy?")
    assert "Rome" in text
    assert_ended_turn(engine, seq)


def test_story_request_gets_a_story_that_ends(engine) -> None:
    prompt = chat_prompt(engine.tokenizer, "Tell me a story.")
    seq = engine.add_request("story", engine.encode(prompt), SamplingParams(max_tokens=400), stream=False)
    text = ""
    while engine.has_unfinished():
        text += "".join(out.text for out in engine.step())
    pieces = text.split()
    assert len(pieces) >= 15, text
    assert sum(bool(WORD.match(p)) for p in pieces) / len(pieces) > 0.8, text
    assert seq.finish_reason == "stop" and seq.num_output_tokens < 400  # at one of the model's EOS ids


def test_plain_prompt_still_continues_a_story(engine) -> None:
    prompt = "Once upon a time"
    end = engine.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    seq = engine.add_request("story", engine.encode(prompt), SamplingParams(max_tokens=400, end_id=end),
                             stream=False)
    text = ""
    while engine.has_unfinished():
        text += "".join(out.text for out in engine.step())
    pieces = text.split()
    assert len(pieces) >= 10, text
    assert sum(bool(WORD.match(p)) for p in pieces) / len(pieces) > 0.8, text
    assert "help you" not in text and "<|im_" not in text
    assert seq.finish_reason == "stop"  # at <|endoftext|> (the only end_id), the end of the story


def test_onnxruntime_ends_the_turn_at_im_end_too(engine, engine_factory, onnx_compiled_dir) -> None:
    onnx = engine_factory(runtime="onnxruntime", compiled_dir=str(onnx_compiled_dir), num_threads=1)
    assert set(onnx.runner.eos_token_ids) == set(engine.runner.eos_token_ids)
    for question in ["What is 2+3?", "Hello!"]:
        expected, _ = answer(engine, question)
        text, seq = answer(onnx, question)
        assert text == expected
        assert_ended_turn(onnx, seq)
