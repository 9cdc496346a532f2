"""llmserve: the in-flight batching LLM engine behind the Triton `llm` model.

- `engine`: the engine itself, usable and testable without a server
- `runners`, `models`, `export`: one forward step per runtime, the torch models, the compiled models
- `triton`: what the `model_repository/*/1/model.py` adapters and a tritonserver process need
- `gateway`: the public front end (to come); `paths`: the checkout's layout; `errors`
"""

from llmserve.engine.config import EngineConfig, SamplingParams
from llmserve.errors import InvalidRequestError, OverloadedError

__all__ = ["EngineConfig", "SamplingParams", "InvalidRequestError", "OverloadedError"]
