"""The benchmark's naive baseline (bench/naive_server.py) streams correct greedy text."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.naive_client import naive_request
from bench.naive_server import NaiveServer

pytestmark = pytest.mark.e2e

PROMPTS = ["Once upon a time", "Tom had a dog"]
NUM_TOKENS = 16


def greedy_texts(model_dir, prompts: list[str]) -> list[str]:
    """Plain greedy HF generation, decoded in one piece."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, do_sample=False)
        texts.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def test_naive_server_streams_greedy_text(default_model_dir, tmp_path):
    async def run_all(url: str):
        parts: list[list[str]] = [[] for _ in PROMPTS]
        records = await asyncio.gather(*(naive_request(url, prompt, NUM_TOKENS, NUM_TOKENS, text_parts=part)
                                         for prompt, part in zip(PROMPTS, parts)))
        return records, ["".join(p) for p in parts]

    with NaiveServer(default_model_dir, log_path=tmp_path / "naive.log") as server:
        records, texts = asyncio.run(run_all(server.url))

    for record, text, expected in zip(records, texts, greedy_texts(default_model_dir, PROMPTS), strict=True):
        assert record.error is None, record.error
        assert record.num_output_tokens == NUM_TOKENS
        assert len(record.chunks) >= 3, record.chunks
        assert record.ttft > 0 and record.latency >= record.ttft
        assert [n for _, n in record.chunks] == sorted(n for _, n in record.chunks)
        assert all(0 < n <= NUM_TOKENS for _, n in record.chunks)
        assert text and text == expected
