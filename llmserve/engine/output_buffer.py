"""What a sequence may emit: text units held for stop strings, released, then sent.

Units are released whole: a unit whose text might begin a stop string waits
(with everything after it) until the match either completes, and generation
stops with the output cut where the stop string starts, or fails. Released
units accumulate until sent, each step when streaming or once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmserve.engine.detokenizer import TextUnit
from llmserve.engine.stop_strings import StopStringMatcher


@dataclass(slots=True, frozen=True)
class Emission:
    """A run of released units: the text of ids[prefix_offset:end_offset] past ids[:read_offset]."""

    prefix_offset: int
    read_offset: int
    end_offset: int
    text: str
    text_length: int  # chars kept of the window's text; -1 = all (it was not cut by a stop string)


class OutputBuffer:
    __slots__ = ("_matcher", "_held", "_held_text", "_unsent", "_unsent_chars", "_cut")

    def __init__(self, matcher: StopStringMatcher | None) -> None:
        self._matcher = matcher
        self._held: list[TextUnit] = []
        self._held_text = ""
        self._unsent: list[TextUnit] = []
        self._unsent_chars = 0
        self._cut: int | None = None

    def add(self, unit: TextUnit, check_stop: bool) -> bool:
        """Take a new unit; True if a stop string completed (the output is then final)."""
        self._held.append(unit)
        self._held_text += unit.text
        hold_at = len(self._held_text)
        if check_stop and self._matcher is not None:
            match = self._matcher.find(self._held_text)
            if match >= 0:
                self._release(len(self._held), cut=match)
                return True
            hold_at = self._matcher.hold_from(self._held_text)
        released, chars = 0, 0
        for held in self._held:
            if chars + len(held.text) > hold_at:
                break
            chars += len(held.text)
            released += 1
        self._release(released)
        return False

    def finish(self) -> None:
        """Generation ended without a stop string: a pending partial match is plain text."""
        self._release(len(self._held))

    def take(self) -> Emission | None:
        """Everything released and not yet sent, or None."""
        if not self._unsent:
            return None
        first, last = self._unsent[0], self._unsent[-1]
        text = "".join(u.text for u in self._unsent)
        text_length = -1
        if self._cut is not None:
            text_length = self._cut
            text = text[:text_length]
        emission = Emission(first.prefix_offset, first.read_offset, last.end_offset, text, text_length)
        self._unsent, self._unsent_chars, self._cut = [], 0, None
        return emission

    def _release(self, count: int, cut: int | None = None) -> None:
        if count == 0:
            return
        if cut is not None:  # chars of all unsent text kept: earlier unsent text + the match's start
            self._cut = self._unsent_chars + cut
        units = self._held[:count]
        self._unsent.extend(units)
        released_chars = sum(len(u.text) for u in units)
        self._unsent_chars += released_chars
        del self._held[:count]
        self._held_text = self._held_text[released_chars:]
