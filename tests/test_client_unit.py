"""Unit tests of the client library that need no server.

Tensor building, response parsing, exception mapping, argument validation,
and a real connection-refused round trip against a port nothing listens on.
"""

from __future__ import annotations

import asyncio
import gc
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, serialize_byte_tensor

from client import (
    AsyncClient,
    BadRequestError,
    Client,
    ClientError,
    Completion,
    GenerationCancelledError,
    ModelNotFoundError,
    OverloadedError,
    RequestTimeoutError,
    ServerUnavailableError,
    StreamChunk,
    errors,
)
from client import sync_client
from client._common import TritonClient, close_abandoned_clients, normalize_url, send_stop
from client._tensors import ChunkAssembler, _first_values, build_request, build_stop_inputs
from llmserve.triton.launcher import free_port

# --------------------------------------------------------------------------- helpers


def _inputs(prompt: str = "hello", **params):
    request = build_request(prompt, params)
    return request, {t.name(): t for t in request.inputs}


def _value(tensor):
    """Decode an InferInput's payload back to numpy."""
    raw = tensor._get_content()
    if tensor.datatype() == "BYTES":
        return deserialize_bytes_tensor(raw).reshape(tensor.shape())
    dtype = {"BOOL": np.bool_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64}[tensor.datatype()]
    return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape())


def _result(text: bytes | None = None, reason: str | None = None, n_in: int | None = None,
            n_out: int | None = None, final: bool = False) -> InferResult:
    """A real tritonclient InferResult, as the ensemble would send it."""
    response = service_pb2.ModelInferResponse(model_name="ensemble", id="r")

    def add(name: str, datatype: str, payload: bytes) -> None:
        output = response.outputs.add()
        output.name, output.datatype = name, datatype
        output.shape.extend([1, 1])
        response.raw_output_contents.append(payload)

    if text is not None:
        add("text_output", "BYTES", serialize_byte_tensor(np.array([[text]], dtype=np.object_)).item())
    if reason is not None:
        add("finish_reason", "BYTES", serialize_byte_tensor(np.array([[reason.encode()]], dtype=np.object_)).item())
    if n_in is not None:
        add("num_input_tokens", "INT32", np.array([[n_in]], dtype=np.int32).tobytes())
    if n_out is not None:
        add("num_output_tokens", "INT32", np.array([[n_out]], dtype=np.int32).tobytes())
    response.parameters["triton_final_response"].bool_param = final
    return InferResult(response)


# --------------------------------------------------------------------------- tensors


def test_required_inputs_only_by_default():
    request, tensors = _inputs("Once upon a time")
    assert list(tensors) == ["text_input", "max_tokens", "stream"]
    assert tensors["text_input"].datatype() == "BYTES"
    assert tensors["text_input"].shape() == [1, 1]
    assert _value(tensors["text_input"])[0, 0] == b"Once upon a time"
    assert tensors["max_tokens"].datatype() == "INT32"
    assert _value(tensors["max_tokens"]).tolist() == [[128]]
    assert tensors["stream"].datatype() == "BOOL"
    assert _value(tensors["stream"]).tolist() == [[True]]
    assert len(request.request_id) == 32 and int(request.request_id, 16) >= 0  # uuid4 hex


def test_all_optional_inputs_names_dtypes_shapes():
    _, tensors = _inputs(
        "héllo", max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, repetition_penalty=1.1,
        presence_penalty=0.2, frequency_penalty=0.3, min_tokens=2, seed=2**64 - 1, stop=["\n\n", "END"],
        bad_words="bad", end_id=2, pad_id=0, exclude_input_in_output=True,
    )
    expected = {
        "text_input": ("BYTES", [1, 1]), "max_tokens": ("INT32", [1, 1]), "stream": ("BOOL", [1, 1]),
        "temperature": ("FP32", [1, 1]), "top_p": ("FP32", [1, 1]), "top_k": ("INT32", [1, 1]),
        "repetition_penalty": ("FP32", [1, 1]), "presence_penalty": ("FP32", [1, 1]),
        "frequency_penalty": ("FP32", [1, 1]), "min_tokens": ("INT32", [1, 1]), "seed": ("UINT64", [1, 1]),
        "stop_words": ("BYTES", [1, 2]), "bad_words": ("BYTES", [1, 1]), "end_id": ("INT32", [1, 1]),
        "pad_id": ("INT32", [1, 1]), "exclude_input_in_output": ("BOOL", [1, 1]),
    }
    assert {name: (t.datatype(), t.shape()) for name, t in tensors.items()} == expected
    assert _value(tensors["text_input"])[0, 0].decode() == "héllo"
    assert _value(tensors["temperature"])[0, 0] == np.float32(0.5)
    assert _value(tensors["top_k"])[0, 0] == 40
    assert _value(tensors["seed"])[0, 0] == np.uint64(2**64 - 1)
    assert _value(tensors["stop_words"]).tolist() == [[b"\n\n", b"END"]]
    assert _value(tensors["bad_words"]).tolist() == [[b"bad"]]


