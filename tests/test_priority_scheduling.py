"""Priority scheduling in the engine, on the default model: the waiting queue's order, preemption
of the worst running sequence for a better-priority request, and that a preempted request resumes
to exactly the output it would have had (tokens, text, log probabilities, its one final output)."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest

from llmserve.engine.config import SamplingParams
from llmserve.engine.sequence import SequenceStatus
from llmserve.errors import InvalidRequestError
from llmserve.triton.parsing import parse_generation

# Longer than one 16-token block of the prefix cache, so a resumed sequence can start from it.
BASE = ("Once upon a time there was a little girl named Lily. She loved to play in the park with her "
        "friends, and every day she")
LONG = SamplingParams(max_tokens=24, min_tokens=24, priority=1)


def _engine(engine_factory, onnx_compiled_dir=None, runtime="torch", **overrides):
    extra = {"compiled_dir": str(onnx_compiled_dir)} if runtime == "onnxruntime" else {}
    return engine_factory(runtime=runtime, num_threads=1, **extra, **overrides)


def _drain(engine, outputs: dict[str, list]) -> None:
    for out in engine.step():
        outputs.setdefault(out.request_id, []).append(out)


def _run(engine, prompt: str, params: SamplingParams, *, preempt_at=(), high_prompt: str = BASE):
    """The request `victim` alone on the engine; a priority-0 request `high<i>` (3 tokens) arrives
    after each step number in `preempt_at`. Returns (victim's Sequence, {request_id: outputs},
    the victim's outputs counted while it was preempted)."""
    victim = engine.add_request("victim", engine.encode(prompt), params)
    outputs: dict[str, list] = {}
    while_waiting = 0
    step = 0
    while engine.has_unfinished():
        if step in preempt_at:
            engine.add_request(f"high{step}", engine.encode(high_prompt),
                               SamplingParams(max_tokens=3, min_tokens=3, priority=0))
        before = len(outputs.get("victim", []))
        _drain(engine, outputs)
        if victim.status is SequenceStatus.WAITING and victim.num_preemptions:
            while_waiting += len(outputs.get("victim", [])) - before
        step += 1
    return victim, outputs, while_waiting


# -- the queue ----------------------------------------------------------------------------------

def test_waiting_queue_serves_lower_priority_first_then_arrival(engine_factory):
    engine = _engine(engine_factory, max_num_seqs=2)
    order = [("a", 1), ("b", 0), ("c", 2), ("d", 0), ("e", 1), ("f", -5)]
    for rid, priority in order:
        engine.add_request(rid, engine.encode("The little dog"), SamplingParams(max_tokens=2, min_tokens=2, priority=priority))
    assert [s.request_id for s in engine.scheduler.waiting] == ["f", "b", "d", "a", "e", "c"]
    admitted = []
    while engine.has_unfinished():
        before = [s.request_id for s in engine.scheduler.waiting]
        engine.step()
        after = {s.request_id for s in engine.scheduler.waiting}
        admitted += [rid for rid in before if rid not in after]
    assert admitted == ["f", "b", "d", "a", "e", "c"]
    assert engine.stats.preemptions == 0  # equal or worse priorities never preempt


def test_finish_and_check_queue_still_work_on_the_ordered_queue(engine_factory):
    engine = _engine(engine_factory, max_num_seqs=1, max_queued_requests=3)
    seqs = [engine.add_request(str(i), engine.encode("Hi"), SamplingParams(max_tokens=2, min_tokens=2, priority=p))
            for i, p in enumerate([3, 1, 2])]
    engine.abort(seqs[1].seq_id)  # a waiting sequence leaves the queue
    assert [s.request_id for s in engine.scheduler.waiting] == ["2", "0"]
    engine.scheduler.check_queue()
    engine.scheduler.check_queue(extra_waiting=0)


# -- preemption -----------------------------------------------------------------------------------

def test_a_better_priority_request_preempts_the_worst_running_one(engine_factory):
    engine = _engine(engine_factory, max_num_seqs=3)
    released = []
    release = engine.runner.release
    engine.runner.release = lambda slot: (released.append(slot), release(slot))
    running = [engine.add_request(f"low{i}", engine.encode(p), replace(LONG, priority=2 if i == 0 else 1))
               for i, p in enumerate(["Once upon a time", "The little dog", "Tom and his friend"])]
    for _ in range(3):
        engine.step()
    assert engine.scheduler.slots.num_free == 0
    # The worst running sequence's priority (2): it waits, preempts nothing.
    same = engine.add_request("same", engine.encode("The sun was"), replace(LONG, priority=2))
    engine.step()
    assert same.status is SequenceStatus.WAITING and engine.stats.preemptions == 0
    # Priority 0 preempts the worst running one, the priority-2 sequence, and runs at the next step.
    high = engine.add_request("high", engine.encode("A big red ball"), SamplingParams(max_tokens=4, min_tokens=4, priority=0))
    worst, slot = running[0], running[0].slot
    generated = list(worst.ids)
    engine.step()
    assert high.status is SequenceStatus.RUNNING and high.slot == slot and high.num_output_tokens == 1
    assert worst.status is SequenceStatus.WAITING and worst.slot is None and worst.num_cached == 0
    assert worst.ids == generated and worst.num_output_tokens == 4  # its tokens are kept
    assert released == [slot]
    assert engine.stats.preemptions == 1 == engine.snapshot().preemptions
    # A preempted sequence keeps its arrival: ahead of later arrivals of its priority.
    assert [s.request_id for s in engine.scheduler.waiting] == ["low0", "same"]
    # Among equal priorities the latest arrival is the worst.
    top = engine.add_request("top", engine.encode("In the morning"), SamplingParams(max_tokens=2, min_tokens=2, priority=-1))
    second_slot = running[2].slot
    engine.step()
    assert top.status is SequenceStatus.RUNNING
    assert running[2].status is SequenceStatus.WAITING and running[1].status is SequenceStatus.RUNNING
    assert engine.stats.preemptions == 2 and released == [slot, second_slot]
    assert [s.request_id for s in engine.scheduler.waiting] == ["low2", "low0", "same"]
    while engine.has_unfinished():
        engine.step()
    assert all(s.finish_reason == "length" and s.num_output_tokens == LONG.max_tokens for s in running)
    assert engine.scheduler.slots.num_free == 3


def test_several_preemptions_in_one_step(engine_factory):
    engine = _engine(engine_factory, max_num_seqs=2)
    lows = [engine.add_request(f"low{i}", engine.encode(p), LONG) for i, p in enumerate(["Hi", "Tom had"])]
    engine.step()
    highs = [engine.add_request(f"high{i}", engine.encode("The bird flew"), SamplingParams(max_tokens=3, min_tokens=3, priority=0))
             for i in range(2)]
    engine.step()
    assert all(h.status is SequenceStatus.RUNNING for h in highs)
    assert all(s.status is SequenceStatus.WAITING for s in lows) and engine.stats.preemptions == 2
    assert [s.request_id for s in engine.scheduler.waiting] == ["low0", "low1"]


CASES = {
    "greedy": LONG,
    "logprobs": replace(LONG, logprobs=True, top_logprobs=3),
    "penalties": replace(LONG, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
    "seeded": replace(LONG, temperature=0.9, top_p=0.9, seed=7),
}


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_preempted_request_gives_the_output_of_an_unpreempted_run(engine_factory, case, prefix_caching):
    params = CASES[case]
    plain, plain_outputs, _ = _run(_engine(engine_factory, max_num_seqs=1, enable_prefix_caching=prefix_caching),
                                   BASE, params)
    engine = _engine(engine_factory, max_num_seqs=1, enable_prefix_caching=prefix_caching)
    preempted, outputs, while_waiting = _run(engine, BASE, params, preempt_at=(3, 12))
    assert engine.stats.preemptions == 2 and preempted.num_preemptions == 2
    assert preempted.output_ids == plain.output_ids
    if params.logprobs:
        assert np.allclose(preempted.logprobs, plain.logprobs, atol=1e-3)
        assert [ids for ids, _ in preempted.top_logprobs] == [ids for ids, _ in plain.top_logprobs]
        assert math.isclose(preempted.cum_logprob, plain.cum_logprob, abs_tol=1e-2)
    # The stream paused while it waited, then carried on: its text, one final output.
    assert while_waiting == 0
    finals = [out for out in outputs["victim"] if out.finished]
    assert len(finals) == 1 and outputs["victim"][-1].finished
    assert finals[0].num_output_tokens == params.max_tokens and finals[0].finish_reason == "length"
    assert "".join(o.text for o in outputs["victim"]) == "".join(o.text for o in plain_outputs["victim"])
    if params.logprobs:
        streamed = [lp for o in outputs["victim"] for lp in o.log_probs]
        assert np.allclose(streamed, preempted.logprobs)
    if prefix_caching:
        # The high-priority prompts (BASE, all but its last token) came from the cache; the resumed
        # sequence's own prefix hits are not counted again as prompt tokens served by it.
        base = len(engine.encode(BASE))
        assert engine.stats.prefix_cached_tokens == 2 * (base - 1)


def test_a_resumed_sequence_restarts_from_its_own_cached_prompt(engine_factory):
    engine = _engine(engine_factory, max_num_seqs=1)
    forwards = []
    forward = engine.runner.forward
    engine.runner.forward = lambda slots, ids, starts: (forwards.append((list(starts), [len(t) for t in ids])),
                                                         forward(slots, ids, starts))[1]
    victim, _, _ = _run(engine, BASE, LONG, preempt_at=(3,))
    # The resume: a pass from position 16 (the prompt's first block, left in the slot) over the rest
    # of the prompt and the 3 tokens generated before the preemption.
    base = len(engine.encode(BASE))
    assert ([16], [base - 16 + 3]) in forwards
    assert victim.num_output_tokens == LONG.max_tokens


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preemption_on_the_onnxruntime_runner(engine_factory, onnx_compiled_dir, prefix_caching):
    """The server's default runner keeps decode K/V in a live batch: a preempted slot leaves it."""
    params = CASES["logprobs"]
    make = dict(runtime="onnxruntime", onnx_compiled_dir=onnx_compiled_dir, max_num_seqs=2,
                enable_prefix_caching=prefix_caching)
    plain, _, _ = _run(_engine(engine_factory, **make), BASE, params)
    engine = _engine(engine_factory, **make)
    other = engine.add_request("other", engine.encode("Tom had a dog"), replace(LONG, priority=1))
    preempted, outputs, _ = _run(engine, BASE, params, preempt_at=(2, 9))
    assert engine.stats.preemptions == 2 and preempted.num_preemptions == 2 and not other.num_preemptions
    assert preempted.output_ids == plain.output_ids
    assert np.allclose(preempted.logprobs, plain.logprobs, atol=1e-3)
    assert other.output_ids == _run(_engine(engine_factory, **make), "Tom had a dog", LONG)[0].output_ids


def test_prefill_budget_counts_the_tokens_to_compute(engine_factory):
    """A resumed sequence's prefill is its prompt + output so far: the step's token budget counts
    them (the first prefill always goes, the next waits for the next step)."""
    engine = _engine(engine_factory, max_num_seqs=2, max_num_batched_tokens=20, enable_prefix_caching=False)
    lows = [engine.add_request(f"low{i}", engine.encode(p), SamplingParams(max_tokens=60, min_tokens=60, priority=1))
            for i, p in enumerate(["Hi", "Tom had"])]
    for _ in range(25):
        engine.step()
    for i in range(2):
        engine.add_request(f"high{i}", engine.encode("Hi"), SamplingParams(max_tokens=2, min_tokens=2, priority=0))
    engine.step()
    assert all(s.status is SequenceStatus.WAITING for s in lows)
    assert all(s.num_uncached > 20 for s in lows)
    while all(s.status is SequenceStatus.WAITING for s in lows):
        engine.step()
    assert [s.status for s in lows] == [SequenceStatus.RUNNING, SequenceStatus.WAITING]
    engine.step()
    assert lows[1].status is SequenceStatus.RUNNING
    while engine.has_unfinished():
        engine.step()
    assert [s.num_output_tokens for s in lows] == [60, 60]


# -- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("priority", [2**31, -2**31 - 1, 1.5, "1", True, None])
def test_invalid_priority_is_an_invalid_request_naming_it(priority):
    with pytest.raises(InvalidRequestError, match="priority"):
        SamplingParams(max_tokens=4, min_tokens=4, priority=priority)


def test_priority_parses_from_the_request_tensor():
    inputs = {"max_tokens": np.array([[4]], dtype=np.int32), "priority": np.array([[-3]], dtype=np.int32)}
    params, _, _ = parse_generation(inputs)
    assert params.priority == -3 and type(params.priority) is int
    assert parse_generation({"max_tokens": np.array([[4]], dtype=np.int32)})[0].priority == 0
    assert SamplingParams(max_tokens=4, min_tokens=4, priority=2**31 - 1).priority == 2**31 - 1


def test_a_full_queue_takes_a_better_priority_request_in_place_of_the_worst_queued_one(engine_factory):
    """max_queued_requests holds requests never admitted: preempted ones do not count, and a newcomer
    of better priority pushes the worst queued one out (refused as overloaded) instead of being refused."""
    from llmserve.errors import OverloadedError

    engine = _engine(engine_factory, max_num_seqs=1, max_queued_requests=2)
    running = engine.add_request("running", engine.encode("Once upon a time"), replace(LONG, priority=5))
    engine.step()
    queued = [engine.add_request(f"q{i}", engine.encode("The little dog"), replace(LONG, priority=p))
              for i, p in enumerate((3, 4))]
    refused_before = engine.snapshot().refused
    with pytest.raises(OverloadedError, match="max_queued_requests=2"):  # not better than the worst queued (4)
        engine.add_request("same", engine.encode("Hi"), replace(LONG, priority=4))
    urgent = engine.add_request("urgent", engine.encode("Hi"), replace(LONG, priority=0))
    assert engine.take_evicted() == [queued[1]] and queued[1].status is SequenceStatus.FINISHED
    assert [s.request_id for s in engine.scheduler.waiting] == ["urgent", "q0"]
    assert engine.snapshot().refused == refused_before + 2
    engine.step()  # urgent preempts the running one, which waits again without counting as queued
    assert urgent.status is SequenceStatus.RUNNING and running.status is SequenceStatus.WAITING
    engine.add_request("q2", engine.encode("The sun"), replace(LONG, priority=4))  # room: 1 queued + 1 preempted
    while engine.has_unfinished():
        engine.step()
    assert running.num_output_tokens == LONG.max_tokens


def test_the_loop_refuses_the_evicted_request_as_overloaded(engine_factory):
    import queue as queue_module

    from llmserve.engine.loop import EngineLoop
    from llmserve.errors import OverloadedError

    engine = _engine(engine_factory, max_num_seqs=1, max_queued_requests=1)
    outputs: dict[str, queue_module.Queue] = {name: queue_module.Queue() for name in ("running", "low", "high")}
    loop = EngineLoop(engine, send=lambda h, out: outputs[h].put(out), fail=lambda h, exc: outputs[h].put(exc))
    loop.start()
    try:
        long = SamplingParams(max_tokens=200, min_tokens=200, priority=1)
        loop.submit("running", "running", engine.encode("Once upon a time"), long)
        assert not isinstance(outputs["running"].get(timeout=30), Exception)  # it runs
        loop.submit("low", "low", engine.encode("The dog"), long)
        deadline = time.monotonic() + 30  # queued (a request still in the loop's inbox has no place to give)
        while engine.num_waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        loop.submit("high", "high", engine.encode("The cat"), replace(long, priority=0, max_tokens=2, min_tokens=2))
        refused = outputs["low"].get(timeout=30)
        assert isinstance(refused, OverloadedError) and "better priority" in str(refused)
        while not isinstance(out := outputs["high"].get(timeout=30), Exception) and not out.finished:
            pass
        assert out.finished and out.num_output_tokens == 2
    finally:
        loop.shutdown()
