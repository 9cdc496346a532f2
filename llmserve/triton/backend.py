"""Helpers shared by the model.py adapters; imported only inside the Python backend stub."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from llmserve.errors import InvalidRequestError, OverloadedError


def request_inputs(request) -> dict[str, np.ndarray]:
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}


def error_response(exc: Exception):
    """An error response whose text says what kind it is: a streamed error reaches gRPC clients
    without its status code, and clients type it from the text ("invalid request", "overloaded")."""
    if isinstance(exc, InvalidRequestError):
        code, message = pb_utils.TritonError.INVALID_ARG, f"invalid request: {exc}"
    elif isinstance(exc, OverloadedError):
        code, message = pb_utils.TritonError.UNAVAILABLE, str(exc)
    else:
        code, message = pb_utils.TritonError.INTERNAL, f"{type(exc).__name__}: {exc}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def respond_each(requests, respond) -> list:
    """`respond(request)` for each request of a non-decoupled model's `execute`; a request whose
    `respond` raises gets its error response, and the others are answered all the same."""
    responses = []
    for request in requests:
        try:
            responses.append(respond(request))
        except Exception as exc:
            responses.append(error_response(exc))
    return responses


def string_tensor(name: str, value: str | bytes):
    data = value.encode("utf-8") if isinstance(value, str) else value
    return pb_utils.Tensor(name, np.array([[data]], dtype=np.object_))


def int_tensor(name: str, value: int, dtype=np.int32):
    return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))
