"""llmserve: the in-flight batching LLM engine behind the Triton `llm` model.

A plain Python package: scheduler, KV-cache slots, model runner, sampler and
incremental detokenizer, usable and testable without a Triton server. The
`model_repository/*/1/model.py` files are thin adapters over it.
"""

from llmserve.engine.config import EngineConfig, SamplingParams
from llmserve.errors import InvalidRequestError, OverloadedError

__all__ = ["EngineConfig", "SamplingParams", "InvalidRequestError", "OverloadedError"]
