"""Reading a HF model directory's `config.json` and `generation_config.json` as plain JSON.

Plain JSON rather than `transformers.AutoConfig`: it accepts both the transformers 4.x
(`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`) spellings without conversion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a HF model directory")
    return json.loads(path.read_text())


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def eos_token_ids(model_dir: str | Path, config: dict[str, Any]) -> list[int]:
    """EOS ids from generation_config.json (which often lists several) then config.json, deduplicated."""
    path = Path(model_dir) / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    ids = _as_id_list(generation.get("eos_token_id")) + _as_id_list(config.get("eos_token_id"))
    return list(dict.fromkeys(ids))


def rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either config spelling."""
    params = config.get("rope_parameters")
    if params:  # transformers 5.x: theta and the scaling type live together
        return float(params.get("rope_theta", 10000.0)), params
    return float(config.get("rope_theta", 10000.0)), config.get("rope_scaling")
