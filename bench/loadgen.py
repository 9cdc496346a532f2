"""The load generators: closed loop (N workers, each sending its next request when the last one
ends) and open loop (requests sent at Poisson arrivals of a given rate, whatever the server does:
vLLM `bench serve`'s `--request-rate`)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable

from bench.records import RequestRecord
from measure.prompts import Prompt

RequestFn = Callable[[str], Awaitable[RequestRecord]]
PromptRequestFn = Callable[[Prompt], Awaitable[RequestRecord]]


async def run_level(request: RequestFn, prompts: list[str], concurrency: int,
                    requests_per_worker: int) -> list[RequestRecord]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(concurrency * requests_per_worker):
        queue.put_nowait(prompts[i % len(prompts)])
    records: list[RequestRecord] = []

    async def worker() -> None:
        while not queue.empty():
            records.append(await request(queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def poisson_offsets(count: int, rate: float, seed: int) -> list[float]:
    """When each of `count` requests is sent, in seconds from the first (which goes at 0): exponential
    gaps of mean 1/rate; all at 0 for an infinite rate."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, at = [], 0.0
    for _ in range(count):
        offsets.append(at)
        at += rng.expovariate(rate)
    return offsets


async def run_open_loop(request: PromptRequestFn, prompts: list[Prompt], rate: float,
                        seed: int = 0) -> list[RequestRecord]:
    """Send `prompts` in order at Poisson arrivals of `rate` requests/s; every request runs on its own
    (none waits for another), so a server slower than the rate builds a queue, as under real traffic."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for prompt, offset in zip(prompts, poisson_offsets(len(prompts), rate, seed)):
        delay = start + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(request(prompt)))
    return list(await asyncio.gather(*tasks))
