"""OnnxRuntimeRunner: the TorchModelRunner interface over the exported decoder graph
(notes/onnx-interface.md) on ONNX Runtime's CPU provider.

K/V handling, with I/O binding throughout (ONNX Runtime reads and writes torch-owned memory):
- The decode batch stays live between steps: when a decode call continues exactly the previous
  decode call (same slots, each one token further), the previous call's present buffers are bound
  as this call's past; nothing is copied outside the graph.
- Otherwise the call's past is packed, left padded, from the per-slot store. A decode call then
  becomes the live batch; a prefill call (several tokens) writes its new K/V to the store and
  leaves the live batch alone: the engine prefills new sequences before each decode pass.
- The live batch's K/V reaches the store lazily: only when a call changes the batch or touches
  one of its slots (`_retire_live`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmserve.export.manifest import check_engine, default_engine_dir
from llmserve.model_runner import validate_batch, validate_token_ids
from llmserve.models.hf_config import eos_token_ids, read_config
from llmserve.runners.kv_store import Arena, SlotStore

MODEL_FILE = "model.onnx"


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("runtime onnxruntime needs the onnxruntime package: install the pinned requirements "
                          "(`make install`)") from None
    return onnxruntime


@dataclass(slots=True)
class LiveDecode:
    """The decode batch whose K/V lives in an arena between steps."""

    slots: list[int]
    lengths: list[int]  # tokens each row holds: the next call's start positions
    pads: np.ndarray  # [B] int64: position p of row b sits at column p + pads[b]
    stored: list[int]  # positions [0, stored[b]) of row b are also in the store
    width: int  # columns of the present tensors
    arena: int  # index of the arena holding them


class OnnxRuntimeRunner:
    """Same interface and attributes as TorchModelRunner; float32 on the CPU only."""

    def __init__(self, model_dir: str | os.PathLike, *, num_slots: int, max_model_len: int | None = None,
                 engine_dir: str | os.PathLike | None = None, num_threads: int | None = None,
                 device: str = "cpu", dtype: str = "float32") -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        if max_model_len is not None and max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {max_model_len}")
        if device != "cpu" or dtype != "float32":
            raise ValueError(f"runtime onnxruntime runs float32 on the CPU, not {dtype} on {device!r} "
                             "(use runtime torch or tensorrt)")
        ort = _import_onnxruntime()
        engine_dir = Path(engine_dir) if engine_dir else default_engine_dir("onnxruntime", model_dir)
        manifest = check_engine("onnxruntime", engine_dir, model_dir, MODEL_FILE)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.engine_dir = engine_dir
        self.vocab_size: int = manifest["vocab_size"]
        self.max_model_len: int = min(max_model_len or manifest["max_positions"], manifest["max_positions"])
        self.num_slots = num_slots
        self.eos_token_ids: list[int] = eos_token_ids(model_dir, read_config(model_dir))
        self._kv_names = manifest["inputs"][3:]
        self._present_names = manifest["outputs"][1:]
        self._kv_shape = (manifest["num_kv_heads"], manifest["head_dim"])
        self.session = ort.InferenceSession(str(engine_dir / MODEL_FILE), _session_options(ort, num_threads),
                                            providers=["CPUExecutionProvider"])
        n = len(self._kv_names)
        self.store = SlotStore(num_tensors=n, num_slots=num_slots, num_kv_heads=self._kv_shape[0],
                               max_len=self.max_model_len, head_dim=self._kv_shape[1])
        self.kv_cache_bytes: int = self.store.nbytes
        # 0 and 1: the live decode batch's past/present, alternating; 2 and 3: other calls.
        self._arenas = [Arena(n) for _ in range(4)]
        self._live: LiveDecode | None = None

    @torch.inference_mode()
    def forward(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]],
                start_positions: Sequence[int]) -> torch.Tensor:
        """See TorchModelRunner.forward: same contract, same errors."""
        validate_batch(slots, token_ids, start_positions, num_slots=self.num_slots, max_model_len=self.max_model_len)
        slots, starts = list(slots), list(start_positions)
        lens = [len(tokens) for tokens in token_ids]
        T = max(lens)
        ids = torch.tensor([[*[0] * (T - len(t)), *t] for t in token_ids] if min(lens) != T else token_ids)
        validate_token_ids(ids, self.vocab_size)
        live = self._live
        if T == 1 and live is not None and live.slots == slots and live.lengths == starts:
            return self._continue_live(live, ids)
        if live is not None and (T == 1 or not set(live.slots).isdisjoint(slots)):
            self._retire_live()
        return self._run_packed(slots, ids, starts, lens)

    def _continue_live(self, live: LiveDecode, ids: torch.Tensor) -> torch.Tensor:
        B, W = len(live.slots), live.width
        past = self._arenas[live.arena].views((B, *self._kv_head_shape(W)))
        present = self._arenas[1 - live.arena].views((B, *self._kv_head_shape(W + 1)))
        mask = (np.arange(W + 1) >= live.pads[:, None]).astype(np.int64)
        positions = torch.tensor(live.lengths).unsqueeze(1)
        logits = self._run(ids, positions, torch.from_numpy(mask), past, present)
        live.lengths = [n + 1 for n in live.lengths]
        live.width, live.arena = W + 1, 1 - live.arena
        return logits

    def _run_packed(self, slots: list[int], ids: torch.Tensor, starts: list[int], lens: list[int]) -> torch.Tensor:
        B, T = ids.shape
        P = max(starts)
        decode = T == 1  # becomes the live batch
        first = 0 if decode else 2
        past = self._arenas[first].views((B, *self._kv_head_shape(P)))
        present = self._arenas[first + 1].views((B, *self._kv_head_shape(P + T)))
        self.store.gather(past, slots, starts)
        # Left padding: row b's past ends at column P, its new tokens end at column P + T.
        mask = torch.zeros(B, P + T, dtype=torch.int64)
        positions = torch.zeros(B, T, dtype=torch.int64)
        for b, (start, n) in enumerate(zip(starts, lens)):
            mask[b, P - start:P] = 1
            mask[b, P + T - n:] = 1
            positions[b, T - n:] = torch.arange(start, start + n)
        logits = self._run(ids, positions, mask, past, present)
        if decode:
            pads = np.array([P - s for s in starts], dtype=np.int64)
            self._live = LiveDecode(slots, [s + 1 for s in starts], pads, list(starts), P + 1, first + 1)
        else:
            self.store.scatter(present, slots, starts, lens, [P + T - n for n in lens])
        return logits

    def _retire_live(self) -> None:
        """Write the live batch's K/V the store lacks, then forget the live batch."""
        live, self._live = self._live, None
        B = len(live.slots)
        present = self._arenas[live.arena].views((B, *self._kv_head_shape(live.width)))
        counts = [n - s for n, s in zip(live.lengths, live.stored)]
        columns = [s + int(pad) for s, pad in zip(live.stored, live.pads)]
        self.store.scatter(present, live.slots, live.stored, counts, columns)

    def _kv_head_shape(self, width: int) -> tuple[int, int, int]:
        heads, head_dim = self._kv_shape
        return heads, width, head_dim

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor],
             present: list[torch.Tensor]) -> torch.Tensor:
        logits = torch.empty(ids.shape[0], self.vocab_size)
        binding = self.session.io_binding()
        for name, tensor in (("input_ids", ids), ("position_ids", positions), ("attention_mask", mask),
                             *zip(self._kv_names, past)):
            binding.bind_input(name, "cpu", 0, _NUMPY_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        for name, tensor in (("logits", logits), *zip(self._present_names, present)):
            binding.bind_output(name, "cpu", 0, np.float32, tuple(tensor.shape), tensor.data_ptr())
        self.session.run_with_iobinding(binding)
        return logits


_NUMPY_TYPES = {torch.int64: np.int64, torch.float32: np.float32}


def _session_options(ort, num_threads: int | None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one decoder chain: no parallel branches
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = num_threads or 0  # 0 = ONNX Runtime's default (physical cores)
    # Idle pool threads must not spin: the cores are shared with Triton, the other models and clients.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
