"""The engine thread: submit from other threads, one send callback, cancellation, shutdown."""

import queue
import threading
import time

import pytest

from llmserve.engine.config import SamplingParams
from llmserve.engine.loop import EngineLoop
from llmserve.errors import InvalidRequestError


class Handle:
    """Stands in for a Triton response sender: records outputs, can be cancelled."""

    def __init__(self):
        self.outputs = queue.Queue()
        self.cancelled = threading.Event()


@pytest.fixture
def loop(engine_factory):
    errors = []
    loop = EngineLoop(engine_factory(max_num_seqs=4), send=lambda h, out: h.outputs.put(out),
                      fail=lambda h, exc: errors.append((h, exc)) or h.outputs.put(exc),
                      is_cancelled=lambda h: h.cancelled.is_set(), cancel_check_interval=0.01)
    loop.start()
    yield loop
    loop.shutdown()


def collect(handle, timeout=30):
    outputs = []
    while True:
        out = handle.outputs.get(timeout=timeout)
        outputs.append(out)
        if isinstance(out, Exception) or out.finished:
            return outputs


def test_concurrent_submissions_all_finish(loop):
    engine = loop.engine
    handles = [Handle() for _ in range(10)]

    def submit(i):
        loop.submit(handles[i], f"r{i}", engine.encode(f"Story {i}: once"), SamplingParams(max_tokens=8))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for handle in handles:
        outputs = collect(handle)
        assert outputs[-1].finish_reason in ("length", "stop")
        assert sum(o.finished for o in outputs) == 1  # exactly one final output


def test_invalid_request_is_refused_in_the_callers_thread(loop):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        loop.submit(Handle(), "bad", [1, 2, 3], SamplingParams(max_tokens=10**6))


def test_cancelled_handle_is_aborted_with_a_final_output(loop):
    handle = Handle()
    loop.submit(handle, "c", loop.engine.encode("Once upon a time"),
                SamplingParams(max_tokens=900, min_tokens=900))
    handle.outputs.get(timeout=30)
    handle.cancelled.set()
    outputs = collect(handle)
    assert outputs[-1].finish_reason == "cancelled"
    assert outputs[-1].num_output_tokens < 900


def test_abort_by_request_id(loop):
    handle = Handle()
    loop.submit(handle, "stop-me", loop.engine.encode("Once upon a time"),
                SamplingParams(max_tokens=900, min_tokens=900))
    handle.outputs.get(timeout=30)
    loop.abort_request("stop-me")
    assert collect(handle)[-1].finish_reason == "cancelled"


def test_shutdown_ends_open_requests(engine_factory):
    handle = Handle()
    loop = EngineLoop(engine_factory(), send=lambda h, out: h.outputs.put(out), fail=lambda h, e: None)
    loop.start()
    loop.submit(handle, "x", loop.engine.encode("Once"), SamplingParams(max_tokens=900, min_tokens=900))
    handle.outputs.get(timeout=30)
    loop.shutdown()
    assert collect(handle)[-1].finish_reason == "cancelled"


def test_a_failing_send_does_not_stop_the_loop(engine_factory):
    class Broken(Handle):
        pass

    def send(handle, out):
        if isinstance(handle, Broken):
            raise ConnectionError("client went away")
        handle.outputs.put(out)

    loop = EngineLoop(engine_factory(), send=send, fail=lambda h, e: None)
    loop.start()
    try:
        loop.submit(Broken(), "gone", loop.engine.encode("Once"), SamplingParams(max_tokens=50))
        ok = Handle()
        loop.submit(ok, "ok", loop.engine.encode("Once"), SamplingParams(max_tokens=5))
        assert collect(ok)[-1].finish_reason in ("length", "stop")
        # The failed send aborts "gone" through the inbox: at the latest a step after the sender
        # got to it, which under load can be after "ok" ended.
        deadline = time.monotonic() + 5
        while loop.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not loop.engine.has_unfinished()
    finally:
        loop.shutdown()


def test_slow_sending_merges_outputs_without_losing_text(engine_factory):
    import time

    engine = engine_factory()
    expected = engine.generate(["Once upon a time"], SamplingParams(max_tokens=60, min_tokens=60))[0]

    def slow_send(handle, out):
        time.sleep(0.01)  # slower than a step: outputs pile up and merge
        handle.outputs.put(out)

    loop = EngineLoop(engine, send=slow_send, fail=lambda h, e: None)
    loop.start()
    try:
        handle = Handle()
        loop.submit(handle, "slow", engine.encode("Once upon a time"), SamplingParams(max_tokens=60, min_tokens=60))
        outputs = collect(handle)
    finally:
        loop.shutdown()
    assert "".join(o.text for o in outputs) == expected
    assert len(outputs) < 30  # 60 tokens, far fewer responses
    assert outputs[-1].num_output_tokens == 60


