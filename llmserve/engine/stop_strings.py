"""Stop strings matched on text, with partial matches held back until resolved."""

from __future__ import annotations


class StopStringMatcher:
    __slots__ = ("stops", "_longest")

    def __init__(self, stops: tuple[str, ...]) -> None:
        if not stops or any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = stops
        self._longest = max(len(s) for s in stops)

    def find(self, text: str) -> int:
        """Index where the earliest stop string starts in `text`, or -1."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def hold_from(self, text: str) -> int:
        """Earliest index whose suffix could still grow into a stop string (len(text) if none).

        Only the last len(longest stop) - 1 characters can start a partial match,
        so this is O(total stop length) whatever the length of `text`.
        """
        start = max(len(text) - self._longest + 1, 0)
        for i in range(start, len(text)):
            tail = text[i:]
            if any(s.startswith(tail) for s in self.stops):
                return i
        return len(text)
