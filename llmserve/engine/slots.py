"""KV-cache slot allocation.

The runner preallocates one cache region per slot; a running sequence owns one
slot from admission until it finishes. Lowest-free-first keeps the active slots
packed, so the runner can usually attend over a contiguous slice (no gather).
A free slot keeps its last prompt's K/V (the prefix cache reuses it), so a caller
may ask for a particular free slot, or rank the free ones.
"""

from __future__ import annotations

from collections.abc import Callable


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        self.num_slots = num_slots
        self._free = set(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def is_free(self, slot: int) -> bool:
        return slot in self._free

    def allocate(self, slot: int | None = None, rank: Callable[[int], object] | None = None) -> int:
        """`slot` if given (it must be free), else the free slot of lowest `rank` (default: the slot
        number itself)."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        if slot is None:
            slot = min(self._free, key=rank) if rank is not None else min(self._free)
        elif slot not in self._free:
            raise ValueError(f"slot {slot} is not free")
        self._free.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.add(slot)
