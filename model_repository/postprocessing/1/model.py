"""postprocessing: decode windows from `llm` -> text pieces (thin adapter over llmserve).

Also where a cancelled ensemble request becomes visible: on Triton 2.51 the
cancellation of an ensemble never reaches the decoupled `llm` step, but the
postprocessing requests the ensemble creates afterwards report it. So each
response of a cancelled request asks `llm` (over BLS) to stop that sequence.
"""

import time
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

from llmserve.engine.tokenizer import load_tokenizer
from llmserve.triton.backend import int_tensor, request_inputs, respond_each, string_tensor
from llmserve.triton.gc_freeze import freeze_startup_objects
from llmserve.triton.packing import OutputInfo, decode_window, token_pieces
from llmserve.triton.settings import resolve_model_dir

_REMEMBERED_SEQUENCES = 4096
# How often a sequence's cancellation is asked: bounds the tokens generated after a cancel
# (docs/notes/engine-and-triton.md).
CANCEL_CHECK_S = 0.01


class TritonPythonModel:
    def initialize(self, args):
        self.decoder = load_tokenizer(resolve_model_dir(args)).backend_tokenizer
        # sequence -> when its cancellation was last asked (inf once it was told to stop), bounded
        self.last_check: OrderedDict[int, float] = OrderedDict()
        freeze_startup_objects()

    def execute(self, requests):
        return respond_each(requests, self._respond)

    def _respond(self, request):
        inputs = request_inputs(request)
        info = OutputInfo.unpack(inputs["output_info"])
        if not info.finish_reason and self._cancelled(request, info.sequence_id):
            self._stop(info.sequence_id)
        token_ids = inputs["token_ids"].reshape(-1).tolist()
        text = decode_window(self.decoder, token_ids, info.prefix_length, info.text_length)
        tensors = [
            string_tensor("text_output", text),
            string_tensor("finish_reason", info.finish_reason),
            int_tensor("num_input_tokens", info.num_input_tokens),
            int_tensor("num_output_tokens", info.num_output_tokens),
        ]
        if "log_probs" in inputs:
            tensors.extend(self._log_prob_tensors(inputs, token_ids, info.prefix_length, text))
        return pb_utils.InferenceResponse(tensors)

    def _log_prob_tensors(self, inputs, token_ids, prefix_length, text):
        """TensorRT-LLM's output_log_probs and cum_log_probs, plus each new token's id and share of the
        text, and its top alternatives (ids, log probabilities, texts; id -1 pads)."""
        new_ids = np.array([token_ids[prefix_length:]], dtype=np.int32)
        pieces = token_pieces(self.decoder, token_ids, prefix_length, text)
        top_ids = inputs["top_ids"][0]  # [new tokens, k]
        top_texts = np.array([[self.decoder.decode([i], skip_special_tokens=False).encode() if i >= 0 else b""
                               for i in row] for row in top_ids.tolist()], dtype=np.object_)
        return [
            pb_utils.Tensor("output_ids", new_ids),
            pb_utils.Tensor("output_log_probs", inputs["log_probs"].reshape(1, -1).astype(np.float32)),
            pb_utils.Tensor("cum_log_probs", inputs["cum_log_prob"].reshape(1, 1).astype(np.float32)),
            pb_utils.Tensor("output_token_texts", np.array([[p.encode() for p in pieces]], dtype=np.object_)
                            .reshape(1, -1)),
            pb_utils.Tensor("top_token_ids", top_ids.reshape(1, *top_ids.shape).astype(np.int32)),
            pb_utils.Tensor("top_log_probs", inputs["top_log_probs"].reshape(1, *top_ids.shape).astype(np.float32)),
            pb_utils.Tensor("top_token_texts", top_texts.reshape(1, *top_ids.shape)),
        ]

    def _cancelled(self, request, sequence_id: int) -> bool:
        """request.is_cancelled() is an IPC to the server: ask at most every CANCEL_CHECK_S per sequence,
        never on its first response (that IPC would delay every first token; a cancel that early is
        seen on the next response), and never again for one already stopped."""
        now = time.monotonic()
        last = self.last_check.get(sequence_id)
        if last is None or now - last < CANCEL_CHECK_S:
            if last is None:
                self._remember(sequence_id, now)
            return False
        self._remember(sequence_id, now)
        return request.is_cancelled()

    def _remember(self, sequence_id: int, checked_at: float) -> None:
        self.last_check[sequence_id] = checked_at
        self.last_check.move_to_end(sequence_id)
        if len(self.last_check) > _REMEMBERED_SEQUENCES:
            self.last_check.popitem(last=False)

    def _stop(self, sequence_id: int) -> None:
        self._remember(sequence_id, float("inf"))
        stop = pb_utils.InferenceRequest(
            model_name="llm", requested_output_names=[],
            inputs=[pb_utils.Tensor("stop", np.array([[True]])),
                    pb_utils.Tensor("sequence_id", np.array([[sequence_id]], dtype=np.uint64))])
        for response in stop.exec(decoupled=True):
            if response.has_error():
                pb_utils.Logger.log_warn(f"stopping sequence {sequence_id}: {response.error().message()}")
