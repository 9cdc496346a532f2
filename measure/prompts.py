"""The prompt set of the bench and the load test.

- `STORY_OPENINGS`: story openings of varied length, as the default model was trained on.
  `make bench` (and `python -m bench.runtimes`) send these (`BENCH_PROMPTS`), in this order,
  round robin: request i of a run sends prompt i mod 16, the same on every system; results.json
  records them under config.prompts.
- `QUESTIONS`: short chat questions.
- `prompts.jsonl` (`DEFAULT_PROMPTS`): the load test's mix, drawn from both and from
  paragraph-long stories, with a max_tokens each; `python -m measure.make_prompts` rewrites it
  (the same seed gives the same file). One JSON object per line: {"prompt": str, "max_tokens": int}.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

STORY_OPENINGS = [
    "Once upon a time",
    "The little dog ran to the park and",
    "One day, Lily went to the market with her mother. She saw",
    "Tom and his friend Ben wanted to build a big tower out of blocks, but",
    "In the morning",
    "The sun was shining and the birds were singing when",
    "She looked at the old map and said,",
    "A big red ball rolled down the hill. The children",
    "The cat said",
    "After school, Ben found a small box under his bed. Inside the box there was",
    "There was a small house near the river where a kind old man lived. Every day he",
    "Mia liked to paint pictures of the sky.",
    "The bird flew over the garden and",
    "It was a rainy day, so Max and his sister stayed inside and",
    "Grandma made a cake for the party. Everyone",
    "The boy and the girl",
]
BENCH_PROMPTS = STORY_OPENINGS

QUESTIONS = [
    "Hi!", "Tell me a story.", "What happens next?", "Can you tell me a story about a cat?",
    "What did Lily find in the garden?", "Why was Tom sad?", "Tell me a short story about a brave fox.",
    "Who is Max's best friend?", "Write a story about a rainy day.", "What did the little dog want?",
    "Can you write a story for my daughter? She loves ponies.", "What is the bunny's name?",
    "Tell me about a girl who wants to be a pilot.", "Where did Ben go after school?",
    "Make up a bedtime story about the moon.", "What did Grandma bake for the party?",
    "Please write a story with a happy ending.", "How did the kitten get down from the tree?",
    "Tell me a story about two friends who build a tower.", "What did Mia paint?",
    "Write a story where a boy loses his red hat.", "Why did the bird fly over the garden?",
    "Tell me a story set at the beach in July.", "What is in the small box under the bed?",
    "Can you continue the story about the old map?", "Write a funny story about a frog and a duck.",
    "Who lives in the small house near the river?", "Tell me a story about a café in Zürich.",
    "What did the children do on Saturday?", "Write a story about a kind old man and his dog.",
]

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    max_tokens: int

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"prompt text must be a non-empty string, got {self.text!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")


def load_prompts(path: str | Path = DEFAULT_PROMPTS) -> list[Prompt]:
    """Read and validate a prompt file; errors name the file and line."""
    path = Path(path)
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompts.append(Prompt(record["prompt"], record["max_tokens"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: not a prompt record "
                                 f'{{"prompt": str, "max_tokens": int}}: {exc}') from None
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class PromptSampler:
    """Draws prompts with its own seeded generator, so that user N of a run
    asks the same sequence of prompts on every run."""

    def __init__(self, prompts: list[Prompt], seed: int | str) -> None:
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        self._prompts = prompts
        self._rng = random.Random(seed)

    def next(self) -> Prompt:
        return self._rng.choice(self._prompts)

    def uniform(self, low: float, high: float) -> float:
        return self._rng.uniform(low, high)
