"""`python -m bench.decode_step`: one decode step of the ONNX Runtime runner, in-place decode graph
(`decode.onnx`) against the past/present graph (the same compiled model without it), side by side
in one run, over batch sizes and context lengths.

Each cell prefills `batch` slots with `context` tokens, then times `--steps` decode steps of the
whole batch (after one untimed step). Output: a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from llmserve.engine.config import DEFAULT_MAX_NUM_SEQS, EngineConfig
from llmserve.paths import DEFAULT_MODEL_DIR


def _levels(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def step_ms(runner, batch: int, context: int, steps: int) -> float:
    """Milliseconds per decode step of `batch` sequences holding `context` tokens."""
    slots = list(range(batch))
    for slot in slots:
        runner.forward([slot], [[5 + slot % 7] * context], [0])
    held = [context] * batch
    runner.forward(slots, [[7]] * batch, held)
    held = [n + 1 for n in held]
    start = time.perf_counter()
    for _ in range(steps):
        runner.forward(slots, [[7]] * batch, held)
        held = [n + 1 for n in held]
    elapsed = (time.perf_counter() - start) / steps
    for slot in slots:
        runner.release(slot)
    return elapsed * 1e3


def main(argv: list[str] | None = None) -> None:
    from llmserve.runners import compiled_dir_of, create_runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--batch", default="1,8,32,64", help="batch sizes (comma-separated)")
    parser.add_argument("--context", default="32,128,384,640", help="tokens each sequence holds")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args(argv)
    batches, contexts = _levels(args.batch), _levels(args.context)
    config = EngineConfig(model_dir=args.model_dir, max_num_seqs=max(max(batches), DEFAULT_MAX_NUM_SEQS))
    compiled = compiled_dir_of(config)
    with tempfile.TemporaryDirectory() as scratch:
        past_present = Path(scratch) / "compiled"
        shutil.copytree(compiled, past_present, ignore=shutil.ignore_patterns("decode.onnx"))
        runners = {
            "in-place": create_runner(config, num_threads=args.num_threads),
            "past/present": create_runner(EngineConfig(model_dir=args.model_dir, max_num_seqs=config.max_num_seqs,
                                                       compiled_dir=str(past_present)), num_threads=args.num_threads),
        }
        if runners["in-place"]._in_place is None:
            raise SystemExit(f"{compiled} has no decode.onnx: rebuild it (`make engine`)")
        print("| batch | context | in-place ms/step | past/present ms/step | past/present / in-place |")
        print("|---:|---:|---:|---:|---:|")
        for batch in batches:
            for context in contexts:
                times = {name: step_ms(runner, batch, context, args.steps) for name, runner in runners.items()}
                print(f"| {batch} | {context} | {times['in-place']:.2f} | {times['past/present']:.2f} | "
                      f"{times['past/present'] / times['in-place']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
