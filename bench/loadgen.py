"""Closed-loop load: `concurrency` workers, each sending its next request when the last one ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from bench.records import RequestRecord

RequestFn = Callable[[str], Awaitable[RequestRecord]]


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
