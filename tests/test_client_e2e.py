"""End-to-end tests of the client against the real Triton server.

Uses the session-scoped `triton_server` fixture from tests/conftest.py, which
exposes `grpc_url` ("localhost:PORT"), `http_url` and `metrics_url`.

Leaving a request early must cancel it *on the server*; that is checked on the
server's Prometheus metrics (`cancelled_on_server`): the slot frees, the
request finishes with reason `cancelled`, and it generated far fewer tokens
than its min_tokens == max_tokens. The server is shared by the whole session,
so every such check first waits for it to be idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from client import AsyncClient, BadRequestError, Client, ModelNotFoundError, RequestTimeoutError
from llmserve.paths import REPO_ROOT
from llmserve.triton.launcher import metric

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
# Greedy, so that two runs of the same request produce the same text.
GREEDY = {"temperature": 0.0, "seed": 1234}

# min_tokens == max_tokens: the model cannot stop early, so the request is
# still generating when a test leaves it (the default model's context is 1024
# tokens; ~0.3-0.5 s of generation for one stream on onnxruntime, ~0.7-1.3 s on torch).
LONG = {"max_tokens": 900, "min_tokens": 900, "temperature": 0.0}
# A cancelled LONG request must have generated fewer tokens than this.
CUT_SHORT = LONG["max_tokens"] * 3 // 4
# Client-side timeouts that leave a LONG request early (a third of its shortest run).
SHORT_TIMEOUT = 0.1

CONCURRENT_PROMPTS = [
    "Once upon a time", "Tom had a dog", "Lily liked to", "The sun was", "Max found a", "Mia liked to",
    "The bird flew", "It was a rainy day",
]
# Each prompt gets its own exact length, so that their texts differ whatever the model writes
# (two prompts can share a greedy continuation) and a stream carrying another's tokens shows.
CONCURRENT_LENGTHS = {p: 17 + i for i, p in enumerate(CONCURRENT_PROMPTS)}


def concurrent_params(prompt: str) -> dict:
    n = CONCURRENT_LENGTHS[prompt]
    return {"max_tokens": n, "min_tokens": n, **GREEDY}


# --------------------------------------------------------------------------- server-side checks


def active(server) -> float:
    return metric(server.metrics_url, "llm_active_sequences")


def finished(server, reason: str) -> float:
    try:
        return metric(server.metrics_url, "llm_requests_finished_total", reason=reason)
    except KeyError:  # no request has finished for that reason yet
        return 0.0


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_idle(server, timeout: float = 10.0) -> None:
    assert wait_until(lambda: active(server) == 0, timeout), "the server is still busy with an earlier request"


@dataclass(frozen=True)
class Counts:
    generated: float
    cancelled: float
    length: float

    @classmethod
    def read(cls, server) -> Counts:
        return cls(metric(server.metrics_url, "llm_generated_tokens_total"), finished(server, "cancelled"),
                   finished(server, "length"))


def before_cancelling(server) -> Counts:
    """Wait for the shared server to be idle; the counts `assert_cut_short` compares with."""
    wait_idle(server)
    return Counts.read(server)


def assert_cut_short(server, before: Counts) -> None:
    """The one long request started after `before` was cancelled on the server, early."""
    assert wait_until(lambda: active(server) == 0, 3.0), "the sequence still runs 3 s after the client left it"
    # Counters are flushed when the engine goes idle, just after the gauge.
    assert wait_until(lambda: finished(server, "cancelled") > before.cancelled, 2.0), \
        "the server finished the request without cancelling it"
    after = Counts.read(server)
    assert after.cancelled - before.cancelled == 1
    assert after.length == before.length, "the request ran to max_tokens"
    generated = after.generated - before.generated
    assert 0 < generated < CUT_SHORT, f"{generated:.0f} tokens generated for a cancelled request"


@contextlib.contextmanager
def cancelled_on_server(server) -> Iterator[None]:
    """Around code that leaves one long request early: the server must have cut it short."""
    before = before_cancelling(server)
    yield
    assert_cut_short(server, before)


async def async_assert_cut_short(server, before: Counts) -> None:
    """`assert_cut_short` from a coroutine, with the AsyncClient still open: closing its
    channel would cancel the request by itself and hide a stream that did not."""
    await asyncio.to_thread(assert_cut_short, server, before)


# --------------------------------------------------------------------------- streaming and results


def test_stream_yields_deltas_and_a_final_reason(triton_server):
    wait_idle(triton_server)
    before = Counts.read(triton_server)
    with Client(triton_server.grpc_url) as client:
        chunks = list(client.stream(PROMPT, max_tokens=12, min_tokens=12, request_id="e2e-stream", **GREEDY))
    assert len(chunks) >= 2, chunks
    assert all(c.text for c in chunks[:-1]), "empty non-final responses must be skipped"
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    counts = [c.num_output_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 12, "num_output_tokens is cumulative"
    assert chunks[-1].num_input_tokens > 0
    assert {c.num_input_tokens for c in chunks} == {chunks[-1].num_input_tokens}
    # Read to the end: the request finished normally on the server, nothing was cancelled.
    wait_idle(triton_server)
    assert wait_until(lambda: finished(triton_server, "length") == before.length + 1, 2.0)
    assert finished(triton_server, "cancelled") == before.cancelled


def test_generate_joins_the_stream(triton_server):
    with Client(triton_server.grpc_url) as client:
        chunks = list(client.stream(PROMPT, max_tokens=24, **GREEDY))
        completion = client.generate(PROMPT, max_tokens=24, **GREEDY)
    assert completion.text and completion.text == "".join(c.text for c in chunks)
    last = chunks[-1]
    assert (completion.finish_reason, completion.num_input_tokens, completion.num_output_tokens) == (
        last.finish_reason, last.num_input_tokens, last.num_output_tokens)
    assert completion.finish_reason in {"length", "stop"}


def test_async_client_matches_sync(triton_server):
    with Client(triton_server.grpc_url) as client:
        expected = client.generate(PROMPT, max_tokens=24, **GREEDY)

    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            chunks = [c async for c in aclient.stream(PROMPT, max_tokens=24, **GREEDY)]
            completion = await aclient.generate(PROMPT, max_tokens=24, **GREEDY)
        return chunks, completion

    chunks, completion = asyncio.run(run())
    assert len([c for c in chunks if c.text]) >= 2
    assert chunks[-1].finish_reason == expected.finish_reason
    assert "".join(c.text for c in chunks) == completion.text == expected.text
    assert completion.num_output_tokens == expected.num_output_tokens


def test_health(triton_server):
    with Client(triton_server.grpc_url) as client:
        assert client.health() is True
    with Client(triton_server.grpc_url, model="no_such_model") as client:
        assert client.health() is False

    async def run():
        async with AsyncClient(triton_server.grpc_url) as good, \
                AsyncClient(triton_server.grpc_url, model="no_such_model") as missing:
            return await good.health(), await missing.health()

    assert asyncio.run(run()) == (True, False)


# --------------------------------------------------------------------------- typed errors

ERROR_CASES = [
    pytest.param("ensemble", {"temperature": -1.0}, BadRequestError, "temperature", id="temperature"),
    pytest.param("ensemble", {"top_p": 2.0}, BadRequestError, "top_p", id="top_p"),
    pytest.param("nope", {}, ModelNotFoundError, "nope", id="unknown-model"),
    pytest.param("ensemble", {"prompt": "Once upon a time " * 400}, BadRequestError, "context",
                 id="prompt-longer-than-context"),
    pytest.param("ensemble", {"max_tokens": 5000}, BadRequestError, "max_tokens", id="max-tokens-past-context"),
]


def handle_cancellation_errors(server) -> int:
    """Triton 2.51's log line for the gRPC-frontend race that can crash it (client/_common.py)."""
    return server.log_tail(10**8).count("HandleCancellation called even when the context was not cancelled")


