"""llm: the in-flight batching engine as a decoupled Triton model (thin adapter over llmserve).

`execute` parses and hands requests to the engine thread and returns at once;
the engine loop's sender thread sends every response, from one place (`_send`).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from llmserve.config import EngineConfig, server_num_threads
from llmserve.engine import LLMEngine, RequestOutput
from llmserve.engine_loop import EngineLoop
from llmserve.errors import InvalidRequestError
from llmserve.memory import freeze_startup_objects
from llmserve.settings import (DEFAULT_MAX_NUM_SEQS, DEFAULT_RUNTIME, model_parameter, parse_bool,
                               resolve_model_dir)
from llmserve.triton_io import OutputInfo, parse_llm_request
from llmserve.triton_metrics import EngineMetrics
from llmserve.triton_pb import error_response, request_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        def setting(key, default, kind=str):
            value = model_parameter(args, key, "")
            return kind(value) if value else default

        config = EngineConfig(
            model_dir=resolve_model_dir(args),
            runtime=setting("runtime", DEFAULT_RUNTIME),
            engine_dir=setting("engine_dir", None),
            device=setting("device", "cpu"),
            dtype=setting("dtype", "float32"),
            max_num_seqs=setting("max_num_seqs", DEFAULT_MAX_NUM_SEQS, int),
            max_model_len=setting("max_model_len", None, int),
            max_num_batched_tokens=setting("max_num_batched_tokens", 2048, int),
            max_queued_requests=setting("max_queued_requests", 256, int),
            num_threads=setting("num_threads", server_num_threads(), int),
            prefill_num_threads=setting("prefill_num_threads", None, int),
            max_stream_responses_per_s=setting("max_stream_responses_per_s", None, float),
            enable_prefix_caching=setting("enable_prefix_caching", True,
                                          lambda value: parse_bool("enable_prefix_caching", value)),
        )
        self.engine = LLMEngine(config)
        self.metrics = EngineMetrics({"model": args["model_name"]})
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
        info = OutputInfo(out.prefix_length, out.text_length, out.num_input_tokens, out.num_output_tokens,
                          out.seq_id, out.finish_reason or "")
        response = pb_utils.InferenceResponse([
            pb_utils.Tensor("token_ids", np.array([out.token_ids], dtype=np.int32).reshape(1, -1)),
            pb_utils.Tensor("output_info", info.pack()),
        ])
        sender.send(response, flags=FINAL if out.finished else 0)

    def _fail(self, sender, exc):
        sender.send(error_response(exc), flags=FINAL)

    def finalize(self):
        self.loop.shutdown()
