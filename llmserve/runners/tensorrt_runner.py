"""TensorRTRunner: the `Runner` (llmserve/runners/base.py) over a TensorRT plan of the decoder graph
(llmserve/export/graph.py), built by `make engine RUNTIME=tensorrt` (llmserve.export.tensorrt_build).

Same K/V handling as the ONNX Runtime runner (`PastPresentRunner`: a live decode batch whose
present becomes the next past, a per-slot store for everything else), with every buffer a torch
CUDA tensor: the store, the arenas and the logits live on the GPU, TensorRT reads and writes them
in place (`set_tensor_address`) and runs on torch's current stream (`execute_async_v3`), so the
packing kernels before it and the sampler after it are ordered with it without a sync.

One execution context per optimization profile: 0 "decode" (one token per row, up to
max_batch_size rows), 1 "prefill" (up to max_prefill_batch rows of up to max_num_tokens tokens).
Larger prefill calls run in parts (`PastPresentRunner.max_prefill_rows` / `max_prefill_tokens`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llmserve.export.graph_io import DECODER_INPUTS, past_names, present_names
from llmserve.export.manifest import build_command, check_compiled_model
from llmserve.export.tensorrt_env import PLAN_FILE, GpuInfo, current_gpu, import_tensorrt, plan_mismatch
from llmserve.models.hf_config import eos_token_ids, read_config
from llmserve.runners.base import capped_model_len, check_sizes
from llmserve.runners.past_present import PastPresentRunner

DECODE, PREFILL = 0, 1  # optimization profile indices (tensorrt_build.profile_shapes' order)


class TensorRTRunner(PastPresentRunner):
    """A `Runner` on the TensorRT plan in `compiled_dir`; the plan's precision was chosen at build
    time, its inputs, outputs and K/V are float32 (`dtype`)."""

    min_past = 1  # one masked zero column rather than a zero-size profile dimension

    def __init__(self, model_dir: str | os.PathLike, *, num_slots: int, compiled_dir: str | os.PathLike,
                 max_model_len: int | None = None, device: str = "cuda", dtype: str = "float32") -> None:
        check_sizes(num_slots, max_model_len)
        trt = import_tensorrt()
        index = _cuda_device(device, dtype).index or 0
        gpu = current_gpu(index)
        self.device = torch.device("cuda", index)  # torch.cuda.set_device needs the index
        plan_dir = Path(compiled_dir)
        manifest = _runnable_manifest(trt, gpu, plan_dir, model_dir)
        self.dtype = torch.float32
        self.compiled_dir = plan_dir
        self.precision: str = manifest["precision"]
        self.num_slots = num_slots
        self.max_model_len: int = capped_model_len(max_model_len, manifest["max_model_len"])
        self.eos_token_ids: list[int] = eos_token_ids(model_dir, read_config(model_dir))
        self.max_prefill_rows, self.max_prefill_tokens = _prefill_limits(manifest, plan_dir, num_slots, model_dir)
        self._load_plan(trt, model_dir)
        layout = manifest["layout"]
        self._kv_names = past_names(layout["num_layers"])
        self._present_names = present_names(layout["num_layers"])
        self._input_dtypes = {name: _torch_dtype(trt, self._loaded_plan.get_tensor_dtype(name))
                              for name in DECODER_INPUTS}
        self._init_kv(len(self._kv_names), (layout["num_kv_heads"], layout["head_dim"]), self.device)

    def _load_plan(self, trt, model_dir: str | os.PathLike) -> None:
        """Deserialize the plan, one execution context per profile; the logits' width from it."""
        plan_path = self.compiled_dir / PLAN_FILE
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._loaded_plan = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._loaded_plan is None:
            raise RuntimeError(f"TensorRT could not load {plan_path} (see its log above): rebuild it "
                               f"with `{build_command('tensorrt', model_dir)}`")
        self._contexts = [self._make_context(trt, index) for index in (DECODE, PREFILL)]
        self.vocab_size: int = self._loaded_plan.get_tensor_shape("logits")[1]

    def _make_context(self, trt, profile: int):
        # Memory for the selected profile only (the decode context never holds prefill's scratch).
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        context = (self._loaded_plan.create_execution_context(strategy.ON_PROFILE_CHANGE) if strategy is not None
                   else self._loaded_plan.create_execution_context())
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        stream = torch.cuda.current_stream(self.device)
        if not context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not select optimization profile {profile}")
        stream.synchronize()
        return context

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor],
             present: list[torch.Tensor]) -> torch.Tensor:
        B, T = ids.shape
        context = self._contexts[DECODE if T == 1 else PREFILL]
        inputs = {name: tensor.to(self.device, self._input_dtypes[name]).contiguous()
                  for name, tensor in zip(DECODER_INPUTS, (ids, positions, mask))}
        for name, tensor in (*inputs.items(), *zip(self._kv_names, past)):
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{name} of shape {tuple(tensor.shape)} is outside the plan's "
                                 f"{'decode' if T == 1 else 'prefill'} profile (see {self.compiled_dir}/manifest.json)")
            context.set_tensor_address(name, tensor.data_ptr())
        logits = torch.empty(B, self.vocab_size, device=self.device)
        for name, tensor in (("logits", logits), *zip(self._present_names, present)):
            context.set_tensor_address(name, tensor.data_ptr())
        # Stream-ordered with torch: `inputs` may be freed once enqueued (the caching allocator
        # reuses their memory only for later work on this stream).
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the plan in {self.compiled_dir} (see its log above)")
        return logits