@pytest.mark.parametrize(("model", "params", "error", "mentions"), ERROR_CASES)
def test_server_errors_are_typed(triton_server, model, params, error, mentions):
    """The server's error arrives as a message on the stream (no `triton_grpc_error` mode), typed
    from its text, and without the frontend race that mode hits on Triton 2.51."""
    races = handle_cancellation_errors(triton_server)
    params = {"max_tokens": 8, **params}
    prompt = params.pop("prompt", PROMPT)
    with Client(triton_server.grpc_url, model=model) as sync_client, pytest.raises(error) as info:
        sync_client.generate(prompt, **params)
    assert mentions in info.value.message

    async def run():
        async with AsyncClient(triton_server.grpc_url, model=model) as aclient:
            await aclient.generate(prompt, **params)

    with pytest.raises(error, match=mentions):
        asyncio.run(run())
    wait_idle(triton_server, 2.0)  # a rejected request holds no sequence
    assert handle_cancellation_errors(triton_server) == races


# --------------------------------------------------------------------------- leaving early cancels on the server


def test_break_cancels_on_the_server(triton_server):
    with Client(triton_server.grpc_url) as client:
        with cancelled_on_server(triton_server):
            for chunk in client.stream(PROMPT, **LONG):
                assert chunk.text and chunk.finish_reason is None
                # The server's gauges are flushed at most every 50 ms: the first chunk can come sooner.
                assert wait_until(lambda: active(triton_server) == 1, 2.0)
                break
        # The stream's connection went back to the pool and still works.
        assert client.generate(PROMPT, max_tokens=4, min_tokens=4, **GREEDY).num_output_tokens == 4


