"""The engine: in-flight batching over KV-cache slots, one step = schedule -> run -> sample -> postprocess.

- `config`: EngineConfig (sizing) and SamplingParams (per request), validated on construction
- `sequence`, `scheduler`, `slots` (slot allocation), `prefix_cache`, `prefill` (prefill pass grouping)
- `sampler`: penalties, banned tokens, greedy or seeded sampling
- the text side: `tokenizer`, `detokenizer` (incremental), `stop_strings`, `output_buffer`
- `llm_engine`: LLMEngine, the step; `loop`: EngineLoop, the engine on its own thread for a server

No transport here: the Triton side (`llmserve.triton`) and the front end (`llmserve.gateway`) use it.
"""

from llmserve.engine.config import EngineConfig, SamplingParams

__all__ = ["EngineConfig", "SamplingParams", "LLMEngine", "RequestOutput", "EngineLoop"]


def __getattr__(name: str):
    # LLMEngine and EngineLoop import torch: only when asked for, so `llmserve.engine.config` stays light.
    if name in ("LLMEngine", "RequestOutput"):
        from llmserve.engine import llm_engine

        return getattr(llm_engine, name)
    if name == "EngineLoop":
        from llmserve.engine.loop import EngineLoop

        return EngineLoop
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
