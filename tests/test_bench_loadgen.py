"""The bench's open-loop load generator, goodput and workloads (no server: their arithmetic)."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from bench.goodput import Slo, goodput
from bench.loadgen import poisson_offsets, run_open_loop
from bench.records import RequestRecord
from bench.workloads import closed_loop, distinct, shared_prefix, system_prompt
from measure.prompts import Prompt


def test_poisson_offsets_have_the_rates_mean_gap_and_repeat_with_the_seed():
    offsets = poisson_offsets(4000, 20.0, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 20.0, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20.0, rel=0.1)  # exponential: stdev = mean
    assert poisson_offsets(50, 20.0, seed=1) == offsets[:50]
    assert poisson_offsets(50, 20.0, seed=2) != offsets[:50]
    assert poisson_offsets(3, float("inf"), seed=1) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate"):
        poisson_offsets(3, 0.0, seed=1)


def test_open_loop_sends_on_schedule_without_waiting_for_answers():
    sent: list[float] = []

    async def slow_request(prompt: Prompt) -> RequestRecord:
        loop = asyncio.get_running_loop()
        sent.append(loop.time())
        await asyncio.sleep(0.5)  # every answer takes longer than the whole schedule
        return RequestRecord(start=sent[-1], end=loop.time())

    async def run():
        loop = asyncio.get_running_loop()
        start = loop.time()
        records = await run_open_loop(slow_request, [Prompt("p", 4)] * 20, rate=100.0, seed=3)
        return start, loop.time(), records

    start, end, records = asyncio.run(run())
    expected = poisson_offsets(20, 100.0, seed=3)
    assert len(records) == 20
    # Each send on time, within what a busy 2-core machine delays an event loop.
    assert all(abs((at - start) - want) < 0.1 for at, want in zip(sent, expected))
    assert end - start < expected[-1] + 0.5 + 0.3  # the answers overlapped


def _record(ttft_ms: float, gaps_ms: list[float], error: str | None = None, start: float = 0.0) -> RequestRecord:
    record = RequestRecord(start=start, error=error)
    at = start + ttft_ms / 1e3
    record.chunks.append((at, 1))
    for i, gap in enumerate(gaps_ms, start=2):
        at += gap / 1e3
        record.chunks.append((at, i))
    record.end = at
    record.num_output_tokens = len(record.chunks)
    return record


def test_a_request_meets_the_slo_by_its_ttft_and_its_own_itl_p95():
    slo = Slo(ttft_ms=200, itl_ms=50)
    assert slo.met_by(_record(150, [10] * 40))
    assert not slo.met_by(_record(250, [10] * 40))  # TTFT
    assert not slo.met_by(_record(150, [10] * 30 + [80] * 10))  # its ITL p95
    assert slo.met_by(_record(150, [10] * 39 + [80]))  # one slow gap in 40 is within the p95
    assert slo.met_by(_record(150, []))  # one chunk: no gap to miss
    assert not slo.met_by(_record(150, [10], error="HTTP 500"))


def test_goodput_counts_the_requests_that_met_it_per_second():
    records = [_record(100, [10] * 9), _record(300, [10] * 9, start=0.5), _record(100, [10] * 9, start=1.81)]
    # The run: 0 (the first send) .. 2.0 s (the last end); two of the three met the SLO.
    assert goodput(records, Slo()) == pytest.approx(2 / 2.0)
    assert goodput([], Slo()) == 0.0


def test_slo_parse_names_what_is_wrong():
    assert Slo.parse("ttft:100,itl:20") == Slo(100, 20)
    assert Slo.parse("itl:30") == Slo(200, 30)
    with pytest.raises(ValueError, match="tpot:5"):
        Slo.parse("tpot:5")
    with pytest.raises(ValueError, match="> 0"):
        Slo.parse("ttft:0")


def test_workloads_are_seeded_distinct_and_share_what_they_say():
    a, b = distinct(120, seed=7), distinct(120, seed=7)
    assert a.prompts == b.prompts and distinct(120, seed=8).prompts != a.prompts
    assert len({p.text for p in a.prompts}) == 120
    assert 16 <= min(p.max_tokens for p in a.prompts) and max(p.max_tokens for p in a.prompts) <= 256
    lengths = sorted(len(p.text) for p in a.prompts)
    assert lengths[len(lengths) // 10] < 150 < lengths[-len(lengths) // 10]  # short and long ones
    shared = shared_prefix(50, seed=7)
    prefix = system_prompt(7)
    assert len({p.text for p in shared.prompts}) == 50
    assert all(p.text.startswith(prefix) and len(p.text) < 1.5 * len(prefix) for p in shared.prompts)
    loop = closed_loop(40, 64)
    assert len({p.text for p in loop.prompts}) == 16 and {p.max_tokens for p in loop.prompts} == {64}
