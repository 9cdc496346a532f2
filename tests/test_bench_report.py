"""The bench's ratios and targets, computed from results as `python -m bench` stores them, and
the latency arithmetic behind its figures."""

import numpy as np
import pytest

from bench import report
from bench.metrics import summarize
from bench.records import RequestRecord
from measure.latency import itl_samples, percentile


def _level(tps: float, ttft_p50: float, ttft_p95: float) -> dict:
    return {"output_tokens_per_s": tps, "ttft_ms_p50": ttft_p50, "ttft_ms_p95": ttft_p95, "ttft_ms_p99": ttft_p95,
            "itl_ms_p50": 1.0, "itl_ms_p95": 2.0, "tpot_ms_p50": 1.0, "latency_ms_p50": 10.0,
            "latency_ms_p95": 20.0, "errors": 0}


def _results(systems: dict) -> dict:
    return {"date": "today", "prefill_ms": 0.5, "systems": systems,
            "config": {"model": "m", "cpus": 2, "concurrency": [1, 32], "max_tokens": 64, "requests_per_worker": 4,
                       "min_requests": 32, "repeats": 3, "prompts": ["a"]}}


def test_ratios_and_targets_with_the_llm_direct_floor():
    results = _results({
        "engine": {"1": _level(3000, 0.9, 1.3), "32": _level(12000, 5.0, 6.0)},
        "triton": {"1": _level(2000, 4.0, 6.0), "32": _level(9000, 20.0, 36.0)},
        "naive": {"1": _level(500, 10.0, 30.0), "32": _level(100, 300.0, 600.0)},
        "llm-direct": {"1": _level(2200, 3.0, 5.0), "32": _level(10800, 14.0, 25.0)},
    })
    r = report.ratios(results)
    assert r["vs_naive_c32"] == pytest.approx(90.0)
    assert r["vs_engine_c32"] == pytest.approx(0.75)
    assert r["ttft_c1_minus_prefill_ms"] == pytest.approx(3.5)
    assert r["ttft_p95_c32_over_c1"] == pytest.approx(6.0)
    assert r["llm_direct_vs_engine_c32"] == pytest.approx(0.9)
    assert r["llm_direct_ttft_p95_c32_over_c1"] == pytest.approx(5.0)
    results["ratios"] = r
    table = report.markdown(results)
    assert "| 32 | 90.00 | 0.75 | 0.90 |" in table
    assert "| llm called directly: TTFT p95 at c=32 / at c=1 (floor, no target) | 5.00 | |" in table


def test_ratios_without_the_floor_leave_its_column_out():
    results = _results({
        "engine": {"1": _level(3000, 0.9, 1.3), "32": _level(12000, 5.0, 6.0)},
        "triton": {"1": _level(2000, 4.0, 6.0), "32": {"errors": 128}},  # every request failed: no latencies
    })
    r = report.ratios(results)
    assert "ttft_p95_c32_over_c1" not in r and "llm_direct_vs_engine_c32" not in r
    results["ratios"] = r
    table = report.markdown(results)
    assert "llm called directly" not in table
    assert "| 1 | n/a | 0.67 |" in table


def test_a_level_without_latencies_leaves_its_targets_out():
    results = _results({
        "engine": {"1": _level(3000, 0.9, 1.3), "32": _level(12000, 5.0, 6.0)},
        "triton": {"1": {"errors": 32}, "32": _level(9000, 20.0, 36.0)},
    })
    r = report.ratios(results)
    assert "ttft_c1_minus_prefill_ms" not in r and "ttft_p95_c32_over_c1" not in r
    assert r["vs_engine_c32"] == pytest.approx(0.75)


def test_percentiles_interpolate_as_numpy_does():
    values = [5.0, 1.0, 3.0, 10.0, 2.5, 7.0, 0.0]
    for q in (0, 1, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), abs=1e-12), q
    assert percentile([4.0], 95) == 4.0
    assert np.isnan(percentile([], 50))


def test_itl_is_per_token_and_a_tokenless_text_chunk_is_a_gap_of_one():
    chunks = [(1.0, 1), (1.01, 2), (1.04, 5), (1.05, 5)]  # 3 tokens merged; text released, no token
    assert [round(s, 9) for s in itl_samples(chunks, count_tokenless=True)] == [0.01, 0.01, 0.01, 0.01, 0.01]
    assert [round(s, 9) for s in itl_samples(chunks, count_tokenless=False)] == [0.01, 0.01, 0.01, 0.01]
    record = RequestRecord(start=0.99, end=1.06, chunks=chunks, num_output_tokens=5)
    summary = summarize([[record]])
    assert summary["itl_ms_p50"] == pytest.approx(10.0) and summary["ttft_ms_p50"] == pytest.approx(10.0)


def test_the_front_end_against_the_best_peer_at_each_concurrency():
    results = _results({
        "triton": {"1": _level(2000, 4.0, 6.0), "32": _level(9000, 20.0, 36.0)},
        "gateway": {"1": _level(1800, 5.0, 7.0), "32": _level(8400, 22.0, 40.0)},
        "llama.cpp": {"1": _level(2000, 4.0, 5.0), "32": _level(6000, 30.0, 50.0)},
        "transformers": {"1": _level(300, 12.0, 15.0), "32": _level(7000, 11.0, 90.0)},
        "vllm": {"1": {"errors": 32}, "32": {"errors": 32}},  # failed: not a peer at any level
    })
    results["greedy_text_matches"] = {"gateway": True, "llama.cpp": True, "transformers": False}
    results["unavailable"] = {"vllm-x": "not installable here"}
    r = report.ratios(results)
    c1, c32 = r["per_concurrency"]
    assert (c1["best_peer"], c1["first_token_peer"]) == ("llama.cpp", "llama.cpp")
    assert c1["vs_best_peer"] == pytest.approx(0.9) and c1["ttft_p50_vs_best_peer"] == pytest.approx(1.25)
    assert (c32["best_peer"], c32["first_token_peer"]) == ("transformers", "transformers")
    assert c32["vs_best_peer"] == pytest.approx(1.2) and c32["ttft_p50_vs_best_peer"] == pytest.approx(2.0)
    results["ratios"] = r
    table = report.markdown(results)
    assert "| 1 | llama.cpp | 0.90 | llama.cpp | 1.25 | NO |" in table
    assert "| 32 | transformers | 1.20 | transformers | 2.00 | NO |" in table
    assert "transformers NO" in table and "vllm-x: not run (not installable here)." in table


def test_no_peer_row_without_the_front_end():
    results = _results({"triton": {"1": _level(2000, 4.0, 6.0)}, "llama.cpp": {"1": _level(2000, 4.0, 5.0)}})
    assert all("best_peer" not in row for row in report.ratios(results)["per_concurrency"])
