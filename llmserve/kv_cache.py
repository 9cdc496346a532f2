"""KV-cache slot allocation.

The runner preallocates one cache region per slot; a running sequence owns one
slot from admission until it finishes. Lowest-free-first keeps the active slots
packed, so the runner can usually attend over a contiguous slice (no gather).
"""

from __future__ import annotations

import heapq


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)
