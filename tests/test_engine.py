"""The engine in process on the default model: batching, streaming, stops, cancellation."""

import pytest

from llmserve.engine.config import SamplingParams
from llmserve.errors import InvalidRequestError, OverloadedError

PROMPTS = ["Once upon a time", "The little dog", "One day, Lily went to the park", "Tom and his friend",
           "In the morning", "The sun was", "She looked at the", "A big red ball"]


def run(engine, request_ids_params, stream=True):
    """Add requests, step to completion; return {request_id: (pieces, final RequestOutput)}."""
    seqs = {engine.add_request(rid, engine.encode(prompt), params, stream=stream).seq_id: rid
            for rid, (prompt, params) in request_ids_params.items()}
    pieces = {rid: [] for rid in request_ids_params}
    finals = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            rid = seqs[out.seq_id]
            pieces[rid].append(out.text)
            if out.finished:
                finals[rid] = out
    return {rid: (pieces[rid], finals[rid]) for rid in request_ids_params}, steps


def test_greedy_is_identical_alone_and_in_a_batch(engine_factory):
    engine = engine_factory(max_num_seqs=16)
    params = SamplingParams(max_tokens=24)
    alone = [engine.generate([p], params)[0] for p in PROMPTS]
    assert engine.generate(PROMPTS * 2, params) == alone * 2


def test_streamed_pieces_equal_non_streamed_text_for_sampled_requests(engine_factory):
    engine = engine_factory()
    requests = {f"r{i}": (p, SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=i))
                for i, p in enumerate(PROMPTS)}
    streamed, _ = run(engine, requests, stream=True)
    whole, _ = run(engine, requests, stream=False)
    for rid in requests:
        assert "".join(streamed[rid][0]) == "".join(whole[rid][0])
        assert len(whole[rid][0]) == 1  # one output, at the end


def test_in_flight_batching_admits_new_requests_without_waiting(engine_factory):
    engine = engine_factory(max_num_seqs=4)
    long = engine.add_request("long", engine.encode("Once upon a time"), SamplingParams(max_tokens=60, min_tokens=60))
    for _ in range(5):
        engine.step()
    short = engine.add_request("short", engine.encode("The dog"), SamplingParams(max_tokens=3, min_tokens=3))
    finished_at = {}
    for step in range(1, 100):
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
        if not engine.has_unfinished():
            break
    # The short request joined at the next step and left after its 3 tokens, long before the long one.
    assert finished_at["short"] == 3
    assert finished_at["long"] == 55
    assert engine.scheduler.slots.num_free == 4
    assert long.finish_reason == "length" and short.finish_reason == "length"


def test_more_requests_than_slots_queue_and_all_finish(engine_factory):
    engine = engine_factory(max_num_seqs=2)
    requests = {f"r{i}": (p, SamplingParams(max_tokens=5)) for i, p in enumerate(PROMPTS)}
    results, _ = run(engine, requests)
    assert all(final.finish_reason in ("length", "stop") for _, final in results.values())
    assert engine.scheduler.slots.num_free == 2


def test_max_tokens_min_tokens_and_counts(engine_factory):
    engine = engine_factory()
    results, _ = run(engine, {"a": ("Once upon a time", SamplingParams(max_tokens=7, min_tokens=7))})
    pieces, final = results["a"]
    assert final.finish_reason == "length" and final.num_output_tokens == 7
    assert final.num_input_tokens == len(engine.encode("Once upon a time"))


def test_eos_stops_with_reason_stop(engine_factory):
    engine = engine_factory()
    results, _ = run(engine, {"a": ("Once upon a time", SamplingParams(max_tokens=400))})
    assert results["a"][1].finish_reason == "stop"  # the model ends its stories with EOS


def test_stop_string_cuts_output_and_ends_generation(engine_factory):
    engine = engine_factory()
    free = engine.generate(["Once upon a time"], SamplingParams(max_tokens=50))[0]
    stop = free.split()[4]
    results, _ = run(engine, {"a": ("Once upon a time", SamplingParams(max_tokens=50, stop=(stop,)))})
    pieces, final = results["a"]
    text = "".join(pieces)
    assert final.finish_reason == "stop"
    assert text == free[:free.index(stop)]
    assert final.num_output_tokens < len(engine.encode(free))