def test_generation_does_not_wait_for_cancellation_checks(engine_factory):
    """In Triton each is_cancelled() is an IPC; a stuck one must not stall the engine's steps."""
    gate, asked = threading.Event(), threading.Event()

    def is_cancelled(handle):
        asked.set()
        gate.wait(timeout=60)
        return False

    loop = EngineLoop(engine_factory(), send=lambda h, out: h.outputs.put(out), fail=lambda h, e: None,
                      is_cancelled=is_cancelled, cancel_check_interval=0.001)
    loop.start()
    try:
        handles = [Handle() for _ in range(3)]
        for i, handle in enumerate(handles):
            loop.submit(handle, f"r{i}", loop.engine.encode("Once upon"), SamplingParams(max_tokens=40, min_tokens=40))
        assert asked.wait(timeout=30)  # the check is under way, and blocked
        # The engine generates every token meanwhile (sending a final response does wait for a check
        # under way: see the next test).
        deadline = time.monotonic() + 30
        while loop.engine.stats.generated_tokens < 3 * 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.engine.stats.generated_tokens == 3 * 40
        assert not gate.is_set()
        gate.set()
        for handle in handles:
            assert collect(handle)[-1].num_output_tokens == 40
    finally:
        gate.set()
        loop.shutdown()


def test_no_cancellation_check_after_a_final_response(engine_factory):
    """Asking a Triton response sender after its final response crashes tritonserver (its response
    factory is freed), so the watcher must never ask a request that has ended."""
    late_checks = []

    def send(handle, out):
        handle.ended = handle.ended or out.finished
        handle.outputs.put(out)

    def is_cancelled(handle):
        ended = handle.ended
        time.sleep(0.0002)  # an IPC's time, during which the request may end
        if ended or handle.ended:
            late_checks.append(handle)
        return False

    loop = EngineLoop(engine_factory(max_num_seqs=16), send=send, fail=lambda h, e: None,
                      is_cancelled=is_cancelled, cancel_check_interval=0.0001)
    loop.start()
    try:
        for wave in range(5):
            handles = [Handle() for _ in range(16)]
            for i, handle in enumerate(handles):
                handle.ended = False
                loop.submit(handle, f"w{wave}-{i}", loop.engine.encode("Once"), SamplingParams(max_tokens=1 + i % 4))
            for handle in handles:
                collect(handle)
    finally:
        loop.shutdown()
    assert not late_checks, f"{len(late_checks)} cancellation checks after a final response"


def test_requests_stopped_by_their_caller_are_never_asked_about_cancellation(engine_factory):
    """The ensemble's `llm` requests say `poll_cancellation=false` (postprocessing stops them): each
    ask is an IPC on the server, so the watcher must skip them, and still watch the others."""
    asked = []
    loop = EngineLoop(engine_factory(), send=lambda h, out: h.outputs.put(out), fail=lambda h, e: None,
                      is_cancelled=lambda h: asked.append(h) or h.cancelled.is_set(), cancel_check_interval=0.001)
    loop.start()
    try:
        unwatched, watched = Handle(), Handle()
        params = SamplingParams(max_tokens=900, min_tokens=900)
        loop.submit(unwatched, "u", loop.engine.encode("Once"), params, poll_cancellation=False)
        loop.submit(watched, "w", loop.engine.encode("Once"), params)
        unwatched.outputs.get(timeout=30)
        watched.cancelled.set()
        assert collect(watched)[-1].finish_reason == "cancelled"
        unwatched.cancelled.set()  # Triton would not report it; its caller stops it instead
        loop.abort_request("u")
        assert collect(unwatched)[-1].finish_reason == "cancelled"
    finally:
        loop.shutdown()
    assert watched in asked and unwatched not in asked


def test_outbox_sends_first_outputs_then_finals_then_the_rest():
    from llmserve.engine.llm_engine import RequestOutput
    from llmserve.engine.loop import _Outbox

    def output(seq_id, finished=False):
        return RequestOutput(seq_id, str(seq_id), [1], 0, -1, "x", finished, "length" if finished else None, 1, 1)

    def take_all():
        order = []
        while outbox._pending:
            order.append(outbox.take()[0])
        return order

    outbox = _Outbox()
    for seq_id in (1, 2, 3):
        outbox.put(seq_id, "h", output(seq_id))
    assert take_all() == [1, 2, 3]  # all first outputs: arrival order
    outbox.put(1, "h", output(1))  # a later piece
    outbox.put(2, "h", output(2, finished=True))  # a final one
    outbox.put(4, "h", output(4))  # a new sequence's first output
    outbox.put(3, "h", RuntimeError("failed"))  # an error ends its request too
    assert take_all() == [4, 2, 3, 1]
    outbox.put(2, "h", output(2))  # seq id 2 again: ended before, so this is a first output
    outbox.put(1, "h", output(1))
    assert take_all() == [2, 1]
    # An urgent output that arrives while others wait goes out before them.
    for seq_id in (1, 2):
        outbox.put(seq_id, "h", output(seq_id))
    assert outbox.take()[0] == 1
    outbox.put(5, "h", output(5))
    assert take_all() == [5, 2]


def test_a_failing_after_step_does_not_stop_the_loop(engine_factory):
    calls = []

    def after_step(engine):
        calls.append(engine.num_running)
        raise RuntimeError("metrics exporter broke")

    loop = EngineLoop(engine_factory(), send=lambda h, out: h.outputs.put(out), fail=lambda h, e: None,
                      after_step=after_step)
    loop.start()
    try:
        for i in range(2):  # the loop goes on serving after the first failure
            handle = Handle()
            loop.submit(handle, f"r{i}", loop.engine.encode("Once"), SamplingParams(max_tokens=6, min_tokens=6))
            assert collect(handle)[-1].num_output_tokens == 6
        assert len(calls) >= 12
    finally:
        loop.shutdown()
