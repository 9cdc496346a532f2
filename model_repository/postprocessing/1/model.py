"""postprocessing: decode windows from `llm` -> text pieces (thin adapter over llmserve).

Also where a cancelled ensemble request becomes visible: on Triton 2.51 the
cancellation of an ensemble never reaches the decoupled `llm` step, but the
postprocessing requests the ensemble creates afterwards report it. So each
response of a cancelled request asks `llm` (over BLS) to stop that sequence.
"""

from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

from llmserve.detokenizer import decode_window
from llmserve.settings import resolve_model_dir
from llmserve.tokenizer import load_tokenizer
from llmserve.triton_pb import error_response, int_tensor, request_inputs, string_tensor

_REMEMBERED_STOPS = 1024


class TritonPythonModel:
    def initialize(self, args):
        self.decoder = load_tokenizer(resolve_model_dir(args)).backend_tokenizer
        self.stopped: OrderedDict[int, None] = OrderedDict()  # sequences already told to stop

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._respond(request))
            except Exception as exc:
                responses.append(error_response(exc))
        return responses

    def _respond(self, request):
        inputs = request_inputs(request)
        finish_reason = inputs["finish_reason"].reshape(-1)[0]
        if not finish_reason and request.is_cancelled():
            self._stop(int(inputs["sequence_id"].reshape(-1)[0]))
        text = decode_window(self.decoder, inputs["token_ids"].reshape(-1).tolist(),
                             int(inputs["prefix_length"].reshape(-1)[0]),
                             int(inputs["text_length"].reshape(-1)[0]))
        return pb_utils.InferenceResponse([
            string_tensor("text_output", text),
            string_tensor("finish_reason", finish_reason),
            int_tensor("num_input_tokens", int(inputs["num_input_tokens"].reshape(-1)[0])),
            int_tensor("num_output_tokens", int(inputs["num_output_tokens"].reshape(-1)[0])),
        ])

    def _stop(self, sequence_id: int) -> None:
        if sequence_id in self.stopped:
            return
        self.stopped[sequence_id] = None
        if len(self.stopped) > _REMEMBERED_STOPS:
            self.stopped.popitem(last=False)
        stop = pb_utils.InferenceRequest(
            model_name="llm", requested_output_names=[],
            inputs=[pb_utils.Tensor("stop", np.array([[True]])),
                    pb_utils.Tensor("sequence_id", np.array([[sequence_id]], dtype=np.uint64))])
        for response in stop.exec(decoupled=True):
            if response.has_error():
                pb_utils.Logger.log_warn(f"stopping sequence {sequence_id}: {response.error().message()}")
