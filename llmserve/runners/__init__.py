"""Runners: one batched forward step over a slot KV cache, per runtime (EngineConfig.runtime).

Every runner is a `Runner` (llmserve/runners/base.py): `forward(slots, token_ids, start_positions)`
-> float32 logits [B, vocab], `release(slot)` (the engine is done with that slot's K/V),
`copy_prefix(source, destination, length)` (the prefix cache), and attributes vocab_size,
max_model_len, num_slots, eos_token_ids, kv_cache_bytes, device, dtype, packs_prefill (whether
ragged prompts go in one unpadded pass).
Runtimes other than torch are imported only when chosen. A runner is handed its compiled model's
folder: where the checkout keeps it is decided here (`compiled_dir_of`), not in the runners.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmserve.engine.config import EngineConfig
from llmserve.paths import from_repo_root

if TYPE_CHECKING:  # the runners import torch: only when one is created
    from llmserve.runners.base import Runner


def compiled_dir_of(config: EngineConfig) -> Path:
    """The compiled model's folder: config.compiled_dir (a relative path from the repository root:
    tritonserver's model stubs do not run there), else where `make engine` builds it."""
    from llmserve.export.manifest import default_compiled_dir

    if config.compiled_dir is None:
        return default_compiled_dir(config.runtime, config.model_dir)
    return from_repo_root(config.compiled_dir)


def create_runner(config: EngineConfig, *, num_threads: int | None = None) -> Runner:
    """The runner `config.runtime` names; `num_threads` sizes ONNX Runtime's intra-op pool (torch's
    threads are set per call by the engine)."""
    common = dict(num_slots=config.max_num_seqs, max_model_len=config.max_model_len, device=config.device,
                  dtype=config.dtype)
    if config.runtime == "torch":
        from llmserve.runners.torch_runner import TorchModelRunner

        return TorchModelRunner(config.model_dir, **common)
    if config.runtime == "onnxruntime":
        from llmserve.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(config.model_dir, compiled_dir=compiled_dir_of(config), num_threads=num_threads,
                                 **common)
    if config.runtime == "tensorrt":
        from llmserve.runners.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(config.model_dir, compiled_dir=compiled_dir_of(config), **common)
    raise ValueError(f"no runner for runtime {config.runtime!r}")
