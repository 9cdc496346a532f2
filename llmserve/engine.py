"""LLMEngine: one step = schedule -> run -> sample -> postprocess.

Not thread-safe: one thread owns an engine (see `engine_loop.EngineLoop`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedTokenizerBase

from llmserve.config import EngineConfig, SamplingParams
from llmserve.detokenizer import IncrementalDetokenizer, TextUnit, decode
from llmserve.errors import InvalidRequestError
from llmserve.kv_cache import SlotAllocator
from llmserve.output_buffer import Emission, OutputBuffer
from llmserve.sampler import Sampler
from llmserve.scheduler import Scheduler
from llmserve.sequence import Sequence
from llmserve.stop import StopStringMatcher
from llmserve.tokenizer import encode_prompt, encode_text, load_tokenizer


@dataclass(slots=True, frozen=True)
class RequestOutput:
    """What one sequence has to send after a step.

    The text is `token_ids` decoded past its first `prefix_length` tokens, cut to
    `text_length` chars when >= 0 (`detokenizer.decode_window`); `text` is that
    same string, for in-process callers.
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


def merge_outputs(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """One output carrying both: consecutive outputs of a sequence have contiguous decode windows
    (the second's context tokens are the first's new tokens), so their windows join into one."""
    if not first.token_ids:
        return second
    if not second.token_ids:
        return replace(second, token_ids=first.token_ids, prefix_length=first.prefix_length,
                       text_length=first.text_length, text=first.text)
    text_length = -1 if second.text_length < 0 else len(first.text) + second.text_length
    return replace(second, token_ids=first.token_ids + second.token_ids[second.prefix_length:],
                   prefix_length=first.prefix_length, text_length=text_length, text=first.text + second.text)


# What one more forward pass costs, in padded token positions: a prefill group is split off
# only when it saves more padding than this.
PREFILL_PASS_OVERHEAD_TOKENS = 32


# Prefill passes of at least this many tokens use `prefill_num_threads`: a burst's big pass gains from
# more cores, while a lone short prompt would only pay for waking them.
PARALLEL_PREFILL_MIN_TOKENS = 64

# Prompts packed into one pass, at most this many tokens: the first tokens of a big step's early
# prompts go out after their own pass, and a pass's padded attention (B x longest^2) stays small.
MAX_PACKED_PREFILL_TOKENS = 512


def packed_prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Prompts for a runner that packs them (`packs_prefill`): consecutive runs of at most
    MAX_PACKED_PREFILL_TOKENS tokens (a longer prompt goes alone)."""
    groups: list[list[Sequence]] = []
    tokens = MAX_PACKED_PREFILL_TOKENS
    for seq in seqs:
        n = len(seq.pending_ids)
        if tokens + n > MAX_PACKED_PREFILL_TOKENS:
            groups.append([])
            tokens = 0
        groups[-1].append(seq)
        tokens += n
    return groups


def prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Prompts padded into as few forward passes as pay off: sorted by length, split where the
    padding saved beats a pass's overhead (an exact partition by dynamic programming)."""
    if len(seqs) <= 1:
        return [seqs] if seqs else []
    ordered = sorted(seqs, key=lambda s: len(s.pending_ids))
    lengths = [len(s.pending_ids) for s in ordered]
    # best[j]: cheapest cost of the first j prompts; a group ordered[i:j] costs (j - i) * lengths[j - 1].
    best, cut = [0.0] + [float("inf")] * len(ordered), [0] * (len(ordered) + 1)
    for j in range(1, len(ordered) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[j - 1] + PREFILL_PASS_OVERHEAD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(ordered)
    while j:
        groups.append(ordered[cut[j]:j])
        j = cut[j]
    return groups[::-1]


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    prefix_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    generated_tokens: int = 0
    finished: Counter = field(default_factory=Counter)  # by finish reason


class LLMEngine:
    def __init__(self, config: EngineConfig, *, runner=None,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.config = config
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
        self._sequences: dict[int, Sequence] = {}
        self._now = 0.0  # this step's clock and streaming interval (max_stream_responses_per_s)
        self._send_interval = 0.0
        self._hold = 0.0  # how much later than due a piece may go out this step

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
                    stream: bool = True, echo_prompt: bool = False) -> Sequence:
        self.validate(prompt_ids, params)
        bad_word_ids = [ids for ids in (encode_text(self.tokenizer, w) for w in params.bad_words) if ids]
        stop_ids = frozenset([params.end_id]) if params.end_id is not None else self.eos_ids
        seq = Sequence(request_id, prompt_ids, params, stream=stream, stop_ids=stop_ids,
                       bad_word_ids=bad_word_ids)
        seq.detokenizer = IncrementalDetokenizer(self._decoder, seq.ids, len(prompt_ids))
        seq.output = OutputBuffer(StopStringMatcher(params.stop) if params.stop else None)
        if echo_prompt:
            seq.output.add(TextUnit(0, 0, len(prompt_ids), decode(self._decoder, prompt_ids)), check_stop=False)
        self.scheduler.add(seq)
        self._sequences[seq.seq_id] = seq
        self.stats.prompt_tokens += len(prompt_ids)
        return seq

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

    # -- the step ----------------------------------------------------------------

    @torch.inference_mode()
    def step(self, emit: Callable[[list[RequestOutput]], None] | None = None) -> list[RequestOutput]:
        """Run one step. With `emit`, each forward pass's outputs go out as soon as it is done (new
        requests' first tokens do not wait for the decode pass) and the step returns []."""
        batch = self.scheduler.schedule()
        limit = self.config.max_stream_responses_per_s
        self._send_interval = len(self.scheduler.running) / limit if limit else 0.0
        # A step that prefills new prompts holds the running sequences' due pieces (for at most one
        # more interval; they merge into the next output): its first tokens then do not queue behind
        # them in the sender, the postprocessing model and the client.
        self._hold = self._send_interval if batch.prefill else 0.0
        self._now = time.monotonic()
        outputs: list[RequestOutput] = []
        for source, destination, length in batch.copies:
            self.runner.copy_prefix(source, destination, length)
        # Prompts cached but for their last token join the decode pass; other cached prefixes leave
        # ragged rests, padded and grouped by length; fresh prompts are packed when the runner can.
        fresh, rests, joining = [], [], []
        for seq in batch.prefill:
            uncached = len(seq.ids) - seq.num_cached
            (fresh if not seq.num_cached else joining if uncached == 1 else rests).append(seq)
        decode = sorted(batch.decode + joining, key=lambda s: s.slot) if joining else batch.decode
        grouping = packed_prefill_groups if self.runner.packs_prefill else prefill_groups
        groups = [(g, self._prefill_threads if sum(len(s.pending_ids) for s in g) >= PARALLEL_PREFILL_MIN_TOKENS
                   else self._decode_threads) for g in grouping(fresh) + prefill_groups(rests)]
        if decode:
            groups.append((decode, self._decode_threads))
        for group, threads in groups:
            torch.set_num_threads(threads)
            logits = self.runner.forward([s.slot for s in group], [s.pending_ids for s in group],
                                         [s.num_cached for s in group])
            tokens = self.sampler(logits, group)
            group_outputs = []
            for seq, token in zip(group, tokens):
                if seq.num_cached < seq.num_prompt_tokens:
                    self.stats.prefix_cached_tokens += seq.num_prefix_cached
                    self.scheduler.prompt_computed(seq)
                seq.num_cached = len(seq.ids)
                out = self._postprocess(seq, token)
                if out is not None:
                    group_outputs.append(out)
            if emit is not None:
                emit(group_outputs)
            else:
                outputs.extend(group_outputs)
        if batch:
            self.stats.steps += 1
        return outputs

    def _postprocess(self, seq: Sequence, token: int) -> RequestOutput | None:
        params = seq.params
        if token in seq.stop_ids:  # the sampler bans these before min_tokens
            return self._finish(seq, "stop")
        seq.append(token)
        self.stats.generated_tokens += 1
        unit = seq.detokenizer.step()
        if unit is not None and seq.output.add(unit, check_stop=seq.num_output_tokens >= params.min_tokens):
            return self._finish(seq, "stop", stop_matched=True)
        if seq.num_output_tokens >= params.max_tokens:
            return self._finish(seq, "length")
        if seq.stream and self._now >= seq.next_send_time + self._hold:
            emission = seq.output.take()
            if emission is not None:
                seq.next_send_time = self._now + self._send_interval
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
        seq.finish_reason = reason
        self.stats.finished[reason] += 1
        emission = seq.output.take() if reason != "cancelled" else None
        return self._output(seq, emission, finish_reason=reason)

    def _output(self, seq: Sequence, emission: Emission | None, finish_reason: str | None = None) -> RequestOutput:
        if emission is None:
            ids, prefix_length, text_length, text = [], 0, -1, ""
        else:
            ids = seq.ids[emission.prefix_offset:emission.end_offset]
            prefix_length = emission.read_offset - emission.prefix_offset
            text_length, text = emission.text_length, emission.text
        return RequestOutput(seq.seq_id, seq.request_id, ids, prefix_length, text_length, text,
                             finish_reason is not None, finish_reason, seq.num_prompt_tokens,
                             seq.num_output_tokens)

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
