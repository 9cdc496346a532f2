"""Log probabilities (sampler -> engine -> wire) and chat templates, in process."""

import json
import math
from functools import reduce

import numpy as np
import pytest
import torch

from llmserve.engine.chat_template import check_messages, render_chat
from llmserve.engine.config import MAX_TOP_LOGPROBS, SamplingParams
from llmserve.engine.llm_engine import merge_outputs
from llmserve.engine.sampler import Sampler, token_logprobs
from llmserve.engine.sequence import Sequence
from llmserve.errors import InvalidRequestError
from llmserve.triton.packing import decode_window, log_prob_arrays, token_pieces
from llmserve.triton.parsing import parse_generation, parse_prompt


def _seq(**params):
    return Sequence("r", [1, 2, 3], SamplingParams(max_tokens=10, **params), stream=True,
                    stop_ids=frozenset([0]), bad_word_ids=[])


def test_log_probs_come_from_the_logits_the_token_was_chosen_from():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    seqs = [_seq(top_logprobs=4), _seq(), _seq(logprobs=True, repetition_penalty=1.5, temperature=0.7, seed=3)]
    processed = logits.clone()
    tokens = Sampler()(processed, seqs)
    result = token_logprobs(processed, tokens, seqs)
    assert result[1] is None  # not asked
    expected = torch.log_softmax(processed, dim=-1)
    for row in (0, 2):
        assert result[row].logprob == pytest.approx(expected[row, tokens[row]].item(), abs=1e-5)
    # Penalties changed row 2's logits before the choice: its log probs are of the penalised logits.
    assert not torch.equal(processed[2], logits[2])
    assert result[0].top_ids == expected[0].topk(4).indices.tolist()
    assert result[0].top_logprobs == pytest.approx(expected[0].topk(4).values.tolist(), abs=1e-5)
    assert result[0].top_ids[0] == tokens[0]  # greedy: the chosen token is the most likely
    assert result[2].top_ids == [] and result[2].top_logprobs == []


def test_top_logprobs_is_capped_and_implies_logprobs():
    assert SamplingParams(max_tokens=4, top_logprobs=2).logprobs
    with pytest.raises(InvalidRequestError, match="top_logprobs"):
        SamplingParams(max_tokens=4, top_logprobs=MAX_TOP_LOGPROBS + 1)


def _run(engine, prompt, params, echo=False):
    engine.add_request("r", engine.encode(prompt), params, echo_prompt=echo)
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_engine_outputs_carry_one_log_prob_per_new_token(engine_factory):
    engine = engine_factory()
    outputs = _run(engine, "Zürich café 🙂 Once upon a time", SamplingParams(max_tokens=24, top_logprobs=3))
    total = 0.0
    for out in outputs:
        new = len(out.token_ids) - out.prefix_length
        assert len(out.log_probs) == len(out.top_ids) == len(out.top_log_probs) == new
        assert all(lp <= 0 for lp in out.log_probs) and all(len(row) == 3 for row in out.top_ids)
        total += sum(out.log_probs)
        assert out.cum_log_prob == pytest.approx(total, abs=1e-4)
    merged = reduce(merge_outputs, outputs)
    assert merged.log_probs == [lp for out in outputs for lp in out.log_probs]
    assert len(merged.log_probs) == len(merged.token_ids) - merged.prefix_length == merged.num_output_tokens
    # Without asking, nothing is computed or sent.
    assert all(out.log_probs is None for out in _run(engine, "Once upon a time", SamplingParams(max_tokens=5)))


def test_echoed_prompt_tokens_have_no_log_prob(engine_factory):
    engine = engine_factory()
    outputs = _run(engine, "Once upon a time", SamplingParams(max_tokens=4, logprobs=True), echo=True)
    first = outputs[0]
    prompt_tokens = first.num_input_tokens
    assert all(math.isnan(lp) for lp in first.log_probs[:prompt_tokens])
    assert not math.isnan(first.log_probs[prompt_tokens])


