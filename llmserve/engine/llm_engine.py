"""LLMEngine: one step = schedule -> run -> sample -> postprocess.

Not thread-safe: one thread owns an engine (see `llmserve.engine.loop.EngineLoop`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from llmserve.engine.config import EngineConfig, SamplingParams
from llmserve.engine.detokenizer import IncrementalDetokenizer, TextUnit, decode
from llmserve.engine.latency import LatencyLog, RequestLatency
from llmserve.engine.output_buffer import Emission, OutputBuffer
from llmserve.engine.prefill import PARALLEL_PREFILL_MIN_TOKENS, ForwardPass, plan_passes
from llmserve.engine.sampler import Sampler, TokenLogprobs, token_logprobs
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.sequence import Sequence
from llmserve.engine.slots import SlotAllocator
from llmserve.engine.stop_strings import StopStringMatcher
from llmserve.engine.tokenizer import encode_prompt, encode_text, load_tokenizer
from llmserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from llmserve.runners.base import Runner


@dataclass(slots=True, frozen=True)
class RequestOutput:
    """What one sequence has to send after a step.

    The text is `token_ids` decoded past its first `prefix_length` tokens, cut to
    `text_length` chars when >= 0 (a decode window: what the Triton side sends);
    `text` is that same string, for in-process callers.
    """

    seq_id: int
    request_id: str
    token_ids: list[int]
    prefix_length: int
    text_length: int
    text: str
    finished: bool
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    # Only when the request asked for log probabilities: one entry per new token of the window
    # (token_ids[prefix_length:]), NaN for echoed prompt tokens; and the sum over all generated tokens.
    log_probs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_log_probs: list[list[float]] | None = None
    cum_log_prob: float | None = None


def _joined(first: list | None, second: list | None) -> list | None:
    return None if first is None or second is None else first + second


def merge_outputs(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """One output carrying both: consecutive outputs of a sequence have contiguous decode windows
    (the second's context tokens are the first's new tokens), so their windows join into one."""
    if not first.token_ids:
        return second
    if not second.token_ids:
        return replace(second, token_ids=first.token_ids, prefix_length=first.prefix_length,
                       text_length=first.text_length, text=first.text, log_probs=first.log_probs,
                       top_ids=first.top_ids, top_log_probs=first.top_log_probs)
    text_length = -1 if second.text_length < 0 else len(first.text) + second.text_length
    return replace(second, token_ids=first.token_ids + second.token_ids[second.prefix_length:],
                   prefix_length=first.prefix_length, text_length=text_length, text=first.text + second.text,
                   log_probs=_joined(first.log_probs, second.log_probs),
                   top_ids=_joined(first.top_ids, second.top_ids),
                   top_log_probs=_joined(first.top_log_probs, second.top_log_probs))


@dataclass(slots=True)
class EngineStats:
    """Running totals, kept by the engine thread."""

    steps: int = 0
    prompt_tokens: int = 0
    prefix_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0  # running sequences sent back to wait for a request of better priority
    finished: Counter = field(default_factory=Counter)  # by finish reason


@dataclass(slots=True, frozen=True)
class EngineSnapshot:
    """The engine's state and totals at one moment, for metrics: readers need not know its parts."""

    num_running: int
    num_waiting: int
    num_slots: int
    num_slots_used: int
    steps: int
    prompt_tokens: int
    prefix_cached_tokens: int
    generated_tokens: int
    finished: dict[str, int]
    preemptions: int = 0
    refused: int = 0  # requests refused because the waiting queue was full

    @property
    def slot_usage(self) -> float:
        return self.num_slots_used / self.num_slots


class StreamPacer(Protocol):
    """When a streaming sequence's released text goes out. The engine asks `due` for each sequence
    with new text, and calls `sent` when it emits a piece, `finished` when the sequence ends;
    `begin_step` opens each step."""

    def begin_step(self, num_running: int, prefilling: bool) -> None: ...

    def due(self, seq: Sequence) -> bool: ...

    def sent(self, seq: Sequence) -> None: ...

    def finished(self, seq: Sequence) -> None: ...