def test_none_means_not_sent():
    _, tensors = _inputs(temperature=None, top_p=None, top_k=None, seed=None, stop=None, bad_words=None,
                         min_tokens=None, end_id=None, pad_id=None, exclude_input_in_output=None)
    assert list(tensors) == ["text_input", "max_tokens", "stream"]


def test_empty_stop_list_is_not_sent_and_request_id_is_kept():
    request, tensors = _inputs(stop=[], request_id="my-id")
    assert "stop_words" not in tensors
    assert request.request_id == "my-id"


def test_zero_values_are_sent():
    # 0 / 0.0 are real settings (greedy, no top-k), not "unset".
    _, tensors = _inputs(temperature=0.0, top_k=0, seed=0)
    assert _value(tensors["temperature"])[0, 0] == 0.0
    assert _value(tensors["top_k"])[0, 0] == 0
    assert _value(tensors["seed"])[0, 0] == 0


def test_stop_inputs():
    (stop,) = build_stop_inputs()
    assert (stop.name(), stop.datatype(), stop.shape()) == ("stop", "BOOL", [1, 1])
    assert _value(stop).tolist() == [[True]]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("max_tokens", [0, -1, 1.5, "10", True, None, 2**31])
def test_bad_max_tokens(max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        build_request("hi", {"max_tokens": max_tokens})


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [1, 2]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"bad_words": 5}, "bad_words"),
        ({"request_id": 123}, "request_id"),
        ({"exclude_input_in_output": 1}, "exclude_input_in_output"),
    ],
)
def test_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        build_request("hi", params)


@pytest.mark.parametrize("prompt", ["", None, b"bytes"])
def test_bad_prompt(prompt):
    with pytest.raises(ValueError, match="prompt"):
        build_request(prompt, {})


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="max_new_tokens"):
        build_request("hi", {"max_new_tokens": 5})


def test_range_checks_are_left_to_the_server():
    # Values the server may reject but the tensor can carry go through.
    _, tensors = _inputs(temperature=-1.0, top_p=7.0, top_k=-3)
    assert _value(tensors["temperature"])[0, 0] == -1.0


def test_clients_validate_before_any_network_io():
    client = Client(f"127.0.0.1:{free_port()}")
    with pytest.raises(ValueError):
        client.stream("hi", max_tokens=0)  # raises at the call, not at the first next()
    with pytest.raises(ValueError):
        client.generate("hi", max_tokens=-5)
    client.close()
    aclient = AsyncClient(f"127.0.0.1:{free_port()}")
    with pytest.raises(ValueError):
        aclient.stream("hi", max_tokens=0)
    with pytest.raises(ValueError):
        asyncio.run(aclient.generate("hi", max_tokens=0))


@pytest.mark.parametrize("url", ["", "http://localhost:8001"])
def test_bad_url(url):
    with pytest.raises(ValueError):
        Client(url)


