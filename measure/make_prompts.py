"""Write measure/prompts.jsonl: a fixed-seed prompt mix with a realistic length spread.

- 45% short chat questions (a few words to one sentence),
- 30% story openings of a sentence or two (the bench's prompts),
- 25% paragraph-long prompts: one to three stories of the kind the default model
  was trained on, with an instruction in front (100-400 tokens).
max_tokens is log-normal around 64, clipped to 16..256: most answers are short,
a few are long. Run `python -m measure.make_prompts` to rewrite the file; the
same seed gives the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from measure.prompts import DEFAULT_PROMPTS, QUESTIONS, STORY_OPENINGS, Prompt
from tools.build_default_model import make_story

SEED = 20240601
NUM_PROMPTS = 240
MAX_TOKENS_MEDIAN, MAX_TOKENS_SIGMA, MAX_TOKENS_RANGE = 64, 0.7, (16, 256)
INSTRUCTIONS = ["Continue this story:", "Read the story and write what happens next.",
                "Here is a story my son wrote. Please write another one like it.", "Story:"]


def long_prompt(rng: random.Random) -> str:
    """An instruction, then one to three stories (100-400 tokens)."""
    stories = [make_story(rng) for _ in range(rng.choice((1, 1, 2, 3)))]
    return rng.choice(INSTRUCTIONS) + "\n\n" + "\n\n".join(stories)


def draw_max_tokens(rng: random.Random) -> int:
    """A log-normal output length around MAX_TOKENS_MEDIAN, clipped to MAX_TOKENS_RANGE."""
    low, high = MAX_TOKENS_RANGE
    drawn = math.exp(rng.gauss(math.log(MAX_TOKENS_MEDIAN), MAX_TOKENS_SIGMA))
    return int(min(max(round(drawn), low), high))


def make_prompts(seed: int = SEED, count: int = NUM_PROMPTS) -> list[Prompt]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.45:
            text = rng.choice(QUESTIONS)
        elif kind < 0.75:
            text = rng.choice(STORY_OPENINGS)
        else:
            text = long_prompt(rng)
        prompts.append(Prompt(text, draw_max_tokens(rng)))
    return prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--count", type=int, default=NUM_PROMPTS)
    args = parser.parse_args(argv)
    prompts = make_prompts(args.seed, args.count)
    with args.out.open("w", encoding="utf-8") as out:
        for p in prompts:
            out.write(json.dumps({"prompt": p.text, "max_tokens": p.max_tokens}, ensure_ascii=False) + "\n")
    words = sorted(len(p.text.split()) for p in prompts)
    tokens = sorted(p.max_tokens for p in prompts)
    print(f"wrote {len(prompts)} prompts to {args.out}: words p5/p50/p95/max "
          f"{words[len(words) // 20]}/{words[len(words) // 2]}/{words[len(words) * 19 // 20]}/{words[-1]}, "
          f"max_tokens p5/p50/p95 {tokens[len(tokens) // 20]}/{tokens[len(tokens) // 2]}/"
          f"{tokens[len(tokens) * 19 // 20]}")


if __name__ == "__main__":
    main()
