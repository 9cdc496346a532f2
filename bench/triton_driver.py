"""Load against this server: the ensemble over gRPC streaming, through the project's AsyncClient."""

from __future__ import annotations

import time

from bench.records import RequestRecord
from client import AsyncClient


async def triton_request(client: AsyncClient, prompt: str, max_tokens: int, min_tokens: int) -> RequestRecord:
    record = RequestRecord(start=time.perf_counter())
    try:
        async for chunk in client.stream(prompt, max_tokens=max_tokens, min_tokens=min_tokens):
            if chunk.text:
                record.chunks.append((time.perf_counter(), chunk.num_output_tokens))
            record.num_output_tokens = chunk.num_output_tokens
    except Exception as exc:  # recorded, counted as an error in the summary
        record.error = f"{type(exc).__name__}: {exc}"
    record.end = time.perf_counter()
    return record