def test_url_normalisation_and_timeout_validation():
    assert normalize_url("grpc://localhost:8001") == "localhost:8001"
    with pytest.raises(ValueError, match="timeout"):
        Client("localhost:8001", timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        AsyncClient("localhost:8001", timeout=-1)


# --------------------------------------------------------------------------- response parsing


def test_assembler_final_with_data():
    asm = ChunkAssembler(max_tokens=3)
    chunks = [
        asm.feed(_result(b"Hel", "", 4, 1)),
        asm.feed(_result(b"", "", 4, 1)),  # empty non-final: skipped
        asm.feed(_result(b"lo", "", 4, 2)),
        asm.feed(_result(b"!", "length", 4, 3, final=True)),
    ]
    assert chunks == [
        StreamChunk("Hel", None, 4, 1), None, StreamChunk("lo", None, 4, 2), StreamChunk("!", "length", 4, 3),
    ]
    assert asm.done


def test_assembler_empty_final_after_reason():
    asm = ChunkAssembler(max_tokens=10)
    assert asm.feed(_result(b"a", "", 2, 1)) == StreamChunk("a", None, 2, 1)
    # The reason arrives before the final flag: held so that only the last chunk carries it.
    assert asm.feed(_result(b"b", "stop", 2, 2)) is None
    assert asm.feed(_result(final=True)) == StreamChunk("b", "stop", 2, 2)


def test_assembler_empty_final_without_reason_infers_it():
    asm = ChunkAssembler(max_tokens=2)
    asm.feed(_result(b"a", "", 2, 1))
    asm.feed(_result(b"b", "", 2, 2))
    assert asm.feed(_result(final=True)) == StreamChunk("", "length", 2, 2)
    asm = ChunkAssembler(max_tokens=5)
    asm.feed(_result(b"a", "", 2, 1))
    assert asm.feed(_result(final=True)).finish_reason == "stop"


def test_assembler_keeps_split_utf8_characters_whole():
    asm = ChunkAssembler(max_tokens=5)
    euro = "€".encode()  # 3 bytes, split across responses by the server
    first = asm.feed(_result(b"x" + euro[:1], "", 1, 1))
    second = asm.feed(_result(euro[1:], "", 1, 2))
    last = asm.feed(_result(b"", "stop", 1, 2, final=True))
    assert first.text + second.text + last.text == "x€"


def test_first_values_read_raw_contents_as_tritonclient_does():
    result = _result("naïve €".encode(), "", 7, 2**31 - 1)
    response = result.get_response()
    extra = response.outputs.add()  # another dtype, raw
    extra.name, extra.datatype = "cum_log_probs", "FP32"
    extra.shape.extend([1, 1])
    response.raw_output_contents.append(np.array([[-1.5]], dtype=np.float32).tobytes())
    values = _first_values(result)
    assert values == {name: result.as_numpy(name).reshape(-1)[0] for name in values}
    assert values["text_output"] == "naïve €".encode() and values["finish_reason"] == b""
    assert values["num_output_tokens"] == 2**31 - 1 and values["cum_log_probs"] == np.float32(-1.5)


def test_first_values_typed_contents_and_truncated_payloads():
    response = service_pb2.ModelInferResponse(model_name="ensemble", id="r")
    for name, datatype, payload in (("text_output", "BYTES", (5).to_bytes(4, "little") + b"ab"),
                                    ("num_output_tokens", "INT32", b"\x01\x00")):
        output = response.outputs.add()
        output.name, output.datatype = name, datatype
        response.raw_output_contents.append(payload)
    typed = response.outputs.add()  # no raw payload: the value is in `contents` (as tritonclient reads it)
    typed.name, typed.datatype = "finish_reason", "BYTES"
    typed.shape.extend([1, 1])
    typed.contents.bytes_contents.append(b"stop")
    assert _first_values(InferResult(response)) == {"text_output": None, "num_output_tokens": None,
                                                    "finish_reason": b"stop"}


def test_completion_from_chunks():
    chunks = [StreamChunk("a", None, 3, 1), StreamChunk("b", "length", 3, 2)]
    assert Completion.from_chunks(chunks) == Completion("ab", "length", 3, 2)
    with pytest.raises(ValueError):
        Completion.from_chunks(chunks[:1])


def test_types_are_frozen_and_slotted():
    chunk = StreamChunk("a", None, 1, 1)
    with pytest.raises(AttributeError):
        chunk.text = "b"  # type: ignore[misc]
    assert not hasattr(chunk, "__dict__")


# --------------------------------------------------------------------------- exception mapping


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        # Errors put on the stream by the server: message only, no status.
        (InferenceServerException("[StatusCode.INVALID_ARGUMENT] temperature must be >= 0"), BadRequestError),
        (InferenceServerException("StatusCode.INVALID_ARGUMENT: top_p out of range"), BadRequestError),
        (InferenceServerException("temperature must be >= 0, got -1.0"), BadRequestError),
        (InferenceServerException("unexpected datatype TYPE_FP64 for inference input 'temperature', "
                                  "expecting TYPE_FP32"), BadRequestError),
        (InferenceServerException("Exceeds maximum queue size"), OverloadedError),
        (InferenceServerException("[StatusCode.UNAVAILABLE] Exceeds maximum queue size"), OverloadedError),
        (InferenceServerException("[StatusCode.RESOURCE_EXHAUSTED] too many active sequences"), OverloadedError),
        (InferenceServerException("[StatusCode.UNAVAILABLE] server busy"), OverloadedError),
        (InferenceServerException("Request for unknown model: 'nope' is not found"), ModelNotFoundError),
        (InferenceServerException("request was cancelled"), GenerationCancelledError),
        (InferenceServerException("something odd happened"), ClientError),
        (InferenceServerException("in ensemble 'ensemble', max_tokens (100000) + prompt tokens (2) exceeds the "
                                  "model's context of 1024 tokens: use max_tokens <= 1022"), BadRequestError),
        (InferenceServerException("in ensemble 'ensemble', input 'text_input' is empty: send a non-empty prompt"),
         BadRequestError),
        # A server crash is not the caller's fault, whatever its text says.
        (InferenceServerException("in ensemble 'ensemble', RuntimeError: generation failed: Inplace update to "
                                  "inference tensor outside InferenceMode is not allowed."), ClientError),
        # Failed RPCs: tritonclient sets the gRPC status.
        (InferenceServerException("failed to connect to all addresses; Connection refused",
                                  status="StatusCode.UNAVAILABLE"), ServerUnavailableError),
        (InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"), ServerUnavailableError),
        (InferenceServerException("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE"), OverloadedError),
        (InferenceServerException("busy", status="StatusCode.RESOURCE_EXHAUSTED"), OverloadedError),
        (InferenceServerException("Request for unknown model: 'x' is not found", status="StatusCode.NOT_FOUND"),
         ModelNotFoundError),
        # Errors the server ends the stream with (triton_grpc_error mode).
        (InferenceServerException("in ensemble 'ensemble', temperature must be >= 0, got -1.0",
                                  status="StatusCode.INVALID_ARGUMENT"), BadRequestError),
        (InferenceServerException("in ensemble 'ensemble', server overloaded: more than 256 requests waiting",
                                  status="StatusCode.UNAVAILABLE"), OverloadedError),
        (InferenceServerException("in ensemble 'ensemble', the engine is shutting down",
                                  status="StatusCode.UNAVAILABLE"), ServerUnavailableError),
        (InferenceServerException("in ensemble 'ensemble', RuntimeError: boom", status="StatusCode.INTERNAL"),
         ClientError),
        (InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), RequestTimeoutError),
        (InferenceServerException("Locally cancelled by application!", status="StatusCode.CANCELLED"),
         GenerationCancelledError),
        (InferenceServerException("invalid thing", status="StatusCode.INTERNAL"), ClientError),
    ],
)
def test_exception_mapping(exc, expected):
    mapped = errors.from_triton_exception(exc, url="localhost:8001")
    assert type(mapped) is expected
    assert isinstance(mapped, ClientError)


