"""In-flight batching: who runs this step.

Every running sequence decodes one token per step; waiting requests are
admitted at the next step while slots are free, their prompts prefilled within
a token budget. Finished sequences leave at once and free their slot. With the
prefix cache, an admitted prompt starts from a cached prefix's K/V: its slot's own,
or a copy from another slot (`ScheduledBatch.copies`, done before the step's passes).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmserve.engine.config import EngineConfig
from llmserve.engine.prefix_cache import PrefixCache
from llmserve.engine.sequence import Sequence, SequenceStatus
from llmserve.engine.slots import SlotAllocator
from llmserve.errors import OverloadedError


@dataclass(slots=True)
class ScheduledBatch:
    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    # (source slot, destination slot, tokens): cached prefixes to copy before the step runs
    copies: list[tuple[int, int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, config: EngineConfig, slots: SlotAllocator) -> None:
        self.config = config
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in slot order: the runner attends over contiguous slices
        self.prefix_cache = PrefixCache(slots.num_slots) if config.enable_prefix_caching else None

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def check_queue(self, extra_waiting: int = 0) -> None:
        """OverloadedError when the queue (plus `extra_waiting` requests not yet added) is full."""
        waiting = len(self.waiting) + extra_waiting
        if waiting >= self.config.max_queued_requests:
            raise OverloadedError(f"server overloaded: {waiting} requests already waiting for a slot "
                                  f"(max_queued_requests={self.config.max_queued_requests})")

    def add(self, seq: Sequence) -> None:
        self.check_queue()
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(decode=list(self.running))
        budget = self.config.max_num_batched_tokens
        while self.waiting and self.slots.num_free:
            prompt_tokens = self.waiting[0].num_prompt_tokens
            if batch.prefill and prompt_tokens > budget:
                break  # the first always goes, however long, so no prompt starves
            seq = self.waiting.popleft()
            self._allocate(seq, batch)
            seq.status = SequenceStatus.RUNNING
            budget -= prompt_tokens - seq.num_cached
            batch.prefill.append(seq)
        if batch.prefill:
            self.running.extend(batch.prefill)
            self.running.sort(key=lambda s: s.slot)
        return batch

    def _allocate(self, seq: Sequence, batch: ScheduledBatch) -> None:
        cache = self.prefix_cache
        if cache is None:
            seq.slot = self.slots.allocate()
            return
        hit = cache.match(seq.ids, self.slots.is_free)
        if hit is not None and self.slots.is_free(hit.slot):
            seq.slot = self.slots.allocate(hit.slot)
            cache.forget(seq.slot, keep=hit.length)
        else:
            seq.slot = self.slots.allocate(rank=cache.eviction_rank)
            cache.forget(seq.slot)
            if hit is not None:
                batch.copies.append((hit.slot, seq.slot, hit.length))
        if hit is not None:
            seq.num_cached = seq.num_prefix_cached = hit.length

    def prompt_computed(self, seq: Sequence) -> None:
        """The sequence's prompt K/V is now in its slot: index it for later prompts."""
        if self.prefix_cache is not None:
            self.prefix_cache.register(seq.slot, seq.ids[:seq.num_prompt_tokens])

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the engine, wherever it is, and free its slot."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.slots.free(seq.slot)
            seq.slot = None
        seq.status = SequenceStatus.FINISHED
