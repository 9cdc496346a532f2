"""preprocessing: validate the request, prompt text (or chat messages) -> token ids (thin adapter over llmserve).

It receives every ensemble input, all optional: on Triton 2.51 an ensemble
request that lacks a required input (but has enough others) would otherwise
end with an empty response and no error.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from llmserve.engine.chat_template import render_chat
from llmserve.engine.tokenizer import encode_prompt, load_tokenizer
from llmserve.triton.backend import request_inputs, respond_each
from llmserve.triton.gc_freeze import freeze_startup_objects
from llmserve.triton.parsing import parse_prompt_request
from llmserve.triton.settings import resolve_model_dir

# The ensemble's cancellation never reaches `llm` (Triton 2.51): postprocessing stops it instead,
# so `llm` need not ask Triton about these requests.
_NO_POLLING = np.array([[False]])


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(resolve_model_dir(args))
        freeze_startup_objects()

    def execute(self, requests):
        return respond_each(requests, self._respond)

    def _respond(self, request):
        prompt = parse_prompt_request(request_inputs(request))
        text = prompt.text if prompt.messages is None else render_chat(self.tokenizer, prompt.messages)
        ids = encode_prompt(self.tokenizer, text)
        return pb_utils.InferenceResponse([pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32)),
                                           pb_utils.Tensor("poll_cancellation", _NO_POLLING)])
