"""The Triton side: what the `model_repository/*/1/model.py` adapters and a tritonserver process need.

- `settings`: the models' settings (config.pbtxt parameters, LLM_* environment) -> EngineConfig
- `parsing`: request tensors -> engine parameters; `packing`: the `llm` response's wire format
- `pacing`: how often a streaming sequence's pieces go out; `metrics`: engine stats on Triton's endpoint
- `backend`: helpers that need the Python backend's `pb_utils` (imported only inside its stub)
- `gc_freeze`: start-up objects out of the garbage collector's sight
- `launcher`: find and run tritonserver (`python -m llmserve.triton.launcher`, `TritonServer` for tests)
"""