def test_mapping_keeps_server_text_and_status():
    mapped = errors.from_triton_exception(
        InferenceServerException("[StatusCode.INVALID_ARGUMENT] temperature must be >= 0"))
    assert mapped.message == "temperature must be >= 0"
    assert mapped.status == "INVALID_ARGUMENT"
    assert str(mapped) == "temperature must be >= 0"
    mapped = errors.from_triton_exception(InferenceServerException("x", status="StatusCode.NOT_FOUND"))
    assert mapped.status == "NOT_FOUND"


def test_unavailable_message_is_helpful():
    mapped = errors.from_triton_exception(
        InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE"),
        url="localhost:9999")
    assert isinstance(mapped, ServerUnavailableError)
    assert mapped.url == "localhost:9999"
    for needle in ("localhost:9999", "tritonserver", "make serve", "8001", "failed to connect"):
        assert needle in str(mapped)


# --------------------------------------------------------------------------- connection refused, for real


def test_sync_connection_refused_is_fast_and_helpful():
    url = f"127.0.0.1:{free_port()}"
    with Client(url, timeout=30) as client:
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError) as info:
            client.generate("hi", max_tokens=4)
        assert time.monotonic() - start < 5
        with pytest.raises(ServerUnavailableError):
            next(client.stream("hi", max_tokens=4))
        assert client.health() is False
    assert url in str(info.value) and "make serve" in str(info.value) and "8001" in str(info.value)


