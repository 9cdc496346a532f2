"""Model definitions for the runner, and `load_model` to build one from a HF model directory."""

from __future__ import annotations

import os
from typing import Any

import torch

from llmserve.engine.config import DTYPES
from llmserve.models.attention import AttentionBatch, SlotKVCache
from llmserve.models.base import DecoderLM
from llmserve.models.gpt2 import GPT2LMHeadModel
from llmserve.models.hf_config import read_config
from llmserve.models.llama import LlamaForCausalLM
from llmserve.models.weights import load_checkpoint

MODEL_TYPES: dict[str, type[DecoderLM]] = {
    "gpt2": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}
# Used only when config.json's model_type is missing or unknown.
_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

# EngineConfig's dtype names (torch's own) -> torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}") from None


def model_type_of(config: dict[str, Any]) -> str:
    """The supported model type a HF config describes; ValueError naming it otherwise."""
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return model_type
    for arch in config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    raise ValueError(
        f"unsupported model_type {model_type!r} (architectures {config.get('architectures')}); "
        f"supported model types: {', '.join(MODEL_TYPES)}"
    )


def load_model(model_dir: str | os.PathLike, *, dtype: str | torch.dtype,
               device: str | torch.device) -> DecoderLM:
    """Build the model described by `model_dir/config.json` and load its weights, in eval mode."""
    config = read_config(model_dir)
    model_type = model_type_of(config)
    config = {**config, "model_type": model_type}  # normalised for configs known only by architecture
    # Built on the meta device so no memory is allocated (or randomly initialised) twice.
    with torch.device("meta"):
        model = MODEL_TYPES[model_type].from_hf_config(config)
    model = model.to(dtype=resolve_dtype(dtype)).to_empty(device=device)
    model.load_weights(load_checkpoint(model_dir))
    return model.eval()


__all__ = ["AttentionBatch", "DecoderLM", "MODEL_TYPES", "SlotKVCache", "load_model", "model_type_of",
           "resolve_dtype"]