def test_generator_close_cancels_on_the_server(triton_server):
    with Client(triton_server.grpc_url) as client, cancelled_on_server(triton_server):
        chunks = client.stream(PROMPT, **LONG)
        assert next(chunks).text
        chunks.close()


def test_exception_in_the_loop_body_cancels_on_the_server(triton_server):
    with Client(triton_server.grpc_url) as client, cancelled_on_server(triton_server), \
            pytest.raises(KeyError, match="caller bug"):
        for _ in client.stream(PROMPT, **LONG):
            raise KeyError("caller bug")


def test_async_break_cancels_on_the_server(triton_server):
    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            before = before_cancelling(triton_server)
            async with contextlib.aclosing(aclient.stream(PROMPT, **LONG)) as chunks:
                async for chunk in chunks:
                    assert chunk.text
                    break
            await async_assert_cut_short(triton_server, before)

    asyncio.run(run())


def test_async_task_cancellation_cancels_on_the_server(triton_server):
    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            before = before_cancelling(triton_server)
            first = asyncio.Event()

            async def consume():
                async for _ in aclient.stream(PROMPT, **LONG):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await async_assert_cut_short(triton_server, before)

    asyncio.run(run())


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.02])
def test_async_cancellation_before_the_first_response_leaves_nothing_running(triton_server, delay):
    """Cancelled while its request is being written (delay 0: the task has only reached the write)
    or before any response came back: whether or not the request reached the server, nothing is
    left generating."""
    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            before = before_cancelling(triton_server)
            task = asyncio.create_task(aclient.generate(PROMPT, **LONG))
            await asyncio.sleep(delay)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(1.5)  # a LONG request left running would have finished by now
            after = await asyncio.to_thread(Counts.read, triton_server)
            assert after.length == before.length, "the request ran to max_tokens"
            assert after.generated - before.generated < CUT_SHORT
            assert active(triton_server) == 0

    asyncio.run(run())


def test_async_wait_for_timeout_cancels_on_the_server(triton_server):
    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            before = before_cancelling(triton_server)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aclient.generate(PROMPT, **LONG), SHORT_TIMEOUT)
            await async_assert_cut_short(triton_server, before)

    asyncio.run(run())


def test_request_timeout_raises_quickly_and_frees_the_sequence(triton_server):
    timeout = SHORT_TIMEOUT
    with Client(triton_server.grpc_url, timeout=timeout) as sync_client, cancelled_on_server(triton_server):
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            sync_client.generate(PROMPT, **LONG)
        elapsed = time.monotonic() - start
    assert elapsed < timeout + 1.0, f"the timeout was raised after {elapsed:.2f}s"


