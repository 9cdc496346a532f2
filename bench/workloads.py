"""The bench's workloads: what is sent, the same to every system.

- `closed_loop`: the 16 story openings of `measure.prompts`, round robin, one output length (the
  sweep kept from the first bench, for continuity: 91% of its prompt tokens are prefix-cache hits).
- `distinct`: every prompt different (fresh stories, so the prefix cache hardly helps), with a
  realistic spread: half a sentence or two, 30% one story behind an instruction, 20% two or three;
  output lengths log-normal around 64 tokens, 16-256 (`measure.make_prompts`).
- `shared_prefix`: one long system prompt (reference stories, about 300 tokens) before a distinct
  short request: what prefix caching is for.

Seeded: the same seed gives the same requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from measure.make_prompts import INSTRUCTIONS, draw_max_tokens, long_prompt
from measure.prompts import BENCH_PROMPTS, Prompt
from tools.build_default_model import make_story

DEFAULT_SEED = 20261207


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    prompts: list[Prompt]
    description: str

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"workload {self.name} has no prompts")


def closed_loop(count: int, max_tokens: int) -> Workload:
    prompts = [Prompt(BENCH_PROMPTS[i % len(BENCH_PROMPTS)], max_tokens) for i in range(count)]
    return Workload("closed-loop", prompts, f"the {len(BENCH_PROMPTS)} story openings round robin, "
                                           f"{max_tokens} tokens each")


def _opening(rng: random.Random) -> str:
    """The first one or two sentences of a fresh story."""
    sentences = make_story(rng).split(". ")
    return ". ".join(sentences[:rng.choice((1, 2))]).rstrip(".") + "."


def _unique(draw, count: int) -> list[str]:
    texts, seen = [], set()
    while len(texts) < count:
        text = draw()
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def distinct(count: int, seed: int = DEFAULT_SEED) -> Workload:
    rng = random.Random(seed)

    def draw() -> str:
        kind = rng.random()
        return _opening(rng) if kind < 0.5 else long_prompt(rng)

    texts = _unique(draw, count)
    prompts = [Prompt(text, draw_max_tokens(rng)) for text in texts]
    return Workload("distinct", prompts, "distinct prompts: 50% one or two sentences, 50% stories behind an "
                                         "instruction; output 16-256 tokens, median 64")


def system_prompt(seed: int = DEFAULT_SEED) -> str:
    rng = random.Random(seed + 1)
    stories = "\n\n".join(make_story(rng) for _ in range(2))
    return f"You are a storyteller for children. Here are two stories to learn the style from.\n\n{stories}\n\n"


def shared_prefix(count: int, seed: int = DEFAULT_SEED) -> Workload:
    rng = random.Random(seed)
    prefix = system_prompt(seed)
    texts = _unique(lambda: f"{prefix}{rng.choice(INSTRUCTIONS)} {_opening(rng)}", count)
    prompts = [Prompt(text, draw_max_tokens(rng)) for text in texts]
    return Workload("shared-prefix", prompts, "one system prompt of two stories before a distinct request; "
                                              "output 16-256 tokens, median 64")
