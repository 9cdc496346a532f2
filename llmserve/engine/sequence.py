"""One request's state inside the engine."""

from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmserve.engine.config import SamplingParams
from llmserve.engine.detokenizer import IncrementalDetokenizer
from llmserve.engine.output_buffer import OutputBuffer

if TYPE_CHECKING:
    from llmserve.engine.sampler import TokenLogprobs

_seq_ids = itertools.count(1)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = ("seq_id", "request_id", "params", "stream", "ids", "num_prompt_tokens", "num_cached",
                 "num_prefix_cached", "slot", "status", "finish_reason", "stop_ids", "bad_word_ids", "rng",
                 "token_counts", "seen_mask", "detokenizer", "output", "arrival_time", "logprobs", "top_logprobs",
                 "cum_logprob", "num_preemptions", "admitted_time", "first_token_time", "last_token_time")

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, stream: bool,
                 stop_ids: frozenset[int], bad_word_ids: list[list[int]],
                 detokenizer: IncrementalDetokenizer | None = None, output: OutputBuffer | None = None,
                 arrival_time: float | None = None) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.params = params
        self.stream = stream
        self.ids = list(prompt_ids)  # prompt + generated; the detokenizer reads this same list
        self.num_prompt_tokens = len(prompt_ids)
        self.num_cached = 0  # tokens whose keys/values are in the slot's cache
        self.num_prefix_cached = 0  # prompt tokens whose keys/values came from the prefix cache
        self.slot: int | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_ids = stop_ids
        self.bad_word_ids = bad_word_ids
        # Its own generator: a seeded request samples the same tokens whatever shares its batch.
        self.rng = np.random.default_rng(params.seed)
        self.token_counts: torch.Tensor | None = None  # output-token counts, only when penalties are on
        self.seen_mask: torch.Tensor | None = None  # prompt + output tokens, for repetition_penalty
        self.detokenizer = detokenizer
        self.output = output
        # The engine's clock (time.monotonic): when the server took the request (EngineLoop.submit),
        # its first admission to a slot, its first and latest generated token.
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.admitted_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        # Per generated token, only when the request asked (params.logprobs): index i = output token i.
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.top_logprobs: list[tuple[list[int], list[float]]] | None = [] if params.logprobs else None
        self.cum_logprob = 0.0
        # Times it lost its slot to a request of better priority: it then waits again, keeping its
        # tokens, and its K/V (prompt + output so far) is computed again when it is readmitted.
        self.num_preemptions = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.ids[self.num_prompt_tokens:]

    @property
    def pending_ids(self) -> list[int]:
        """Tokens to feed the model this step: the prompt (or its uncached rest; after a preemption,
        prompt + output so far), then the last token."""
        return self.ids[self.num_cached:]

    @property
    def num_uncached(self) -> int:
        """Tokens whose K/V the next step computes."""
        return len(self.ids) - self.num_cached

    @property
    def queue_key(self) -> tuple[int, int]:
        """The waiting queue's order: priority (lower first), then arrival (seq_id, which a preempted
        sequence keeps: it goes back ahead of later arrivals of its priority)."""
        return self.params.priority, self.seq_id

    def append(self, token: int, logprobs: TokenLogprobs | None = None) -> None:
        self.ids.append(token)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs.logprob)
            self.top_logprobs.append((logprobs.top_ids, logprobs.top_logprobs))
            self.cum_logprob += logprobs.logprob
        if self.token_counts is not None:
            self.token_counts[token] += 1
            self.seen_mask[token] = True

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request_id={self.request_id!r}, status={self.status.value}, "
                f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens})")