def test_async_request_timeout_raises_quickly_and_frees_the_sequence(triton_server):
    timeout = SHORT_TIMEOUT

    async def run() -> float:
        async with AsyncClient(triton_server.grpc_url, timeout=timeout) as aclient:
            before = before_cancelling(triton_server)
            start = time.monotonic()
            with pytest.raises(RequestTimeoutError):
                await aclient.generate(PROMPT, **LONG)
            elapsed = time.monotonic() - start
            await async_assert_cut_short(triton_server, before)
        return elapsed

    elapsed = asyncio.run(run())
    assert elapsed < timeout + 1.0, f"the timeout was raised after {elapsed:.2f}s"


# --------------------------------------------------------------------------- concurrency


@pytest.fixture(scope="module")
def sequential_texts(triton_server) -> dict[str, str]:
    """Greedy completions of CONCURRENT_PROMPTS, one request at a time."""
    with Client(triton_server.grpc_url) as client:
        texts = {p: client.generate(p, **concurrent_params(p)).text for p in CONCURRENT_PROMPTS}
    assert len(set(texts.values())) == len(texts), "the prompts must give distinct texts"
    return texts


def test_concurrent_streams_from_threads(triton_server, sequential_texts):
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    with Client(triton_server.grpc_url) as client:
        def work(prompt: str) -> None:
            try:
                results[prompt] = "".join(c.text for c in client.stream(prompt, **concurrent_params(prompt)))
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(p,)) for p in CONCURRENT_PROMPTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    assert results == sequential_texts


def test_concurrent_streams_from_asyncio_tasks(triton_server, sequential_texts):
    async def one(aclient: AsyncClient, prompt: str) -> str:
        return "".join([c.text async for c in aclient.stream(prompt, **concurrent_params(prompt))])

    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            texts = await asyncio.gather(*(one(aclient, p) for p in CONCURRENT_PROMPTS))
        return dict(zip(CONCURRENT_PROMPTS, texts))

    assert asyncio.run(run()) == sequential_texts


def test_async_client_reuses_a_stream_for_the_next_request(triton_server, sequential_texts):
    """A request's stream carries the next request once the request has ended: after its final
    response, and after leaving early (stopped on the server and drained to its final response);
    not after an error. Each request still gets exactly its own text."""
    prompt = CONCURRENT_PROMPTS[0]

    async def text(aclient: AsyncClient, prompt: str) -> str:
        return (await aclient.generate(prompt, **concurrent_params(prompt))).text

    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            assert await text(aclient, prompt) == sequential_texts[prompt]
            streams = list(aclient._idle_streams)
            assert len(streams) == 1
            assert await text(aclient, prompt) == sequential_texts[prompt]
            assert list(aclient._idle_streams) == streams
            async with contextlib.aclosing(aclient.stream(PROMPT, **LONG)) as chunks:
                async for _ in chunks:
                    break
            await asyncio.wait(set(aclient._stop_tasks), timeout=10)  # the stop and the drain
            assert list(aclient._idle_streams) == streams
            assert await text(aclient, prompt) == sequential_texts[prompt]  # nothing of the stopped one
            with pytest.raises(BadRequestError, match="temperature"):
                await aclient.generate(prompt, max_tokens=8, temperature=-1.0)
            assert not aclient._idle_streams  # ended after the error
            assert await text(aclient, prompt) == sequential_texts[prompt]
            streams = list(aclient._idle_streams)
            # Concurrent requests take a stream each; all come back to the idle ones.
            texts = await asyncio.gather(*(text(aclient, p) for p in CONCURRENT_PROMPTS))
            assert dict(zip(CONCURRENT_PROMPTS, texts)) == sequential_texts
            assert len(aclient._idle_streams) == len(CONCURRENT_PROMPTS)
            # A stream that ended while idle (a restarted server, a dropped connection) is replaced.
            for stream in aclient._idle_streams:
                stream.cancel()
            assert await text(aclient, prompt) == sequential_texts[prompt]
            [kept] = aclient._idle_streams
            assert kept not in streams and not kept.done()

    asyncio.run(run())


