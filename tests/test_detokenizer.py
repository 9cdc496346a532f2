"""Incremental detokenization on byte-level BPE and SentencePiece-style tokenizers."""

import pytest

from llmserve.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, decode
from llmserve.triton.packing import decode_window

TEXTS = [
    " Once upon a time, there was a cat.",
    " café in Zürich: naïve crème brûlée",
    " 日本語のテキスト and 中文文本",
    " emoji 🙂🌟 🚀 🇫🇷 end",
    "  two leading spaces and\ttabs\nnew lines",
    " unseen chars: Ω≈ç√∫ ẞ ǅ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
PROMPT = "The story:"


def stream_units(tokenizer, prompt_ids, output_ids):
    ids = list(prompt_ids)
    detok = IncrementalDetokenizer(tokenizer, ids, len(prompt_ids))
    units = []
    for token in output_ids:
        ids.append(token)
        if (unit := detok.step()) is not None:
            units.append(unit)
    if (unit := detok.flush()) is not None:
        units.append(unit)
    return ids, units


@pytest.fixture(params=["bytelevel", "sentencepiece"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer, text):
    prompt_ids = tokenizer.encode(PROMPT).ids
    output_ids = tokenizer.encode(PROMPT + text).ids[len(prompt_ids):]
    ids, units = stream_units(tokenizer, prompt_ids, output_ids)
    expected = decode(tokenizer, ids)[len(decode(tokenizer, prompt_ids)):]
    assert "".join(u.text for u in units) == expected
    assert expected.endswith(text.rstrip()[-3:])
    # No piece splits a character: nothing streams a replacement character.
    assert all(REPLACEMENT_CHAR not in u.text for u in units)


@pytest.mark.parametrize("text", TEXTS)
def test_leading_space_of_first_token_survives(tokenizer, text):
    prompt_ids = tokenizer.encode(PROMPT).ids
    output_ids = tokenizer.encode(PROMPT + text).ids[len(prompt_ids):]
    _, units = stream_units(tokenizer, prompt_ids, output_ids)
    assert units[0].text.startswith(" ")


def test_units_are_contiguous_and_each_window_reproduces_its_text(tokenizer):
    prompt_ids = tokenizer.encode(PROMPT).ids
    output_ids = tokenizer.encode(PROMPT + TEXTS[3] + TEXTS[1]).ids[len(prompt_ids):]
    ids, units = stream_units(tokenizer, prompt_ids, output_ids)
    for previous, unit in zip(units, units[1:]):
        assert unit.read_offset == previous.end_offset
    for unit in units:
        window = ids[unit.prefix_offset:unit.end_offset]
        assert decode_window(tokenizer, window, unit.read_offset - unit.prefix_offset) == unit.text
    # A run of units is one window too (what postprocessing gets when text was held back).
    first, last = units[1], units[-1]
    window = ids[first.prefix_offset:last.end_offset]
    assert decode_window(tokenizer, window, first.read_offset - first.prefix_offset) == \
        "".join(u.text for u in units[1:])


def test_multibyte_character_is_held_until_complete(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    prompt_ids = tok.encode("x").ids
    # Feed the raw bytes of an emoji one byte-token at a time.
    byte_ids = [tok.token_to_id(c) for c in _bytelevel_chars("🚀".encode())]
    ids = list(prompt_ids)
    detok = IncrementalDetokenizer(tok, ids, len(prompt_ids))
    results = []
    for token in byte_ids:
        ids.append(token)
        results.append(detok.step())
    assert results[:-1] == [None] * (len(byte_ids) - 1)
    assert results[-1].text == "🚀"


def test_flush_emits_an_incomplete_tail(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    prompt_ids = tok.encode("x").ids
    ids = prompt_ids + [tok.token_to_id(_bytelevel_chars(b"\xf0")[0])]
    detok = IncrementalDetokenizer(tok, ids, len(prompt_ids))
    assert detok.step() is None
    assert detok.flush().text == REPLACEMENT_CHAR


def test_decode_window_cuts_to_text_length(bytelevel_tokenizer):
    ids = bytelevel_tokenizer.encode("Hello world, again").ids
    full = decode_window(bytelevel_tokenizer, ids, 0)
    assert full == "Hello world, again"
    assert decode_window(bytelevel_tokenizer, ids, 0, 5) == "Hello"


def _bytelevel_chars(data: bytes) -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = _byte_to_unicode()
    return [alphabet[b] for b in data] if ByteLevel else []


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
