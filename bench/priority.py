"""`python -m bench.priority` (`make bench-priority`): high-priority time to first token under
low-priority overload, through a real tritonserver.

One server with few slots (`--max-num-seqs`, 8). Phases, each through the ensemble with the
project's AsyncClient:

1. unloaded: `--requests` high-priority requests (priority 0), one at a time (closed loop);
2. overloaded: `--low-streams` low-priority streams (priority 1, default 4x the slots; long,
   `min_tokens == max_tokens`, each re-issued as soon as it ends) keep every slot busy and a queue
   waiting, while the same high-priority requests run one at a time again;
3. the same overload with every request at priority 0 (`--compare-requests`, few: each waits for
   the queue ahead of it), what a high-priority request would see without priority scheduling.

TTFT is from sending the request to its first chunk. The target: the overloaded high-priority TTFT
p95 within 2x of the unloaded server's. Writes build/bench/priority.{json,md} and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from llmserve.engine.config import DEFAULT_RUNTIME
from llmserve.paths import BUILD_DIR, DEFAULT_MODEL_DIR
from measure.prompts import BENCH_PROMPTS

TARGET_RATIO = 2.0


async def _ttft(client, prompt: str, *, max_tokens: int, priority: int | None) -> tuple[float, int]:
    """(seconds to the first chunk, tokens generated) of one streamed request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async for chunk in client.stream(prompt, max_tokens=max_tokens, min_tokens=max_tokens, priority=priority):
        if first is None:
            first = time.perf_counter() - start
        tokens = chunk.num_output_tokens
    return first if first is not None else time.perf_counter() - start, tokens


async def _closed_loop(client, n: int, max_tokens: int, priority: int | None) -> list[float]:
    ttfts = []
    for i in range(n):
        ttft, _ = await _ttft(client, BENCH_PROMPTS[i % len(BENCH_PROMPTS)], max_tokens=max_tokens, priority=priority)
        ttfts.append(ttft)
    return ttfts


