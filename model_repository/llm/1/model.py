"""llm: the in-flight batching engine as a decoupled Triton model (thin adapter over llmserve).

`execute` parses and hands requests to the engine thread and returns at once;
the engine loop's sender thread sends every response, from one place (`_send`).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from llmserve.engine.llm_engine import LLMEngine, RequestOutput
from llmserve.engine.loop import EngineLoop
from llmserve.errors import InvalidRequestError
from llmserve.triton.backend import error_response, request_inputs
from llmserve.triton.gc_freeze import freeze_startup_objects
from llmserve.triton.metrics import EngineMetrics
from llmserve.triton.pacing import ResponseRatePacer
from llmserve.triton.packing import OutputInfo, log_prob_arrays
from llmserve.triton.parsing import parse_llm_request
from llmserve.triton.settings import (engine_config, inter_token_sample_fraction, latency_histograms,
                                      max_stream_responses_per_s)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        rate = max_stream_responses_per_s(args)
        self.engine = LLMEngine(engine_config(args), pacer=ResponseRatePacer(rate) if rate else None)
        self.metrics = EngineMetrics({"model": args["model_name"]}, max_model_len=self.engine.max_model_len,
                                     histograms=latency_histograms(args),
                                     inter_token_sample_fraction=inter_token_sample_fraction(args))
        self.loop = EngineLoop(self.engine, send=self._send, fail=self._fail,
                               is_cancelled=lambda sender: sender.is_cancelled(),
                               after_step=self.metrics.update)
        self.loop.start()
        freeze_startup_objects()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_llm_request(request_inputs(request))
                if parsed.stop:
                    self._stop(request.request_id(), parsed.sequence_id)
                    sender.send(flags=FINAL)
                    continue
                self.loop.submit(sender, request.request_id(), parsed.prompt_ids, parsed.params,
                                 stream=parsed.stream, echo_prompt=parsed.echo_prompt,
                                 poll_cancellation=parsed.poll_cancellation)
            except Exception as exc:
                self._fail(sender, exc)
        return None

    def _stop(self, request_id, sequence_id):
        if sequence_id is not None:
            self.loop.abort_sequence(sequence_id)
        elif request_id:
            self.loop.abort_request(request_id)
        else:
            raise InvalidRequestError("a stop request needs the request id of the request to stop "
                                      "(or a sequence_id)")

    def _send(self, sender, out: RequestOutput):
        tensors = [
            pb_utils.Tensor("token_ids", np.array([out.token_ids], dtype=np.int32).reshape(1, -1)),
            pb_utils.Tensor("output_info", OutputInfo.of(out).pack()),
        ]
        if out.log_probs is not None:  # only when asked: each tensor costs every hop a copy
            tensors.extend(pb_utils.Tensor(name, array) for name, array in log_prob_arrays(out).items())
        response = pb_utils.InferenceResponse(tensors)
        sender.send(response, flags=FINAL if out.finished else 0)

    def _fail(self, sender, exc):
        sender.send(error_response(exc), flags=FINAL)

    def finalize(self):
        self.loop.shutdown()
        self.metrics.close(self.engine)
