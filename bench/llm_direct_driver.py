"""Load against the `llm` model alone, called directly over gRPC streaming: token ids in, token ids
out; no ensemble, no preprocessing, no postprocessing. The floor of what serving through Triton
costs with a Python-backend `llm`: the transport and one model's round trips, nothing else.

The prompts are tokenized here, once each, with the model's own tokenizer. A request carries
`llm`'s inputs as the ensemble passes them, `poll_cancellation` false included (the load generator
never abandons a request), built and streamed as `AsyncClient` builds and streams its requests:
with its request builder, one request at a time per stream, streams reused.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from tritonclient.grpc import InferInput, service_pb2, service_pb2_grpc

from bench.records import RequestRecord
# The client's own request building and stream ending (half-close, drain, cancel only if that fails).
from client._tensors import PreparedRequest, _scalar_input
from client.async_client import _end_stream, _request_message
from llmserve.engine.tokenizer import encode_prompt, load_tokenizer
from llmserve.triton.packing import OutputInfo


END_STREAM_TIMEOUT_S = 5.0


class LlmDirectClient:
    """Streams generations from the `llm` model of the server at `url` (host:port, gRPC)."""

    def __init__(self, url: str, model_dir: str, model: str = "llm") -> None:
        self.model = model
        self._tokenizer = load_tokenizer(model_dir)
        self._prompt_ids: dict[str, np.ndarray] = {}
        self._channel = grpc.aio.insecure_channel(url)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._idle: list[grpc.aio.StreamStreamCall] = []
        self._ending: set[asyncio.Task] = set()  # streams of failed requests being ended
        self._next_id = 0

    def _request(self, prompt: str, max_tokens: int, min_tokens: int) -> service_pb2.ModelInferRequest:
        ids = self._prompt_ids.get(prompt)
        if ids is None:
            ids = self._prompt_ids[prompt] = np.array([encode_prompt(self._tokenizer, prompt)], dtype=np.int32)
        self._next_id += 1
        input_ids = InferInput("input_ids", list(ids.shape), "INT32")
        input_ids.set_data_from_numpy(ids)
        inputs = [input_ids, _scalar_input("max_tokens", "INT32", max_tokens, np.int32),
                  _scalar_input("min_tokens", "INT32", min_tokens, np.int32),
                  _scalar_input("stream", "BOOL", True, np.bool_),
                  _scalar_input("poll_cancellation", "BOOL", False, np.bool_)]
        return _request_message(self.model, PreparedRequest(inputs, f"direct-{self._next_id}", max_tokens))

    async def request(self, prompt: str, max_tokens: int, min_tokens: int) -> RequestRecord:
        """One generation; `chunks` holds the responses that carried new tokens (failures land in `error`)."""
        message = self._request(prompt, max_tokens, min_tokens)
        record = RequestRecord(start=time.perf_counter())
        call = self._idle.pop() if self._idle else self._stub.ModelStreamInfer()
        try:
            await call.write(message)
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise ConnectionError("the stream ended before the final response")
                if reply.error_message:
                    raise RuntimeError(reply.error_message)
                response = reply.infer_response
                if response.outputs:
                    names = [output.name for output in response.outputs]
                    info = OutputInfo.unpack(np.frombuffer(response.raw_output_contents[names.index("output_info")],
                                                           dtype=np.int64))
                    if info.num_output_tokens > record.num_output_tokens:  # it carried new tokens
                        record.chunks.append((time.perf_counter(), info.num_output_tokens))
                        record.num_output_tokens = info.num_output_tokens
                if response.parameters["triton_final_response"].bool_param:
                    break
        except Exception as exc:  # recorded, counted as an error in the summary
            record.error = f"{type(exc).__name__}: {exc}"
            # Not cancelled: cancelling streams can crash Triton 2.51's gRPC frontend (docs/known-issues.md).
            task = asyncio.get_running_loop().create_task(_end_stream(call, END_STREAM_TIMEOUT_S))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        else:
            self._idle.append(call)
        record.end = time.perf_counter()
        return record

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*self._ending, *(_end_stream(call, END_STREAM_TIMEOUT_S) for call in idle))
        await self._channel.close()