def test_token_pieces_join_to_the_text_whatever_the_window(engine_factory):
    engine = engine_factory()
    free = engine.generate(["Zürich café 🙂 naïve 日本 Once upon a time"], SamplingParams(max_tokens=40))[0]
    stop = free.split()[4]
    params = SamplingParams(max_tokens=40, stop=(stop,), logprobs=True)
    outputs = _run(engine, "Zürich café 🙂 naïve 日本 Once upon a time", params)
    decoder = engine.tokenizer.backend_tokenizer
    for out in [*outputs, reduce(merge_outputs, outputs)]:
        text = decode_window(decoder, out.token_ids, out.prefix_length, out.text_length)
        pieces = token_pieces(decoder, out.token_ids, out.prefix_length, text)
        assert len(pieces) == len(out.token_ids) - out.prefix_length
        assert "".join(pieces) == text == out.text


def test_token_pieces_give_a_split_character_to_the_token_that_completes_it(bytelevel_tokenizer):
    ids = bytelevel_tokenizer.encode("a 𝄞 b").ids
    # Not in the tokenizer's training text: its 4 bytes are 4 byte-level tokens.
    pieces = token_pieces(bytelevel_tokenizer, ids, 0, bytelevel_tokenizer.decode(ids))
    assert len(pieces) == len(ids) >= 6
    assert "".join(pieces) == "a 𝄞 b"
    assert pieces.count("") == 3 and "\ufffd" not in "".join(pieces)


def test_log_prob_arrays_pad_rows_without_alternatives(engine_factory):
    engine = engine_factory()
    first = _run(engine, "Once upon a time", SamplingParams(max_tokens=3, top_logprobs=2), echo=True)[0]
    arrays = log_prob_arrays(first)
    n = len(first.token_ids) - first.prefix_length
    assert arrays["log_probs"].shape == (1, n) and arrays["top_ids"].shape == (1, n, 2)
    assert (arrays["top_ids"][0, 0] == -1).all() and np.isnan(arrays["top_log_probs"][0, 0]).all()
    assert arrays["cum_log_prob"].shape == (1, 1)


def _batched(value, dtype=object):
    return np.array([[value]], dtype=dtype)


def test_parse_prompt_takes_text_or_chat_messages():
    messages = [{"role": "user", "content": "Hi"}]
    prompt = parse_prompt({"messages": _batched(json.dumps(messages).encode())})
    assert prompt.text is None and prompt.messages == messages
    with pytest.raises(InvalidRequestError, match="not both"):
        parse_prompt({"messages": _batched(json.dumps(messages).encode()), "text_input": _batched(b"x")})
    with pytest.raises(InvalidRequestError, match="JSON"):
        parse_prompt({"messages": _batched(b"[{")})


@pytest.mark.parametrize("messages, mentions", [
    ([], "non-empty"),
    ({"role": "user"}, "non-empty list"),
    (["hi"], r"messages\[0\]"),
    ([{"role": "wizard", "content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], r"messages\[0\].content must be a string"),
])
def test_bad_messages_name_the_problem(messages, mentions):
    with pytest.raises(InvalidRequestError, match=mentions):
        check_messages(messages)


def test_parse_generation_reads_the_log_prob_inputs():
    params, _, _ = parse_generation({"max_tokens": _batched(4, np.int32),
                                     "num_top_log_probs": _batched(3, np.int32)})
    assert params.logprobs and params.top_logprobs == 3
    params, _, _ = parse_generation({"max_tokens": _batched(4, np.int32),
                                     "return_log_probs": _batched(True, np.bool_)})
    assert params.logprobs and params.top_logprobs == 0
    with pytest.raises(InvalidRequestError, match="top_logprobs"):
        parse_generation({"max_tokens": _batched(4, np.int32), "num_top_log_probs": _batched(99, np.int32)})


def test_render_chat_uses_the_models_template(engine_factory):
    tokenizer = engine_factory().tokenizer
    text = render_chat(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_model_without_a_chat_template_is_a_clear_error(engine_factory):
    import copy

    tokenizer = copy.deepcopy(engine_factory().tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        render_chat(tokenizer, [{"role": "user", "content": "Hi"}])
