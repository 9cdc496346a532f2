"""Loading a model folder's tokenizer (fast tokenizers only: decode windows run per token)."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(model_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_dir}: a fast tokenizer (tokenizer.json) is required")
    return tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids as the model expects them (with BOS where the tokenizer adds one)."""
    return tokenizer.encode(text, add_special_tokens=True)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of a piece of text inside a sequence (bad words): no special tokens."""
    return tokenizer.encode(text, add_special_tokens=False)
