"""Reading HF checkpoints (safetensors, sharded or not, or pytorch_model.bin) into modules."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


def _shard_files(model_dir: Path, index_name: str) -> list[Path]:
    weight_map = json.loads((model_dir / index_name).read_text())["weight_map"]
    return [model_dir / name for name in dict.fromkeys(weight_map.values())]


def load_checkpoint(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint, on CPU, keyed by their checkpoint names."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").is_file():
        return load_file(model_dir / "model.safetensors")
    if (model_dir / "model.safetensors.index.json").is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in _shard_files(model_dir, "model.safetensors.index.json"):
            tensors.update(load_file(shard))
        return tensors
    if (model_dir / "pytorch_model.bin").is_file():
        bin_files = [model_dir / "pytorch_model.bin"]
    elif (model_dir / "pytorch_model.bin.index.json").is_file():
        bin_files = _shard_files(model_dir, "pytorch_model.bin.index.json")
    else:
        raise FileNotFoundError(
            f"no weights in {model_dir}: expected model.safetensors, model.safetensors.index.json "
            "or pytorch_model.bin"
        )
    tensors = {}
    for path in bin_files:
        tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    return tensors


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop the base-model prefix (`model.`, `transformer.`) where present; other keys are kept."""
    return {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}


def assign_parameters(module: nn.Module, tensors: dict[str, torch.Tensor],
                      ignore_suffixes: Iterable[str] = ()) -> None:
    """Copy `tensors` into the module's parameters (converting dtype/device); strict on names and shapes.

    Keys ending in one of `ignore_suffixes` (non-weight buffers some checkpoints carry) are skipped.
    """
    ignore = tuple(ignore_suffixes)
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(n for n in set(tensors) - set(params) if not n.endswith(ignore))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    with torch.no_grad():
        for name, param in params.items():
            tensor = tensors[name]
            if tensor.shape != param.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} "
                                 f"!= model shape {tuple(param.shape)}")
            param.copy_(tensor)
