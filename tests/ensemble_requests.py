"""Raw tritonclient requests to the ensemble, as an existing TensorRT-LLM client sends them."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

DTYPES = {"text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32",
          "top_p": "FP32", "top_k": "INT32", "repetition_penalty": "FP32", "presence_penalty": "FP32",
          "frequency_penalty": "FP32", "min_tokens": "INT32", "end_id": "INT32", "pad_id": "INT32",
          "seed": "UINT64", "stop_words": "BYTES", "bad_words": "BYTES", "exclude_input_in_output": "BOOL",
          "stop": "BOOL", "sequence_id": "UINT64", "priority": "INT32"}
NUMPY = {"BYTES": np.object_, "INT32": np.int32, "BOOL": bool, "FP32": np.float32, "UINT64": np.uint64}


def make_inputs(**values) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in values.items():
        dtype = DTYPES[name]
        if isinstance(value, np.ndarray):
            array = value
            dtype = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32",
                     np.dtype(np.int64): "INT64"}.get(array.dtype, dtype)
        elif isinstance(value, list):
            array = np.array([[v.encode() if isinstance(v, str) else v for v in value]], dtype=NUMPY[dtype])
        else:
            array = np.array([[value.encode() if isinstance(value, str) else value]], dtype=NUMPY[dtype])
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclass
class StreamResult:
    pieces: list[str] = field(default_factory=list)
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    error: InferenceServerException | None = None
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def run_stream(url: str, model: str = "ensemble", request_id: str = "", timeout: float = 120,
               **values) -> StreamResult:
    """One request over the gRPC stream; collects every response until the final flag."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    result = StreamResult()
    start = time.monotonic()
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, make_inputs(**values), request_id=request_id,
                                  enable_empty_final_response=True)
        while True:
            response, error = responses.get(timeout=timeout)
            if error is not None:
                result.error = error
                break
            read_response(response, result)
            if response.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    result.seconds = time.monotonic() - start
    return result


def read_response(response, result: StreamResult) -> None:
    text = response.as_numpy("text_output")
    if text is None:  # the empty final response
        return
    result.pieces.append(text.reshape(-1)[0].decode("utf-8"))
    result.finish_reason = response.as_numpy("finish_reason").reshape(-1)[0].decode()
    result.num_input_tokens = int(response.as_numpy("num_input_tokens").reshape(-1)[0])
    result.num_output_tokens = int(response.as_numpy("num_output_tokens").reshape(-1)[0])
