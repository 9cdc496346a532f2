"""In-flight batching: who runs this step.

Every running sequence decodes one token per step; waiting requests are
admitted at the next step while slots are free, their prompts prefilled within
a token budget. Finished sequences leave at once and free their slot. With the
prefix cache, an admitted prompt starts from a cached prefix's K/V: its slot's own,
or a copy from another slot (`ScheduledBatch.copies`, done before the step's passes).

Priority: the waiting queue is ordered by `SamplingParams.priority` (lower first), then arrival.
When no slot is free and the best waiting request has a strictly better priority than the worst
running sequence (highest priority number; ties: the latest arrival), that sequence is preempted:
its slot goes to the waiting request, and it waits again with its tokens kept and nothing cached
(`ScheduledBatch.preempted`: the engine releases their slots in the runner before the step runs).
Readmitted, it prefills prompt + output so far and samples its next token; its stream only pauses.
"""

from __future__ import annotations

import bisect
import threading
import time
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
    # (sequence, the slot it left): running sequences sent back to wait, for the runner to release
    # before the copies and the passes
    preempted: list[tuple[Sequence, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, config: EngineConfig, slots: SlotAllocator) -> None:
        self.config = config
        self.slots = slots
        self.waiting: list[Sequence] = []  # ordered by Sequence.queue_key: priority, then arrival
        self.running: list[Sequence] = []  # kept in slot order: the runner attends over contiguous slices
        self.prefix_cache = PrefixCache(slots.num_slots) if config.enable_prefix_caching else None
        # Requests refused because the queue was full: counted from the submitting threads too.
        self.num_refused = 0
        self._refused_lock = threading.Lock()

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _queued(self) -> list[Sequence]:
        """The waiting requests never admitted (preempted ones were: they do not count as queued)."""
        return [s for s in self.waiting if s.admitted_time is None]

    def _evictable(self, priority: int) -> Sequence | None:
        """The queued request a newcomer of `priority` may take the place of: the worst queued one,
        when the newcomer's priority is strictly better."""
        queued = self._queued()
        worst = queued[-1] if queued else None  # the waiting list is in queue order
        return worst if worst is not None and priority < worst.params.priority else None

    def check_queue(self, extra_waiting: int = 0, priority: int = 0) -> None:
        """OverloadedError when the queue (plus `extra_waiting` requests not yet added) is full, unless
        a request of `priority` would take the place of a worse queued one."""
        waiting = len(self._queued()) + extra_waiting
        if waiting >= self.config.max_queued_requests and self._evictable(priority) is None:
            with self._refused_lock:
                self.num_refused += 1
            raise OverloadedError(f"server overloaded: {waiting} requests already waiting for a slot "
                                  f"(max_queued_requests={self.config.max_queued_requests})")

    def add(self, seq: Sequence) -> Sequence | None:
        """Queue `seq`; the queued request it pushed out of a full queue, if any (the caller refuses it
        as overloaded), or OverloadedError for `seq` itself."""
        self.check_queue(priority=seq.params.priority)
        evicted = None
        if len(self._queued()) >= self.config.max_queued_requests:
            evicted = self._evictable(seq.params.priority)
            self.waiting.remove(evicted)
            evicted.status = SequenceStatus.FINISHED
            with self._refused_lock:
                self.num_refused += 1
        bisect.insort(self.waiting, seq, key=_queue_key)
        return evicted

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(decode=list(self.running))
        budget = self.config.max_num_batched_tokens
        while self.waiting:
            head = self.waiting[0]
            # Tokens to compute: the prompt, or after a preemption prompt + output (before any cache hit).
            if batch.prefill and head.num_uncached > budget:
                break  # the first always goes, however long, so no prompt starves
            if not self.slots.num_free and not self._preempt_for(head, batch):
                break
            seq = self.waiting.pop(0)
            if seq.admitted_time is None:
                seq.admitted_time = time.monotonic()
            self._allocate(seq, batch)
            seq.status = SequenceStatus.RUNNING
            budget -= seq.num_uncached
            batch.prefill.append(seq)
        if batch.prefill:
            self.running.extend(batch.prefill)
            self.running.sort(key=lambda s: s.slot)
        return batch

    def _preempt_for(self, head: Sequence, batch: ScheduledBatch) -> bool:
        """Free a slot for `head` by preempting the worst running sequence, if `head`'s priority is
        strictly better; whether it did. Sequences admitted this step are not candidates (they are
        not in `running` yet, and none is worse than the queue's head)."""
        if not self.running:
            return False
        victim = max(self.running, key=_queue_key)
        if head.params.priority >= victim.params.priority:
            return False
        slot = victim.slot
        self.running.remove(victim)
        batch.decode.remove(victim)
        self.slots.free(slot)
        victim.slot = None
        victim.status = SequenceStatus.WAITING
        victim.num_cached = 0  # its K/V is computed again (perhaps from a cached prefix of its prompt)
        victim.num_preemptions += 1
        bisect.insort(self.waiting, victim, key=_queue_key)
        batch.preempted.append((victim, slot))
        return True

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
            seq.num_cached = hit.length
            if not seq.num_preemptions:  # counted once, at its first admission
                seq.num_prefix_cached = hit.length

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


def _queue_key(seq: Sequence) -> tuple[int, int]:
    return seq.queue_key
