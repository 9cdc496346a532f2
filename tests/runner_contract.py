"""What every runner must refuse, with the words its ValueError must contain: constructor sizes
(checked before anything is loaded) and forward() calls."""

from __future__ import annotations

# message -> constructor keyword arguments (besides the model and compiled folders).
BAD_SIZES = {
    "num_slots must be > 0": {"num_slots": 0},
    "max_model_len must be > 0": {"num_slots": 1, "max_model_len": 0},
}


def bad_forward_calls(vocab_size: int, max_model_len: int | None = None) -> dict[str, tuple[list, list, list]]:
    """message -> (slots, token_ids, start_positions), for runners with 2 slots."""
    calls = {
        "out of range": ([2], [[1]], [0]),
        "differ in length": ([0, 1], [[1]], [0, 0]),
        "twice": ([0, 0], [[1], [2]], [0, 0]),
        "no new tokens": ([0], [[]], [0]),
        "negative": ([0], [[1]], [-1]),
        "token ids": ([0], [[vocab_size]], [0]),
        # Ragged prompts from empty caches: the packed prefill paths check them too.
        "token ids must be": ([0, 1], [[1, 2], [vocab_size]], [0, 0]),
        "token ids must be integers": ([0, 1], [[1, -1, 2], [3]], [0, 0]),
        "empty batch": ([], [], []),
    }
    if max_model_len is not None:
        calls["max_model_len"] = ([0], [[1] * (max_model_len + 1)], [0])
    return calls
