"""The prompt file: one JSON object per line, {"prompt": str, "max_tokens": int}."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

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