def test_async_connection_refused_is_fast_and_helpful():
    url = f"127.0.0.1:{free_port()}"

    async def run() -> ServerUnavailableError:
        async with AsyncClient(url, timeout=30) as client:
            start = time.monotonic()
            with pytest.raises(ServerUnavailableError) as info:
                await client.generate("hi", max_tokens=4)
            assert time.monotonic() - start < 5
            with pytest.raises(ServerUnavailableError):
                async for _ in client.stream("hi", max_tokens=4):
                    pass
            assert await client.health() is False
            return info.value

    error = asyncio.run(run())
    assert url in str(error) and "make serve" in str(error)


def test_stop_helper_never_raises_and_is_bounded():
    start = time.monotonic()
    assert send_stop(f"127.0.0.1:{free_port()}", "abc", timeout=1.0) is False
    assert time.monotonic() - start < 3


def test_closed_client_refuses_new_streams():
    client = Client(f"127.0.0.1:{free_port()}")
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(client.stream("hi"))


def test_tritonclient_clients_close_once(monkeypatch):
    """tritonclient's `__del__` closes a client again after `close()`; a gRPC channel closed twice
    under grpc's gevent integration hung the process at exit, so the clients' wrapper closes once."""
    closes = []
    monkeypatch.setattr(grpcclient.InferenceServerClient, "close", lambda self: closes.append(self))
    triton = TritonClient(f"127.0.0.1:{free_port()}")
    triton.close()
    triton.close()
    del triton
    gc.collect()
    assert len(closes) == 1


def test_a_dropped_open_client_is_closed_later_never_by_the_garbage_collector(monkeypatch):
    """A close from the garbage collector deadlocked a locust process on a grpc mutex its thread held:
    a client dropped open (here in a reference cycle, as a stream's callback makes one) is kept and
    closed by the next client created, or by `Client.close()`."""
    closes = []
    monkeypatch.setattr(grpcclient.InferenceServerClient, "close", lambda self: closes.append(self))
    url = f"127.0.0.1:{free_port()}"
    triton = TritonClient(url)
    triton.cycle = triton
    del triton
    gc.collect()
    assert closes == []  # not from the collector
    TritonClient(url).close()
    assert len(closes) == 2  # the dropped one first, then the new one

    dropped = TritonClient(url)
    dropped.cycle = dropped
    del dropped
    gc.collect()
    Client(url).close()
    assert len(closes) == 3
    close_abandoned_clients()
    assert len(closes) == 3  # closed once


def test_a_stop_interrupted_by_a_kill_still_gives_the_connection_back(monkeypatch):
    """A greenlet killed (or Ctrl-C) while its request is being stopped: the connection is still
    released, its stream cancelled, rather than dropped open."""
    released = []

    class Pool:
        def release(self, connection, *, cancel_stream=False):
            released.append((connection, cancel_stream))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sync_client, "send_stop", killed)
    client = Client(f"127.0.0.1:{free_port()}")
    client._pool = Pool()
    request = build_request("hi", {"max_tokens": 4})
    with pytest.raises(KeyboardInterrupt):
        client._end_request("connection", request, ChunkAssembler(4), stop=True, drain=True)
    assert released == [("connection", True)]


def test_cli_stop_strings_take_backslash_escapes():
    """A shell passes `--stop "\n\n"` as backslash-n twice: the CLI reads it as two newlines."""
    from client.__main__ import _parser

    args = _parser().parse_args(["prompt", "--stop", r"\n\n", r"tab\there", r"a\\nb", "plain"])
    assert args.stop == ["\n\n", "tab\there", "a\\nb", "plain"]
