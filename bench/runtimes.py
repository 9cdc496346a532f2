"""`python -m bench.runtimes`: the in-process engine on each runtime, side by side (no server).

Same closed-loop load as the bench's engine limit (`engine_limit.run_level`: every request
max_tokens = min_tokens long, the bench's prompts `measure.prompts.BENCH_PROMPTS`), level by
level with the runtimes in turn, several rounds; reports the median output tokens/s and engine
step time per level.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.engine_limit import make_engine, run_level
from llmserve.engine.llm_engine import LLMEngine
from llmserve.paths import DEFAULT_MODEL_DIR
from llmserve.triton.gc_freeze import freeze_startup_objects
from measure.prompts import BENCH_PROMPTS


def measure(engine: LLMEngine, concurrency: int, requests_per_worker: int, max_tokens: int) -> tuple[float, float]:
    """(output tokens/s, ms per engine step) of one level."""
    steps = engine.stats.steps
    start = time.perf_counter()
    records = run_level(engine, BENCH_PROMPTS, concurrency, requests_per_worker, max_tokens)
    seconds = time.perf_counter() - start
    tokens = sum(r.num_output_tokens for r in records)
    return tokens / seconds, seconds * 1e3 / (engine.stats.steps - steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--runtimes", default="torch,onnxruntime")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-worker", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="engine threads (the server uses cores // 2)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    runtimes = args.runtimes.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    engines = {rt: make_engine(args.model_dir, rt, max(levels), args.threads) for rt in runtimes}
    freeze_startup_objects()
    for engine in engines.values():  # warm-up: first-call allocations, ONNX Runtime's arenas
        measure(engine, max(levels), 1, 8)
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for c in levels:
            for rt, engine in engines.items():
                results.setdefault((rt, c), []).append(measure(engine, c, args.requests_per_worker, args.max_tokens))
    base = runtimes[0]
    print(f"threads={args.threads} max_tokens={args.max_tokens} requests/worker={args.requests_per_worker} "
          f"rounds={args.rounds} (median)")
    print(f"| runtime | concurrency | tokens/s | ms/step | vs {base} |")
    print("|---|---:|---:|---:|---:|")
    for c in levels:
        base_tps = statistics.median(t for t, _ in results[(base, c)])
        for rt in runtimes:
            tps = statistics.median(t for t, _ in results[(rt, c)])
            step = statistics.median(s for _, s in results[(rt, c)])
            print(f"| {rt} | {c} | {tps:.0f} | {step:.2f} | {tps / base_tps:.2f}x |")


if __name__ == "__main__":
    main()