def test_abort_frees_the_slot_and_reports_cancelled(engine_factory):
    engine = engine_factory(max_num_seqs=2)
    seq = engine.add_request("x", engine.encode("Once upon a time"), SamplingParams(max_tokens=100))
    engine.step()
    out = engine.abort(seq.seq_id)
    assert out.finished and out.finish_reason == "cancelled"
    assert engine.scheduler.slots.num_free == 2 and not engine.has_unfinished()
    assert engine.abort(seq.seq_id) is None
    waiting = engine.add_request("y", engine.encode("Hi"), SamplingParams(max_tokens=5))
    assert [o.finish_reason for o in engine.abort_request("y")] == ["cancelled"]
    assert waiting.finish_reason == "cancelled"


def test_echo_prompt_prepends_the_prompt(engine_factory):
    engine = engine_factory()
    seq = engine.add_request("e", engine.encode("Once upon a time"), SamplingParams(max_tokens=5), echo_prompt=True)
    text = ""
    while engine.has_unfinished():
        text += "".join(o.text for o in engine.step())
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    assert seq.finish_reason


def test_validation_errors_name_the_problem(engine_factory):
    engine = engine_factory()
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request("a", [1] * 5000, SamplingParams(max_tokens=5))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("a", [1, 2], SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(InvalidRequestError, match="input_ids"):
        engine.add_request("a", [1, 10**9], SamplingParams(max_tokens=5))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("a", [], SamplingParams(max_tokens=5))


def test_overload_is_refused(engine_factory):
    engine = engine_factory(max_queued_requests=2)
    for i in range(2):
        engine.add_request(str(i), [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(OverloadedError, match="overloaded"):
        engine.add_request("x", [1, 2], SamplingParams(max_tokens=2))


def test_merged_outputs_decode_to_the_joined_text(engine_factory):
    from functools import reduce

    from llmserve.engine.llm_engine import merge_outputs
    from llmserve.triton.packing import decode_window

    engine = engine_factory()
    free = engine.generate(["Zürich café 🙂 Once upon a time"], SamplingParams(max_tokens=40))[0]
    stop = free.split()[5]
    engine.add_request("m", engine.encode("Zürich café 🙂 Once upon a time"),
                       SamplingParams(max_tokens=40, stop=(stop,)))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    decoder = engine.tokenizer.backend_tokenizer
    for split in range(1, len(outputs)):  # merging any prefix, and any suffix, keeps the text exact
        head, tail = reduce(merge_outputs, outputs[:split]), reduce(merge_outputs, outputs[split:])
        for merged in (head, tail):
            assert decode_window(decoder, merged.token_ids, merged.prefix_length, merged.text_length) == merged.text
    merged = reduce(merge_outputs, outputs)
    assert merged.text == "".join(o.text for o in outputs) == free[:free.index(stop)]
    assert merged.finished and merged.finish_reason == "stop"


def test_a_prefill_step_holds_due_pieces_for_at_most_one_interval(engine_factory):
    """With max_stream_responses_per_s, a running sequence's piece that falls due in a step that
    prefills a new prompt waits for the next step (merged, nothing lost), unless it is a whole
    interval late; the new prompt's first token goes out in that step."""
    from llmserve.triton.pacing import ResponseRatePacer

    clock = type("Clock", (), {"now": 100.0, "monotonic": lambda self: self.now})()
    # interval: (running sequences) seconds
    engine = engine_factory(pacer=ResponseRatePacer(1.0, clock=clock.monotonic))
    params = SamplingParams(max_tokens=40, min_tokens=40)

    def step_at(now):
        clock.now = now
        return {out.request_id: out for out in engine.step()}

    engine.add_request("a", engine.encode("Once upon a time"), params)
    assert "a" in step_at(100.0)  # first output: at once; the next one is due 1 s later
    assert step_at(100.5) == {}
    sent = step_at(101.0)["a"].num_output_tokens  # due (and no prefill): sent; next due at 102
    engine.add_request("b", engine.encode("The little dog"), params)
    held = step_at(102.5)  # a is due, but b prefills: only b's first token goes out
    assert list(held) == ["b"] and held["b"].num_output_tokens == 1
    merged = step_at(102.6)["a"]  # the next step sends a's piece: the held token and its own
    assert merged.num_output_tokens == sent + 2
    engine.add_request("c", engine.encode("One day"), params)
    late = step_at(112.0)  # a was due at 104.6: more than an interval (3 s) late, so not held
    assert set(late) == {"a", "b", "c"}


def test_prefill_groups_cut_padding_and_keep_everyone(engine_factory):
    from llmserve.engine.prefill import PREFILL_PASS_OVERHEAD_TOKENS, prefill_groups

    engine = engine_factory()
    seqs = [engine.add_request(str(n), [5] * n, SamplingParams(max_tokens=2)) for n in (3, 40, 4, 38, 3, 41, 5, 39)]
    groups = prefill_groups(seqs)
    assert sorted(s.seq_id for g in groups for s in g) == sorted(s.seq_id for s in seqs)
    assert [[len(s.pending_ids) for s in g] for g in groups] == [[3, 3, 4, 5], [38, 39, 40, 41]]
    same = [engine.add_request("x", [5] * 10, SamplingParams(max_tokens=2)) for _ in range(6)]
    assert len(prefill_groups(same)) == 1  # splitting equal lengths saves nothing
    assert PREFILL_PASS_OVERHEAD_TOKENS > 0 and prefill_groups([]) == []


def test_packed_prefill_groups_bound_each_pass(engine_factory):
    from llmserve.engine.prefill import MAX_PACKED_PREFILL_TOKENS, packed_prefill_groups

    engine = engine_factory()
    cap = MAX_PACKED_PREFILL_TOKENS
    lengths = [cap // 4, cap // 4, cap // 2, 1, cap + 10, 3, 5]
    seqs = [engine.add_request(str(n), [5] * n, SamplingParams(max_tokens=2)) for n in lengths]
    groups = packed_prefill_groups(seqs)
    assert [s for g in groups for s in g] == seqs  # everyone, in arrival order
    assert [[len(s.pending_ids) for s in g] for g in groups] == [[cap // 4, cap // 4, cap // 2], [1], [cap + 10], [3, 5]]
    assert packed_prefill_groups([]) == []


def test_packed_prefill_gives_the_same_tokens_as_one_at_a_time(engine_factory):
    engine = engine_factory()
    assert engine.runner.packs_prefill
    prompts = ["Once upon a time", "The little dog ran to the park and", "A", "Tom and Ben built a big tower"]
    params = SamplingParams(max_tokens=12, min_tokens=12)

    def generate(batch: list[str]) -> list[list[int]]:
        seqs = [engine.add_request("p", engine.encode(p), params) for p in batch]
        while engine.scheduler.num_unfinished:
            engine.step()
        return [s.output_ids for s in seqs]

    together = generate(prompts)  # one packed prefill pass
    assert together == [generate([p])[0] for p in prompts]


def test_latency_log_times_each_request_from_its_arrival(engine_factory):
    import time

    from llmserve.engine.latency import LatencyLog

    engine = engine_factory(max_num_seqs=1)
    engine.latency = LatencyLog()
    arrival = time.monotonic() - 0.5  # as if it waited half a second in a server's inbox
    first = engine.add_request("first", engine.encode("Once upon a time"), SamplingParams(max_tokens=6, min_tokens=6),
                               arrival_time=arrival)
    second_arrival = time.monotonic()
    engine.add_request("second", engine.encode("The little dog"), SamplingParams(max_tokens=4, min_tokens=4),
                       arrival_time=second_arrival)
    while engine.has_unfinished():
        engine.step()
    requests, inter_token = engine.latency.drain()
    assert engine.latency.drain() == ([], [])
    by_tokens = {r.generation_tokens: r for r in requests}
    assert sorted(by_tokens) == [4, 6]
    one, two = by_tokens[6], by_tokens[4]
    assert one.prompt_tokens == first.num_prompt_tokens
    assert 0.5 <= one.queue_time <= one.ttft <= one.e2e
    # One slot: the second request was admitted only after the first ended.
    assert two.queue_time >= (arrival + one.e2e) - second_arrival
    assert two.queue_time <= two.ttft <= two.e2e
    assert len(inter_token) == (6 - 1) + (4 - 1) and all(gap > 0 for gap in inter_token)