def test_async_client_ends_streams_left_idle(triton_server, monkeypatch):
    """An open stream holds up tritonserver's graceful shutdown, so one left unused is ended."""
    monkeypatch.setattr("client.async_client.IDLE_STREAM_TIMEOUT_S", 0.05)

    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            await aclient.generate(PROMPT, max_tokens=2)
            [stream] = aclient._idle_streams
            await asyncio.sleep(0.5)
            assert not aclient._idle_streams
            assert stream.done() and await stream.code() == grpc.StatusCode.OK  # half-closed and ended by the server

    asyncio.run(run())


def test_servers_start_while_an_async_client_holds_idle_streams(triton_server):
    """Starting a server forks this process. Python code between that fork and the exec (a
    `preexec_fn`) runs gRPC's fork handlers, which crashed ~1 child in 5 while a stream was open."""
    from llmserve.triton.launcher import exec_with_parent

    async def run():
        async with AsyncClient(triton_server.grpc_url) as aclient:
            await aclient.generate(PROMPT, max_tokens=2)
            assert aclient._idle_streams
            codes = [subprocess.Popen(exec_with_parent(["true"]), start_new_session=True).wait() for _ in range(40)]
            assert codes == [0] * 40

    asyncio.run(run())


def test_async_client_does_not_reuse_a_timed_out_stream(triton_server):
    async def run():
        async with AsyncClient(triton_server.grpc_url, timeout=SHORT_TIMEOUT) as aclient:
            with pytest.raises(RequestTimeoutError, match="timeout"):
                await aclient.generate(PROMPT, **LONG)
            assert not aclient._idle_streams  # cancelled, as a gRPC deadline would
            assert (await aclient.generate(PROMPT, max_tokens=2, min_tokens=2)).num_output_tokens == 2

    asyncio.run(run())


def test_sync_client_reuses_a_stream_for_the_next_request(triton_server, sequential_texts):
    """`Client` keeps a request's stream open for the next one as `AsyncClient` does: after the
    final response and after leaving early (stopped and drained), not after an error or a timeout
    (the connection is kept, the stream ended); threads take a connection each; a stream that
    ended while idle is replaced."""
    prompt = CONCURRENT_PROMPTS[0]

    def text(client: Client, prompt: str) -> str:
        return client.generate(prompt, **concurrent_params(prompt)).text

    def idle_streams(client: Client) -> list:
        return [c.triton._stream for c in client._pool._idle if c.stream_is_open()]

    with Client(triton_server.grpc_url) as client:
        assert text(client, prompt) == sequential_texts[prompt]
        streams = idle_streams(client)
        assert len(streams) == 1
        assert text(client, prompt) == sequential_texts[prompt]
        assert idle_streams(client) == streams
        with cancelled_on_server(triton_server), contextlib.closing(client.stream(PROMPT, **LONG)) as chunks:
            next(chunks)
        assert idle_streams(client) == streams  # stopped, drained to its final response, kept
        assert text(client, prompt) == sequential_texts[prompt]  # nothing of the stopped one
        with pytest.raises(BadRequestError, match="temperature"):
            client.generate(prompt, max_tokens=8, temperature=-1.0)
        assert not idle_streams(client) and len(client._pool._idle) == 1  # stream ended, connection kept
        assert text(client, prompt) == sequential_texts[prompt]
        with ThreadPoolExecutor(len(CONCURRENT_PROMPTS)) as threads:
            texts = list(threads.map(lambda p: text(client, p), CONCURRENT_PROMPTS))
        assert dict(zip(CONCURRENT_PROMPTS, texts)) == sequential_texts
        streams = idle_streams(client)
        assert 1 < len(streams) <= len(CONCURRENT_PROMPTS)
        for stream in streams:  # as a restarted server or a dropped connection would
            stream._response_iterator.cancel()
        assert wait_until(lambda: not idle_streams(client))
        assert text(client, prompt) == sequential_texts[prompt]
        kept = client._pool._idle[-1].triton._stream
        assert kept not in streams and idle_streams(client) == [kept]


