"""Prefix caching: a new prompt starts from the K/V of a prompt already computed that shares its
beginning, instead of prefilling it again (vLLM's automatic prefix caching, over slots).

A slot's cache keeps the K/V of its last prompt after its sequence finishes, until the slot is
given to another one. Each computed prompt is indexed by its prefixes: every whole block of
`block_size` tokens (shared system prompts, earlier turns of a chat) and all of it but the last
token (the same prompt again: the last token is always computed, its logits give the first
output token). A match on a free slot takes that slot as it is; a match on a slot in use is
copied into the new sequence's slot. Keys chain block hashes, so a prompt's candidate prefixes
are hashed in O(length); a hit is confirmed against the tokens the slot holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

BLOCK_SIZE = 16


@dataclass(slots=True, frozen=True)
class PrefixHit:
    slot: int  # the slot whose cache holds the prefix
    length: int  # tokens matched: positions [0, length) of that slot's K/V


def _prefix_keys(ids: list[int], lengths: list[int], block_size: int) -> list[int]:
    """The key of each prefix ids[:n] for n in `lengths` (ascending): the chained hash of its whole
    blocks, then its partial block."""
    keys, chain, done = [], 0, 0
    for n in lengths:
        while done + block_size <= n:
            chain = hash((chain, *ids[done:done + block_size]))
            done += block_size
        keys.append(hash((chain, n, *ids[done:n])))
    return keys


class PrefixCache:
    def __init__(self, num_slots: int, block_size: int = BLOCK_SIZE) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self._slots_of: dict[int, set[int]] = {}  # prefix key -> slots holding that prefix
        self._keys: list[dict[int, int]] = [{} for _ in range(num_slots)]  # slot -> {key: prefix length}
        self._held: list[list[int]] = [[] for _ in range(num_slots)]  # slot -> tokens of its valid K/V
        self._last_use = [0] * num_slots
        self._clock = itertools.count(1)

    def cacheable_lengths(self, num_tokens: int) -> list[int]:
        """Prefix lengths indexed for a prompt of `num_tokens` (ascending): whole blocks short of its
        last token, and all of it but that token."""
        last = num_tokens - 1
        lengths = list(range(self.block_size, last, self.block_size))
        return lengths + [last] if last > 0 else lengths

    def match(self, prompt_ids: list[int], is_free: Callable[[int], bool]) -> PrefixHit | None:
        """The longest cached prefix of the prompt, short of its last token, on a free slot when one
        holds it (`is_free(slot)`: no copy needed)."""
        lengths = self.cacheable_lengths(len(prompt_ids))
        for n, key in reversed(list(zip(lengths, _prefix_keys(prompt_ids, lengths, self.block_size)))):
            for slot in sorted(self._slots_of.get(key, ()), key=lambda s: not is_free(s)):
                if self._held[slot][:n] == prompt_ids[:n]:  # a hash collision fails here
                    self._last_use[slot] = next(self._clock)
                    return PrefixHit(slot, n)
        return None

    def eviction_rank(self, slot: int) -> tuple[bool, int, int]:
        """Free slots in the order to give away: those holding nothing (lowest first), then the least
        recently used."""
        return bool(self._held[slot]), self._last_use[slot], slot

    def forget(self, slot: int, keep: int = 0) -> None:
        """The slot's K/V past its first `keep` positions is about to be overwritten."""
        keys = self._keys[slot]
        for key in [k for k, n in keys.items() if n > keep]:
            del keys[key]
            holders = self._slots_of[key]
            holders.discard(slot)
            if not holders:
                del self._slots_of[key]
        del self._held[slot][keep:]

    def register(self, slot: int, prompt_ids: list[int]) -> None:
        """The slot's K/V now holds this prompt (all of it but possibly its last token)."""
        lengths = self.cacheable_lengths(len(prompt_ids))
        if not lengths:
            return
        self._held[slot] = prompt_ids[:lengths[-1]]
        keys = self._keys[slot]
        for n, key in zip(lengths, _prefix_keys(prompt_ids, lengths, self.block_size)):
            if key not in keys:
                keys[key] = n
                self._slots_of.setdefault(key, set()).add(slot)
        self._last_use[slot] = next(self._clock)

    def clear(self) -> None:
        """Forget every cached prefix (the slots' K/V stays, unindexed)."""
        for slot in range(len(self._keys)):
            self.forget(slot)

    @property
    def num_entries(self) -> int:
        return len(self._slots_of)
