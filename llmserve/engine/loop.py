"""The engine on its own thread, fed by a server's request threads.

`submit` validates in the caller's thread (so a bad request is answered at
once) and queues; the loop thread admits queued requests before each step. A
sender thread delivers every output through one `send` callback, so sending
(an IPC per response in Triton) overlaps the next forward pass; when it falls
behind, a sequence's new output merges into the one still waiting, and the
server sends fewer, larger responses exactly when it is CPU-bound. Requests are
handled by an opaque handle (a Triton response sender, a queue in tests). Every
request ends with a final output, cancelled and failed ones too.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmserve.engine.config import SamplingParams
from llmserve.engine.llm_engine import LLMEngine, RequestOutput, merge_outputs
from llmserve.errors import OverloadedError

log = logging.getLogger(__name__)

Handle = Any


@dataclass(slots=True, frozen=True, kw_only=True)
class _Add:
    handle: Handle
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    echo_prompt: bool
    poll_cancellation: bool
    arrival_time: float  # time.monotonic() at submit: queue time starts here


@dataclass(slots=True, frozen=True)
class _Abort:
    request_id: str | None = None
    seq_id: int | None = None


def _ends_request(item: RequestOutput | Exception) -> bool:
    return isinstance(item, Exception) or item.finished


class _Outbox:
    """Outputs waiting for the sender thread, at most one entry per sequence. Taken one at a time
    in order of urgency: a sequence's first output (its time to first token), then final ones
    (each frees a client for its next request), then the rest, each group in arrival order. One at
    a time, so an urgent output that arrives while others wait goes out next, not after them."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[Handle, RequestOutput | Exception]] = {}  # in arrival order
        self._started: set[int] = set()  # sequences with an output taken, until their last
        self._ready = threading.Condition()
        self._closed = False

    def put(self, seq_id: int, handle: Handle, item: RequestOutput | Exception) -> None:
        with self._ready:
            queued = self._pending.get(seq_id)  # a merged output keeps its place: it waited longest
            if queued is not None and isinstance(item, RequestOutput) and isinstance(queued[1], RequestOutput):
                item = merge_outputs(queued[1], item)
            self._pending[seq_id] = (handle, item)  # an error replaces what was waiting: the request failed
            self._ready.notify()

    def take(self) -> tuple[int, Handle, RequestOutput | Exception] | None:
        """The most urgent output waiting as (seq_id, handle, item), or None once closed and drained."""
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if not self._pending:
                return None
            seq_id = min(self._pending, key=self._urgency)  # the first of the most urgent
            handle, item = self._pending.pop(seq_id)
            if _ends_request(item):
                self._started.discard(seq_id)
            else:
                self._started.add(seq_id)
            return seq_id, handle, item

    def _urgency(self, seq_id: int) -> int:
        if seq_id not in self._started:
            return 0
        return 1 if _ends_request(self._pending[seq_id][1]) else 2

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()


