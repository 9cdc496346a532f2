"""Runners: one batched forward step over a slot KV cache, per runtime (EngineConfig.runtime).

Every runner has TorchModelRunner's interface: `forward(slots, token_ids, start_positions)` ->
float32 logits [B, vocab], `release(slot)` (the engine is done with that slot's K/V),
`copy_prefix(source, destination, length)` (the prefix cache), and attributes vocab_size,
max_model_len, num_slots, eos_token_ids, kv_cache_bytes, device, dtype, packs_prefill (whether
ragged prompts go in one unpadded pass).
Runtimes other than torch are imported only when chosen.
"""

from __future__ import annotations

from pathlib import Path

from llmserve.config import EngineConfig
from llmserve.export.manifest import REPO_ROOT


def engine_dir_of(config: EngineConfig) -> str | None:
    """config.engine_dir with a relative path taken from the repository root (tritonserver's model
    stubs do not run there); None lets the runner use build/engines/<runtime>/<model folder name>."""
    if config.engine_dir is None:
        return None
    path = Path(config.engine_dir)
    return str(path if path.is_absolute() else REPO_ROOT / path)


def create_runner(config: EngineConfig, *, num_threads: int | None = None):
    """The runner `config.runtime` names; `num_threads` sizes ONNX Runtime's intra-op pool (torch's
    threads are set per call by the engine)."""
    common = dict(num_slots=config.max_num_seqs, max_model_len=config.max_model_len, device=config.device,
                  dtype=config.dtype)
    if config.runtime == "torch":
        from llmserve.model_runner import TorchModelRunner

        return TorchModelRunner(config.model_dir, **common)
    if config.runtime == "onnxruntime":
        from llmserve.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(config.model_dir, engine_dir=engine_dir_of(config), num_threads=num_threads,
                                 **common)
    if config.runtime == "tensorrt":
        from llmserve.runners.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(config.model_dir, engine_dir=engine_dir_of(config), **common)
    raise ValueError(f"no runner for runtime {config.runtime!r}")