class LowLoad:
    """`n` long streams at `priority`, each re-issued as soon as it ends, until stopped; their TTFTs."""

    def __init__(self, client, n: int, max_tokens: int, priority: int | None) -> None:
        self.client, self.n, self.max_tokens, self.priority = client, n, max_tokens, priority
        self.ttfts: list[float] = []
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task] = []

    async def _worker(self, index: int) -> None:
        i = index
        while True:
            try:
                ttft, _ = await _ttft(self.client, BENCH_PROMPTS[i % len(BENCH_PROMPTS)], max_tokens=self.max_tokens,
                                      priority=self.priority)
                self.ttfts.append(ttft)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (counted and shown)
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
            i += self.n

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.n)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()  # leaving a stream cancels its request on the server
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None}
    ms = np.array(values) * 1e3
    return {"n": len(values), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


async def _wait_saturated(metrics_url: str, num_slots: int, timeout: float = 30.0) -> None:
    """Until every slot is busy and requests wait (the overload has built up)."""
    from llmserve.triton.launcher import metric

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(KeyError, OSError):
            if (metric(metrics_url, "llm_active_sequences") >= num_slots
                    and metric(metrics_url, "llm_waiting_sequences") > 0):
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the low-priority load did not fill the {num_slots} slots within {timeout:g} s")


async def _measure(args, server) -> dict:
    from client import AsyncClient
    from llmserve.triton.launcher import metric

    async with AsyncClient(server.grpc_url, timeout=600) as high, AsyncClient(server.grpc_url, timeout=600) as low:
        await _closed_loop(high, 4, args.high_max_tokens, 0)  # warm-up, unrecorded
        unloaded = await _closed_loop(high, args.requests, args.high_max_tokens, 0)
        phases = {}
        for name, low_priority, n, high_priority in (
                ("priority", 1, args.requests, 0),
                ("no priority", 0, args.compare_requests, 0)):
            if not n:
                continue
            preempted_before = metric(server.metrics_url, "llm_preemptions_total")
            load = LowLoad(low, args.low_streams, args.low_max_tokens, low_priority)
            load.start()
            started = time.monotonic()
            await _wait_saturated(server.metrics_url, args.max_num_seqs)
            high_ttfts = await _closed_loop(high, n, args.high_max_tokens, high_priority)
            await asyncio.sleep(0.5)
            low_ttfts = list(load.ttfts)
            await load.stop()
            phases[name] = {"high": _stats(high_ttfts), "low": _stats(low_ttfts), "low_errors": load.errors[:5],
                            "seconds": time.monotonic() - started,
                            "preemptions": metric(server.metrics_url, "llm_preemptions_total") - preempted_before}
            # Let the cancelled streams leave the engine before the next phase.
            deadline = time.monotonic() + 30
            while metric(server.metrics_url, "llm_active_sequences") > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
    return {"unloaded": _stats(unloaded), **phases}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(result: dict) -> str:
    cfg = result["config"]
    rows = [("high (priority 0), unloaded", result["unloaded"])]
    if "priority" in result:
        rows += [(f"high (priority 0), {cfg['low_streams']} low-priority streams", result["priority"]["high"]),
                 ("low (priority 1) streams, same run", result["priority"]["low"])]
    if "no priority" in result:
        rows += [(f"high without priority (all at 0), {cfg['low_streams']} streams", result["no priority"]["high"]),
                 ("low streams, same run (all at 0)", result["no priority"]["low"])]
    lines = [f"Priority scheduling: {cfg['max_num_seqs']} slots, runtime {cfg['runtime']}, high requests of "
             f"{cfg['high_max_tokens']} tokens one at a time, low streams of {cfg['low_max_tokens']} tokens.", "",
             "| requests | n | TTFT p50 (ms) | TTFT p95 (ms) |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['n']} | {_fmt(s['p50_ms'])} | {_fmt(s['p95_ms'])} |" for name, s in rows]
    lines.append("")
    if "priority" in result:
        lines.append(f"Preemptions: {result['priority']['preemptions']:.0f} (priority run)"
                     + (f", {result['no priority']['preemptions']:.0f} (all at 0)" if "no priority" in result else ""))
        loaded, unloaded = result["priority"]["high"]["p95_ms"], result["unloaded"]["p95_ms"]
        ratio = loaded / unloaded
        met = "met" if ratio <= TARGET_RATIO else "NOT met"
        lines.append(f"Target: high-priority TTFT p95 within {TARGET_RATIO:g}x of the unloaded server's: "
                     f"{loaded:.0f} ms vs {unloaded:.0f} ms = {ratio:.2f}x, {met}.")
        errors = result["priority"]["low_errors"] + result.get("no priority", {}).get("low_errors", [])
        if errors:
            lines.append(f"Low-priority stream errors (first): {errors[0]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.priority", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME)
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the server's KV-cache slots")
    parser.add_argument("--requests", type=int, default=40, help="high-priority requests per phase")
    parser.add_argument("--high-max-tokens", type=int, default=16)
    parser.add_argument("--low-streams", type=int, default=None, help="default: 4x --max-num-seqs")
    parser.add_argument("--low-max-tokens", type=int, default=256)
    parser.add_argument("--compare-requests", type=int, default=5,
                        help="high requests of the same overload with every request at priority 0 (0: skip)")
    parser.add_argument("--out", type=Path, default=BUILD_DIR / "bench")
    args = parser.parse_args(argv)
    args.low_streams = args.low_streams or 4 * args.max_num_seqs
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from llmserve.triton.launcher import TritonServer, model_env

    env = model_env(args.model_dir, runtime=args.runtime, max_num_seqs=args.max_num_seqs,
                    max_queued_requests=max(256, 2 * args.low_streams))
    started = time.monotonic()
    with TritonServer(env=env, log_path=args.out / "priority-server.log") as server:
        result = asyncio.run(_measure(args, server))
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["seconds"] = time.monotonic() - started
    (args.out / "priority.json").write_text(json.dumps(result, indent=2))
    text = report(result)
    (args.out / "priority.md").write_text(text)
    print(text)
    print(f"({result['seconds']:.0f} s; {args.out / 'priority.json'})")


if __name__ == "__main__":
    main()
