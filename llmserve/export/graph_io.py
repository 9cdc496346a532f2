"""The names of the decoder graph's inputs and outputs (the interface in llmserve/export/graph.py).

Pure Python, no torch: the TensorRT plan builder and the runners name the graph's tensors from
here without importing the model code.
"""

from __future__ import annotations

# The decoder graph's inputs before the past K/V, in order.
DECODER_INPUTS = ["input_ids", "position_ids", "attention_mask"]
# The in-place decode graph's inputs before the past K/V, in order.
IN_PLACE_DECODE_INPUTS = ["input_ids", "position_ids", "seqlens_k", "total_sequence_length"]
# The packed-prefill graph's inputs (it has no past).
PREFILL_INPUTS = ["input_ids", "position_ids", "padded_index", "prompt_mask", "last_index"]
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def _kv_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    """`past_key_values.{i}.key`, `past_key_values.{i}.value`, layer by layer: the K/V inputs."""
    return _kv_names(PAST_PREFIX, num_layers)


def present_names(num_layers: int) -> list[str]:
    """`present.{i}.key`, `present.{i}.value`, layer by layer: the K/V outputs."""
    return _kv_names(PRESENT_PREFIX, num_layers)


def is_past_name(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


def input_names(num_layers: int) -> list[str]:
    return [*DECODER_INPUTS, *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]