def test_sync_client_ends_streams_left_idle(triton_server, monkeypatch):
    """An open stream holds up tritonserver's graceful shutdown, so one left unused is ended
    (its connection stays pooled), and the janitor thread that ends it stops."""
    monkeypatch.setattr("client.sync_client.IDLE_STREAM_TIMEOUT_S", 0.05)
    with Client(triton_server.grpc_url) as client:
        client.generate(PROMPT, max_tokens=2)
        [connection] = client._pool._idle
        assert connection.has_stream()
        assert wait_until(lambda: not connection.has_stream(), 2.0)  # half-closed and ended by the server
        assert wait_until(lambda: client._pool._janitor is None, 2.0)
        assert client._pool._idle == [connection]
        assert client.generate(PROMPT, max_tokens=2, min_tokens=2).num_output_tokens == 2
        assert client._pool._idle == [connection] and connection.stream_is_open()


def test_sync_client_does_not_reuse_a_timed_out_stream(triton_server):
    with Client(triton_server.grpc_url, timeout=SHORT_TIMEOUT) as client, cancelled_on_server(triton_server):
        with pytest.raises(RequestTimeoutError, match="timeout"):
            client.generate(PROMPT, **LONG)
        assert not any(c.has_stream() for c in client._pool._idle)  # cancelled, as a gRPC deadline would


def test_sync_client_opens_a_stream_per_request_under_gevent(triton_server):
    """Under gevent's monkey-patching idle open streams slowed everyone down, so there `Client`
    ends each request's stream (and still reuses the connection)."""
    script = f"""
import faulthandler; faulthandler.dump_traceback_later(40, exit=True)  # where it hangs, if it does
from gevent import monkey; monkey.patch_all()
import grpc.experimental.gevent; grpc.experimental.gevent.init_gevent()
from client import Client
with Client({triton_server.grpc_url!r}) as client:
    assert client.generate("Once upon a time", max_tokens=4, min_tokens=4).num_output_tokens == 4
    [connection] = client._pool._idle
    assert not connection.has_stream()
    assert client.generate("Once upon a time", max_tokens=4, min_tokens=4).num_output_tokens == 4
    assert client._pool._idle == [connection]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    # As from a terminal: Ctrl-C works even when this test run ignores SIGINT (as background jobs
    # of a non-interactive shell do), which the CLI would inherit.
    return subprocess.Popen([sys.executable, "-m", "client", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_cli_streams_and_reports_stats(triton_server):
    with Client(triton_server.grpc_url) as client:
        full = client.generate(PROMPT, max_tokens=24, temperature=0.0).text
    stop = full.split()[3]  # a stop string the greedy text contains: it ends the output before it
    proc = _cli(PROMPT, "--url", triton_server.grpc_url, "--max-tokens", "24", "--temperature", "0",
                "--stop", "zzzq", stop)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == full[: full.index(stop)] + "\n"
    assert "finish=stop" in err and "tokens/s" in err and "time to first token" in err, err


def test_cli_error_exits_1_with_the_servers_message(triton_server):
    with Client(triton_server.grpc_url) as client, pytest.raises(BadRequestError) as info:
        client.generate(PROMPT, max_tokens=8, temperature=-1.0)
    proc = _cli(PROMPT, "--url", triton_server.grpc_url, "--max-tokens", "8", "--temperature", "-1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert f"error: {info.value.message}" in err
    assert out == ""


def test_cli_ctrl_c_exits_130_and_cancels_on_the_server(triton_server):
    # 900 tokens take ~0.4 s on onnxruntime: a test process stalled that long by a busy machine
    # sends its Ctrl-C after the end, so such an attempt (exit 0, finish=length) is run again.
    for _attempt in range(3):
        before = before_cancelling(triton_server)
        proc = _cli(PROMPT, "--url", triton_server.grpc_url, "--max-tokens", "900", "--min-tokens", "900")
        try:
            # Ctrl-C once the server generates for it (its gauge, flushed every 50 ms) and the first
            # tokens (TTFT ~10 ms) are out.
            assert wait_until(lambda: active(triton_server) == 1 or proc.poll() is not None, 10.0)
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode == 0 and "finish=length" in err:
            continue
        assert out.strip(), "nothing was streamed before the Ctrl-C"
        assert proc.returncode == 130, err
        assert "cancelled" in err
        assert_cut_short(triton_server, before)
        break
    else:
        pytest.fail("the CLI finished its 900 tokens before the Ctrl-C, three times")