class EngineLoop:
    def __init__(self, engine: LLMEngine, send: Callable[[Handle, RequestOutput], None],
                 fail: Callable[[Handle, Exception], None], *,
                 is_cancelled: Callable[[Handle], bool] | None = None,
                 cancel_check_interval: float = 0.05,
                 after_step: Callable[[LLMEngine], None] | None = None) -> None:
        self.engine = engine
        self._send = send
        self._fail = fail
        self._is_cancelled = is_cancelled
        self._cancel_check_interval = cancel_check_interval
        self._after_step = after_step
        self._after_step_failed = False
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._handles: dict[int, Handle] = {}  # seq_id -> handle, owned by the loop thread
        self._stopping = False
        self._outbox = _Outbox()
        self._closing = threading.Event()
        # Handles the cancellation watcher may ask, until their final response goes out: asking a
        # Triton response sender after its final response crashes tritonserver (the factory is freed).
        # The lock pairs one check (an IPC, ~0.1 ms) with the sender's removal before a final send.
        self._watched: dict[int, Handle] = {}
        self._watched_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="llm-sender", daemon=True)
        self._watcher = threading.Thread(target=self._watch_cancellation, name="llm-cancel-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._sender.start()
        if self._is_cancelled is not None:
            self._watcher.start()

    def submit(self, handle: Handle, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
               stream: bool = True, echo_prompt: bool = False, poll_cancellation: bool = True) -> None:
        """Queue a request; raises InvalidRequestError/OverloadedError in the caller's thread.
        `poll_cancellation=False`: never ask `is_cancelled` about it (its caller stops it explicitly)."""
        if self._stopping:
            raise OverloadedError("the engine is shutting down")
        self.engine.validate(prompt_ids, params)
        # Requests still in the inbox count as queued but cannot give their place to a better priority.
        self.engine.scheduler.check_queue(extra_waiting=self._inbox.qsize(), priority=params.priority)
        self._inbox.put(_Add(handle=handle, request_id=request_id, prompt_ids=prompt_ids, params=params,
                             stream=stream, echo_prompt=echo_prompt, poll_cancellation=poll_cancellation,
                             arrival_time=time.monotonic()))

    def abort_request(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id=request_id))

    def abort_sequence(self, seq_id: int) -> None:
        self._inbox.put(_Abort(seq_id=seq_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; every request still open gets its final `cancelled` output."""
        self._stopping = True
        self._closing.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        if self._watcher.is_alive():
            self._watcher.join(timeout)
        self._outbox.close()
        self._sender.join(timeout)

    # -- the loop thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._drain_inbox(block=not self.engine.has_unfinished()):
                break
            try:
                self.engine.step(emit=self._deliver_all)
            except Exception as exc:  # a bug in a step must not take every other request down
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            if self._after_step is not None:
                try:
                    self._after_step(self.engine)
                except Exception:  # metrics must not stop the engine (logged once: it runs every step)
                    if not self._after_step_failed:
                        log.exception("after_step failed; later failures are not logged")
                    self._after_step_failed = True
        for seq_id in list(self._handles):
            self._abort(_Abort(seq_id=seq_id))

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts; False once shutdown was asked."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            if isinstance(item, _Add):
                self._add(item)
            else:
                self._abort(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, item: _Add) -> None:
        try:
            seq = self.engine.add_request(item.request_id, item.prompt_ids, item.params, stream=item.stream,
                                          echo_prompt=item.echo_prompt, arrival_time=item.arrival_time)
        except Exception as exc:
            self._fail(item.handle, exc)
            return
        self._handles[seq.seq_id] = item.handle
        for evicted in self.engine.take_evicted():
            handle = self._handles.pop(evicted.seq_id)
            self._outbox.put(evicted.seq_id, handle, OverloadedError(
                "server overloaded: the queue is full and a request of better priority took this "
                f"request's place (max_queued_requests={self.engine.config.max_queued_requests})"))
        if item.poll_cancellation and self._is_cancelled is not None:
            self._watched[seq.seq_id] = item.handle  # no lock: the engine thread never waits for a check

    def _abort(self, item: _Abort) -> None:
        if item.seq_id is not None:
            out = self.engine.abort(item.seq_id)
            outputs = [out] if out is not None else []
        else:
            outputs = self.engine.abort_request(item.request_id)
        self._deliver_all(outputs)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        handle = self._handles.pop(out.seq_id) if out.finished else self._handles[out.seq_id]
        self._outbox.put(out.seq_id, handle, out)

    # -- the cancellation watcher thread ------------------------------------------------

    def _watch_cancellation(self) -> None:
        """Ask every open request whether its client cancelled, every `cancel_check_interval`. Off
        the engine thread: in Triton each ask is an IPC, and a step must not wait for one per sequence."""
        while not self._closing.wait(self._cancel_check_interval):
            with self._watched_lock:
                seq_ids = list(self._watched)
            for seq_id in seq_ids:
                with self._watched_lock:  # the sender cannot end this request meanwhile
                    handle = self._watched.get(seq_id)
                    if handle is None:
                        continue
                    try:
                        cancelled = self._is_cancelled(handle)
                    except Exception:
                        continue
                if cancelled:
                    self.abort_sequence(seq_id)

    # -- the sender thread -------------------------------------------------------------

    def _send_loop(self) -> None:
        while (entry := self._outbox.take()) is not None:
            seq_id, handle, item = entry
            if _ends_request(item):
                with self._watched_lock:
                    self._watched.pop(seq_id, None)
            try:
                if isinstance(item, Exception):
                    self._fail(handle, item)
                else:
                    self._send(handle, item)
            except Exception:  # a client that went away must not stop the server
                log.exception("sending a response failed")
                if isinstance(item, RequestOutput) and not item.finished:
                    self.abort_sequence(item.seq_id)

    def _fail_all(self, exc: Exception) -> None:
        for seq_id, handle in list(self._handles.items()):
            self.engine.abort(seq_id)
            del self._handles[seq_id]
            self._outbox.put(seq_id, handle, RuntimeError(f"generation failed: {exc}"))
