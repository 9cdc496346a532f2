"""preprocessing: prompt text -> token ids (thin adapter over llmserve)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from llmserve.settings import resolve_model_dir
from llmserve.tokenizer import encode_prompt, load_tokenizer
from llmserve.triton_io import parse_text_input
from llmserve.triton_pb import error_response, request_inputs


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(resolve_model_dir(args))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = encode_prompt(self.tokenizer, parse_text_input(request_inputs(request)))
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32))]))
            except Exception as exc:
                responses.append(error_response(exc))
        return responses
