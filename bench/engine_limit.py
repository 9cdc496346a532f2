"""The engine's own limit: the same closed-loop load on an in-process LLMEngine, no server, no transport."""

from __future__ import annotations

import heapq
import random
import statistics
import time

from bench.records import RequestRecord
from llmserve.engine.config import EngineConfig, SamplingParams
from llmserve.engine.llm_engine import LLMEngine
from llmserve.triton.launcher import ensure_compiled_model
from llmserve.triton.settings import server_num_threads


def make_engine(model_dir: str, runtime: str, max_num_seqs: int, threads: int | None = None) -> LLMEngine:
    """The engine as the `llm` model configures it (same runtime; its threads unless `threads`),
    minus the transport. Its compiled model is built first when missing, as `make engine` does."""
    ensure_compiled_model(model_dir, runtime)
    return LLMEngine(EngineConfig(model_dir=model_dir, runtime=runtime, max_num_seqs=max_num_seqs,
                                  num_threads=server_num_threads() if threads is None else threads))


def run_level(engine: LLMEngine, prompts: list[str], concurrency: int, requests_per_worker: int,
              max_tokens: int, transit_s: tuple[float, float] = (0.0, 0.0), seed: int = 0) -> list[RequestRecord]:
    """Closed loop on the engine alone. `transit_s` (low, high): each replacement request reaches
    the engine a uniformly drawn delay after its predecessor's last token, as requests do through a
    server (the load on the engine then arrives staggered); (0, 0) admits it before the next step."""
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens)
    pending = [prompts[i % len(prompts)] for i in range(concurrency * requests_per_worker)]
    pending.reverse()
    live: dict[int, RequestRecord] = {}
    records: list[RequestRecord] = []
    due: list[float] = []  # when each replacement request arrives (a heap)
    draw = random.Random(seed).uniform

    def admit() -> None:
        prompt = pending.pop()
        record = RequestRecord(start=time.perf_counter())
        live[engine.add_request("bench", engine.encode(prompt), params, stream=True).seq_id] = record

    while pending and len(live) < concurrency:
        admit()
    while live or due:
        now = time.perf_counter()
        while due and due[0] <= now:
            heapq.heappop(due)
            admit()
        if not live:
            time.sleep(due[0] - now)
            continue
        for out in engine.step():
            record = live[out.seq_id]
            now = time.perf_counter()
            if out.text:
                record.chunks.append((now, out.num_output_tokens))
            if out.finished:
                record.end, record.num_output_tokens = now, out.num_output_tokens
                records.append(live.pop(out.seq_id))
                if len(due) < len(pending):
                    heapq.heappush(due, now + draw(*transit_s))
    return records


def prefill_ms(engine: LLMEngine, prompt: str, repeats: int = 20) -> float:
    """Median time of the engine step that prefills `prompt` alone and samples its first token (all
    of it: the prefix cache is emptied first)."""
    params = SamplingParams(max_tokens=2)
    times = []
    for _ in range(repeats):
        engine.reset_prefix_cache()
        seq = engine.add_request("prefill", engine.encode(prompt), params)
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
        engine.abort(seq.seq_id)
    return statistics.median(times)
