"""Settings of the Triton models: config.pbtxt `parameters`, overridden by LLM_* environment variables.

The environment wins so that `make serve MODEL_DIR=...` (and two servers side by
side from one checkout) need no edits to the model repository. A setting left
empty takes its default from one place: EngineConfig's fields for the engine's
sizing, the constants here for what only a server sets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from llmserve.engine.config import EngineConfig
from llmserve.paths import DEFAULT_MODEL_DIR

# Streaming responses per second over all sequences (`llmserve.triton.pacing`); a setting of
# "none" sends one per step each.
DEFAULT_MAX_STREAM_RESPONSES_PER_S = 500.0
# The share of inter-token gaps the ITL histogram observes (`llmserve.triton.metrics`): each is an IPC.
DEFAULT_INTER_TOKEN_SAMPLE_FRACTION = 0.0625


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


def server_num_threads(cpus: int | None = None) -> int:
    """Half the cores for the engine's matmuls, the rest for Triton, the other models and clients."""
    return max(1, (cpus or os.cpu_count() or 2) // 2)


def resolve_model_dir(args: dict) -> str:
    """The Hugging Face model folder; relative paths are taken from the repository root."""
    configured = model_parameter(args, "model_dir")
    path = Path(configured) if configured else DEFAULT_MODEL_DIR
    if not path.is_absolute():
        # args["model_repository"] is <repo>/model_repository/<model>
        path = Path(args["model_repository"]).resolve().parents[1] / path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing): build the default model with "
                                f"`make model` or point MODEL_DIR at a Hugging Face model folder")
    return str(path)


def _typed(field: dataclasses.Field, text: str):
    kind = str(field.type)
    if "bool" in kind:
        return parse_bool(field.name, text)
    if "int" in kind:
        return int(text)
    return text


def engine_config(args: dict) -> EngineConfig:
    """The `llm` model's EngineConfig: each EngineConfig field is a setting of the same name; an
    empty one keeps the field's default, but for `num_threads` (half the cores: `server_num_threads`)."""
    values = {}
    for field in dataclasses.fields(EngineConfig):
        if field.name == "model_dir":
            continue
        text = model_parameter(args, field.name)
        if text:
            values[field.name] = _typed(field, text)
    values.setdefault("num_threads", server_num_threads())
    return EngineConfig(model_dir=resolve_model_dir(args), **values)


def max_stream_responses_per_s(args: dict) -> float | None:
    """The `llm` model's streaming budget; None (setting "none") = one response per step each."""
    text = model_parameter(args, "max_stream_responses_per_s")
    if not text:
        return DEFAULT_MAX_STREAM_RESPONSES_PER_S
    return None if text.lower() == "none" else float(text)


def latency_histograms(args: dict) -> bool:
    """The `llm` model's latency and token-count histograms (`llmserve.triton.metrics`); on by default."""
    return parse_bool("latency_histograms", model_parameter(args, "latency_histograms", "true"))


def inter_token_sample_fraction(args: dict) -> float:
    text = model_parameter(args, "inter_token_sample_fraction")
    value = float(text) if text else DEFAULT_INTER_TOKEN_SAMPLE_FRACTION
    if not 0 < value <= 1:  # also refuses nan
        raise ValueError(f"setting inter_token_sample_fraction must be in (0, 1], got {text!r}")
    return value
