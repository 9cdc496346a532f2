"""Settings of the Triton models: config.pbtxt `parameters`, overridden by LLM_* environment variables.

The environment wins so that `make serve MODEL_DIR=...` (and two servers side by
side from one checkout) need no edits to the model repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_MODEL_DIR = "build/models/default"  # relative to the repository root
# The llm model's runtime when none is set (config.pbtxt says the same): on CPU the ONNX Runtime
# runner is faster than torch at every concurrency (README "Runtimes"). torch and tensorrt run on GPUs.
DEFAULT_RUNTIME = "onnxruntime"
# The llm model's slots (concurrent sequences) when none is set; config.pbtxt says the same.
DEFAULT_MAX_NUM_SEQS = 64


def model_parameter(args: dict, key: str, default: str = "") -> str:
    """A model's setting: env LLM_<KEY> (set, even empty) > config.pbtxt parameter > default."""
    env = os.environ.get(f"LLM_{key.upper()}")
    if env is not None:
        return env.strip() or default
    params = json.loads(args["model_config"]).get("parameters", {})
    value = params.get(key, {}).get("string_value", "")
    return value if value and not value.startswith("${") else default


def parse_bool(key: str, value: str) -> bool:
    """A boolean setting's text (true/false, 1/0, yes/no, on/off); ValueError naming it otherwise."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"setting {key} must be true or false, got {value!r}")


def resolve_model_dir(args: dict) -> str:
    """The Hugging Face model folder; relative paths are taken from the repository root."""
    configured = model_parameter(args, "model_dir", DEFAULT_MODEL_DIR)
    path = Path(configured)
    if not path.is_absolute():
        # args["model_repository"] is <repo>/model_repository/<model>
        path = Path(args["model_repository"]).resolve().parents[1] / path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing): build the default model with "
                                f"`make model` or point MODEL_DIR at a Hugging Face model folder")
    return str(path)