def _cuda_device(device: str, dtype: str) -> torch.device:
    """The CUDA device asked for; ValueError for another device, or for a dtype other than the I/O's."""
    cuda = torch.device(device)
    if cuda.type != "cuda":
        raise ValueError(f"runtime tensorrt runs on a CUDA GPU, not on {device!r}: set device=cuda "
                         f"(LLM_DEVICE=cuda for the server)")
    if dtype != "float32":
        raise ValueError(f"runtime tensorrt takes its precision from the plan (`make engine RUNTIME=tensorrt "
                         f"PRECISION=fp16|fp32|int8|fp8`); its I/O and K/V are float32, not {dtype}")
    return cuda


def _runnable_manifest(trt, gpu: GpuInfo, plan_dir: Path, model_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the plan in `plan_dir`, after checking it was built from these weights, for
    this GPU and TensorRT; FileNotFoundError / ValueError telling how to rebuild it."""
    manifest = check_compiled_model("tensorrt", plan_dir, model_dir, PLAN_FILE)
    if reason := plan_mismatch(manifest, trt_version=trt.__version__, gpu=gpu):
        raise ValueError(f"the TensorRT plan at {plan_dir} cannot run here: {reason}: rebuild it with "
                         f"`{build_command('tensorrt', model_dir)}`")
    return manifest


def _prefill_limits(manifest: dict[str, Any], plan_dir: Path, num_slots: int,
                    model_dir: str | os.PathLike) -> tuple[int, int]:
    """(rows, tokens) of the largest prefill call the plan's prefill profile takes, after checking its
    decode profile takes all `num_slots` sequences."""
    profiles = manifest["profiles"]
    decode_rows = profiles["decode"]["input_ids"][2][0]
    if num_slots > decode_rows:
        # A decode step runs all sequences in one call (the live batch): it cannot be split.
        raise ValueError(f"the TensorRT plan at {plan_dir} decodes at most {decode_rows} sequences per "
                         f"step (built with max_batch_size={manifest['max_batch_size']}), fewer than "
                         f"max_num_seqs={num_slots}: rebuild it with LLM_MAX_NUM_SEQS={num_slots} "
                         f"`{build_command('tensorrt', model_dir)}`, or lower max_num_seqs")
    rows, tokens = profiles["prefill"]["input_ids"][2]
    return rows, tokens


def _torch_dtype(trt, dtype) -> torch.dtype:
    types = {getattr(trt.DataType, name): torch_type for name, torch_type in
             (("INT64", torch.int64), ("INT32", torch.int32), ("FLOAT", torch.float32), ("HALF", torch.float16))}
    try:
        return types[dtype]
    except KeyError:
        raise ValueError(f"the TensorRT plan has an input of type {dtype}, not one of the graph's") from None