class EveryStep:
    """The default pacing: each step's new text goes out at once."""

    def begin_step(self, num_running: int, prefilling: bool) -> None:
        pass

    def due(self, seq: Sequence) -> bool:
        return True

    def sent(self, seq: Sequence) -> None:
        pass

    def finished(self, seq: Sequence) -> None:
        pass


class LLMEngine:
    def __init__(self, config: EngineConfig, *, runner: Runner | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 pacer: StreamPacer | None = None) -> None:
        self.config = config
        self.pacer = pacer or EveryStep()
        # Prefill may use its own thread count (compute-bound bursts); decode shares the cores with
        # the transport.
        self._decode_threads = config.num_threads or torch.get_num_threads()
        self._prefill_threads = config.prefill_num_threads or self._decode_threads
        if runner is None:
            from llmserve.runners import create_runner
            runner = create_runner(config, num_threads=self._decode_threads)
        self.runner = runner
        self.tokenizer = tokenizer or load_tokenizer(config.model_dir)
        self._decoder = self.tokenizer.backend_tokenizer
        self.max_model_len: int = runner.max_model_len
        self.eos_ids = frozenset(runner.eos_token_ids or [self.tokenizer.eos_token_id])
        self.scheduler = Scheduler(config, SlotAllocator(runner.num_slots))
        self.sampler = Sampler()
        self.stats = EngineStats()
        # Queued requests a better-priority newcomer pushed out of the full queue, for the caller to
        # refuse as overloaded (`EngineLoop` does; take them with `take_evicted`).
        self.evicted: list[Sequence] = []
        # Latencies are kept only for an exporter that drains them (llmserve/triton/metrics.py sets it).
        self.latency: LatencyLog | None = None
        self._sequences: dict[int, Sequence] = {}

    # -- requests --------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError naming the problem; safe to call from any thread."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: at least one input token is required")
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"input_ids must be token ids in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                                      f"{self.max_model_len} tokens")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens ({params.max_tokens}) + prompt tokens ({len(prompt_ids)}) exceeds the model's "
                f"context of {self.max_model_len} tokens: use max_tokens <= {self.max_model_len - len(prompt_ids)}")
        if params.end_id is not None and params.end_id >= vocab:
            raise InvalidRequestError(f"end_id must be a token id in [0, {vocab}), got {params.end_id}")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    stream: bool = True, echo_prompt: bool = False, arrival_time: float | None = None) -> Sequence:
        """`arrival_time` (time.monotonic) is when the server took the request; default now."""
        self.validate(prompt_ids, params)
        bad_word_ids = [ids for ids in (encode_text(self.tokenizer, w) for w in params.bad_words) if ids]
        stop_ids = frozenset([params.end_id]) if params.end_id is not None else self.eos_ids
        seq = Sequence(request_id, prompt_ids, params, stream=stream, stop_ids=stop_ids,
                       bad_word_ids=bad_word_ids, arrival_time=arrival_time)
        seq.detokenizer = IncrementalDetokenizer(self._decoder, seq.ids, len(prompt_ids))
        seq.output = OutputBuffer(StopStringMatcher(params.stop) if params.stop else None)
        if echo_prompt:
            seq.output.add(TextUnit(0, 0, len(prompt_ids), decode(self._decoder, prompt_ids)), check_stop=False)
        evicted = self.scheduler.add(seq)
        if evicted is not None:  # a worse queued request gave up its place in the full queue
            del self._sequences[evicted.seq_id]
            self.evicted.append(evicted)
        self._sequences[seq.seq_id] = seq
        self.stats.prompt_tokens += len(prompt_ids)
        return seq

    def take_evicted(self) -> list[Sequence]:
        evicted, self.evicted = self.evicted, []
        return evicted

    def abort(self, seq_id: int) -> RequestOutput | None:
        """Stop a sequence now and free its slot; its final output says `cancelled`."""
        seq = self._sequences.get(seq_id)
        return None if seq is None else self._finish(seq, "cancelled")

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        ids = [s.seq_id for s in self._sequences.values() if s.request_id == request_id]
        return [out for out in map(self.abort, ids) if out is not None]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix: the next prompts are prefilled in full."""
        if self.scheduler.prefix_cache is not None:
            self.scheduler.prefix_cache.clear()

    def has_unfinished(self) -> bool:
        return bool(self._sequences)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def snapshot(self) -> EngineSnapshot:
        """The state and totals now (call it from the engine's thread, e.g. after a step)."""
        slots, stats = self.scheduler.slots, self.stats
        return EngineSnapshot(
            num_running=self.num_running, num_waiting=self.num_waiting, num_slots=slots.num_slots,
            num_slots_used=slots.num_used, steps=stats.steps, prompt_tokens=stats.prompt_tokens,
            prefix_cached_tokens=stats.prefix_cached_tokens, generated_tokens=stats.generated_tokens,
            finished=dict(stats.finished), preemptions=stats.preemptions, refused=self.scheduler.num_refused)

    # -- the step ----------------------------------------------------------------

    @torch.inference_mode()
    def step(self, emit: Callable[[list[RequestOutput]], None] | None = None) -> list[RequestOutput]:
        """Run one step. With `emit`, each forward pass's outputs go out as soon as it is done (new
        requests' first tokens do not wait for the decode pass) and the step returns []."""
        batch = self.scheduler.schedule()
        for _, slot in batch.preempted:  # as _finish does; before any copy or pass touches the slot
            self.runner.release(slot)
        self.stats.preemptions += len(batch.preempted)
        self.pacer.begin_step(len(self.scheduler.running), prefilling=bool(batch.prefill))
        for source, destination, length in batch.copies:
            self.runner.copy_prefix(source, destination, length)
        outputs: list[RequestOutput] = []
        for forward_pass in plan_passes(batch.prefill, batch.decode, packs_prefill=self.runner.packs_prefill):
            tokens, logprobs = self._run(forward_pass)
            now = time.monotonic()  # the pass's tokens exist from now
            pass_outputs = [out for seq, token, token_logprobs in zip(forward_pass.seqs, tokens, logprobs)
                            if (out := self._postprocess(seq, token, token_logprobs, now)) is not None]
            if emit is not None:
                emit(pass_outputs)
            else:
                outputs.extend(pass_outputs)
        if batch:
            self.stats.steps += 1
        return outputs

    def _run(self, forward_pass: ForwardPass) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One forward pass, its sampled tokens and their log probabilities where asked; its prompts'
        K/V is then in their slots."""
        seqs = forward_pass.seqs
        big_prefill = forward_pass.prefill and forward_pass.num_tokens >= PARALLEL_PREFILL_MIN_TOKENS
        torch.set_num_threads(self._prefill_threads if big_prefill else self._decode_threads)
        logits = self.runner.forward([s.slot for s in seqs], [s.pending_ids for s in seqs],
                                     [s.num_cached for s in seqs])
        tokens = self.sampler(logits, seqs)
        logprobs = token_logprobs(logits, tokens, seqs)
        for seq in seqs:
            if seq.num_cached < seq.num_prompt_tokens:  # its prompt's K/V was computed in this pass
                if not seq.num_preemptions:  # a readmitted sequence's prompt was counted at its first
                    self.stats.prefix_cached_tokens += seq.num_prefix_cached
                self.scheduler.prompt_computed(seq)  # the prompt only, not the output it recomputed
            seq.num_cached = len(seq.ids)
        return tokens, logprobs

    def _postprocess(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None,
                     now: float) -> RequestOutput | None:
        params = seq.params
        if token in seq.stop_ids:  # the sampler bans these before min_tokens
            return self._finish(seq, "stop")  # not an output token: neither counted nor timed
        if seq.first_token_time is None:
            seq.first_token_time = now
        elif self.latency is not None:
            self.latency.inter_token.append(now - seq.last_token_time)
        seq.last_token_time = now
        seq.append(token, logprobs)
        self.stats.generated_tokens += 1
        unit = seq.detokenizer.step()
        if unit is not None and seq.output.add(unit, check_stop=seq.num_output_tokens >= params.min_tokens):
            return self._finish(seq, "stop", stop_matched=True)
        if seq.num_output_tokens >= params.max_tokens:
            return self._finish(seq, "length")
        if seq.stream and self.pacer.due(seq):
            emission = seq.output.take()
            if emission is not None:
                self.pacer.sent(seq)
                return self._output(seq, emission)
        return None

    def _finish(self, seq: Sequence, reason: str, stop_matched: bool = False) -> RequestOutput:
        if reason != "cancelled" and not stop_matched:
            unit = seq.detokenizer.flush()
            if unit is not None and seq.output.add(unit, check_stop=seq.num_output_tokens >= seq.params.min_tokens):
                reason = "stop"
            seq.output.finish()
        slot = seq.slot
        self.scheduler.finish(seq)
        if slot is not None:
            self.runner.release(slot)
        del self._sequences[seq.seq_id]
        if self.latency is not None:
            self._record_latency(seq)
        self.pacer.finished(seq)
        seq.finish_reason = reason
        self.stats.finished[reason] += 1
        emission = seq.output.take() if reason != "cancelled" else None
        return self._output(seq, emission, finish_reason=reason)

    def _record_latency(self, seq: Sequence) -> None:
        end = time.monotonic()
        start = seq.arrival_time
        queued_until = seq.admitted_time if seq.admitted_time is not None else end
        ttft = seq.first_token_time - start if seq.first_token_time is not None else None
        self.latency.requests.append(RequestLatency(queued_until - start, ttft, end - start, seq.num_prompt_tokens,
                                                    seq.num_output_tokens))

    def _output(self, seq: Sequence, emission: Emission | None, finish_reason: str | None = None) -> RequestOutput:
        if emission is None:
            ids, prefix_length, text_length, text = [], 0, -1, ""
        else:
            ids = seq.ids[emission.prefix_offset:emission.end_offset]
            prefix_length = emission.read_offset - emission.prefix_offset
            text_length, text = emission.text_length, emission.text
        out = RequestOutput(seq.seq_id, seq.request_id, ids, prefix_length, text_length, text,
                            finish_reason is not None, finish_reason, seq.num_prompt_tokens,
                            seq.num_output_tokens)
        if seq.logprobs is None:
            return out
        log_probs: list[float] = []
        top_ids: list[list[int]] = []
        top_log_probs: list[list[float]] = []
        if emission is not None:
            for position in range(emission.read_offset, emission.end_offset):
                index = position - seq.num_prompt_tokens
                if index < 0:  # an echoed prompt token
                    log_probs.append(math.nan)
                    top_ids.append([])
                    top_log_probs.append([])
                else:
                    log_probs.append(seq.logprobs[index])
                    top_ids.append(seq.top_logprobs[index][0])
                    top_log_probs.append(seq.top_logprobs[index][1])
        return replace(out, log_probs=log_probs, top_ids=top_ids, top_log_probs=top_log_probs,
                       cum_log_prob=seq.cum_logprob)

    # -- in-process use --------------------------------------------------------------

    def generate(self, prompts: Iterable[str], params: SamplingParams) -> list[str]:
        """Run prompts to completion in one batch and return their texts (tests, benchmarks)."""
        seqs = [self.add_request(str(i), self.encode(p), params, stream=False) for i, p in enumerate(prompts)]
        texts = {s.seq_id: "" for s in seqs}
        while any(s.finish_reason is None for s in seqs):
            for out in self.step():
                if out.seq_id in texts:
                    texts[out.seq_id] += out.text
        return [texts[s.seq_id] for s in seqs]
