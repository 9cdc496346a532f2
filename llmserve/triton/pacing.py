"""Stream pacing for the Triton server: how often a streaming sequence's pieces go out.

Every response costs an IPC and an ensemble hop on the way out. With a budget of
`max_responses_per_s` across all sequences, a sequence's pieces go out every
(running sequences / budget) seconds, merged, instead of once per step.
"""

from __future__ import annotations

import time

from llmserve.engine.sequence import Sequence


class ResponseRatePacer:
    """The engine's `StreamPacer` under a responses-per-second budget (the `llm` model's
    `max_stream_responses_per_s` setting)."""

    def __init__(self, max_responses_per_s: float, clock=time.monotonic) -> None:
        if max_responses_per_s <= 0:
            raise ValueError(f"max_stream_responses_per_s must be > 0, got {max_responses_per_s}")
        self.max_responses_per_s = max_responses_per_s
        self._clock = clock
        self._now = 0.0
        self._interval = 0.0
        self._hold = 0.0  # how much later than due a piece may go out this step
        self._next_send: dict[int, float] = {}  # seq_id -> when its next piece is due (absent: at once)

    def begin_step(self, num_running: int, prefilling: bool) -> None:
        self._now = self._clock()
        self._interval = num_running / self.max_responses_per_s
        # A step that prefills new prompts holds the running sequences' due pieces (for at most one
        # more interval; they merge into the next output): its first tokens then do not queue behind
        # them in the sender, the postprocessing model and the client.
        self._hold = self._interval if prefilling else 0.0

    def due(self, seq: Sequence) -> bool:
        return self._now >= self._next_send.get(seq.seq_id, 0.0) + self._hold

    def sent(self, seq: Sequence) -> None:
        self._next_send[seq.seq_id] = self._now + self._interval

    def finished(self, seq: Sequence) -> None:
        self._next_send.pop(seq.seq_id, None)
