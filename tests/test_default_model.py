"""Checks on the locally built default model (see tools/build_default_model.py).

The model folder comes from $LLMSERVE_MODEL_DIR, else build/models/default. These tests
do not build it (that takes about a minute); they skip when it is missing. The check runs
at test time, not at collection, so a build done earlier in the session (conftest's
default_model_dir fixture) counts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from llmserve.paths import DEFAULT_MODEL_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, even by accident

MODEL_DIR = Path(os.environ.get("LLMSERVE_MODEL_DIR", DEFAULT_MODEL_DIR))

# A word, optionally wrapped in quotes/brackets and followed by punctuation: `"Yes!`, `Lily's`.
WORD = re.compile(r"""^["'(]*[A-Za-z]+(?:['’-][A-Za-z]+)*[.,!?;:"')]*$""")


@pytest.fixture(scope="module", autouse=True)
def _require_built_model() -> None:
    # Module scope and autouse: runs before the module-scoped loaders below.
    if not (MODEL_DIR / ".complete").exists():
        pytest.skip(f"default model not built at {MODEL_DIR}; "
                    "run python tools/build_default_model.py")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


def test_folder_has_model_and_tokenizer_files() -> None:
    for name in ["config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json"]:
        assert (MODEL_DIR / name).is_file(), name
    # transformers 5 keeps the chat template in its own file, not in tokenizer_config.json.
    assert (MODEL_DIR / "chat_template.jinja").is_file()


def test_special_tokens_and_chat_template(tokenizer) -> None:
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode("<|im_start|>user", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_encode_adds_no_special_tokens(tokenizer) -> None:
    ids = tokenizer.encode("Once upon a time")
    assert tokenizer.eos_token_id not in ids


@pytest.mark.parametrize("text", ["Zürich café 🙂 naïve", "猫 and 🌟 über", " two  spaces\n"])
def test_tokenizer_round_trips_multibyte_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_some_tokens_split_a_multibyte_character(tokenizer) -> None:
    # Streaming detokenization must cope with tokens that end mid-character; make sure
    # the model actually has such tokens for some input.
    ids = tokenizer.encode("猫 🙂 ありがとう", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)


def test_model_config_matches_tokenizer(model, tokenizer) -> None:
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.vocab_size == len(tokenizer)
    # Generation ends at <|endoftext|> (a story's end) and at <|im_end|> (a chat turn's end).
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert cfg.eos_token_id == eos_ids
    assert model.generation_config.eos_token_id == eos_ids


def test_greedy_continuation_is_made_of_words(model, tokenizer) -> None:
    import torch

    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    pieces = text.split()
    assert len(pieces) >= 5, text
    words = sum(bool(WORD.match(p)) for p in pieces)
    assert words / len(pieces) > 0.8, text
