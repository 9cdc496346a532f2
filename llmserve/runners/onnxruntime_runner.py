"""OnnxRuntimeRunner: the `Runner` (llmserve/runners/base.py) over the exported decoder graph
(llmserve/export/graph.py) on ONNX Runtime's CPU provider.

K/V handling (`PastPresentRunner`, shared with the TensorRT runner): a per-slot store, written
lazily, and a decode batch that runs through the compiled model's in-place decode graph
(`decode.onnx`: llmserve/runners/in_place_decode.py), or, for a compiled model without it, the
live past/present batch of llmserve/runners/past_present.py. Ragged prompts from empty caches run
unpadded, packed end to end, through its packed-prefill graph (`prefill.onnx`, when it has one);
prompts with a cached prefix run through the past/present graph. I/O binding throughout: ONNX Runtime
reads and writes torch-owned memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from llmserve.export.graph_io import DECODER_INPUTS
from llmserve.export.manifest import check_compiled_model
from llmserve.models.attention import packed_layout
from llmserve.models.hf_config import eos_token_ids, read_config
from llmserve.runners.base import capped_model_len, check_sizes, validate_token_ids
from llmserve.runners.past_present import PastPresentRunner

MODEL_FILE = "model.onnx"
_INDEX_TYPES = {torch.int64: np.int64, torch.int32: np.int32}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("runtime onnxruntime needs the onnxruntime package: install the pinned requirements "
                          "(`make install`)") from None
    return onnxruntime


class OnnxRuntimeRunner(PastPresentRunner):
    """A `Runner` on the ONNX export in `compiled_dir`; float32 on the CPU only."""

    def __init__(self, model_dir: str | os.PathLike, *, num_slots: int, compiled_dir: str | os.PathLike,
                 max_model_len: int | None = None, num_threads: int | None = None,
                 device: str = "cpu", dtype: str = "float32") -> None:
        check_sizes(num_slots, max_model_len)
        if device != "cpu" or dtype != "float32":
            raise ValueError(f"runtime onnxruntime runs float32 on the CPU, not {dtype} on {device!r} "
                             "(use runtime torch or tensorrt)")
        ort = _import_onnxruntime()
        compiled_dir = Path(compiled_dir)
        manifest = check_compiled_model("onnxruntime", compiled_dir, model_dir, MODEL_FILE)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.compiled_dir = compiled_dir
        self.vocab_size: int = manifest["vocab_size"]
        self.max_model_len: int = capped_model_len(max_model_len, manifest["max_positions"])
        self.num_slots = num_slots
        self.eos_token_ids: list[int] = eos_token_ids(model_dir, read_config(model_dir))
        self._kv_names = manifest["inputs"][len(DECODER_INPUTS):]
        self._present_names = manifest["outputs"][1:]  # after the logits
        options = _session_options(ort, num_threads)
        self.session = ort.InferenceSession(str(compiled_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        prefill_file = manifest.get("prefill_model")
        self.packs_prefill = bool(prefill_file) and (compiled_dir / prefill_file).is_file()
        self.prefill_session = (ort.InferenceSession(str(compiled_dir / prefill_file), options,
                                                     providers=["CPUExecutionProvider"])
                                if self.packs_prefill else None)
        self._init_kv(len(self._kv_names), (manifest["num_kv_heads"], manifest["head_dim"]))
        decode_file = manifest.get("decode_model")
        self.decode_session = (ort.InferenceSession(str(compiled_dir / decode_file), options,
                                                    providers=["CPUExecutionProvider"])
                               if decode_file and (compiled_dir / decode_file).is_file() else None)
        if self.decode_session is not None:
            self._init_in_place(self.max_model_len)
        # I/O binding through ONNX Runtime's C bindings (the pinned version's `_sess` and
        # `SessionIOBinding`): the Python wrapper re-resolves the device on every bind, which slows
        # each step (docs/notes/runners-and-export.md).
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._graphs = {name: (session._sess, ort.capi.onnxruntime_pybind11_state.SessionIOBinding(session._sess))
                        for name, session in (("decoder", self.session), ("prefill", self.prefill_session),
                                              ("decode", self.decode_session))
                        if session is not None}

    def _execute(self, graph: str, inputs: list[tuple[str, torch.Tensor]], kv_inputs: list[torch.Tensor],
                 logits: torch.Tensor, present: list[torch.Tensor]) -> None:
        """Run one of the graphs on torch-owned memory: int64 or int32 `inputs` by name, then the K/V
        inputs (past, in the manifest's order; none for the prefill graph), into `logits` and
        `present` (the same tensors as past for the in-place decode graph)."""
        session, binding = self._graphs[graph]
        cpu = self._cpu
        for name, tensor in inputs:
            binding.bind_input(name, cpu, _INDEX_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        if kv_inputs:
            shape = tuple(kv_inputs[0].shape)
            for name, tensor in zip(self._kv_names, kv_inputs):
                binding.bind_input(name, cpu, np.float32, shape, tensor.data_ptr())
        binding.bind_output("logits", cpu, np.float32, tuple(logits.shape), logits.data_ptr())
        shape = tuple(present[0].shape)
        for name, tensor in zip(self._present_names, present):
            binding.bind_output(name, cpu, np.float32, shape, tensor.data_ptr())
        session.run_with_iobinding(binding, None)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor],
             present: list[torch.Tensor]) -> torch.Tensor:
        logits = torch.empty(ids.shape[0], self.vocab_size)
        self._execute("decoder", [("input_ids", ids), ("position_ids", positions), ("attention_mask", mask)],
                      past, logits, present)
        return logits

    def _run_in_place(self, ids: torch.Tensor, positions: torch.Tensor, seqlens_k: torch.Tensor,
                      total_sequence_length: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
        logits = torch.empty(ids.shape[0], self.vocab_size)
        self._execute("decode", [("input_ids", ids), ("position_ids", positions), ("seqlens_k", seqlens_k),
                                 ("total_sequence_length", total_sequence_length)], kv, logits, kv)
        return logits

    def _run_packed_prefill(self, slots: list[int], token_ids: Sequence[Sequence[int]],
                            lens: list[int]) -> torch.Tensor:
        ids = torch.tensor([[t for tokens in token_ids for t in tokens]])
        validate_token_ids(ids, self.vocab_size)
        total = ids.shape[1]
        layout = packed_layout(torch.tensor(lens), total, max(lens))
        logits = torch.empty(len(lens), self.vocab_size)
        present = self._arenas[3].views((1, *self._kv_head_shape(total)))
        self._execute("prefill", [("input_ids", ids), ("position_ids", layout.positions.unsqueeze(0)),
                                  ("padded_index", layout.padded_index), ("prompt_mask", layout.valid.long()),
                                  ("last_index", layout.last_index)], [], logits, present)
        self.store.scatter(present, slots, [0] * len(slots), lens, layout.firsts.tolist(), rows=[0] * len(slots))
        return logits


def _session_options(ort, num_threads: int | None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one decoder chain: no parallel branches
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = num_threads or 0  # 0 = ONNX Runtime's default (physical cores)
    # Idle pool threads must not spin: the cores are shared with Triton, the other models and clients.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
