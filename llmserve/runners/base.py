"""What every runner is (`Runner`) and the checks every runner makes the same way, with the same
messages: of its constructor's sizes (`check_sizes`, `capped_model_len`) and of each forward
call (`validate_batch`, `validate_token_ids`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Runner(Protocol):
    """One batched forward step of a decoder-only LM over a slot-based KV cache: TorchModelRunner,
    OnnxRuntimeRunner and TensorRTRunner (`llmserve.runners.create_runner` picks one).

    The engine owns scheduling and slot allocation; the runner owns the weights and the cache.
    Each call appends new tokens for a set of slots (prefill, chunked prefill and decode are the
    same operation with different lengths) and returns the logits of each sequence's last token.
    """

    vocab_size: int  # the logits' width
    max_model_len: int  # tokens a slot holds at most
    num_slots: int
    eos_token_ids: list[int]
    kv_cache_bytes: int
    device: torch.device  # where the logits are
    dtype: torch.dtype
    packs_prefill: bool  # ragged prompts from empty caches go in one unpadded pass (the engine groups by it)

    def forward(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]],
                start_positions: Sequence[int]) -> torch.Tensor:
        """For each i, append token_ids[i] to the KV cache of slot slots[i] at positions
        start_positions[i] .. start_positions[i]+len(token_ids[i])-1 (start_positions[i] is how many
        tokens that slot already has cached; earlier cache content of that slot beyond it is stale
        and ignored), run the model over the new tokens attending to the slot's cached prefix +
        themselves (causal), and return float32 logits [B, vocab] for the LAST new token of each i.

        Raises ValueError for a malformed batch (`validate_batch`, `validate_token_ids`):
        mismatched lengths, a slot out of range or repeated, an empty token list, a negative
        start, a token id outside the vocabulary, or a sequence that would run past max_model_len.
        """
        ...

    def release(self, slot: int) -> None:
        """The engine is done with the slot's K/V (its sequence finished)."""
        ...

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """Copy positions [0, length) of slot `source`'s K/V into slot `destination` (the prefix cache)."""
        ...


def check_sizes(num_slots: int, max_model_len: int | None) -> None:
    """A runner constructor's first check (ValueError); max_model_len None = the model's."""
    if num_slots <= 0:
        raise ValueError(f"num_slots must be > 0, got {num_slots}")
    if max_model_len is not None and max_model_len <= 0:
        raise ValueError(f"max_model_len must be > 0, got {max_model_len}")


def capped_model_len(max_model_len: int | None, limit: int) -> int:
    """The runner's max_model_len: the one asked for (None: the model's), at most the model's `limit`."""
    return min(max_model_len or limit, limit)


def validate_batch(slots: Sequence[int], token_ids: Sequence[Sequence[int]], start_positions: Sequence[int], *,
                   num_slots: int, max_model_len: int) -> None:
    """The `forward` contract every runner enforces, with the same messages (ValueError)."""
    if not len(slots) == len(token_ids) == len(start_positions):
        raise ValueError(f"slots, token_ids and start_positions differ in length: "
                         f"{len(slots)}, {len(token_ids)}, {len(start_positions)}")
    if not slots:
        raise ValueError("empty batch")
    if len(set(slots)) != len(slots):
        raise ValueError(f"a slot appears twice in one call: {list(slots)}")
    for slot, tokens, start in zip(slots, token_ids, start_positions):
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} out of range [0, {num_slots})")
        if not tokens:
            raise ValueError(f"no new tokens for slot {slot}")
        if start < 0:
            raise ValueError(f"negative start position {start} for slot {slot}")
        if start + len(tokens) > max_model_len:
            raise ValueError(f"slot {slot} would hold {start + len(tokens)} tokens, "
                             f"past max_model_len={max_model_len}")


def validate_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """ids: the batch's token ids as a tensor built from the caller's lists (int64 when all are ints)."""
    if ids.dtype != torch.int64 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must be integers in [0, {vocab_size})")
