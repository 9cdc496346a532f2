"""`python -m bench` (`make bench`): start the servers on free ports, sweep concurrency, write the results.

Order: the in-process engine first (no server running), then this server, then
the naive server, each alone on the machine, all in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from pathlib import Path

from bench import engine_limit, loadgen, report
from bench.metrics import summarize
from bench.prompts import PROMPTS
from llmserve.memory import freeze_startup_objects

REPO_ROOT = Path(__file__).resolve().parents[1]


def _levels(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c]


def run_engine(args, results: dict) -> None:
    engine = engine_limit.make_engine(args.model_dir, max(args.concurrency))
    engine_limit.run_level(engine, PROMPTS, 2, 1, 8)  # warm-up
    results["prefill_ms"] = engine_limit.prefill_ms(engine, PROMPTS[0])
    for c in args.concurrency:
        records = engine_limit.run_level(engine, PROMPTS, c, args.requests_per_worker, args.max_tokens)
        _store(results, "engine", c, summarize(records))


async def _sweep(system: str, request, args, results: dict) -> None:
    await loadgen.run_level(request, PROMPTS, 2, 1)  # warm-up
    for c in args.concurrency:
        records = await loadgen.run_level(request, PROMPTS, c, args.requests_per_worker)
        _store(results, system, c, summarize(records))


def run_triton(args, results: dict, name: str = "triton", settings: dict[str, str] | None = None) -> None:
    from bench.triton_driver import triton_request
    from client import AsyncClient
    from llmserve.launcher import TritonServer, model_env

    async def main(url: str) -> None:
        async with AsyncClient(url, timeout=600) as client:
            await _sweep(name, lambda p: triton_request(client, p, args.max_tokens, args.max_tokens),
                         args, results)

    env = model_env(args.model_dir, **(settings or {}))
    with TritonServer(env=env, log_path=args.out / f"{name}.log") as server:
        asyncio.run(main(server.grpc_url))


def _variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME:KEY=VALUE,KEY=VALUE -> this server again, with those `llm` settings (LLM_<KEY>)."""
    name, _, assignments = text.partition(":")
    return f"triton[{name}]", dict(a.split("=", 1) for a in assignments.split(",") if a)


def run_naive(args, results: dict) -> None:
    from bench.naive_client import naive_request
    from bench.naive_server import NaiveServer

    with NaiveServer(args.model_dir, log_path=args.out / "naive.log") as server:
        asyncio.run(_sweep("naive", lambda p: naive_request(server.url, p, args.max_tokens, args.max_tokens),
                           args, results))


def _store(results: dict, system: str, concurrency: int, summary: dict) -> None:
    results["systems"].setdefault(system, {})[str(concurrency)] = summary
    tps = summary.get("output_tokens_per_s", float("nan"))
    print(f"  {system:7s} c={concurrency:<3d} {tps:8.1f} tok/s  TTFT p50 {summary.get('ttft_ms_p50', float('nan')):7.1f} ms"
          f"  errors {summary['errors']}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default=str(REPO_ROOT / "build" / "models" / "default"))
    parser.add_argument("--concurrency", type=_levels, default=[1, 4, 16, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=64, help="also min_tokens: every request the same length")
    parser.add_argument("--requests-per-worker", type=int, default=4)
    parser.add_argument("--systems", default="engine,triton,naive")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench")
    parser.add_argument("--variant", type=_variant, action="append", default=[],
                        help="also run this server with other llm settings, side by side: "
                             "NAME:KEY=VALUE,... (e.g. per-step:max_stream_responses_per_s=)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {"model": os.path.relpath(args.model_dir, REPO_ROOT), "cpus": os.cpu_count(),
                   "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "requests_per_worker": args.requests_per_worker, "prompts": PROMPTS},
        "systems": {},
    }
    freeze_startup_objects()  # the load generator's own GC pauses would blur every system's figures
    runners = {"engine": run_engine, "triton": run_triton, "naive": run_naive}
    for system in args.systems.split(","):
        print(f"{system}:", file=sys.stderr, flush=True)
        runners[system](args, results)
    for name, settings in args.variant:
        print(f"{name}:", file=sys.stderr, flush=True)
        run_triton(args, results, name, settings)
    results["ratios"] = report.ratios(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = report.markdown(results)
    (args.out / "results.md").write_text(table)
    report.plot(results, args.out / "results.png")
    print(table)


if __name__ == "__main__":
    main()
